"""PROMISE12 measures of a binary segmentation against a reference, in millimetres.

Dice; 95% Hausdorff distance (the larger of the two directed 95th percentiles of surface distances);
average boundary distance (mean over both surfaces' distances); relative volume difference
100 * (V_pred - V_ref) / V_ref in % and its absolute value (aRVD). Also on the apex and base thirds of
the gland (Litjens et al. 2014): the reference's extent along the patient's superior-inferior axis split
in three, base = the superior third, apex = the inferior third. That axis comes from the image's
direction cosines (ITK's LPS: physical +z is superior): the array axis whose direction is closest to
physical z, in the sense that points superior, so a volume stored with its slices in the other order,
or stored sagittally, gives the same apex and base values. Surface distances come from
SimpleITK's Maurer distance maps with the image spacing, surfaces from its label-contour filter; the
volume's border counts as surface (a segmentation that fills the whole volume has the volume's outer
shell as its surface), so distances are defined for any non-empty segmentation.

An empty prediction (or an empty reference) has no surface at all: its HD95 and ABD are the worst
distance the volume holds, its diagonal in mm (`worst_distance`), so that such a case is scored as the
failure it is instead of dropped from a mean as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

REGIONS = ("whole", "apex", "base")
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Measures:
    dice: float
    hd95_mm: float  # worst_distance when either segmentation is empty
    abd_mm: float
    rvd_percent: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}dice": self.dice,
            f"{prefix}hd95_mm": self.hd95_mm,
            f"{prefix}abd_mm": self.abd_mm,
            f"{prefix}rvd_percent": self.rvd_percent,
            f"{prefix}abs_rvd_percent": abs(self.rvd_percent),
        }


def worst_distance(shape: tuple[int, ...], spacing_zyx: Sequence[float]) -> float:
    """The volume's diagonal in mm: no two voxels of it are farther apart."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_zyx, strict=True))))


def measures(
    pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float], worst: float | None = None
) -> Measures:
    """Measures of binary (D, H, W) arrays with voxel spacing (dz, dy, dx) in mm.

    worst: HD95 and ABD when either segmentation is empty (default: worst_distance of this volume).
    """
    pred, ref = pred.astype(bool), ref.astype(bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    v_pred, v_ref = int(pred.sum()), int(ref.sum())
    dice = 2 * int((pred & ref).sum()) / (v_pred + v_ref) if v_pred + v_ref else 1.0
    rvd = 100.0 * (v_pred - v_ref) / v_ref if v_ref else math.nan
    if v_pred == 0 and v_ref == 0:
        return Measures(dice, 0.0, 0.0, rvd)
    if v_pred == 0 or v_ref == 0:
        worst = worst_distance(pred.shape, spacing_zyx) if worst is None else worst
        return Measures(dice, worst, worst, rvd)
    d_pred_to_ref = _surface_distances(pred, ref, spacing_zyx)
    d_ref_to_pred = _surface_distances(ref, pred, spacing_zyx)
    hd95 = max(float(np.percentile(d_pred_to_ref, 95)), float(np.percentile(d_ref_to_pred, 95)))
    abd = float(np.concatenate([d_pred_to_ref, d_ref_to_pred]).mean())
    return Measures(dice, hd95, abd, rvd)


def superior_axis(direction: Sequence[float] = IDENTITY) -> tuple[int, int]:
    """(array axis, sign) of the patient's superior-inferior axis: the array axis (0 = D, 1 = H, 2 = W)
    whose physical direction has the largest z component, and +1 when increasing that index moves
    superior (LPS: +z is superior), -1 when it moves inferior.

    direction: SimpleITK's 9 values, row-major; column j is the physical direction of index axis j
    (x, y, z), and index axis j is array axis 2 - j.
    """
    z_of_index_axes = np.asarray(direction, dtype=float).reshape(3, 3)[2]
    j = int(np.argmax(np.abs(z_of_index_axes)))
    return 2 - j, (1 if z_of_index_axes[j] > 0 else -1)


def promise12_measures(
    pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float], direction: Sequence[float] = IDENTITY
) -> dict[str, float]:
    """Measures on the whole gland and on its apex and base thirds (flat dict, e.g. "apex_dice"); the
    thirds are taken along the superior-inferior axis that `direction` (SimpleITK's) gives."""
    worst = worst_distance(ref.shape, spacing_zyx)
    out = measures(pred, ref, spacing_zyx, worst).as_dict()
    axis, sign = superior_axis(direction)
    # the superior-inferior axis first, increasing towards superior: apex at low indices, base at high
    pred, ref = np.moveaxis(pred, axis, 0)[::sign], np.moveaxis(ref, axis, 0)[::sign]
    spacing = (spacing_zyx[axis], *(s for a, s in enumerate(spacing_zyx) if a != axis))
    slices = np.flatnonzero(ref.any(axis=(1, 2)))
    if len(slices) == 0:
        raise ValueError("the reference segmentation is empty")
    first, last = int(slices[0]), int(slices[-1]) + 1
    third = (last - first) / 3
    for region, (lo, hi) in (("apex", (first, first + third)), ("base", (last - third, last))):
        lo, hi = int(math.floor(lo)), int(math.ceil(hi))
        out.update(measures(pred[lo:hi], ref[lo:hi], spacing, worst).as_dict(f"{region}_"))
    return out


def hausdorff(
    pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float], percentile: float = 100.0
) -> float:
    """Symmetric Hausdorff distance (mm) of two non-empty binary arrays' surfaces at `percentile`."""
    directed = (_surface_distances(pred, ref, spacing_zyx), _surface_distances(ref, pred, spacing_zyx))
    return max(float(np.percentile(d, percentile)) for d in directed)


def _contour(array: np.ndarray, spacing: tuple[float, ...]) -> Any:
    """SimpleITK image of the surface voxels of a binary array (face-connected label contour), on the
    array padded by one background voxel per side: voxels on the volume's border are surface too."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.pad(array.astype(np.uint8), 1))
    image.SetSpacing(spacing)
    return sitk.LabelContour(image, fullyConnected=False)


def _surface_distances(source: np.ndarray, target: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Distances (mm) from each surface voxel of `source` to the nearest surface voxel of `target`."""
    import SimpleITK as sitk

    spacing = tuple(float(s) for s in spacing_zyx[::-1])
    target_surface = _contour(target, spacing)
    # outside the surface voxels: distance to the nearest one; on them (negative values): 0
    distance = sitk.SignedMaurerDistanceMap(target_surface, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)  # fmt: skip
    on_source_surface = (
        sitk.GetArrayFromImage(_contour(source, spacing)) > 0
    )  # a copy: the image is temporary
    return np.maximum(sitk.GetArrayFromImage(distance)[on_source_surface], 0.0).astype(np.float64)
