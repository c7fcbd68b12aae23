"""Sliding-window inference over whole volumes, with overlap-weighted blending and test-time mirroring.

Same arguments and the same window placement as MONAI's `sliding_window_inference`, so the same call
gives the same result; the stitching (window gather, weighting, accumulation, normalisation) runs in
the C++ extension on the CPU and in Triton kernels on CUDA, always accumulating in float32. The
predictor may return several outputs (a list, tuple or dict), each at its own resolution, as in MONAI
(predictor_outputs.py).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast, overload

import torch
import torch.nn.functional as F

from prostate_kernels.devices import available_device, memory_bytes
from prostate_kernels.integers import as_int
from prostate_kernels.ops.window_ops import check_starts, window_ops_for
from prostate_kernels.predictor_outputs import OutputForm, OutputLayout, Outputs, checked_outputs, flatten
from prostate_kernels.progress import progress_bar
from prostate_kernels.window_batch import BatchPredictor, WindowBatch, calling
from prostate_kernels.windows import MODES, importance_map, window_starts

Predictor = Callable[..., Outputs]  # (windows[, coords], *args, **kwargs) -> outputs, as MONAI calls it
PADDING_MODES = ("constant", "reflect", "replicate", "circular")


@overload
def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Sequence[int | None] | int,
    sw_batch_size: int,
    predictor: Callable[..., torch.Tensor],
    overlap: Sequence[float] | float = ...,
    mode: str = ...,
    sigma_scale: Sequence[float] | float = ...,
    padding_mode: str = ...,
    cval: float = ...,
    sw_device: torch.device | str | None = ...,
    device: torch.device | str | None = ...,
    progress: bool = ...,
    roi_weight_map: torch.Tensor | None = ...,
    process_fn: Callable | None = ...,
    buffer_steps: int | None = ...,
    buffer_dim: int = ...,
    with_coord: bool = ...,
    *args: Any,
    flip_axes: Sequence[int] | int = ...,
    **kwargs: Any,
) -> torch.Tensor: ...


@overload
def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Sequence[int | None] | int,
    sw_batch_size: int,
    predictor: Predictor,
    overlap: Sequence[float] | float = ...,
    mode: str = ...,
    sigma_scale: Sequence[float] | float = ...,
    padding_mode: str = ...,
    cval: float = ...,
    sw_device: torch.device | str | None = ...,
    device: torch.device | str | None = ...,
    progress: bool = ...,
    roi_weight_map: torch.Tensor | None = ...,
    process_fn: Callable | None = ...,
    buffer_steps: int | None = ...,
    buffer_dim: int = ...,
    with_coord: bool = ...,
    *args: Any,
    flip_axes: Sequence[int] | int = ...,
    **kwargs: Any,
) -> Outputs: ...


def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Sequence[int | None] | int,
    sw_batch_size: int,
    predictor: Predictor,
    overlap: Sequence[float] | float = 0.5,
    mode: str = "constant",
    sigma_scale: Sequence[float] | float = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    roi_weight_map: torch.Tensor | None = None,
    process_fn: Callable | None = None,
    buffer_steps: int | None = None,
    buffer_dim: int = -1,
    with_coord: bool = False,
    *args: Any,
    flip_axes: Sequence[int] | int = (),
    **kwargs: Any,
) -> Outputs:
    """Runs `predictor` on overlapping windows of `inputs` and blends the window predictions.

    Args:
        inputs: (N, C, D, H, W) floating tensor (or (N, C, H, W) with a 2-element roi_size).
        roi_size: window size per spatial axis, e.g. (16, 64, 64) for the paper's 64x64x16 patch; an int
            applies to every axis; None or a value <= 0 takes that axis' full size (as MONAI's
            fall_back_tuple). Python, numpy or torch integers.
            Volumes smaller than the window are padded (half before, half after, as MONAI) and the
            result is cropped back; "reflect" and "circular" padding wider than the volume itself are
            applied in steps (each step at most the current size - 1, as numpy.pad does).
        sw_batch_size: windows per predictor call (windows of different images may share a call).
        predictor: maps (B, C, *roi) windows to (B, K, *roi) predictions (any float dtype), or to a list,
            tuple or dict of such tensors, each with its own K and its own spatial size S: an S other
            than roi is that output at another resolution (zoom S / roi per axis; its windows go to
            int(start * zoom), as in MONAI). The windows tensor it receives is a buffer reused for
            the next batch: clone it to keep it.
        overlap: fraction of the window shared by neighbours along each axis, in [0, 1).
        mode: "constant" (equal weights) or "gaussian" (sigma = sigma_scale * roi, minimum clamped).
        sigma_scale: Gaussian sigma as a fraction of the window, one value or one per axis.
        padding_mode, cval: how inputs smaller than the window are padded (torch.nn.functional.pad).
        sw_device: device the predictor runs on (default: inputs' device).
        device: device of the stitched output (default: inputs' device).
        progress: show a tqdm bar over windows.
        roi_weight_map: a weight map of the window's size ((*roi) or (1, 1, *roi)), finite and >= 0, used
            instead of the one `mode` makes (as MONAI); every voxel of the result must get some weight
            from a window (else ValueError naming the voxel, where MONAI gives NaN there).
        process_fn: not supported (TypeError when given): MONAI normalises its per-window weights
            by the first window batch's.
        buffer_steps, buffer_dim: accepted and checked as MONAI checks them; they change nothing here
            (MONAI buffers windows on sw_device to copy fewer, larger pieces to `device`; here each
            batch's predictions are accumulated into the output on `device` as they come).
        with_coord: call predictor(windows, coords, *args, **kwargs), coords holding every window's
            slices into the padded inputs, [slice(n, n + 1), slice(None), slice(z, z + rd), ...], as MONAI.
        *args, **kwargs: passed on to the predictor, as MONAI; a keyword argument `condition` (a tensor of
            the inputs' batch and spatial size) is padded and cut into the same windows as the inputs
            (and mirrored with them).
        flip_axes (keyword only): spatial axis or axes (0 = first spatial axis) to mirror for test-time
            augmentation: every non-empty combination of them is predicted too (flipped in, flipped
            back) and all predictions are averaged, as nnU-Net does; () disables it. A batch of fewer than
            sw_batch_size windows shares predictor calls with its mirror images (still at most
            sw_batch_size windows per call).

    Returns:
        (N, K, D, H, W) float32 on `device`: sum over windows of prediction x importance, divided by
        the sum of importances at each voxel. Runs under torch.no_grad(): the result has no gradient.
        For several outputs, one such tensor each (of size int(D * zoom), ...), in the predictor's
        form: a tuple for a list or tuple (its tensor for one element), a dict with sorted keys.
        For a MONAI MetaTensor input, MetaTensors carrying its meta data, as MONAI returns them.
    """
    _check_inputs(inputs)
    meta = _monai_meta(inputs)
    if meta is not None:  # stitched as a plain tensor: MetaTensor's bookkeeping on every op costs host time
        inputs = inputs.as_subclass(torch.Tensor)
    spatial_dims = inputs.dim() - 2
    if not callable(predictor):
        raise TypeError(f"predictor must be callable, got {type(predictor).__name__}")
    if process_fn is not None:
        raise TypeError(
            f"process_fn {process_fn!r} is not supported: MONAI weighs each window batch by the weights "
            "process_fn returns but divides every voxel by the first batch's; process the outputs inside "
            "the predictor instead, and fixed window weights as roi_weight_map"
        )
    _check_buffering(buffer_steps, buffer_dim, spatial_dims)
    flips = _check_flip_axes(flip_axes, spatial_dims)
    condition = _checked_condition(kwargs.pop("condition", None), inputs)
    plan = _plan(inputs, roi_size, sw_batch_size, overlap, mode, sigma_scale, padding_mode, cval,
                 sw_device, device, progress, roi_weight_map, bool(with_coord))  # fmt: skip
    call = calling(predictor, plan.with_coord, args, kwargs)
    if spatial_dims == 2:  # 2-D runs as 3-D with a unit first axis: the same windows and weights
        weights = None if plan.weights is None else plan.weights[None]
        plan = replace(plan, roi=(1, *plan.roi), overlaps=(0.0, *plan.overlaps), sigmas=(1.0, *plan.sigmas),
                       weights=weights, lifted_2d=True)  # fmt: skip
        inputs, call, flips = inputs.unsqueeze(2), _lift_2d(call), tuple(a + 1 for a in flips)
        condition = None if condition is None else condition.unsqueeze(2)
    if flips:
        call = _mirrored(call, flips, plan.sw_batch_size)
    with torch.no_grad():
        form, results = _stitch(inputs, call, plan, condition)
    stitched = form.pack([r.squeeze(2) for r in results] if spatial_dims == 2 else results)
    if meta is None:
        return stitched
    from monai.utils import convert_to_dst_type  # present: the inputs are one of its MetaTensors

    return convert_to_dst_type(stitched, meta, device=plan.device)[0]  # as MONAI's, which does the same


def _monai_meta(inputs: torch.Tensor) -> torch.Tensor | None:
    """For a MONAI MetaTensor, an empty MetaTensor holding its meta data (affine, file name, ...), which
    the result takes as MONAI's sliding_window_inference gives it (so that MONAI's transforms that
    follow, SaveImage, Invertd, still know where the voxels lie); None for any other tensor."""
    if not type(inputs).__module__.startswith("monai."):
        return None
    from monai.data import MetaTensor

    return MetaTensor([]).copy_meta_from(inputs, copy_attr=False) if isinstance(inputs, MetaTensor) else None


@dataclass(frozen=True)
class _Plan:
    """Validated, per-axis settings of one sliding-window run."""

    roi: tuple[int, ...]
    sw_batch_size: int
    overlaps: tuple[float, ...]
    mode: str
    sigmas: tuple[float, ...]
    padding_mode: str
    cval: float
    sw_device: torch.device
    device: torch.device
    progress: bool
    weights: torch.Tensor | None = None  # roi_weight_map: (*roi) float32 on `device`, finite, >= 0
    with_coord: bool = False
    lifted_2d: bool = False  # a 2-D input run as 3-D with a unit first axis


def _plan(
    inputs: torch.Tensor,
    roi_size: Sequence[int | None] | int,
    sw_batch_size: int,
    overlap: Sequence[float] | float,
    mode: str,
    sigma_scale: Sequence[float] | float,
    padding_mode: str,
    cval: float,
    sw_device: torch.device | str | None,
    device: torch.device | str | None,
    progress: bool,
    roi_weight_map: object = None,
    with_coord: bool = False,
) -> _Plan:
    """Checks the arguments (ValueError naming the value) and expands them per spatial axis."""
    spatial_dims = inputs.dim() - 2
    roi = _per_axis_roi(roi_size, tuple(inputs.shape[2:]))
    _check_padded_fits(inputs, roi, roi_size)
    overlaps = _per_axis(overlap, spatial_dims, "overlap")
    if not all(0.0 <= o < 1.0 for o in overlaps):
        raise ValueError(f"overlap {overlap} must be in [0, 1) on every axis")
    check_modes(mode, padding_mode)
    sigmas = _per_axis(sigma_scale, spatial_dims, "sigma_scale")
    if mode == "gaussian" and not all(s > 0 for s in sigmas):
        raise ValueError(f"sigma_scale {sigma_scale} must be > 0 on every axis")
    batch = as_int(sw_batch_size)
    if batch is None or batch < 1:
        raise ValueError(f"sw_batch_size {sw_batch_size!r} must be a positive int")
    out_device = available_device(device, "device") if device is not None else inputs.device
    weights = None if roi_weight_map is None else _checked_weights(roi_weight_map, roi, out_device)
    return _Plan(
        roi=roi,
        sw_batch_size=batch,
        overlaps=overlaps,
        mode=mode,
        sigmas=sigmas,
        padding_mode=padding_mode,
        cval=float(cval),
        sw_device=available_device(sw_device, "sw_device") if sw_device is not None else inputs.device,
        device=out_device,
        progress=progress,
        weights=weights,
        with_coord=with_coord,
    )


def check_modes(mode: object, padding_mode: object) -> None:
    """ValueError naming a blending mode or padding mode that is not one of those known."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode {padding_mode!r} is not one of {PADDING_MODES}")


def _checked_weights(roi_weight_map: object, roi: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """roi_weight_map as a (*roi) float32 tensor on device, or ValueError/TypeError naming it: of shape
    roi or (1, 1, *roi) (MONAI's two forms), real, finite, >= 0 and not all 0."""
    if not isinstance(roi_weight_map, torch.Tensor) and not hasattr(roi_weight_map, "__array__"):
        raise TypeError(f"roi_weight_map must be a tensor of the window's size {roi}, got "
                        f"{type(roi_weight_map).__name__}")  # fmt: skip
    weights = torch.as_tensor(roi_weight_map)
    shape = tuple(weights.shape)
    if shape not in (roi, (1, 1, *roi)):
        raise ValueError(
            f"roi_weight_map has shape {shape}; expected the window's size {roi} or {(1, 1, *roi)}"
        )
    if weights.dtype == torch.bool or weights.is_complex() or weights.device.type == "meta":
        raise TypeError(f"roi_weight_map must hold real numbers, got {weights.dtype} on {weights.device}")
    weights = weights.reshape(roi).to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        bad = (~torch.isfinite(weights) | (weights < 0)).nonzero()[0].tolist()
        raise ValueError(f"roi_weight_map must be finite and >= 0: it holds {weights[tuple(bad)].item()} at "
                         f"{tuple(bad)}")  # fmt: skip
    if not bool((weights > 0).any()):
        raise ValueError("roi_weight_map is 0 everywhere: no window would count anywhere")
    return weights.contiguous()


def _check_buffering(buffer_steps: object, buffer_dim: object, spatial_dims: int) -> None:
    """MONAI's checks of buffer_steps and buffer_dim (which change nothing here): buffer_steps None or an
    int and, when buffering (buffer_steps > 0), buffer_dim a spatial axis in [-spatial_dims, spatial_dims)."""
    steps = as_int(buffer_steps)
    if buffer_steps is not None and steps is None:
        raise TypeError(f"buffer_steps {buffer_steps!r} must be None or an int")
    dim = as_int(buffer_dim)
    if dim is None:
        raise TypeError(f"buffer_dim {buffer_dim!r} must be an int")
    if steps is not None and steps > 0 and not -spatial_dims <= dim < spatial_dims:
        raise ValueError(f"buffer_dim {buffer_dim} must be in [{-spatial_dims}, {spatial_dims})")


def _checked_condition(condition: object, inputs: torch.Tensor) -> torch.Tensor | None:
    """The `condition` keyword argument as a plain tensor of the inputs' batch and spatial size, or a
    ValueError/TypeError naming its shape."""
    if condition is None:
        return None
    if not isinstance(condition, torch.Tensor):
        raise TypeError(f"condition must be a torch.Tensor, got {type(condition).__name__}")
    condition = condition.as_subclass(torch.Tensor)
    if condition.dim() != inputs.dim() or condition.shape[0] != inputs.shape[0] or \
            condition.shape[2:] != inputs.shape[2:] or condition.shape[1] == 0:  # fmt: skip
        raise ValueError(
            f"condition has shape {tuple(condition.shape)}; expected (N, C', *spatial) = "
            f"({inputs.shape[0]}, C' >= 1, {', '.join(map(str, inputs.shape[2:]))}) like the inputs"
        )
    return condition


def _stitch(
    inputs: torch.Tensor, predictor: BatchPredictor, plan: _Plan, condition: torch.Tensor | None
) -> tuple[OutputForm, list[torch.Tensor]]:
    """The 3-D sliding-window loop: gather -> predict -> weighted accumulate -> normalise -> crop.

    condition: None or (N, C', D, H, W), cut into the same windows as the inputs.
    Returns the predictor's output form and one stitched (N, K, *size) float32 tensor per output."""
    roi, device = plan.roi, plan.device
    padded, crop = _pad_to_roi(inputs, roi, plan.padding_mode, plan.cval)
    if condition is not None:
        condition = _pad_to_roi(condition, roi, plan.padding_mode, plan.cval)[0]
    batch, padded_size = padded.shape[0], tuple(padded.shape[2:])
    per_image = window_starts(padded_size, roi, plan.overlaps)  # (W, 3) z, y, x
    num_windows = per_image.shape[0] * batch
    image_index = torch.arange(batch).repeat_interleave(per_image.shape[0])[:, None]
    starts = torch.cat([image_index, per_image.repeat(batch, 1)], dim=1)  # (N*W, 4): n, z, y, x; image-major
    # every window's bounds checked once here, on the host: the ops in the loop skip that check, which
    # on a GPU would wait for the device twice per batch of windows
    check_starts("sliding_window_inference", starts, (batch, 1, *padded_size), roi)
    starts_in = starts.to(padded.device)
    gather_ops = window_ops_for(padded.device, starts_checked=True)
    stitch_ops = window_ops_for(device, starts_checked=True)
    importance = (
        plan.weights
        if plan.weights is not None
        else importance_map(roi, plan.mode, plan.sigmas, device=device)
    )

    # One window buffer serves every batch (fresh multi-MB buffers cost page faults on each batch);
    # the predictor must not keep its input past the call.
    buffer = padded.new_empty((min(plan.sw_batch_size, num_windows), padded.shape[1], *roi))
    layout: OutputLayout | None = None  # the first batch's; every later batch must repeat it
    grids: list[_OutputGrid] = []  # one per predictor output, made for the first batch
    # closed however the loop ends (an out-of-memory error here is retried on the CPU with a new bar)
    with progress_bar(num_windows, "sliding window", "win", enabled=plan.progress) as bar:
        for first in range(0, num_windows, plan.sw_batch_size):
            last = min(first + plan.sw_batch_size, num_windows)
            windows = gather_ops.gather(padded, starts_in[first:last], list(roi), buffer[: last - first])
            call = WindowBatch(windows.to(plan.sw_device))
            if plan.with_coord or condition is not None:  # (most calls need neither: no host work for them)
                call = WindowBatch.cut(call.windows, starts[first:last], roi, plan.with_coord, condition)
            layout, outputs = checked_outputs(predictor(call), last - first, roi, layout)
            if not grids:
                grids = [_OutputGrid.make(shape, batch, padded_size, roi, starts, importance, device)
                         for shape in layout.shapes]  # fmt: skip
                for index, grid in enumerate(grids):
                    grid.check_covered(per_image, crop, layout.form.name(index), plan.lifted_2d)
            for grid, output in zip(grids, outputs, strict=True):
                stitch_ops.accumulate_(
                    grid.output,
                    None,
                    output.to(device).contiguous(),
                    grid.starts[first:last],
                    grid.importance,
                )
            bar.update(last - first)
    assert layout is not None  # made by the first batch: there is at least one window
    results = []
    for grid in grids:
        # Every image has the same windows, so the division by the weight map needs only their positions.
        stitch_ops.normalize_by_positions_(grid.output, grid.scaled(per_image).to(device), grid.importance)
        results.append(grid.output[(slice(None), slice(None)) + grid.cropped(crop)])
    return layout.form, results


@dataclass(frozen=True)
class _OutputGrid:
    """Where one predictor output is stitched: at the input's resolution times `zoom` per axis.

    An output of spatial size S for windows of size roi has zoom S / roi (1 for most predictors): its
    buffer is int(padded size * zoom) voxels, a window starting at s goes to int(s * zoom) and its
    importance map is the roi's resized to S (nearest-exact), as MONAI places and weights it."""

    zoom: tuple[float, ...]
    output: torch.Tensor  # (N, K, *int(padded size * zoom)) float32, the running weighted sum
    starts: torch.Tensor  # (N*W, 4) n, z, y, x of every window in output voxels, on the output's device
    importance: torch.Tensor  # (S_z, S_y, S_x) float32

    @staticmethod
    def make(
        shape: tuple[int, ...],
        batch: int,
        padded_size: tuple[int, ...],
        roi: tuple[int, ...],
        starts: torch.Tensor,
        importance: torch.Tensor,
        device: torch.device,
    ) -> _OutputGrid:
        """The grid of an output of (K, *S) = shape per window, for windows at starts (N*W, 4)."""
        channels, size = shape[0], shape[1:]
        # MONAI's z_scale, computed as it computes it (the float product decides int(start * zoom))
        zoom = tuple(s / float(r) for s, r in zip(size, roi, strict=True))
        grid_size = tuple(int(p * z) for p, z in zip(padded_size, zoom, strict=True))
        scaled = starts
        if size != roi:  # (the input's windows were checked against the padded input already)
            resized = F.interpolate(importance[None, None], size=size, mode="nearest-exact")
            importance = resized[0, 0].contiguous()
            scaled = torch.cat([starts[:, :1], _scaled(starts[:, 1:], zoom)], dim=1)
            check_starts("sliding_window_inference", scaled, (batch, 1, *grid_size), size)
        output = torch.zeros((batch, channels, *grid_size), dtype=torch.float32, device=device)
        return _OutputGrid(zoom, output, scaled.to(device), importance)

    def check_covered(
        self, positions: torch.Tensor, crop: tuple[slice, ...], name: str, lifted_2d: bool
    ) -> None:
        """ValueError naming the first voxel of the result that no window at positions (W, 3) weighs
        (an roi_weight_map with zeros): its sum of weights would be 0 (MONAI gives NaN there). The voxel
        is named (y, x) for a 2-D input (lifted_2d)."""
        positive = (self.importance > 0).cpu()
        if bool(positive.all()):
            return
        covered = torch.zeros(self.output.shape[2:], dtype=torch.bool)
        for z, y, x in self.scaled(positions).tolist():
            covered[z : z + positive.shape[0], y : y + positive.shape[1], x : x + positive.shape[2]] |= (
                positive
            )
        uncovered = (~covered[self.cropped(crop)]).nonzero()
        if len(uncovered):
            voxel, axes = tuple(uncovered[0].tolist()), "(z, y, x)"
            if lifted_2d:
                voxel, axes = voxel[1:], "(y, x)"
            raise ValueError(
                f"roi_weight_map is 0 wherever the windows cover voxel {axes} = {voxel} of {name}'s result: "
                "no weight to divide by there"
            )

    def scaled(self, positions: torch.Tensor) -> torch.Tensor:
        """(W, 3) window starts in input voxels -> in this output's voxels."""
        return _scaled(positions, self.zoom)

    def cropped(self, crop: tuple[slice, ...]) -> tuple[slice, ...]:
        """The input's crop of the padding (input voxels) in this output's voxels, rounded as MONAI."""
        return tuple(
            slice(int(round(c.start * z)), int(round(c.stop * z)))
            for c, z in zip(crop, self.zoom, strict=True)
        )


def _scaled(positions: torch.Tensor, zoom: tuple[float, ...]) -> torch.Tensor:
    """(W, 3) window starts in input voxels -> int(start * zoom) per axis (MONAI's _compute_coords)."""
    if all(z == 1.0 for z in zoom):
        return positions
    rows = [[int(p * z) for p, z in zip(row, zoom, strict=True)] for row in positions.tolist()]
    return torch.tensor(rows, dtype=positions.dtype).reshape(positions.shape)


def _check_inputs(inputs: object) -> None:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() not in (4, 5):
        raise ValueError(f"inputs must be (N, C, D, H, W) (or (N, C, H, W)), got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor, got {inputs.dtype}")
    if inputs.numel() == 0:
        raise ValueError(f"inputs is empty: shape {tuple(inputs.shape)}")
    if inputs.device.type == "meta":
        raise ValueError("inputs are on the meta device, which holds no values to predict from")


class RoiTooLargeError(ValueError, MemoryError):
    """roi_size pads the inputs beyond their device's memory: a bad argument (ValueError) that is also an
    out-of-memory condition found before allocating (MemoryError: what the CLI reports as one)."""


def _check_padded_fits(inputs: torch.Tensor, roi: tuple[int, ...], roi_size: object) -> None:
    """RoiTooLargeError naming roi_size when the inputs padded up to the window would alone exceed the
    memory of their device (torch would fail allocating them, or overflow computing their size, naming
    neither)."""
    padded = [max(size, r) for size, r in zip(inputs.shape[2:], roi, strict=True)]
    need = inputs.shape[0] * inputs.shape[1] * math.prod(padded) * inputs.element_size()
    total = memory_bytes(inputs.device)
    if total is not None and need > total:
        raise RoiTooLargeError(
            f"roi_size {roi_size!r} pads inputs of size {tuple(inputs.shape)} to {tuple(padded)} voxels, "
            f"{need / 2**30:.3g} GiB in {inputs.dtype}: more than the {total / 2**30:.3g} GiB of memory of "
            f"{inputs.device}"
        )


def _per_axis_roi(roi_size: Sequence[int | None] | int, image_size: tuple[int, ...]) -> tuple[int, ...]:
    single = as_int(roi_size) is not None or (isinstance(roi_size, torch.Tensor) and roi_size.dim() == 0)
    sizes = [roi_size] * len(image_size) if single else _as_list(roi_size, "roi_size")
    if len(sizes) != len(image_size):
        raise ValueError(
            f"roi_size {tuple(sizes)} has {len(sizes)} dims, expected {len(image_size)} for inputs of "
            f"spatial size {image_size}"
        )
    found = [_fall_back(r, full) for r, full in zip(sizes, image_size, strict=True)]
    roi = tuple(r for r in found if r is not None and r > 0)
    if len(roi) < len(found):
        raise ValueError(f"roi_size {tuple(sizes)} must hold ints (<= 0 or None for a full axis)")
    return roi


def _fall_back(value: object, full: int) -> int | None:
    """MONAI's fall_back_tuple for one axis: None or an int <= 0 means the whole axis."""
    size = as_int(value)
    if value is None or (size is not None and size <= 0):
        return full
    return size


def _as_list(value: object, name: str) -> list:
    """A sequence (list, tuple, numpy array, 1-D tensor) as a list; TypeError naming it otherwise."""
    sequence = isinstance(value, (Sequence, torch.Tensor)) or hasattr(value, "__array__")
    if isinstance(value, (str, bytes)) or not sequence:
        raise TypeError(f"{name} {value!r} must be a number or a sequence of numbers")
    return list(cast(Iterable[object], value))


def _per_axis(value: Sequence[float] | float, dims: int, name: str) -> tuple[float, ...]:
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    values = [value] * dims if is_number else _as_list(value, name)
    if len(values) != dims:
        raise ValueError(f"{name} {value} must be one number or {dims} numbers")
    reals = [v for v in values if isinstance(v, numbers.Real) and not isinstance(v, bool)]
    if len(reals) < len(values):
        raise TypeError(f"{name} {value!r} must be a number or a sequence of numbers")
    return tuple(float(v) for v in reals)


def _check_flip_axes(flip_axes: Sequence[int] | int, spatial_dims: int) -> tuple[int, ...]:
    single = as_int(flip_axes)
    raw = (single,) if single is not None else tuple(_as_list(flip_axes, "flip_axes"))
    found = [as_int(a) for a in raw]
    axes = tuple(a for a in found if a is not None and 0 <= a < spatial_dims)
    if len(axes) < len(found):
        raise ValueError(f"flip_axes {raw} must be spatial axes in [0, {spatial_dims})")
    if len(set(axes)) != len(axes):
        raise ValueError(f"flip_axes {axes} repeats an axis")
    return axes


def _pad_to_roi(
    inputs: torch.Tensor, roi: tuple[int, ...], padding_mode: str, cval: float
) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """inputs padded up to at least roi per axis (MONAI's split: half before), and the crop undoing it."""
    before_after = []
    for size, r in zip(inputs.shape[2:], roi, strict=True):
        missing = max(r - size, 0)
        before_after.append((missing // 2, missing - missing // 2))
    crop = tuple(slice(b, b + s) for (b, _), s in zip(before_after, inputs.shape[2:], strict=True))
    if not any(b or a for b, a in before_after):
        return inputs.contiguous(), crop
    if padding_mode == "constant":
        pad = [p for b, a in reversed(before_after) for p in (b, a)]  # F.pad lists the last axis first
        return F.pad(inputs, pad, mode="constant", value=cval).contiguous(), crop
    return _pad_in_steps(inputs, before_after, padding_mode).contiguous(), crop


def _pad_in_steps(inputs: torch.Tensor, before_after: list[tuple[int, int]], mode: str) -> torch.Tensor:
    """F.pad in `mode`, in as many steps as needed: reflect pads at most size - 1 and circular at most
    size per side and step (F.pad's limits); replicate has none and takes one step."""
    remaining = [list(pair) for pair in before_after]
    padded = inputs
    while any(b or a for b, a in remaining):
        step = []
        for axis, (b, a) in enumerate(remaining):
            size = padded.shape[2 + axis]
            limit = {"reflect": size - 1, "circular": size}.get(mode, max(b, a))
            take = (min(b, limit), min(a, limit))
            remaining[axis] = [b - take[0], a - take[1]]
            step.append(take)
        if not any(b or a for b, a in step):
            raise ValueError(
                f"padding_mode {mode!r} cannot pad an axis of size 1 (use 'replicate' or 'constant')"
            )
        padded = F.pad(padded, [p for b, a in reversed(step) for p in (b, a)], mode=mode)
    return padded


def _mirrored(predictor: BatchPredictor, flip_axes: tuple[int, ...], windows_per_call: int) -> BatchPredictor:
    """Averages predictor over the input and its mirror images along every combination of flip_axes.

    The B windows it is given and their mirror images share predictor calls of up to windows_per_call
    (sw_batch_size) windows, whole mirror images at a time: B == windows_per_call keeps one call per
    mirror image; a smaller B (the last batch of windows, a single window holding the whole volume) puts
    several mirror images in one call. Fewer, fuller calls: on the CPU PyTorch's conv3d takes its im2col
    path (slow_conv3d) instead of oneDNN for a batch of 1 on small maps, 2-5x slower per window."""
    dims = [a + 2 for a in flip_axes]  # spatial axis -> tensor axis of (B, C, D, H, W)
    combos = [()] + [c for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)]

    def predict(windows: WindowBatch) -> Outputs:
        count, roi = windows.windows.shape[0], tuple(windows.windows.shape[2:])
        images_per_call = max(windows_per_call // count, 1)
        layout: OutputLayout | None = None  # the unmirrored call's; the mirrored calls must repeat it
        totals: list[
            torch.Tensor
        ] = []  # per output, (B, K, *S) float32: the mirror images' sum, flipped back
        for first in range(0, len(combos), images_per_call):
            group = combos[first : first + images_per_call]
            batch = WindowBatch.joined([windows.flipped(axes) for axes in group])  # len(group) * B windows
            context = f" (the unmirrored windows; these mirrored along {group[0]})" if layout else ""
            layout, outputs = checked_outputs(predictor(batch), len(group) * count, roi, layout, context)
            for image, axes in enumerate(group):
                for index, output in enumerate(outputs):
                    part = output[image * count : (image + 1) * count]
                    part = torch.flip(part, axes) if axes else part
                    if index == len(totals):
                        totals.append(part.to(torch.float32, copy=True))
                    else:
                        totals[index] += part
        assert layout is not None  # combos holds at least the unmirrored windows
        return layout.form.rebuild([total / len(combos) for total in totals])

    return predict


def _lift_2d(predictor: BatchPredictor) -> BatchPredictor:
    """A 2-D predictor seen as a 3-D one whose first spatial axis has size 1."""

    def predict(windows: WindowBatch) -> Outputs:
        form, outputs = flatten(predictor(windows.without_axis(2)))
        lifted = [o.unsqueeze(2) if isinstance(o, torch.Tensor) else o for o in outputs]
        return form.rebuild(cast(list[torch.Tensor], lifted))  # checked_outputs names any non-tensor

    return predict
