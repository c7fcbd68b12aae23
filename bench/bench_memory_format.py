"""A training step of the paper's 3D networks in NCDHW against channels-last (prostate_kernels/layout.py,
`train --channels-last`), side by side in one run.

GPU: Tiramisu 3D p3a, DeepLabv3+ 3D and U-Net 3D at the paper's patches, batch 2, bf16 autocast, Adam,
BCE loss; ours (the library's layers) and eager (plain PyTorch layers): median step time (Triton's
do_bench) and peak memory in each layout. DeepLabv3+'s depthwise convs take the library's halo kernels
only channels-last; cuDNN runs other kernels in each layout.
CPU: float32 (what `train` runs on a CPU), the library's layers (PyTorch's kernels on a CPU), patches
small enough for two cores: rounds alternate between the layouts, medians.

    python bench/bench_memory_format.py [--device cuda|cpu] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import BATCH, PAPER_PATCH, cuda_step, train_step_fn, variant  # noqa: E402
from common import BenchResult, environment, interleaved_medians, markdown_table  # noqa: E402

from prostate_kernels.layout import in_layout  # noqa: E402

LAYOUTS = (("ncdhw", False), ("channels_last", True))
GPU_MODELS = ("tiramisu3d_p3a", "deeplabv3plus_3d", "unet3d")
CPU_CASES = {  # model -> (input shape without the batch, batch); the demo's network and settings first
    "tiramisu3d_tiny": ((1, 16, 32, 32), 8),
    "unet3d": ((1, 16, 64, 64), 2),
    "deeplabv3plus_3d": ((1, 16, 64, 64), 2),
}
CPU_ROUNDS = 5


def _speedup(row: dict) -> str:
    """NCDHW's step time over channels-last's ("" when either did not run)."""
    try:
        return f"{float(row['ncdhw_ms']) / float(row['channels_last_ms']):.2f}"
    except (KeyError, ValueError):
        return ""


def gpu_rows(names=GPU_MODELS, kinds=("ours", "eager")) -> list[dict]:
    rows = []
    for name in names:
        shape = PAPER_PATCH[name]
        for kind in kinds:
            row = {"model": name, "input": "x".join(map(str, shape[1:])), "batch": BATCH, "variant": kind}
            for layout, channels_last in LAYOUTS:
                model = None
                try:
                    model, backend = variant(name, kind, "cuda", channels_last)
                    ms, peak = cuda_step(model, backend, shape, channels_last)
                    row.update({f"{layout}_ms": f"{ms:.1f}", f"{layout}_MiB": f"{peak:.0f}"})
                except torch.OutOfMemoryError:
                    row.update({f"{layout}_ms": "OOM", f"{layout}_MiB": "OOM"})
                finally:
                    model = None
                    gc.collect()
                    torch.cuda.empty_cache()
            row["channels_last_speedup"] = _speedup(row)
            rows.append(row)
            print(row, flush=True)
    return rows


def cpu_rows(cases=CPU_CASES, rounds: int = CPU_ROUNDS) -> list[dict]:
    rows = []
    for name, (shape, batch) in cases.items():
        steps = {}
        for layout, channels_last in LAYOUTS:
            model, backend = variant(name, "ours", "cpu", channels_last)
            generator = torch.Generator().manual_seed(0)  # the same batch in both layouts
            x = torch.randn((batch, *shape), generator=generator)
            y = (torch.rand((batch, 1, *shape[1:]), generator=generator) > 0.5).float()
            steps[layout] = train_step_fn(model, backend, in_layout(x, channels_last), y, amp_dtype=None)
        times = interleaved_medians(steps, rounds)
        row = {"model": name, "input": "x".join(map(str, shape[1:])), "batch": batch, "variant": "ours"}
        row.update({f"{layout}_ms": f"{times[layout]['median'] * 1e3:.1f}" for layout, _ in LAYOUTS})
        row["channels_last_speedup"] = _speedup(row)
        rows.append(row)
        print(row, flush=True)
    return rows


def run(device: str) -> BenchResult:
    cuda = device == "cuda"
    rows = gpu_rows() if cuda else cpu_rows()
    notes = [
        "channels_last_speedup: NCDHW's step time over channels-last's (> 1: channels-last is faster)",
        "batch 2, bf16 autocast, Adam, BCE loss; median of Triton's do_bench"
        if cuda
        else f"float32, Adam, BCE loss; median of {CPU_ROUNDS} rounds alternating between the layouts",
    ]
    summary = "channels-last step speed-up: " + ", ".join(
        f"{r['model']} {r['variant']} {r['channels_last_speedup']}x"
        for r in rows
        if r["channels_last_speedup"]
    )
    return BenchResult("memory_format", rows, notes, summary)


def main(argv: list[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.device)
    md, csv_path = result.write(environment(), args.device, args.out_dir)
    print(markdown_table(list(dict.fromkeys(k for r in result.rows for k in r)), result.rows))
    print(f"\nwritten: {md}\n         {csv_path}\n{result.summary}")
    return result


if __name__ == "__main__":
    main()
