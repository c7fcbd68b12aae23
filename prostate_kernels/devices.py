"""available_device: the one check that a device argument names a device this machine has; memory_bytes:
how much memory a device has in all; available_cores: how many CPU cores this process may use;
native_bf16: whether a GPU computes bf16 in hardware."""

from __future__ import annotations

import os

import torch

from prostate_kernels.data.errors import first_line


def available_device(value: torch.device | str | int, name: str | None = None) -> torch.device:
    """torch.device(value) when this machine has that device; ValueError otherwise, naming `name` (the
    argument, if given) and the value: a string torch does not parse, the meta device (it holds no
    values), CUDA without a CUDA device or past the last one, another device torch cannot reach."""
    what = f"{name} {value!r}" if name else repr(value)
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "meta":
        raise ValueError(f"{what}: the meta device holds no values to compute with")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} is not available: torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{what} is not available: {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception as exc:  # torch raises RuntimeError or AssertionError for a missing backend
            raise ValueError(f"{what} is not available: {first_line(exc)}") from None
    return device


def memory_bytes(device: torch.device) -> int | None:
    """The total memory of `device` in bytes: the host's physical memory for the CPU, the GPU's for CUDA;
    None where it is not known (another device type, a platform without sysconf, the meta device, which
    holds nothing)."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU with bf16 in hardware (compute capability 8.0, Ampere, or later),
    where the Triton kernels compile their bf16 variants. torch.cuda.is_bf16_supported() also says yes
    for older GPUs, where PyTorch emulates bf16."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
