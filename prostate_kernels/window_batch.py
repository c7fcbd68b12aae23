"""One predictor call of the sliding window: its windows and what MONAI passes along with them.

MONAI's `sliding_window_inference` calls `predictor(windows, *args, **kwargs)`, or, with
`with_coord=True`, `predictor(windows, coords, *args, **kwargs)`, where `coords` lists every window's
slices into the (padded) inputs: [slice(n, n + 1), slice(None), slice(z, z + rd), slice(y, y + rh),
slice(x, x + rw)] (two spatial slices in 2-D). A keyword argument named `condition` (a tensor of the
inputs' batch and spatial size) is cut into the same windows as the inputs and passed as `condition=`.

The stitching's inner steps (test-time mirroring, the 2-D lift) transform a `WindowBatch` as a whole,
so that the coordinates and the condition windows always travel with their windows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prostate_kernels.predictor_outputs import Outputs

Coords = list[list[slice]]  # per window: [slice(n, n + 1), slice(None), *one slice per spatial axis]


@dataclass(frozen=True)
class WindowBatch:
    """B windows for one predictor call, with their coordinates and condition windows if asked for."""

    windows: torch.Tensor  # (B, C, *roi), a reused buffer: the predictor must not keep it
    coords: Coords | None = None  # MONAI's with_coord slices, in padded-input voxels; None unless asked
    condition: torch.Tensor | None = None  # (B, Cc, *roi): the `condition` argument's windows

    @staticmethod
    def cut(
        windows: torch.Tensor,
        starts: torch.Tensor,
        roi: Sequence[int],
        with_coord: bool,
        condition: torch.Tensor | None,
    ) -> WindowBatch:
        """The batch of windows at starts (B, 1 + len(roi)) rows (n, z, y, x) on the host: their coordinates
        if with_coord, the windows of the padded `condition` (N, Cc, *padded size) if one was given."""
        rows = starts.tolist() if with_coord or condition is not None else []
        coords = [
            [slice(n, n + 1), slice(None), *(slice(s, s + r) for s, r in zip(at, roi, strict=True))]
            for n, *at in rows
        ]
        cut = None
        if condition is not None:
            cut = torch.cat([condition[tuple(c)] for c in coords]).to(windows.device)
        return WindowBatch(windows, coords if with_coord else None, cut)

    def flipped(self, axes: tuple[int, ...]) -> WindowBatch:
        """Mirrored along the tensor axes `axes` (windows and condition; a window's place is unchanged)."""
        if not axes:
            return self
        condition = None if self.condition is None else torch.flip(self.condition, axes)
        return WindowBatch(torch.flip(self.windows, axes), self.coords, condition)

    @staticmethod
    def joined(batches: Sequence[WindowBatch]) -> WindowBatch:
        """The batches one after the other, as one call."""
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        coords = None if first.coords is None else [c for b in batches for c in (b.coords or [])]
        condition = None if first.condition is None else torch.cat([b.condition for b in batches])  # type: ignore[misc]
        return WindowBatch(torch.cat([b.windows for b in batches]), coords, condition)

    def without_axis(self, axis: int) -> WindowBatch:
        """With the unit tensor axis `axis` (the 2-D lift's first spatial axis) removed."""
        coords = None if self.coords is None else [c[:axis] + c[axis + 1 :] for c in self.coords]
        condition = None if self.condition is None else self.condition.squeeze(axis)
        return WindowBatch(self.windows.squeeze(axis), coords, condition)


BatchPredictor = Callable[[WindowBatch], Outputs]


def calling(
    predictor: Callable[..., Outputs], with_coord: bool, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> BatchPredictor:
    """The user's predictor called as MONAI calls it: predictor(windows[, coords], *args, **kwargs), with
    the condition windows as `condition=` when the call was given a condition."""

    def call(batch: WindowBatch) -> Outputs:
        extra = kwargs if batch.condition is None else {**kwargs, "condition": batch.condition}
        try:
            if with_coord:
                return predictor(batch.windows, batch.coords, *args, **extra)
            return predictor(batch.windows, *args, **extra)
        except TypeError as error:  # with extra arguments, most likely one sliding_window_inference lacks
            if not (args or kwargs):
                raise
            raise TypeError(
                f"{error} (sliding_window_inference passed the predictor {len(args)} extra positional "
                f"argument(s) and the keyword argument(s) {sorted(kwargs)}, as MONAI does with arguments it "
                "does not take itself)"
            ) from error

    return call
