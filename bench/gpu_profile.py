"""Where the GPU time of a dense layer and of a Tiramisu 3D p3a training step goes: torch.profiler's
per-kernel CUDA time, for bench/gpu_suite.py's "profile" section (one table per case, top kernels).

    python3 bench/gpu_profile.py        # on a CUDA machine; prints the tables
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchResult, synchronize  # noqa: E402

TOP = 12
PHASE_ROWS = " (phases, no profiler)"  # the case suffix of phase_rows' rows


def _dense_layer_phases(c_in: int, size: tuple[int, int, int], device: str = "cuda") -> dict:
    """{"fwd", "bwd", "fwd+bwd"}: steps of one bf16 channels-last fused layer (batch 2, growth 16), as
    bench_bn_relu_conv3d times them: a forward, the backward of a retained graph, a fresh forward +
    backward (x.grad set to None before each backward)."""
    from prostate_kernels.nn import BNReLUConv3d

    layer = BNReLUConv3d(c_in, 16).to(device, torch.bfloat16)
    x = torch.randn((2, c_in, *size), device=device, dtype=torch.bfloat16)
    x = x.to(memory_format=torch.channels_last_3d).requires_grad_(True)
    gy = torch.randn((2, 16, *size), device=device, dtype=torch.bfloat16)
    retained = layer(x)

    def backward_only():
        x.grad = None
        retained.backward(gy, retain_graph=True)

    def both():
        x.grad = None
        layer(x).backward(gy)

    return {"fwd": lambda: layer(x), "bwd": backward_only, "fwd+bwd": both}


def _dense_layer_step(c_in: int, size: tuple[int, int, int], device: str = "cuda"):
    return _dense_layer_phases(c_in, size, device)["fwd+bwd"]


def enqueue_and_wall_ms(step, repeats: int = 20) -> tuple[float, float]:
    """(host ms per step until the step's work is queued, wall ms per step until it is done), without
    the profiler, after two warm-up steps. Enqueue near wall: the GPU waited for the host (or the queue
    was full: then the kernel time says it); enqueue far below wall: the GPU's own time."""
    for _ in range(2):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    queued = time.perf_counter()
    synchronize()
    done = time.perf_counter()
    return (queued - start) * 1e3 / repeats, (done - start) * 1e3 / repeats


def phase_rows(c_in: int, size: tuple[int, int, int], device: str = "cuda") -> list[dict]:
    """enqueue_and_wall_ms of the fused layer's forward, retained backward and fresh forward + backward
    (the H200 run of 2026-12-04 timed C_in=48 16x64x64 at 0.38, 0.87 and 2.12 ms: the last far above
    the first two's sum). Columns as the profile rows', with host and wall ms in place of kernel ones."""
    name = f"dense layer C_in={c_in} {'x'.join(map(str, size))} bf16{PHASE_ROWS}"
    return [_phase_row(name, phase, step) for phase, step in _dense_layer_phases(c_in, size, device).items()]


def _phase_row(case: str, phase: str, step, repeats: int = 20) -> dict:
    """A phase row: enqueue_and_wall_ms of `step`, in the profile rows' columns."""
    enqueue, wall = enqueue_and_wall_ms(step, repeats)
    return {
        "case": case,
        "kernel": phase,
        "calls_per_step": 1,
        "cuda_ms_per_step": f"{enqueue:.3f}",  # host ms to enqueue here
        "share_of_kernel_time": f"{enqueue / wall:.2f}",  # enqueue / wall here
        "step_wall_ms": f"{wall:.3f}",
        "step_kernel_ms": "",
    }


def _model_step(
    name: str = "tiramisu3d_p3a",
    kind: str = "ours",
    shape: tuple[int, int, int] = (16, 64, 64),
    device: str = "cuda",
):
    """One bf16-autocast Adam training step of bench_models' `kind` ("ours", "eager") of network `name`
    on a (BATCH, 1, *shape) batch, as bench_models times it."""
    from bench_models import BATCH, train_step_fn, variant

    model, backend = variant(name, kind, device)
    x = torch.randn((BATCH, 1, *shape), device=device)
    y = (torch.rand((BATCH, 1, *shape), device=device) > 0.5).float()
    return train_step_fn(model, backend, x, y)


def model_step_rows(
    name: str = "tiramisu3d_p3a", shape: tuple[int, int, int] = (16, 64, 64), device: str = "cuda"
) -> list[dict]:
    """enqueue_and_wall_ms of a whole training step, ours and the plain network (eager): host ms near wall
    ms = the step waits for the host. The H200 run of 2026-12-04 timed p3a's step at 16x64x64 at 133 ms
    (ours) and 115 ms (eager) against a 6 ms compute floor. Columns as phase_rows'."""
    case = f"{name} step {'x'.join(map(str, shape))} bf16{PHASE_ROWS}"
    rows = []
    for kind in ("ours", "eager"):
        rows.append(_phase_row(case, kind, _model_step(name, kind, shape, device), repeats=10))
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


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
    averages = prof.key_averages()
    events = [e for e in averages if e.device_time_total > 0 and e.device_type.name == "CUDA"]
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
    # The host side: where the CPU time of a step goes (self time per op, launches included), for the
    # steps whose wall time is far above their kernel time.
    host = sorted((e for e in averages if e.device_type.name == "CPU"), key=lambda e: e.self_cpu_time_total)
    host_ms = sum(e.self_cpu_time_total for e in host) / 1e3 / repeats
    for e in reversed(host[-TOP:]):
        rows.append(
            {
                "case": f"{name} (host)",
                "kernel": e.key[:70],
                "calls_per_step": e.count // repeats,
                "cuda_ms_per_step": f"{e.self_cpu_time_total / 1e3 / repeats:.3f}",  # self CPU ms here
                "share_of_kernel_time": f"{e.self_cpu_time_total / 1e3 / repeats / host_ms:.2f}",
                "step_wall_ms": f"{wall_ms:.3f}",
                "step_kernel_ms": f"{host_ms:.3f}",  # the host's total self CPU ms per step here
            }
        )
    return rows


def python_profile(name: str, step, repeats: int = 50) -> list[dict]:
    """Where the host's Python time of a step goes (cProfile, top functions by own time, the Triton launch
    path and our launchers included): torch.profiler sees aten ops only. cProfile slows Python down, so
    the shares are what to read, not the milliseconds."""
    import cProfile
    import pstats

    for _ in range(2):
        step()
    synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats):
        step()
    profiler.disable()
    synchronize()
    # (file, line, function) -> (calls, _, own s, cumulative s, _): the table print_stats reads, not typed
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:TOP]
    return [
        {
            "case": f"{name} (python)",
            "kernel": f"{Path(f).name}:{line} {fn}"[:70],
            "calls_per_step": v[0] // repeats,
            "cuda_ms_per_step": f"{v[2] * 1e3 / repeats:.3f}",  # own Python ms here
            "share_of_kernel_time": f"{v[2] / total:.2f}",
            "step_wall_ms": "",
            "step_kernel_ms": f"{total * 1e3 / repeats:.3f}",  # all Python ms per step (under cProfile)
        }
        for (f, line, fn), v in top
    ]


