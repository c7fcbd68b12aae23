"""Sliding-window stitching: ours vs MONAI vs the PyTorch twin, against the copy floor.

A 1x1x40x512x512 volume, roi (16, 64, 64), overlap 0.5 (900 windows), identity predictor, so that
only the stitching is timed: window gather, weighting, accumulation, normalisation. Modes constant and
gaussian, sw_batch_size 8 and 64. The floor is the time to copy the window data twice (one gather and
one scatter: 900 x 16 x 64 x 64 float32 each way), timed as two contiguous copies in the same rounds.

    python bench/bench_sliding_window.py [--rounds 15] [--device cpu|cuda] [--out-dir bench/results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchResult, environment, interleaved_medians, markdown_table  # noqa: E402

import prostate_kernels  # noqa: E402
from prostate_kernels import sliding_window_inference, use_backend  # noqa: E402
from prostate_kernels.ops.window_ops import window_ops_for  # noqa: E402
from prostate_kernels.windows import importance_map, window_starts  # noqa: E402

VOLUME = (1, 1, 40, 512, 512)
ROI = (16, 64, 64)
OVERLAP = 0.5
MODES = ("constant", "gaussian")
BATCH_SIZES = (8, 64)
TARGET_VS_MONAI = 2.0
TARGET_VS_FLOOR = 1.5


def identity(windows: torch.Tensor) -> torch.Tensor:
    return windows


def monai_or_none():
    """MONAI's sliding_window_inference, or None where MONAI is not installed (the GPU image)."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    return sliding_window_inference


def providers(x: torch.Tensor, mode: str, batch: int) -> dict:
    monai_swi = monai_or_none()

    def ours():
        return sliding_window_inference(x, ROI, batch, identity, overlap=OVERLAP, mode=mode)

    def monai():
        return monai_swi(x, ROI, batch, identity, overlap=OVERLAP, mode=mode)

    def twin():
        with use_backend("torch"):
            return sliding_window_inference(x, ROI, batch, identity, overlap=OVERLAP, mode=mode)

    cases = {"ours": ours}
    if monai_swi is not None:
        cases["monai"] = monai
    if x.device.type == "cpu":
        cases["pytorch twin"] = twin
    return cases


def floor_case(x: torch.Tensor):
    windows = window_starts(VOLUME[2:], ROI, (OVERLAP,) * 3).shape[0]
    src = torch.randn((windows, 1, *ROI), device=x.device)
    dst = torch.empty_like(src)

    def copy_twice():
        dst.copy_(src)
        src.copy_(dst)

    return windows, copy_twice


def phase_cases(x: torch.Tensor, mode: str, batch: int) -> dict:
    """The stages of our stitching, each timed alone on the same data (identity predictor)."""
    ops = window_ops_for(x.device)
    positions = window_starts(VOLUME[2:], ROI, (OVERLAP,) * 3).to(x.device)
    starts = torch.cat([torch.zeros_like(positions[:, :1]), positions], dim=1)
    chunks = [starts[i : i + batch] for i in range(0, starts.shape[0], batch)]
    importance = importance_map(ROI, mode, 0.125, device=x.device)
    buffer = x.new_empty((batch, 1, *ROI))
    windows = ops.gather(x, starts, list(ROI))  # all windows, for the accumulate-only phase
    output = torch.zeros_like(x)

    def gather_all():
        for chunk in chunks:
            ops.gather(x, chunk, list(ROI), buffer[: chunk.shape[0]])

    def accumulate_all():
        for i, chunk in enumerate(chunks):
            ops.accumulate_(output, None, windows[i * batch : i * batch + chunk.shape[0]], chunk, importance)

    return {
        "phase: allocate zeroed output": lambda: torch.zeros_like(x),
        "phase: gather": gather_all,
        "phase: accumulate": accumulate_all,
        "phase: normalize": lambda: ops.normalize_by_positions_(output, positions, importance),
    }


def check_outputs(x: torch.Tensor) -> list[str]:
    """Every provider's output equals MONAI's (or, without MONAI, the PyTorch twin's) before timing."""
    notes = []
    for mode in MODES:
        results = {name: fn() for name, fn in providers(x, mode, 8).items()}
        if "monai" in results:
            baseline_name, baseline = "monai", results["monai"]
        else:
            with use_backend("torch"):
                baseline_name = "pytorch twin"
                baseline = sliding_window_inference(x, ROI, 8, identity, overlap=OVERLAP, mode=mode)
        for name, out in results.items():
            diff = (out.float() - baseline.float()).abs().max().item()
            if diff > 1e-5:
                raise SystemExit(
                    f"{name} differs from {baseline_name} by {diff} in mode {mode}: not timing it"
                )
            notes.append(f"{mode}: max |{name} - {baseline_name}| = {diff:.2e}")
    return notes


