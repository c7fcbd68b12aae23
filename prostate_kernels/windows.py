"""Window geometry for sliding-window inference: where windows go and how much each voxel counts.

Placement and importance maps follow MONAI's sliding_window_inference exactly (its
`_get_scan_interval`, `dense_patch_slices` and `compute_importance_map`), so that the same call gives
the same windows and the same weights:
- stride per axis = int(roi * (1 - overlap)), at least 1; the roi itself when it equals the image size;
- starts at 0, stride, 2 * stride, ... until a window reaches the border; the last one is moved back
  to end flush with the border (so sizes not divisible by the stride are covered without padding);
- windows are enumerated in C order of their (z, y, x) starts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

MODES = ("constant", "gaussian")
WHOLE = "whole"  # a window the size of the whole volume (predict --window whole)
MIN_IMPORTANCE = 1e-3  # Gaussian weights are clamped to at least this (or the map's own minimum, if larger)


def scan_intervals(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]
) -> tuple[int, ...]:
    """Stride between window starts along each axis."""
    intervals = []
    for size, roi, ov in zip(image_size, roi_size, overlap, strict=True):
        if roi == size:
            intervals.append(int(roi))
        else:
            intervals.append(max(int(roi * (1 - ov)), 1))
    return tuple(intervals)


def axis_starts(size: int, roi: int, interval: int) -> list[int]:
    """Window starts along one axis of length `size` (size >= roi): regular, the last flush with the end."""
    count = 1
    for d in range(math.ceil(size / interval)):
        if d * interval + roi >= size:
            count = d + 1
            break
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


def window_starts(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]
) -> torch.Tensor:
    """(num_windows, len(image_size)) int64 start of every window, in C order over the axes."""
    intervals = scan_intervals(image_size, roi_size, overlap)
    per_axis = [axis_starts(s, r, i) for s, r, i in zip(image_size, roi_size, intervals, strict=True)]
    return torch.tensor(list(itertools.product(*per_axis)), dtype=torch.int64).reshape(-1, len(image_size))


def starts_of_positions(positions: torch.Tensor) -> torch.Tensor:
    """(P, 4) int64 rows (0, z, y, x), contiguous: window positions (P, 3) shared by every image, as the
    starts of those windows in image 0 (the layout of the stitching ops' `starts`)."""
    return torch.cat([torch.zeros_like(positions[:, :1]), positions], dim=1).contiguous()


def importance_map(
    roi_size: Sequence[int],
    mode: str = "constant",
    sigma_scale: Sequence[float] | float = 0.125,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """float32 weight of each voxel of a window, shape roi_size.

    "constant": all ones. "gaussian": product over axes of exp(-x^2 / (2 sigma^2)) with x centred on the
    window and sigma = sigma_scale * roi (per axis), clamped below at max(min of the map, 1e-3) so that
    corner voxels keep a small positive weight.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if mode == "constant":
        return torch.ones(tuple(roi_size), dtype=torch.float32, device=device)
    scales = (
        [float(sigma_scale)] * len(roi_size) if isinstance(sigma_scale, (int, float)) else list(sigma_scale)
    )
    if len(scales) != len(roi_size) or not all(s > 0 for s in scales):
        raise ValueError(
            f"sigma_scale {sigma_scale} must be > 0, one value or one per axis of {tuple(roi_size)}"
        )
    # 0-d to start: each axis's profile multiplies in a new last dimension (times 1.0: exact)
    weights = torch.ones((), dtype=torch.float, device=device)
    for axis, (size, scale) in enumerate(zip(roi_size, scales, strict=True)):
        sigma = size * scale
        x = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float, device=device)
        profile = torch.exp(x**2 / (-2 * sigma**2))
        weights = weights.unsqueeze(-1) * profile[(None,) * axis]
    floor = max(torch.min(weights).item(), MIN_IMPORTANCE)
    return torch.clamp_(weights, min=floor).contiguous()
