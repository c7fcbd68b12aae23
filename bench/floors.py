"""The hardware floor of a benchmark row (DESIGN.md section 7): the bytes an op must move at the device's
measured copy bandwidth, and its FLOPs at the device's measured dense matmul rate for its dtype; the
floor is the larger of the two. Both rates are measured once per run, on the device that runs the rows,
so a row's `of_floor` (floor time / measured time, 1.0 = at the floor) compares like with like.

The bytes and FLOPs of a shape are computed without any device (`Work`), so tables show them on the CPU
too, before a GPU run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from common import interleaved_medians

COPY_BYTES = 2**28  # 256 MiB each way: far past every cache
MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}  # torch.mm of n x n; 8192^2 keeps a GPU's tensor cores busy


@dataclass(frozen=True)
class DeviceRates:
    device: str
    copy_bytes_per_s: float  # bytes read + written per second by a large device-to-device copy_
    matmul_flops_per_s: dict  # dtype name -> FLOP/s of torch.mm at MATMUL_SIZE

    def describe(self) -> str:
        rates = ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in self.matmul_flops_per_s.items())
        return f"measured on {self.device}: copy {self.copy_bytes_per_s / 1e9:.0f} GB/s; matmul {rates}"


@dataclass(frozen=True)
class Work:
    """What an op must do at least: FLOPs and bytes moved to and from memory."""

    flops: float
    bytes: float

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes)

    def floor_seconds(self, rates: DeviceRates, dtype: torch.dtype) -> float:
        matmul = rates.matmul_flops_per_s.get(str(dtype).removeprefix("torch."), float("nan"))
        return max(self.flops / matmul, self.bytes / rates.copy_bytes_per_s)

    def columns(self, rates: DeviceRates | None, dtype: torch.dtype, seconds: float, tag: str = "") -> dict:
        """Row columns: GFLOP, MB moved, floor ms and the fraction of the floor reached (with rates)."""
        suffix = f"_{tag}" if tag else ""
        out = {f"gflop{suffix}": f"{self.flops / 1e9:.2f}", f"mb_moved{suffix}": f"{self.bytes / 1e6:.1f}"}
        if rates is not None:
            floor = self.floor_seconds(rates, dtype)
            out[f"floor_ms{suffix}"] = f"{floor * 1e3:.3f}"
            out[f"of_floor{suffix}"] = f"{floor / seconds:.2f}"
        return out


def _seconds(fn, device: str) -> float:
    """Median seconds of fn: triton's do_bench on a GPU, common.interleaved_medians on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3
    return interleaved_medians({"fn": fn}, rounds=5, warmup=1)["fn"]["median"]


def measure_rates(device: str, dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> DeviceRates:
    """Copy bandwidth and matmul rates of `device` now (float32 at PyTorch's default precision: IEEE
    unless torch.backends.cuda.matmul.allow_tf32 is set)."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = 2 * COPY_BYTES / _seconds(lambda: dst.copy_(src), device)
    n = MATMUL_SIZE.get(device, 1024)
    rates = {}
    for dtype in dtypes if device == "cuda" else (torch.float32,):
        a = torch.randn(n, n, device=device).to(dtype)
        rates[str(dtype).removeprefix("torch.")] = 2 * n**3 / _seconds(lambda a=a: a @ a, device)
    return DeviceRates(device, copy, rates)
