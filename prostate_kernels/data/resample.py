"""Resampling volumes to a target spacing and back onto their own grid (SimpleITK's Resample).

Training at a fixed spacing (`train --spacing Z Y X`) resamples images linearly and masks by nearest
neighbour; prediction resamples each input to the checkpoint's spacing and the probabilities back onto
the input's own grid, so the output keeps the input's size, spacing, origin and direction exactly.
Each resampling runs with the grids moved so that the target grid's origin is 0 (a translation of both
grids changes nothing but ITK's arithmetic): ITK maps every voxel through physical points, origin + D x
(index x spacing), and an origin far from 0 rounds that sum away (at 1e16 mm float64 steps are 2 mm, so
every voxel of a 0.6 mm image met the same point and the output was garbage, silently).
Spacings here are in array order (Z, Y, X) mm, as on the command line; Volume keeps SimpleITK's (x, y, z).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from prostate_kernels.data.errors import DataError
from prostate_kernels.data.io import Volume, itk_call, simpleitk, to_sitk

_LARGEST_SIZE = 2**32 - 1  # voxels along one axis: SimpleITK sizes are uint32
TRAINING_HINT = "choose a coarser --spacing (Z Y X, mm)"  # what to do when a resampled grid is too large
PREDICT_HINT = "the network sees voxels of that size (its checkpoint's): is the file's voxel size right?"
_AT_ZERO = (0.0, 0.0, 0.0)  # the origin each resampling runs at (the module's docstring says why)


def resample_to_spacing(
    volume: Volume, spacing_zyx: tuple[float, float, float], nearest: bool = False, hint: str = TRAINING_HINT
) -> Volume:
    """`volume` on a grid of `spacing_zyx` covering the same extent (same origin and direction; each size
    rounded, at least 1). Linear interpolation (float32), or nearest neighbour (masks, dtype kept).
    hint: what the DataError for a grid too large to allocate tells the user to do."""
    sitk = simpleitk()
    target = (float(spacing_zyx[2]), float(spacing_zyx[1]), float(spacing_zyx[0]))  # (x, y, z)
    dtype = volume.array.dtype if nearest else np.float32
    image = to_sitk(replace(volume, origin=_AT_ZERO), dtype)  # the output keeps volume's origin
    size = [
        max(1, int(round(n * s / t)))
        for n, s, t in zip(image.GetSize(), image.GetSpacing(), target, strict=True)
    ]
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = _resample(volume, size, target, np.dtype(dtype).itemsize, hint, lambda: sitk.Resample(
        image, size, sitk.Transform(), interpolator, image.GetOrigin(), target, image.GetDirection(), 0.0,
        image.GetPixelID(),
    ))  # fmt: skip
    return replace(volume, array=sitk.GetArrayFromImage(out), spacing=target)


def resample_image(
    image: Volume, spacing_zyx: tuple[float, float, float], hint: str = TRAINING_HINT
) -> Volume:
    """resample_to_spacing for an image about to be z-scored (linear, float32).

    DataError when the resampled image is constant: a spacing coarser than the image's extent leaves a
    grid of one voxel (or of one value), which has no standard deviation to z-score by; its division by
    zero would give a NaN image and silently empty predictions."""
    out = resample_to_spacing(image, spacing_zyx, hint=hint)
    values = out.array
    if values.max() == values.min():
        raise DataError(
            image.path,
            f"resampled to spacing {_mm(spacing_zyx)} mm (Z Y X) its {_shape(values)} voxels all hold "
            f"{values.flat[0]:.6g}: nothing to segment at that spacing (the image spans "
            f"{_mm(_extent_zyx(image))} mm)",
        )
    return out


def resample_case(
    image: Volume, mask: Volume, spacing_zyx: tuple[float, float, float]
) -> tuple[Volume, Volume]:
    """A training case on the grid of `spacing_zyx`: the image linearly (resample_image), the mask by
    nearest neighbour. DataError when no mask voxel is left: a gland narrower than the spacing can fall
    between the coarse grid's voxel centres, leaving no prostate voxel to centre patches on."""
    out_image = resample_image(image, spacing_zyx)
    out_mask = resample_to_spacing(mask, spacing_zyx, nearest=True)
    if not out_mask.array.any():
        raise DataError(
            mask.path,
            f"resampled to spacing {_mm(spacing_zyx)} mm (Z Y X) no mask voxel is left of its "
            f"{int(np.count_nonzero(mask.array))} (grid of {_shape(out_mask.array)} voxels): choose a finer "
            "--spacing",
        )
    return out_image, out_mask


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _shape(array: np.ndarray) -> str:
    return "x".join(str(n) for n in array.shape)


def _extent_zyx(volume: Volume) -> tuple[float, ...]:
    """(Z, Y, X) mm that the volume's voxels cover."""
    return tuple(n * s for n, s in zip(volume.array.shape, volume.spacing[::-1], strict=True))


def resample_onto(volume: Volume, grid: Volume) -> np.ndarray:
    """`volume`'s values (float32, linear) at the voxel centres of `grid`: an array of grid's shape."""
    sitk = simpleitk()
    empty = Volume(np.zeros(grid.array.shape, np.uint8), grid.spacing, _AT_ZERO, grid.direction)
    reference = to_sitk(empty)
    x, y, z = (float(a - b) for a, b in zip(volume.origin, grid.origin, strict=True))
    moved = replace(volume, origin=(x, y, z))  # volume, translated as grid is to _AT_ZERO
    out = _resample(volume, list(reference.GetSize()), grid.spacing, 4, PREDICT_HINT, lambda: sitk.Resample(
        to_sitk(moved, np.float32), reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    ))  # fmt: skip
    return sitk.GetArrayFromImage(out)


def _resample(volume: Volume, size_xyz: list[int], spacing_xyz, itemsize: int, hint: str, call):
    """call() (a SimpleITK Resample to size_xyz voxels of spacing_xyz mm): ITK's errors become one DataError
    naming the volume's file; an allocation ITK could not make names the size that was asked for, and the
    hint (a --spacing far finer than the image's: 0.001 mm made a 10^14-voxel grid, and ITK's RuntimeError
    ended the command). A size past SimpleITK's uint32 sizes is refused the same way before the call (its
    TypeError ended predict on a file whose slices were 10^9 mm thick)."""
    gib = math.prod(size_xyz) * itemsize / 2**30
    too_large = DataError(
        volume.path,
        f"resampled from spacing {_mm(volume.spacing[::-1])} mm to {_mm(spacing_xyz[::-1])} mm (Z Y X) it "
        f"would have {tuple(size_xyz[::-1])} voxels ({gib:.3g} GiB), more than this machine can allocate: "
        f"{hint}",
    )
    if max(size_xyz) > _LARGEST_SIZE:
        raise too_large
    try:
        return itk_call("resample", volume.path, call)
    except DataError as exc:
        if "allocate" not in str(exc):
            raise
        raise too_large from None
