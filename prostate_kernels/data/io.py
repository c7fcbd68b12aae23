"""Reading and writing medical volumes through SimpleITK (.mhd/.raw, .nii/.nii.gz, .nrrd, ...).

Arrays are (D, H, W) = (slices, rows, columns); spacing, origin and direction are kept in SimpleITK's
(x, y, z) order, so a written prediction overlays its input exactly in 3D Slicer or ITK-SNAP.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import overload

import numpy as np

from prostate_kernels.data.dicom import check_file_meta, read_series
from prostate_kernels.data.errors import ConfigError, DataError
from prostate_kernels.data.integrity import (
    captured_stderr,
    check_complete,
    check_regular,
    itk_path,
    itk_reason,
)
from prostate_kernels.data.metaimage import check_metaimage_header
from prostate_kernels.data.nifti_nonfinite import check_nifti_finite
from prostate_kernels.data.nrrd import check_nrrd_voxels
from prostate_kernels.safe_files import place_together, staging_errors_named, temporary_path

GEOMETRY_TOLERANCE = 1e-4  # relative, on spacing/origin/direction, when comparing an image with its mask


@dataclass
class Volume:
    array: np.ndarray  # (D, H, W)
    spacing: tuple[float, float, float]  # mm, SimpleITK order (x, y, z)
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major 3x3
    path: Path | None = None

    def like(self, array: np.ndarray) -> Volume:
        """A volume with this one's geometry and another array of the same shape."""
        if tuple(array.shape) != tuple(self.array.shape):
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in array order (D, H, W)."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])


def simpleitk():
    import SimpleITK as sitk  # imported here: `import prostate_kernels` must not need SimpleITK

    return sitk


def to_sitk(volume: Volume, dtype=None):
    """A SimpleITK image of `volume` with its geometry (the array cast to `dtype` when given)."""
    sitk = simpleitk()
    array = volume.array if dtype is None else np.ascontiguousarray(volume.array, dtype=dtype)
    image = sitk.GetImageFromArray(array.astype(np.uint8) if array.dtype == np.bool_ else array)
    image.SetSpacing(tuple(float(v) for v in volume.spacing))
    image.SetOrigin(tuple(float(v) for v in volume.origin))
    image.SetDirection(tuple(float(v) for v in volume.direction))
    return image


def itk_call(action: str, path: Path | None, call):
    """call() with ITK's own stderr captured; a RuntimeError becomes one DataError line naming `path`
    (an image not read from a file has none)."""
    with captured_stderr() as itk_said:  # ITK prints its own complaints there: they go into our message
        try:
            return call()
        except RuntimeError as exc:
            error = exc
    raise DataError(path, f"cannot {action} image ({itk_reason(str(error), itk_said())})") from None


def read_volume(path: str | Path, channel: int | None = None, mask: bool = False) -> Volume:
    """A 3-D scalar image (a file, or a directory of one DICOM series); DataError naming the file for
    anything else (truncated files included).

    A multi-channel image (4-D, x y z channels, as the Decathlon's prostate task stores T2 and ADC; or 3-D
    with vector voxels) gives its channel `channel` (0-based) with the 3-D geometry; without `channel` it
    is a DataError that says to choose one (--channel), or for a mask (`mask`) that a mask is one 3-D
    label map. A 4-D image of one channel is that channel."""
    path = Path(path)
    return _volume(_one_channel(_read_image(path), path, channel, mask), path)


def read_channels(path: str | Path, channels: Sequence[int] | None = None) -> list[Volume]:
    """The channels `channels` of the image at `path` (read once), in that order: one 3-D Volume each, on
    the image's grid (read_volume says which images have channels, and what is refused). None: the image
    itself, which must then have one channel (`[read_volume(path)]`)."""
    path = Path(path)
    if channels is None:
        return [read_volume(path)]
    image = _read_image(path)
    return [_volume(_one_channel(image, path, channel, False), path) for channel in channels]


