"""Deterministic mode for a run of the library (train --deterministic, predict --deterministic).

What it changes, and why it is enough for this library's own code: its training kernels use no atomics
(the compile gate checks each kernel's PTX), so only two things could still move the last bits between
runs, and both follow torch.use_deterministic_algorithms: the autotuners time their tiles (untimed first
candidates under the flag: ops/launch.py) and the GPU window stitching sums by atomics (the PyTorch twin
under the flag: ops/window_ops.py). PyTorch's own ops follow the flag as PyTorch decides.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"  # cuBLAS's deterministic-workspace setting, read when it starts


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """With enabled: torch.use_deterministic_algorithms(True, warn_only=True) (an op without a deterministic
    version warns and runs, instead of stopping the run at its first backward), cuDNN's benchmark off and
    cuBLAS's workspace fixed (CUBLAS_WORKSPACE_CONFIG, unless set), for the block; the previous settings
    and environment come back after it (a cuBLAS that started inside the block keeps its workspace: it
    reads the variable once). Without: nothing changes."""
    if not enabled:
        yield
        return
    was = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    benchmark, workspace = torch.backends.cudnn.benchmark, os.environ.get(CUBLAS_WORKSPACE)
    os.environ.setdefault(CUBLAS_WORKSPACE, ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.backends.cudnn.benchmark = benchmark
        if workspace is None:
            os.environ.pop(CUBLAS_WORKSPACE, None)
