"""Functional API: every op's public entry, re-exported from the op's own module in ops/ (which
validates, picks the backend, applies autocast and dispatches)."""

from __future__ import annotations

from prostate_kernels.ops.bn_relu_conv3d import bn_relu_conv3d
from prostate_kernels.ops.depthwise_conv3d import depthwise_conv3d
from prostate_kernels.ops.window_ops import (
    window_accumulate_,
    window_gather,
    window_normalize_,
    window_normalize_by_positions_,
)

__all__ = [
    "bn_relu_conv3d",
    "depthwise_conv3d",
    "window_accumulate_",
    "window_gather",
    "window_normalize_",
    "window_normalize_by_positions_",
]