def _read_image(path: Path):
    """The SimpleITK image at `path` (a file, or a directory of one DICOM series), as stored."""
    if not path.exists():
        raise DataError(path, "file not found")
    sitk = simpleitk()
    if path.is_dir():  # a DICOM series' slices (read_series checks the names)
        return itk_call("read", path, lambda: read_series(path))
    check_regular(path)
    check_file_meta(path)  # a DICOM file's damaged meta element length: GDCM would allocate gigabytes
    check_metaimage_header(path)  # before ITK reads it: a bad NDims ends the process, a pipe waits forever
    check_nrrd_voxels(path)
    check_complete(path)
    name = itk_path(path)
    image = itk_call("read", path, lambda: sitk.ReadImage(name))
    check_nifti_finite(image, path)  # ITK 5 reads a NIfTI file's NaN voxels as 0
    return image


def _volume(image, path: Path) -> Volume:
    """The Volume of a 3-D scalar SimpleITK image read from `path`; DataError for complex or empty ones."""
    array = simpleitk().GetArrayFromImage(image)
    if np.iscomplexobj(array):
        raise DataError(
            path, f"complex voxel values ({image.GetPixelIDTypeAsString()}): expected a real image"
        )
    if min(array.shape) < 1:
        raise DataError(path, f"empty image of size {array.shape}")
    return Volume(
        array, tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()), path
    )


def _one_channel(image, path: Path, channel: int | None, mask: bool):
    """The 3-D scalar image of `image`'s channel `channel` (read_volume says which images have several)."""
    sitk = simpleitk()
    dimension, components = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    if dimension not in (3, 4) or (dimension == 4 and components != 1):
        kind = f"{dimension}-D" + (f" image of {components} components" if components != 1 else " one")
        raise DataError(path, f"expected a 3-D image, got a {kind}")
    channels = image.GetSize()[3] if dimension == 4 else components
    if channels > 1 and channel is None:
        if mask:
            raise DataError(path, f"holds {channels} channels: a mask must be one 3-D label map")
        layout = f"a 4-D image of size {image.GetSize()}" if dimension == 4 else f"{channels} components"
        raise DataError(path, f"holds {channels} channels ({layout}): pass --channel "
                              f"(0 to {channels - 1}) to choose the one to use")  # fmt: skip
    channel = channel or 0
    if not 0 <= channel < channels:
        which = f"channels 0 to {channels - 1}" if channels > 1 else "one channel, 0"
        raise DataError(path, f"--channel {channel} is not one of its channels: it holds {which}")
    if dimension == 4:
        size = list(image.GetSize())
        return sitk.Extract(image, [*size[:3], 0], [0, 0, 0, channel])  # the 4th axis collapsed
    return sitk.VectorIndexSelectionCast(image, channel) if components > 1 else image