def run(device: str = "cpu", rounds: int = 15) -> BenchResult:
    torch.manual_seed(0)
    x = torch.randn(VOLUME, device=device)
    notes = [f"extension: {'loaded' if prostate_kernels.HAS_EXT else 'NOT loaded (pure-PyTorch path)'}"]
    notes += check_outputs(x)
    windows, copy_twice = floor_case(x)
    rows = []
    for mode in MODES:
        for batch in BATCH_SIZES:
            cases = providers(x, mode, batch)
            cases["floor (2 copies)"] = copy_twice
            t = interleaved_medians(cases, rounds)
            rows.append(_row(t, device, mode, batch, windows))
            print(markdown_table(list(rows[-1]), rows[-1:]).splitlines()[-1], flush=True)
    phases = _phase_rows(x, copy_twice, rounds)
    notes += [
        f"volume {VOLUME}, roi {ROI}, overlap {OVERLAP}, identity predictor; medians of {rounds} "
        "interleaved rounds after 2 warm-up calls; min-max shows the machine's spread",
        f"floor = two contiguous copies of {windows} x {ROI[0]}x{ROI[1]}x{ROI[2]} float32 (gather + scatter)",
        "phases of ours, timed alone (same rounds as a fresh floor measurement):\n\n"
        + markdown_table(list(phases[0]), phases)
        + "\n",
    ]
    return BenchResult("sliding_window", rows, notes, _summary(rows))


def _summary(rows: list[dict]) -> str:
    def span(key):
        values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"

    return (f"speed-up vs MONAI {span('speedup_vs_monai')}x (target >= {TARGET_VS_MONAI}); ours / copy floor "
            f"{span('ours_over_floor')} (target <= {TARGET_VS_FLOOR})")  # fmt: skip


def _row(t: dict, device: str, mode: str, batch: int, windows: int) -> dict:
    floor, ours = t["floor (2 copies)"]["median"], t["ours"]["median"]
    monai = t["monai"]["median"] if "monai" in t else None

    def spread(name):
        return f"{t[name]['min'] * 1e3:.1f}-{t[name]['max'] * 1e3:.1f}" if name in t else ""

    return {
        "device": device,
        "mode": mode,
        "sw_batch_size": batch,
        "windows": windows,
        "ours_ms": f"{ours * 1e3:.1f}",
        "ours_min_max_ms": spread("ours"),
        "monai_ms": f"{monai * 1e3:.1f}" if monai else "not installed",
        "monai_min_max_ms": spread("monai"),
        "twin_ms": f"{t['pytorch twin']['median'] * 1e3:.1f}" if "pytorch twin" in t else "",
        "floor_ms": f"{floor * 1e3:.1f}",
        "speedup_vs_monai": f"{monai / ours:.2f}" if monai else "",
        "ours_over_floor": f"{ours / floor:.2f}",
        "target_2x_monai": ("met" if monai / ours >= TARGET_VS_MONAI else "MISSED") if monai else "n/a",
        "target_1.5x_floor": "met" if ours / floor <= TARGET_VS_FLOOR else "MISSED",
    }


def _phase_rows(x: torch.Tensor, copy_twice, rounds: int) -> list[dict]:
    rows = []
    for batch in BATCH_SIZES:
        cases = phase_cases(x, "gaussian", batch)
        cases["floor (2 copies)"] = copy_twice
        t = interleaved_medians(cases, rounds)
        floor = t.pop("floor (2 copies)")["median"]
        for name, stats in t.items():
            rows.append(
                {
                    "sw_batch_size": batch,
                    "phase (gaussian)": name.removeprefix("phase: "),
                    "median_ms": f"{stats['median'] * 1e3:.1f}",
                    "fraction_of_floor": f"{stats['median'] / floor:.2f}",
                }
            )
    return rows


def main(argv: list[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.device, args.rounds)
    md, csv_path = result.write(environment(), args.device, args.out_dir)
    print(markdown_table(list(result.rows[0]), result.rows))
    print(f"\nwritten: {md}\n         {csv_path}")
    return result


if __name__ == "__main__":
    main()
