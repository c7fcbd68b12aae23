"""One voxel-axis orientation for the network: volumes reoriented by permuting and flipping their axes.

A network sees arrays, not millimetres: trained on axial scans, whose (D, H, W) axes run foot-to-head,
front-to-back and right-to-left, it reads a sagittal series (a series acquired in another plane, as
prostate protocols do besides the axial one) with the left-right axis first, and a file written with
another axis convention (nibabel's NIfTI: x toward the right) mirrored. Neither is wrong in the file: the
direction cosines say where each axis points. So `train --orientation CODE` (default LPS) reorients every
case to one orientation first and records CODE in the checkpoint; `predict` reorients each input to the
checkpoint's CODE and the probabilities back onto the input's own voxel grid. Reorienting permutes and
flips whole axes (SimpleITK's DICOMOrient): no voxel value changes and the way back is exact.

Codes are SimpleITK's (DICOMOrientImageFilter): three letters, one of R/L, one of A/P and one of S/I in
any order, naming where the x, y and z voxel axes point. LPS is the identity direction: x toward the
patient's left, y toward the back, z toward the head, i.e. arrays (D, H, W) = (z, y, x) whose slices are
axial. An oblique direction is reoriented to the code nearest to it (the axes stay oblique).

`None` (`train --orientation stored`; checkpoints written before orientations were recorded) keeps the
axes as each file stores them.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from prostate_kernels.data.errors import ConfigError
from prostate_kernels.data.io import Volume, simpleitk, to_sitk

DEFAULT_ORIENTATION = "LPS"
STORED = "stored"  # the command-line word for None: each file's own axes
ORIENTATION_CODES = frozenset(
    "".join(letters[i] for letters, i in zip(axes, flips, strict=True))
    for axes in itertools.permutations(("RL", "AP", "SI"))
    for flips in itertools.product((0, 1), repeat=3)
)  # the 48 codes, upper case: 6 axis orders x 8 sign choices
CODE_RULE = (
    "three letters, one of R/L, one of A/P and one of S/I (LPS: x toward the left, y toward the back, z "
    "toward the head)"
)


def check_orientation(code: object) -> str | None:
    """`code` itself when it is None or one of ORIENTATION_CODES; else a ConfigError naming it."""
    if code is None or (isinstance(code, str) and code in ORIENTATION_CODES):
        return code
    raise ConfigError(f"--orientation {code!r} is not an orientation: {CODE_RULE}, in upper case, or None")


def orientation_of(volume: Volume) -> str:
    """The code nearest to `volume`'s direction cosines ('LPS' for the identity direction)."""
    sitk = simpleitk()
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        tuple(float(v) for v in volume.direction)
    )


def reoriented(volume: Volume, code: str | None) -> Volume:
    """`volume` with its voxel axes permuted and flipped to orientation `code` (None: `volume` itself).
    The same voxels at the same physical points: spacing, origin and direction follow the axes."""
    if code is None or orientation_of(volume) == code:
        return volume
    sitk = simpleitk()
    image = sitk.DICOMOrient(to_sitk(volume), code)
    return replace(
        volume,
        array=sitk.GetArrayFromImage(image),
        spacing=tuple(image.GetSpacing()),
        origin=tuple(image.GetOrigin()),
        direction=tuple(image.GetDirection()),
    )


def back_onto(oriented: Volume, original: Volume) -> np.ndarray:
    """The voxels of `oriented` (a volume on the grid reoriented(original, code) gave) in `original`'s
    own axis order: an array of original's shape, the exact inverse of reoriented.

    The inverse is read from the two directions (their product is a signed permutation of the x, y, z
    axes), not from original's nearest code: a direction midway between two codes (45 degrees) does not
    come back to its own axes through its code."""
    signed = np.rint(
        np.asarray(original.direction, np.float64).reshape(3, 3).T
        @ np.asarray(oriented.direction, np.float64).reshape(3, 3)
    )  # [i, j] = +-1: oriented's axis j runs along (or against) original's axis i (x, y, z)
    if not (np.abs(signed).sum(axis=0) == 1).all() or not (np.abs(signed).sum(axis=1) == 1).all():
        raise ValueError(f"direction {oriented.direction} is not a reorientation of {original.direction}")
    source = [int(np.flatnonzero(signed[i])[0]) for i in range(3)]  # original axis i <- oriented axis
    # numpy axes run (z, y, x): x, y, z axis a is numpy axis 2 - a
    array = np.transpose(oriented.array, [2 - source[2 - k] for k in range(3)])
    flipped = [2 - i for i in range(3) if signed[i, source[i]] < 0]
    array = np.flip(array, flipped) if flipped else array
    if array.shape != original.array.shape:
        raise ValueError(f"reoriented back, shape {array.shape} is not the input's {original.array.shape}")
    return np.ascontiguousarray(array)


__all__ = [
    "CODE_RULE",
    "DEFAULT_ORIENTATION",
    "ORIENTATION_CODES",
    "STORED",
    "back_onto",
    "check_orientation",
    "orientation_of",
    "reoriented",
]
