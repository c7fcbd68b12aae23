"""Functional API: thin entry points; each op picks its implementation from prostate_kernels.backend."""

from prostate_kernels.ops.window_ops import (
    window_accumulate_,
    window_gather,
    window_normalize_,
    window_normalize_by_positions_,
)

__all__ = ["window_accumulate_", "window_gather", "window_normalize_", "window_normalize_by_positions_"]
