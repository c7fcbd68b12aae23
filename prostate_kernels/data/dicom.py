"""DICOM series: a directory of one series' slice files, read as one 3-D volume by SimpleITK (GDCM).

A scanner exports each series as a directory of slices (often without a file suffix). GDCM sorts them by
position, so the volume comes back with the slice spacing and orientation the files record.
"""

from __future__ import annotations

import contextlib
import locale
import os
import struct
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
        if entry.is_file():
            check_file_meta(entry)
    with captured_stderr(), kept_locale():  # GDCM warns "No Series were found" there
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(name))


# A DICOM Part 10 file: a 128-byte preamble, the marker "DICM", then the File Meta group (PS3.10 7.1).
_MARKER, _META_START = b"DICM", 132


def _marked_dicom(file) -> bool:
    """Whether the open binary `file`, read from its start, carries the DICOM marker (leaves the file
    positioned at the File Meta group)."""
    return file.read(_META_START)[_META_START - len(_MARKER) :] == _MARKER


# Value representations (DICOM PS3.5 6.2) whose explicit-VR elements have a 2-byte reserved field and a
# 4-byte length (PS3.5 7.1.2); the other known ones have a 2-byte length.
_FOUR_BYTE_LENGTH = frozenset(vr.encode() for vr in "OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_TWO_BYTE_LENGTH = frozenset(
    vr.encode() for vr in "AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split()
)
_KNOWN_VRS = _FOUR_BYTE_LENGTH | _TWO_BYTE_LENGTH


def check_file_meta(path: Path) -> None:
    """DataError when `path` is a DICOM Part 10 file ("DICM" after its 128-byte preamble) whose File Meta
    group (0002, always explicit-VR little endian: PS3.10 7.1) declares an element running past the end
    of the file. GDCM allocates the declared length before it finds the file too short: one byte of a
    928-byte slice's (0002,0001) length changed to 0xE2000002 made a series read take 7.7 GB and 22 s
    before it refused the slice (measured, SimpleITK 2.5), where a smaller machine kills the process.
    Damaged lengths in the data set after the group cost nothing there (GDCM checks them; measured). Files
    without the marker, and a group whose bytes stop making sense (an unknown VR), are left to GDCM."""
    try:
        with open(path, "rb") as file:
            if not _marked_dicom(file):
                return
            size = os.fstat(file.fileno()).st_size
            for tag, vr, length, end in _file_meta_elements(file, size):
                if end > size:
                    raise DataError(path, f"damaged DICOM file: its File Meta element {tag} {vr} declares a "
                                          f"value of {length} bytes, past the end of the {size}-byte file "
                                          "(GDCM would try to hold it in memory)")  # fmt: skip
    except OSError:
        return  # unreadable: series_ids' and the passed-over check's business, with their own messages


def _file_meta_elements(file, size: int) -> Iterator[tuple[str, str, int, int]]:
    """(tag "(0002,0001)", VR, declared length, where its value would end) of each File Meta element of an
    open Part 10 file of `size` bytes, from _META_START on, until the group ends, an element has an undefined
    length (0xFFFFFFFF) or the bytes are no element (an unknown VR: left to GDCM)."""
    at = _META_START
    while at + 8 <= size:
        file.seek(at)
        head = file.read(12)
        group, element = struct.unpack_from("<HH", head)
        vr = head[4:6]
        if group != 0x0002 or vr not in _KNOWN_VRS:
            return
        if vr in _FOUR_BYTE_LENGTH:
            if len(head) < 12:  # the file ends inside the element's length: nothing declared to allocate
                return
            length, at = struct.unpack_from("<I", head, 8)[0], at + 12
        else:
            length, at = struct.unpack_from("<H", head, 6)[0], at + 8
        if length == 0xFFFFFFFF:
            return
        yield f"({group:04X},{element:04X})", vr.decode(), length, at + length
        at += length


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
                marked = _marked_dicom(file)
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