def write_volume(volume: Volume, path: str | Path, replace: bool = True) -> Path:
    """Writes `volume` with its geometry (compressed for .gz); creates the parent directory.
    replace=False: DataError, nothing replaced and none of its files left, where one of its files exists
    when it is placed (safe_files.place_together: a file another run wrote since the caller checked).

    Whole or not at all: SimpleITK writes into a hidden staging directory beside `path` under the final
    file names, whose files are then renamed into place, a MetaImage header after its voxel file (so a
    header never points at a missing or partial one). A write that fails or is killed leaves `path` as it
    was; before, an interrupted predict left a truncated segmentation that the rerun refused to replace.
    The staging directory of a killed write is removed by the next predict into that directory
    (safe_files.remove_dead_temporaries).
    """
    sitk = simpleitk()
    path = Path(path)
    itk_path(path)  # before anything is created for it (the staging name beside it is then UTF-8 too)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = to_sitk(volume)
    staging = temporary_path(path)
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed process that had this pid
    with staging_errors_named(path):
        staging.mkdir()
    try:
        staged = staging / path.name
        compress = path.name.endswith(".gz")
        try:
            itk_call("write", path, lambda: sitk.WriteImage(image, str(staged), useCompression=compress))
        except DataError as exc:
            raise _write_failure(exc, path, staged, volume.array.nbytes) from None
        # `path` last: a header is in place only once its voxel file is
        place_together(sorted(staging.iterdir(), key=lambda f: f.name == path.name), path.parent, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _write_failure(error: DataError, path: Path, staged: Path, nbytes: int) -> DataError:
    """ITK's write error about `path`, said of `path` (not of the staging copy that ITK was writing), and
    led by the likely cause when the file system has less room than the voxels take (ITK says only "file
    stream is fail after write" when the disk is full)."""
    problem = error.problem.replace(str(staged), str(path))
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:  # no answer: the message stays ITK's
        return DataError(path, problem)
    if free < nbytes:
        problem = f"no space left on its file system ({free} bytes free, {nbytes} to write): {problem}"
    return DataError(path, problem)


LABEL_MAP_MAX_VALUES = 16  # an image of whole numbers with at most this many values is taken for a mask


def check_image(volume: Volume) -> None:
    """DataError if the intensities cannot be z-scored (NaN or infinite values, constant intensity) or
    are a label mask's: at most LABEL_MAP_MAX_VALUES whole numbers (an 8-bit MR image holds up to 256,
    the real T2 cases of ../shared/data all 256; a mask 2, a multi-label one a few). Segmenting a mask
    gave a mask of nothing, or training learnt to copy one, without a word."""
    array = volume.array
    _check_finite(volume, "image")
    if array.max() == array.min():
        raise DataError(volume.path, f"image has constant intensity {array.min()}: nothing to segment")
    values = _few_whole_values(array, LABEL_MAP_MAX_VALUES)
    if values is not None:
        listed = _some_values(values)
        raise DataError(volume.path, f"holds only {len(values)} different values ({listed}): a label mask, "
                                     "not an MR image; pass the image it was drawn on")  # fmt: skip


def _few_whole_values(array: np.ndarray, most: int) -> np.ndarray | None:
    """The distinct values of `array` (sorted) when there are at most `most` and all are whole numbers,
    else None. A strided sample of ~64k voxels answers "more" for an image without sorting all of it."""
    sample = array.ravel()[:: max(1, array.size // 65536)]
    if len(np.unique(sample)) > most:
        return None
    values = np.unique(array)
    return values if len(values) <= most and bool(np.all(values == np.round(values))) else None


def read_mask(
    path: str | Path, image: Volume | None = None, label: int | Sequence[int] | None = None
) -> Volume:
    """A binary mask (uint8 0/1): voxels equal to `label` (or to any of several labels: the Decathlon's
    prostate zones 1 and 2 make the whole gland), or non-zero when label is None.

    With `image` given, size and geometry must match it. An empty mask is a DataError.
    """
    labels = as_labels(label)
    mask = read_volume(path, mask=True)
    if image is not None:
        check_same_grid(image, mask)
    values = mask.array
    _check_finite(mask, "mask")
    fractional = _fractions(values)
    if fractional.size:
        raise DataError(path, f"holds values that are not whole numbers ({_some_values(fractional)}): "
                              "a label mask holds whole numbers (a probability map, or a mask resampled "
                              "with linear interpolation?)")  # fmt: skip
    if labels is None:
        present = np.unique(values)
        present = present[present != 0]
        if len(present) > 1:
            raise DataError(path, f"mask holds {len(present)} labels ({_some_values(present)}): "
                                  "pass --label to choose the one to use, or several to join")  # fmt: skip
    binary = np.isin(values, labels) if labels is not None else (values != 0)
    if not binary.any():
        what = f"label {', '.join(map(str, labels))}" if labels is not None else "foreground"
        raise DataError(path, f"mask has no {what} voxels (values present: {_some_values(values)})")
    return replace(mask.like(binary.astype(np.uint8)), path=mask.path)


@overload
def as_labels(label: int | Sequence[int]) -> tuple[int, ...]: ...
@overload
def as_labels(label: None) -> None: ...
def as_labels(label: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """--label's value as a tuple of labels (None: every non-zero value); one int is one label."""
    return _int_tuple(label)


@overload
def as_channels(channel: int | Sequence[int]) -> tuple[int, ...]: ...
@overload
def as_channels(channel: None) -> None: ...
def as_channels(channel: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """--channel's value as a tuple of channels (None: a single-channel image); one int is one channel
    (checkpoints before several channels record one int)."""
    return _int_tuple(channel)


def channel_count(channel: int | Sequence[int] | None) -> int:
    """How many image channels a network on --channel `channel` takes (1 without --channel)."""
    return len(as_channels(channel) or (0,))


def check_channels(channels: tuple[int, ...]) -> None:
    """ConfigError unless --channel names one or more different channels >= 0 (train's and predict's)."""
    flag = f"--channel {' '.join(map(str, channels))}"
    if not channels or min(channels) < 0:
        raise ConfigError(f"{flag} must be one or more channels >= 0")
    repeated = sorted({c for c in channels if channels.count(c) > 1})
    if repeated:
        raise ConfigError(f"{flag} names channel {repeated[0]} more than once")


def _int_tuple(value: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    return (int(value),) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)


def check_binary(prediction: Volume) -> None:
    """DataError if a predicted mask holds more than one non-zero value, or one that is not a whole number
    (evaluation scores its non-zero voxels as the gland, which for a probability map, an image or a
    multi-label map means nothing, and a fraction is no label)."""
    values = prediction.array
    _check_finite(prediction, "prediction")
    foreground = values[values != 0]
    if foreground.size and (foreground != foreground.flat[0]).any():
        present = np.unique(foreground)  # sorted, no 0; _some_values of it shows the first ones
        raise DataError(prediction.path, f"holds {present.size} different non-zero values "
                                         f"({_some_values(present)}): a prediction must be a binary mask "
                                         "(0 and one label), not a probability map or an image")  # fmt: skip
    fractional = _fractions(foreground[:1])  # one non-zero value left: a label only if a whole number
    if fractional.size:
        raise DataError(prediction.path, f"its non-zero value {_some_values(fractional)} is not a whole "
                                         "number: a prediction must be a binary mask (0 and one label), "
                                         "not probabilities or a rescaled mask")  # fmt: skip


def _fractions(values: np.ndarray) -> np.ndarray:
    """The voxel values that are not whole numbers (float voxels only; finite: _check_finite first).
    Labels are whole numbers: a fraction means a probability map, or a mask resampled with linear
    interpolation, whose blurred border would otherwise count as labels."""
    return values[values != np.round(values)] if values.dtype.kind == "f" else values[:0]


def _check_finite(volume: Volume, what: str) -> None:
    """DataError if the voxels of `what` (an image, a mask, a prediction) hold NaN or infinite values (in a
    mask NaN was listed as a label: "mask holds 2 labels (1, nan)"); integer voxels always are finite."""
    if volume.array.dtype.kind == "f" and not np.isfinite(volume.array).all():
        raise DataError(volume.path, f"{what} contains NaN or infinite values")


def check_same_grid(image: Volume, mask: Volume, of: str = "image") -> None:
    """DataError (naming `mask`'s file and `image`'s, called `of`: "image", "reference") if they differ in
    size, spacing, origin or direction."""
    other = f"{of} {image.path}" if image.path is not None else f"the {of}"
    if mask.array.shape != image.array.shape:
        raise DataError(mask.path, f"size {_plain(mask.array.shape[::-1])} differs from {other} "
                                   f"size {_plain(image.array.shape[::-1])} (x, y, z)")  # fmt: skip
    for name in ("spacing", "origin", "direction"):
        a, b = np.asarray(getattr(image, name)), np.asarray(getattr(mask, name))
        if not np.allclose(
            a, b, rtol=GEOMETRY_TOLERANCE, atol=GEOMETRY_TOLERANCE * max(1.0, np.abs(a).max())
        ):
            raise DataError(mask.path, f"{name} {_plain(b)} differs from {other} {name} {_plain(a)}")


def _plain(values) -> str:
    """(0.5, 0.5, 3) for numbers of any numpy or Python type, rounded to 4 decimals."""
    return "(" + ", ".join(f"{round(float(v), 4):g}" for v in values) + ")"


def _some_values(array: np.ndarray) -> str:
    values = np.unique(array)
    shown = ", ".join(f"{v.item():g}" for v in values[:8])
    return shown + (", ..." if len(values) > 8 else "")
