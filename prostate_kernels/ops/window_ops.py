"""Sliding-window stitching ops, registered with torch.library (with fake kernels for torch.compile).

    prostate_kernels::window_gather(volume, starts, roi) -> windows
    prostate_kernels::window_accumulate_(output, weight?, windows, starts, importance) -> ()
    prostate_kernels::window_normalize_(output, weight) -> ()
    prostate_kernels::window_normalize_by_positions_(output, positions, importance) -> ()

Shapes: volume/output (N, C, D, H, W); weight (N, 1, D, H, W) float32 (batch 1 allowed when
normalising: one weight map for every image); windows (B, C, rd, rh, rw); starts (B, 4) int64 rows
(n, z, y, x); positions (P, 3) int64 rows (z, y, x) of windows shared by every image;
importance (rd, rh, rw) float32. output is float32: accumulation is always float32,
whatever the windows' dtype (float32, float64, float16, bfloat16).

Bad input raises ValueError or TypeError naming the value, whichever implementation runs: the checks
below run first for every implementation (the one place where arguments are validated). The C++
extension keeps its own checks as well, because it is callable directly (prostate_kernels._C) and
every one of them guards its raw-pointer loops (dtype, contiguity, rank, bounds: nothing is written
out of bounds); through these ops they are never the ones that fire. These ops are for inference:
they have no autograd formula.

On a GPU (Triton) overlapping windows are summed with float atomics, whose order changes from run to run
(a last-bit difference); under torch.use_deterministic_algorithms(True) the summing ops run the PyTorch
twin instead, in batch order, as the C++ CPU path always does.

`window_ops_for(device)` returns the checked implementation directly; sliding_window_inference calls
it in its loop to skip the custom-op dispatcher (about 50 us a call in eager mode), while the
registered ops are what a torch.compile'd graph records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import NamedTuple

import torch

from prostate_kernels import backend, reference
from prostate_kernels._ext import _C
from prostate_kernels.windows import starts_of_positions

_WINDOW_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------- checks


def _check_tensor(
    op: str, name: str, value: object, ndim: int | None = None, layout: str = ""
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(value.shape)}")
    if not value.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous, got strides {value.stride()} for shape {tuple(value.shape)}"
        )
    return value


def _check_float32(op: str, name: str, value: torch.Tensor) -> None:
    if value.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be float32, got {value.dtype}")


def _check_same_device(
    op: str, reference_name: str, reference_tensor: torch.Tensor, **others: torch.Tensor
) -> None:
    for name, tensor in others.items():
        if tensor.device != reference_tensor.device:
            raise ValueError(
                f"{op}: {name} is on {tensor.device} but {reference_name} is on {reference_tensor.device}"
            )


def check_roi(op: str, roi: Sequence[int]) -> list[int]:
    """roi as a list of 3 positive ints, or ValueError naming it."""
    if len(roi) != 3 or not all(isinstance(r, int) and not isinstance(r, bool) for r in roi):
        raise ValueError(f"{op}: roi {tuple(roi)} must be 3 ints (rd, rh, rw)")
    if min(roi) <= 0:
        raise ValueError(f"{op}: roi {tuple(roi)} has a size <= 0")
    return list(roi)


def check_starts(
    op: str, starts: object, volume_shape: Sequence[int], roi: Sequence[int], bounds: bool = True
) -> torch.Tensor:
    """starts (B, 4) int64 with every window inside the volume (N, C, D, H, W), or ValueError/TypeError.

    bounds=False checks the layout only: the bounds check reads the values, which on a GPU waits for
    the device (sliding_window_inference checks all its starts once on the host instead).
    """
    starts = _check_tensor(op, "starts", starts, 2, "(B, 4) rows (n, z, y, x)")
    if starts.shape[1] != 4:
        raise ValueError(f"{op}: starts must have shape (B, 4) rows (n, z, y, x), got {tuple(starts.shape)}")
    if starts.dtype != torch.int64:
        raise TypeError(f"{op}: starts must be int64, got {starts.dtype}")
    if starts.shape[0] == 0 or not bounds:
        return starts
    n, _, d, h, w = volume_shape
    upper = torch.tensor([n - 1, d - roi[0], h - roi[1], w - roi[2]], device=starts.device)
    outside = ((starts < 0) | (starts > upper)).any(dim=1)
    if bool(outside.any()):
        b = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"{op}: window {b} starts at (n, z, y, x) = {tuple(starts[b].tolist())}; a window of size "
            f"{tuple(roi)} there reaches outside the volume of shape {tuple(volume_shape)}"
        )
    return starts


def _check_gather_out(op: str, out: object, volume: torch.Tensor, shape: tuple[int, ...]) -> None:
    out = _check_tensor(op, "out", out, 5, "(B, C, rd, rh, rw)")
    if tuple(out.shape) != shape:
        raise ValueError(f"{op}: out must have shape {shape}, got {tuple(out.shape)}")
    if out.dtype != volume.dtype:
        raise TypeError(f"{op}: out has dtype {out.dtype} but volume has {volume.dtype}")
    _check_same_device(op, "volume", volume, out=out)
    if out.data_ptr() == volume.data_ptr():
        raise ValueError(f"{op}: out and volume must be different buffers")


def _check_accumulate_args(
    output: torch.Tensor,
    weight: torch.Tensor | None,
    windows: torch.Tensor,
    starts: torch.Tensor,
    importance: torch.Tensor,
    bounds: bool = True,
) -> None:
    op = "window_accumulate_"
    _check_tensor(op, "output", output, 5, "(N, C, D, H, W)")
    _check_float32(op, "output", output)
    _check_tensor(op, "windows", windows, 5, "(B, C, rd, rh, rw)")
    if windows.dtype not in _WINDOW_DTYPES:
        raise TypeError(f"{op}: windows must be float32, float64, float16 or bfloat16, got {windows.dtype}")
    if windows.shape[1] != output.shape[1]:
        raise ValueError(
            f"{op}: windows have {windows.shape[1]} channels but output has {output.shape[1]} "
            f"(windows {tuple(windows.shape)}, output {tuple(output.shape)})"
        )
    _check_tensor(op, "importance", importance, 3, "(rd, rh, rw)")
    _check_float32(op, "importance", importance)
    if tuple(importance.shape) != tuple(windows.shape[2:]):
        raise ValueError(
            f"{op}: importance has shape {tuple(importance.shape)} but windows are {tuple(windows.shape[2:])}"
        )
    starts = check_starts(op, starts, output.shape, windows.shape[2:], bounds)
    if starts.shape[0] != windows.shape[0]:
        raise ValueError(f"{op}: starts has {starts.shape[0]} rows but there are {windows.shape[0]} windows")
    _check_same_device(op, "output", output, windows=windows, starts=starts, importance=importance)
    if weight is not None:
        _check_tensor(op, "weight", weight, 5, "(N, 1, D, H, W)")
        _check_float32(op, "weight", weight)
        expected = (output.shape[0], 1, *output.shape[2:])
        if tuple(weight.shape) != expected:
            raise ValueError(f"{op}: weight must have shape {expected}, got {tuple(weight.shape)}")
        _check_same_device(op, "output", output, weight=weight)
        if weight.data_ptr() == output.data_ptr():
            raise ValueError(f"{op}: weight and output must be different buffers")


def _check_normalize_by_positions_args(
    output: torch.Tensor, positions: torch.Tensor, importance: torch.Tensor
) -> None:
    op = "window_normalize_by_positions_"
    _check_tensor(op, "output", output, 5, "(N, C, D, H, W)")
    _check_float32(op, "output", output)
    _check_tensor(op, "importance", importance, 3, "(rd, rh, rw)")
    _check_float32(op, "importance", importance)
    positions = _check_tensor(op, "positions", positions, 2, "(P, 3) rows (z, y, x)")
    if positions.shape[1] != 3:
        raise ValueError(
            f"{op}: positions must have shape (P, 3) rows (z, y, x), got {tuple(positions.shape)}"
        )
    if positions.dtype != torch.int64:
        raise TypeError(f"{op}: positions must be int64, got {positions.dtype}")
    check_starts(op, starts_of_positions(positions), (1, 1, *output.shape[2:]), importance.shape)
    _check_same_device(op, "output", output, positions=positions, importance=importance)


def _check_normalize_args(output: torch.Tensor, weight: torch.Tensor) -> None:
    op = "window_normalize_"
    _check_tensor(op, "output", output, 5, "(N, C, D, H, W)")
    _check_float32(op, "output", output)
    _check_tensor(op, "weight", weight, 5, "(N or 1, 1, D, H, W)")
    _check_float32(op, "weight", weight)
    n = output.shape[0]
    if weight.shape[0] not in (1, n) or weight.shape[1] != 1 or weight.shape[2:] != output.shape[2:]:
        raise ValueError(
            f"{op}: weight must have shape ({n} or 1, 1, {', '.join(map(str, output.shape[2:]))}), "
            f"got {tuple(weight.shape)}"
        )
    _check_same_device(op, "output", output, weight=weight)


# ------------------------------------------------------------------------------------ dispatch


class WindowOps(NamedTuple):
    """One device's implementation of the four ops, each checking its arguments."""

    gather: Callable[..., torch.Tensor]  # (volume, starts, roi, out=None) -> windows
    accumulate_: Callable[..., None]
    normalize_: Callable[[torch.Tensor, torch.Tensor], None]
    normalize_by_positions_: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def _checked(impl, starts_checked: bool = False) -> WindowOps:
    """impl's functions (the C++ extension, the Triton kernels or the PyTorch twin) behind the checks;
    starts_checked: the caller has checked every window's bounds already (layout is still checked)."""

    def gather(volume, starts, roi, out=None):
        op = "window_gather"
        _check_tensor(op, "volume", volume, 5, "(N, C, D, H, W)")
        roi = check_roi(op, roi)
        starts = check_starts(op, starts, volume.shape, roi, bounds=not starts_checked)
        _check_same_device(op, "volume", volume, starts=starts)
        if out is not None:
            _check_gather_out(op, out, volume, (starts.shape[0], volume.shape[1], *roi))
        return impl.window_gather(volume, starts, roi, out)

    def accumulate_(output, weight, windows, starts, importance):
        _check_accumulate_args(output, weight, windows, starts, importance, bounds=not starts_checked)
        impl.window_accumulate_(output, weight, windows, starts, importance)

    def normalize_(output, weight):
        _check_normalize_args(output, weight)
        impl.window_normalize_(output, weight)

    def normalize_by_positions_(output, positions, importance):
        _check_normalize_by_positions_args(output, positions, importance)
        impl.window_normalize_by_positions_(output, positions, importance)

    return WindowOps(gather, accumulate_, normalize_, normalize_by_positions_)


