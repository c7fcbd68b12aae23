"""DICOM series: a directory of one series' slice files, read as one 3-D volume by SimpleITK (GDCM).

A scanner exports each series as a directory of slices (often without a file suffix). GDCM sorts them by
position, so the volume comes back with the slice spacing and orientation the files record.
"""

from __future__ import annotations

import contextlib
import locale
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from prostate_kernels.data.errors import DataError
from prostate_kernels.data.integrity import captured_stderr, itk_path


@contextlib.contextmanager
def kept_locale() -> Iterator[None]:
    """The process's locale as it was before the block: GDCM's DICOM writer sets it to "C" (measured,
    SimpleITK 2.5), after which Python decodes subprocess output and reads text files as ASCII. Its reader
    left it alone in the same measurement; the library guards its reads all the same."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def series_ids(directory: Path) -> tuple[str, ...]:
    """The DICOM series among the files directly in `directory` (none: ()). GDCM opens every file there,
    so a pipe, socket or device among them is a DataError first (reading one could wait forever)."""
    import SimpleITK as sitk

    name = itk_path(directory)
    for entry in directory.iterdir():
        itk_path(entry)  # GDCM opens every file there
        if not (entry.is_file() or entry.is_dir()):
            raise DataError(entry, "not a regular file (a pipe, socket or device): reading it could wait "
                                   "forever")  # fmt: skip
    with captured_stderr(), kept_locale():  # GDCM warns "No Series were found" there
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(name))


def series_directories(directory: Path) -> list[Path]:
    """`directory` when its files make a DICOM series, else its subdirectories whose files do (a patient's
    export: one directory per series)."""
    if series_ids(directory):
        return [directory]
    return [sub for sub in sorted(directory.iterdir()) if sub.is_dir() and series_ids(sub)]


def read_series(directory: Path):
    """The one DICOM series in `directory` as a SimpleITK image; DataError when it holds none or several
    (naming them: the slices of two series would be mixed)."""
    import SimpleITK as sitk

    ids = series_ids(directory)
    if not ids:
        raise DataError(directory, "is a directory without a DICOM series, expected an image file")
    if len(ids) > 1:
        named = ", ".join(i or "an empty UID" for i in ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise DataError(directory, f"holds {len(ids)} DICOM series ({named}): give a directory of one series")
    with captured_stderr(), kept_locale():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(itk_path(directory), ids[0])
    _check_no_dicom_file_passed_over(directory, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's tags, for its position
    with kept_locale():
        image = reader.Execute()
    _check_slice_positions([reader.GetMetaData(i, POSITION) if reader.HasMetaDataKey(i, POSITION) else None
                            for i in range(len(files))], directory)  # fmt: skip
    return image


POSITION = "0020|0032"  # Image Position (Patient): a slice's first voxel, x\y\z mm


def _check_no_dicom_file_passed_over(directory: Path, series_files: tuple[str, ...]) -> None:
    """DataError naming a file of `directory` that is marked as a DICOM file ("DICM" after its 128-byte
    preamble, as every DICOM Part 10 file is; a DICOMDIR apart) but is not one of the series' files: GDCM
    passes over a file it cannot parse, so a series whose first or last slice was cut short (an
    interrupted copy) or damaged read as a volume one slice short, without a word (630 of 2000 damaged
    variants of a 4-slice series, tools/fuzz_readers.py --kind dicom; a missing middle slice is refused
    for its uneven spacing). Files without the marker (a README, .DS_Store) are not DICOM and left alone."""
    read = {Path(name).name for name in series_files}
    for entry in sorted(directory.iterdir()):
        if entry.name in read or entry.name.upper() == "DICOMDIR" or not entry.is_file():
            continue
        try:
            with open(entry, "rb") as file:
                marked = file.read(132)[128:] == b"DICM"
        except OSError as exc:  # GDCM passed over it too
            raise DataError(
                entry, f"cannot be read ({exc.strerror}), so the series beside it may lack it"
            ) from None
        if marked:
            raise DataError(entry, f"is marked as a DICOM file but GDCM could not read it into the series of "
                                   f"the {len(read)} slice(s) beside it (cut short or damaged?): the volume "
                                   "would lack it; restore or remove it")  # fmt: skip


def _check_slice_positions(positions: list[str | None], directory: Path) -> None:
    """DataError when the series' slices share positions (echoes, b-values or time points of one series)
    or are unevenly spaced (missing slices): GDCM stacks them into one volume all the same, of the wrong
    depth or spacing. Slices that record no position are not checked."""
    recorded = [p for p in positions if p is not None]
    if len(positions) < 2 or len(recorded) < len(positions):
        return
    try:
        points = np.array([[float(v) for v in p.split("\\")] for p in recorded])
    except ValueError:
        points = None
    if points is None or points.shape != (len(positions), 3):
        raise DataError(directory, f"a slice's position {POSITION} is not 3 numbers")
    distinct = len({tuple(p) for p in np.round(points, 3)})
    if distinct < len(positions):  # GDCM then ordered them by file name (measured), not along the normal
        raise DataError(directory, f"holds {len(positions)} slices at {distinct} positions: several images "
                                   "per position (echoes, b-values or time points); give a directory of "
                                   "one of them")  # fmt: skip
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)  # GDCM's order: along the slice normal
    if steps.max() - steps.min() > 0.01 * steps.mean():
        raise DataError(directory, f"its slices are unevenly spaced ({steps.min():.4g} to {steps.max():.4g} "
                                   "mm apart): missing slices?")  # fmt: skip
