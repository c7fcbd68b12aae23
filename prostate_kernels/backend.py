"""Which implementation an op runs: the Triton kernels, the PyTorch twin, or (CPU) the C++ extension.

"auto"   : Triton kernels for CUDA tensors (an op's entry may still take its PyTorch twin at sizes where
           the kernels measured slower: depthwise_conv3d below TRITON_FROM_ELEMENTS); on the CPU the C++
           extension where an op has one, otherwise the PyTorch twin (prostate_kernels.reference).
"triton" : always the Triton kernels. On CPU tensors this needs the Triton interpreter
           (TRITON_INTERPRET=1 in the environment before Triton is first imported); the tests run so.
"torch"  : always the PyTorch twin (the test oracle and the benchmark baseline).

The choice is process-wide; `use_backend` changes it for a `with` block and restores it afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")

_backend: Backend = "auto"


def get_backend() -> Backend:
    """The backend set by `set_backend` ("auto" unless changed)."""
    return _backend


def set_backend(name: Backend) -> None:
    """Select the kernel backend for every op: "auto", "triton" or "torch"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    _backend = name


@contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """`with use_backend("torch"): ...` runs the block on that backend, then restores the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(device: torch.device, has_cpu_extension: bool = False) -> str:
    """The implementation to run for tensors on `device`: "triton", "torch" or "cpp".

    Raises RuntimeError when "triton" is forced on CPU tensors without the interpreter, instead of
    letting Triton fail later with "0 active drivers".
    """
    backend = get_backend()
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"backend 'triton' was selected for tensors on {device}, but Triton runs on the CPU only "
                "through its interpreter: set TRITON_INTERPRET=1 before importing prostate_kernels"
            )
        return "triton"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and has_cpu_extension:
        return "cpp"
    return "torch"


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts convolutions to on `device`, or None when autocast is off there
    (devices without autocast support, such as "meta", count as off)."""
    if device.type not in ("cuda", "cpu", "xpu", "mps"):
        return None
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Context that disables autocast on `device` (a no-op on devices without autocast, e.g. "meta")."""
    if device.type not in ("cuda", "cpu", "xpu", "mps"):
        return nullcontext()
    return torch.autocast(device.type, enabled=False)