def window_ops_for(device: torch.device, starts_checked: bool = False) -> WindowOps:
    """The implementation the current backend picks for tensors on `device` (see backend.py).

    starts_checked=True: the caller has checked every start it will pass against the volume's bounds
    (check_starts on a host copy), so the ops skip that check, which would wait for a GPU on every call.
    """
    choice = backend.resolve(device, has_cpu_extension=_C is not None)
    if choice == "cpp":
        return _checked(_C, starts_checked)
    if choice == "triton":
        from prostate_kernels.ops import window_accumulate  # imports Triton on first use only

        if torch.are_deterministic_algorithms_enabled():
            return _checked(_deterministic_stitching(window_accumulate), starts_checked)
        return _checked(window_accumulate, starts_checked)
    return _checked(reference, starts_checked)


def _deterministic_stitching(triton_ops):
    """The Triton ops with the two that sum overlapping windows by float atomics (an order that changes
    from run to run on a GPU) replaced by the PyTorch twin, which adds window after window in batch order:
    what torch.use_deterministic_algorithms(True) asks for. Slower on a GPU (a few torch ops per window);
    gather and normalisation write each voxel once and stay Triton."""
    return SimpleNamespace(
        window_gather=triton_ops.window_gather,
        window_accumulate_=reference.window_accumulate_,
        window_normalize_=triton_ops.window_normalize_,
        window_normalize_by_positions_=reference.window_normalize_by_positions_,
    )


