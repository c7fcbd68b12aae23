"""Where the GPU time of a dense layer and of a Tiramisu 3D p3a training step goes: torch.profiler's
per-kernel CUDA time, for bench/gpu_suite.py's "profile" section (one table per case, top kernels).

    python3 bench/gpu_profile.py        # on a CUDA machine; prints the tables
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchResult  # noqa: E402

TOP = 12


def _dense_layer_step(c_in: int, size: tuple[int, int, int]):
    from prostate_kernels.nn import BNReLUConv3d

    layer = BNReLUConv3d(c_in, 16).cuda().to(torch.bfloat16)
    x = torch.randn((2, c_in, *size), device="cuda", dtype=torch.bfloat16)
    x = x.to(memory_format=torch.channels_last_3d).requires_grad_(True)
    gy = torch.randn((2, 16, *size), device="cuda", dtype=torch.bfloat16)

    def step():
        x.grad = None
        layer(x).backward(gy)

    return step


def _p3a_step():
    from bench_models import BATCH, train_step_fn, variant

    model, backend = variant("tiramisu3d_p3a", "ours", "cuda")
    x = torch.randn((BATCH, 1, 16, 64, 64), device="cuda")
    y = (torch.rand((BATCH, 1, 16, 64, 64), device="cuda") > 0.5).float()
    return train_step_fn(model, backend, x, y)


def profile(name: str, step, repeats: int = 5) -> list[dict]:
    """Top kernels by total CUDA time over `repeats` steps (after two warm-up steps: autotuning done),
    with the wall time per step and the CPU time the profiler saw."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(repeats):
            step()
        end.record()
        torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / repeats
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    gpu_ms = sum(e.device_time_total for e in events) / 1e3 / repeats
    rows = []
    for e in events[:TOP]:
        rows.append(
            {
                "case": name,
                "kernel": e.key[:70],
                "calls_per_step": e.count // repeats,
                "cuda_ms_per_step": f"{e.device_time_total / 1e3 / repeats:.3f}",
                "share_of_kernel_time": f"{e.device_time_total / 1e3 / repeats / gpu_ms:.2f}",
                "step_wall_ms": f"{wall_ms:.3f}",
                "step_kernel_ms": f"{gpu_ms:.3f}",
            }
        )
    return rows


def run() -> BenchResult:
    rows = []
    for c_in, size in ((48, (16, 64, 64)), (416, (16, 64, 64)), (288, (4, 16, 16))):
        rows += profile(
            f"dense layer C_in={c_in} {'x'.join(map(str, size))} bf16", _dense_layer_step(c_in, size)
        )
    rows += profile("tiramisu3d_p3a step 16x64x64 bf16", _p3a_step(), repeats=3)
    notes = [
        "torch.profiler, CUDA kernel time per step (after 2 warm-up steps); step_wall_ms: CUDA events around "
        "the profiled steps; wall much above kernel time = the GPU waits for the host (launch overhead)"
    ]
    summary = "; ".join(
        f"{case}: wall {r['step_wall_ms']} ms, kernels {r['step_kernel_ms']} ms"
        for case, r in {r["case"]: r for r in rows}.items()
    )
    return BenchResult("profile", rows, notes, summary)


if __name__ == "__main__":
    from common import markdown_table

    result = run()
    print(markdown_table(list(result.rows[0]), result.rows))
    print(result.summary)