def run() -> BenchResult:
    rows = []
    for c_in, size in ((48, (16, 64, 64)), (416, (16, 64, 64)), (288, (4, 16, 16))):
        rows += profile(
            f"dense layer C_in={c_in} {'x'.join(map(str, size))} bf16", _dense_layer_step(c_in, size)
        )
    for c_in, size in ((48, (16, 64, 64)), (288, (4, 16, 16))):
        label = f"dense layer C_in={c_in} {'x'.join(map(str, size))} bf16"
        rows += phase_rows(c_in, size)
        rows += python_profile(label, _dense_layer_step(c_in, size))
    rows += profile("tiramisu3d_p3a step 16x64x64 bf16", _model_step(), repeats=3)
    rows += model_step_rows()
    rows += python_profile("tiramisu3d_p3a step 16x64x64 bf16", _model_step(), repeats=5)
    notes = [
        "torch.profiler, CUDA kernel time per step (after 2 warm-up steps); step_wall_ms: CUDA events around "
        "the profiled steps; wall much above kernel time = the GPU waits for the host (launch overhead)",
        "(host) rows: the CPU side of the same steps, self CPU time per op (Triton launches appear as their "
        "kernel's name on the CPU); there cuda_ms_per_step holds self CPU ms, step_kernel_ms the host total",
        "(python) rows: cProfile of 50 steps (5 of the p3a step), own time per Python function (Triton's "
        "launch path and our launchers included); cuda_ms_per_step holds own Python ms, step_kernel_ms all "
        "Python ms per step",
        "(phases, no profiler) rows: 20 steps of the layer's forward, retained backward and fresh forward + "
        "backward (10 whole p3a training steps, ours and eager); cuda_ms_per_step holds the host's ms per "
        "step to enqueue them, share_of_kernel_time enqueue / wall, step_wall_ms the wall ms per step until "
        "done (perf_counter, synchronised)",
    ]
    return BenchResult("profile", rows, notes, summarize(rows))


def summarize(rows: list[dict]) -> str:
    """One clause per case (per phase for the phase rows), each kind of row read by its own columns."""
    clauses = []
    for case, r in {r["case"]: r for r in rows if not r["case"].endswith(PHASE_ROWS)}.items():
        if case.endswith("(host)"):
            clauses.append(f"{case}: host self CPU {r['step_kernel_ms']} ms")
        elif case.endswith("(python)"):
            clauses.append(f"{case}: {r['step_kernel_ms']} ms of Python under cProfile")
        else:
            clauses.append(f"{case}: wall {r['step_wall_ms']} ms, kernels {r['step_kernel_ms']} ms")
    for r in rows:
        if r["case"].endswith(PHASE_ROWS):
            case = r["case"].removesuffix(PHASE_ROWS)
            clauses.append(
                f"{case} {r['kernel']}: host {r['cuda_ms_per_step']} ms of wall {r['step_wall_ms']} ms"
            )
    return "; ".join(clauses)


if __name__ == "__main__":
    from common import markdown_table

    result = run()
    print(markdown_table(list(result.rows[0]), result.rows))
    print(result.summary)