# ------------------------------------------------------------------------------------------- ops


@torch.library.custom_op("prostate_kernels::window_gather", mutates_args=())
def window_gather(volume: torch.Tensor, starts: torch.Tensor, roi: list[int]) -> torch.Tensor:
    """Copies windows of size roi = (rd, rh, rw) out of volume (N, C, D, H, W) at starts (B, 4).

    Returns (B, C, rd, rh, rw) in volume's dtype.
    """
    return window_ops_for(volume.device).gather(volume, starts, roi)


@window_gather.register_fake
def _window_gather_fake(volume: torch.Tensor, starts: torch.Tensor, roi: list[int]) -> torch.Tensor:
    return volume.new_empty((starts.shape[0], volume.shape[1], *roi))


@torch.library.custom_op("prostate_kernels::window_accumulate_", mutates_args=("output", "weight"))
def window_accumulate_(
    output: torch.Tensor,
    weight: torch.Tensor | None,
    windows: torch.Tensor,
    starts: torch.Tensor,
    importance: torch.Tensor,
) -> None:
    """output[n, :, z:z+rd, y:y+rh, x:x+rw] += windows[b] * importance, and, if weight is given,
    weight[n, 0, z:z+rd, y:y+rh, x:x+rw] += importance, for each window b with starts[b] = (n, z, y, x).

    float32 accumulation; windows may overlap each other, also inside one batch.
    """
    window_ops_for(output.device).accumulate_(output, weight, windows, starts, importance)


@window_accumulate_.register_fake
def _window_accumulate_fake(output, weight, windows, starts, importance) -> None:
    return None


@torch.library.custom_op("prostate_kernels::window_normalize_", mutates_args=("output",))
def window_normalize_(output: torch.Tensor, weight: torch.Tensor) -> None:
    """output /= weight voxel by voxel (weight batch 1 or N); voxels no window covered (weight <= 0) get 0."""
    window_ops_for(output.device).normalize_(output, weight)


@window_normalize_.register_fake
def _window_normalize_fake(output, weight) -> None:
    return None


@torch.library.custom_op("prostate_kernels::window_normalize_by_positions_", mutates_args=("output",))
def window_normalize_by_positions_(
    output: torch.Tensor, positions: torch.Tensor, importance: torch.Tensor
) -> None:
    """output[n, c] /= the weight map of windows at positions (P, 3) rows (z, y, x), shared by every image.

    Equal to window_accumulate_ of every window's importance into a zeroed (1, 1, D, H, W) weight
    followed by window_normalize_; on the CPU the weight map is summed plane by plane in cache and never
    stored. Voxels no window covers become 0.
    """
    window_ops_for(output.device).normalize_by_positions_(output, positions, importance)


@window_normalize_by_positions_.register_fake
def _window_normalize_by_positions_fake(output, positions, importance) -> None:
    return None
