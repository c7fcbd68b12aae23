"""The paper's networks: training-step time and peak memory, fused layers vs eager PyTorch vs
torch.compile, and the patch-size ladder of Tiramisu 3D p3a (ours vs the naive torch.cat model).

GPU (bf16 autocast, batch 2, Adam, BCE-with-logits loss): per model at the paper's patch, median step
time and max_memory_allocated; the ladder (16,64,64) -> ... -> (64,384,384) (LADDER):
does one training step fit, and the largest that does, ours vs naive.
CPU: the saved-bytes measure of the ladder instead (bytes autograd keeps for backward plus the output),
measured at 8x32x32 and scaled by the voxel count (every saved tensor is activation-sized).

    python bench/bench_models.py [--device cuda|cpu] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchResult, environment, markdown_table, saved_bytes, time_once  # noqa: E402
from floors import Work, measure_rates  # noqa: E402
from prostate_kernels.models import build_model  # noqa: E402

from prostate_kernels import use_backend  # noqa: E402
from prostate_kernels.backend import Backend  # noqa: E402
from prostate_kernels.layout import in_layout, model_in_layout  # noqa: E402

BATCH = 2
PAPER_PATCH = {  # model -> input shape without the batch (channels, *spatial)
    "unet3d": (1, 16, 256, 256),
    "deeplabv3plus_2d": (13, 256, 256),
    "deeplabv3plus_3d": (1, 16, 128, 128),
    "tiramisu3d_p3a": (1, 16, 64, 64),
    "tiramisu3d_p3b": (1, 16, 64, 64),
    "tiramisu3d_p4a": (1, 16, 64, 64),
}
# up to 8x the 32x128x128 that the naive network trained in 80 GB (H100, 2026-11-27), and past it
LADDER = ((16, 64, 64), (16, 128, 128), (32, 128, 128), (32, 256, 256), (64, 256, 256), (64, 384, 384))
TARGET_VOXELS_VS_NAIVE = 8


def variant(
    name: str, kind: str, device: str, channels_last: bool = False
) -> tuple[torch.nn.Module, Backend]:
    """(model, backend): "ours" the library's layers, "eager" plain PyTorch, "compile" torch.compile of it
    (Inductor), "ours_compile" torch.compile of ours (the code around our custom ops compiled);
    channels_last: its weights in that layout (layout.py)."""
    torch.manual_seed(0)
    ours = kind in ("ours", "ours_compile")
    kwargs = {} if ours or not name.startswith("tiramisu") else {"memory_efficient": False}
    model = model_in_layout(build_model(name, **kwargs).to(device), channels_last)
    if kind in ("compile", "ours_compile"):
        # torch.compile of a Module is an OptimizedModule (a Module), typed as a callable
        model = cast(torch.nn.Module, torch.compile(model))
    return model, ("auto" if ours else "torch")


def train_step_fn(model, backend: Backend, x: torch.Tensor, y: torch.Tensor, amp_dtype=torch.bfloat16):
    """One Adam step on (x, y) under `backend`, autocast to amp_dtype (None: off, float32)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        with (
            use_backend(backend),
            torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        ):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_flops(name: str, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward + backward of the plain-PyTorch network on (BATCH, *shape), counted by
    torch.utils.flop_counter on the meta device (nothing computed): the compute floor of a step."""
    from torch.utils.flop_counter import FlopCounterMode

    # dropout 0 (off the CPU its masks come from a Triton kernel, which cannot run on meta tensors; it adds
    # no FLOPs worth counting)
    kwargs = {"memory_efficient": False, "dropout": 0.0} if name.startswith("tiramisu") else {}
    with torch.device("meta"):
        model = build_model(name, **kwargs)
        x = torch.empty((BATCH, *shape))
    with use_backend("torch"), FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return float(counter.get_total_flops())


def floor_columns(name: str, shape, rates, ms: float) -> dict:
    """gflop, floor_ms (FLOPs over the bf16 matmul rate measured in this run) and of_floor; the bytes a
    whole network moves are not modelled, so this floor is the compute one only."""
    columns = Work(step_flops(name, shape), 0.0).columns(rates, torch.bfloat16, ms * 1e-3)
    columns.pop("mb_moved")
    return columns


def cuda_step(model, backend: Backend, shape, channels_last: bool = False) -> tuple[float, float]:
    """(median ms, peak MiB) of a training step (its input channels-last when asked), or raises
    torch.OutOfMemoryError."""
    from triton.testing import do_bench

    x = in_layout(torch.randn((BATCH, *shape), device="cuda"), channels_last)
    y = (torch.rand((BATCH, 1, *shape[1:]), device="cuda") > 0.5).float()
    step = train_step_fn(model, backend, x, y)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = time_once(step)
    peak = torch.cuda.max_memory_allocated() / 2**20
    if seconds > 0.5:  # large patches: do_bench's own estimate alone would take several steps
        return statistics.median(time_once(step) for _ in range(3)) * 1e3, peak
    return do_bench(step, warmup=3, rep=30, return_mode="median"), peak


def gpu_models(names=tuple(PAPER_PATCH), kinds=("ours", "eager", "compile")) -> list[dict]:
    rates = measure_rates("cuda")
    rows = []
    for name in names:
        shape = PAPER_PATCH[name]
        for kind in kinds:
            row = {"model": name, "input": "x".join(map(str, shape[1:])), "variant": kind}
            try:
                model, backend = variant(name, kind, "cuda")
                ms, peak = cuda_step(model, backend, shape)
                row.update(
                    step_ms=f"{ms:.1f}", peak_MiB=f"{peak:.0f}", **floor_columns(name, shape, rates, ms)
                )
            except torch.OutOfMemoryError:
                row.update(step_ms="OOM", peak_MiB="OOM")
            finally:
                torch.cuda.empty_cache()
            rows.append(row)
        print(markdown_table(list(rows[-1]), rows[-len(kinds) :]), flush=True)
    return rows


def gpu_ladder(on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The ladder's rows; on_row(rows so far) after each (bench/gpu_suite.py saves them, so that a call
    cut by its time limit keeps the rungs it ran)."""
    rows = []
    # the naive network first: its rungs are the small, quick ones, and a call cut by its time limit
    # (the H200 run's was cut in ours' large rungs) then still has the ratio's denominator
    for kind in ("eager", "ours"):
        out_of_memory = False
        for patch in LADDER:  # increasing voxel counts: past the first OOM, larger patches are not run
            row = {
                "variant": kind,
                "patch": "x".join(map(str, patch)),
                "voxels": patch[0] * patch[1] * patch[2],
            }
            if out_of_memory:
                row.update(trains="OOM (not run: a smaller patch was)", step_ms="", peak_MiB="")
            else:
                model = None
                try:
                    model, backend = variant("tiramisu3d_p3a", kind, "cuda")
                    ms, peak = cuda_step(model, backend, (1, *patch))
                    row.update(trains="yes", step_ms=f"{ms:.0f}", peak_MiB=f"{peak:.0f}")
                except torch.OutOfMemoryError:
                    row.update(trains="OOM", step_ms="", peak_MiB="")
                    out_of_memory = True
                finally:
                    model = None
                    gc.collect()
                    torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
            if on_row is not None:
                on_row(list(rows))  # a copy: later rungs are appended to rows
    return rows


def cpu_ladder() -> list[dict]:
    base = (8, 32, 32)
    base_voxels = base[0] * base[1] * base[2]
    x = torch.randn((BATCH, 1, *base), requires_grad=True)
    measured = {}
    for kind in ("ours", "eager"):
        model, backend = variant("tiramisu3d_p3a", kind, "cpu")
        with use_backend(backend):
            measured[kind] = saved_bytes(model, x)
    rows = []
    for kind, nbytes in measured.items():
        for patch in LADDER:
            voxels = patch[0] * patch[1] * patch[2]
            rows.append(
                {
                    "variant": kind,
                    "patch": "x".join(map(str, patch)),
                    "voxels": voxels,
                    "kept_for_backward_GiB": f"{nbytes * voxels / base_voxels / 2**30:.2f}",
                }
            )
    return rows


def ladder_summary(rows: list[dict], key: str) -> str:
    """Largest patch of ours in the memory naive needs at the paper's patch (CPU) or that trains (GPU)."""
    target = f"target >= {TARGET_VOXELS_VS_NAIVE}x"

    def verdict(ratio: float) -> str:
        return f"{target}: {'met' if ratio >= TARGET_VOXELS_VS_NAIVE else 'MISSED'}"

    if key == "trains":
        best = {k: max((r["voxels"] for r in rows if r["variant"] == k and r["trains"] == "yes"), default=0)
                for k in ("ours", "eager")}  # fmt: skip
        ours = f"largest trainable patch: ours {best['ours']} voxels"
        if not best["eager"]:  # no ratio to state: naive trained none of the rungs it ran
            return f"{ours}, naive none of its rungs ({target}: not measured)"
        ratio = best["ours"] / best["eager"]
        return f"{ours}, naive {best['eager']} voxels, ratio {ratio:.0f}x ({verdict(ratio)})"
    budget = float(next(r for r in rows if r["variant"] == "eager")[key])  # naive at the paper's patch
    fits = [r for r in rows if r["variant"] == "ours" and float(r[key]) <= budget]
    if not fits:
        return f"within the {budget:.2f} GiB naive keeps at 16x64x64, ours fits no rung ({target}: MISSED)"
    largest = max(fits, key=lambda r: r["voxels"])
    ratio = largest["voxels"] / rows[0]["voxels"]
    return (f"within the {budget:.2f} GiB naive keeps at 16x64x64, ours fits up to {largest['patch']} "
            f"({ratio:.0f}x the voxels; {verdict(ratio)})")  # fmt: skip


def run(
    device: str,
    names=tuple(PAPER_PATCH),
    kinds=("ours", "eager", "compile"),
    ladder: bool = True,
    on_ladder_row: Callable[[BenchResult], None] | None = None,
) -> list[BenchResult]:
    """[models (GPU only: `names` x `kinds`; none when names is empty), patch ladder (if `ladder`)];
    on_ladder_row(the ladder's result so far, marked partial) after each GPU rung."""
    results = []
    if device == "cuda" and names:
        rows = gpu_models(names, kinds)
        results.append(
            BenchResult(
                "models", rows, [f"batch {BATCH}, bf16 autocast, Adam, BCE loss"], _speed_summary(rows)
            )
        )
    if not ladder:
        return results
    if device == "cuda":
        on_row = (
            None
            if on_ladder_row is None
            else lambda rows: on_ladder_row(ladder_result(rows, True, partial=True))
        )
        results.append(ladder_result(gpu_ladder(on_row), True, partial=False))
    else:
        results.append(ladder_result(cpu_ladder(), False, partial=False))
    return results


def ladder_result(rows: list[dict], gpu: bool, partial: bool) -> BenchResult:
    """The ladder's BenchResult; partial: the rungs run so far (the run may be cut before the rest)."""
    notes = [
        "Tiramisu 3D p3a, batch 2; ours = memory-efficient dense blocks (fused layers), eager = torch.cat"
    ]
    if partial:
        notes.append(f"PARTIAL: the rungs run before this was saved ({len(rows)}); the rest did not run")
        summary = f"PARTIAL ({len(rows)} rungs): " + "; ".join(
            f"{r['variant']} {r['patch']} {r['trains']} {r.get('peak_MiB', '')} MiB" for r in rows
        )
    else:
        summary = ladder_summary(rows, "trains" if gpu else "kept_for_backward_GiB")
    notes.append(summary)
    if not gpu:
        notes.append("CPU: kept-for-backward bytes measured at 8x32x32 and scaled by voxel count")
    return BenchResult("patch_ladder", rows, notes, summary)


def _speed_summary(rows: list[dict]) -> str:
    """Training-step speed-up of ours over eager per model."""
    step = {(r["model"], r["variant"]): r["step_ms"] for r in rows}
    parts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ours, eager = step.get((model, "ours")), step.get((model, "eager"))
        if ours and eager and "OOM" not in (ours, eager):
            parts.append(f"{model} {float(eager) / float(ours):.2f}x")
    return "training step vs eager: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> list[BenchResult]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    env = environment()
    results = run(args.device)
    for result in results:
        md, csv_path = result.write(env, args.device, args.out_dir)
        print(markdown_table(list(result.rows[0]), result.rows))
        print(f"\nwritten: {md}\n         {csv_path}")
    print(results[-1].summary)
    return results


if __name__ == "__main__":
    main()
