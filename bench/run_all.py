"""`make bench`: every benchmark this machine can run, into one results file, plots and a summary.

CPU: the PyTorch providers, the sliding-window stitching, the saved-bytes memory studies. GPU: all of it.
Writes bench/results/<date>-<device>.md and .csv (device, versions, git sha, shapes, medians, ratios,
fractions of the floor; -run2, -run3, ... after an earlier run of the day: nothing is written over) and
PNG plots beside them, refreshes README.md's tables, prints the summary.

    python bench/run_all.py [--out-dir DIR] [--no-readme] [--only optimize,dense_block,...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_bn_relu_conv3d  # noqa: E402
import bench_dense_block  # noqa: E402
import bench_depthwise  # noqa: E402
import bench_memory_format  # noqa: E402
import bench_models  # noqa: E402
import bench_optimize  # noqa: E402
import bench_sliding_window  # noqa: E402
from common import RESULTS_DIR, BenchResult, environment, free_stem, markdown_table, write_combined  # noqa: E402
from plots import ladder_plot, speedup_plot  # noqa: E402


def benchmarks(device: str) -> dict[str, Callable[[], list[BenchResult]]]:
    """name -> callable returning that benchmark's BenchResults, in the order they run."""
    cuda = device == "cuda"
    return {
        "sliding_window": lambda: [bench_sliding_window.run(device, rounds=15)],
        "bn_relu_conv3d": lambda: [
            bench_bn_relu_conv3d.run(device, compile_mode="full-res" if cuda else "all")
        ],
        "dense_block": lambda: [bench_dense_block.run(device)],
        "depthwise": lambda: [bench_depthwise.run(device, quick=cuda)],
        "models": lambda: bench_models.run(device),
        "memory_format": lambda: [bench_memory_format.run(device)],
        "optimize": lambda: [bench_optimize.run(device)],
    }


def run_all(device: str, only: list[str] | None = None) -> list[BenchResult]:
    """Every benchmark (only: those named) on `device`."""
    chosen = benchmarks(device)
    unknown = sorted(set(only or []) - set(chosen))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {sorted(chosen)}")
    return [result for name, run in chosen.items() if not only or name in only for result in run()]


def write_all(
    results: list[BenchResult],
    out_dir: Path,
    memory_curve: bool = True,
    env: dict | None = None,
    stem: str | None = None,
) -> list[Path]:
    """Combined md/csv and the plots (memory_curve: the CPU saved-bytes curve of the dense block);
    env: the header (device, versions, sha, date) of the run that measured them, default this one;
    stem: the files' names, default a free one (free_stem); a run that rewrites its files after each
    section passes the stem it chose first, so it writes over its own files only."""
    env = env or environment()
    stem = stem or free_stem(env, out_dir)
    md, csv_path = write_combined(results, env, out_dir, stem)
    written = [md, csv_path]
    speedups = speedup_plot(results, out_dir / f"{stem}-speedup.png")
    written += [speedups] if speedups else []
    ladder = next((r for r in results if r.name == "patch_ladder"), None)
    if ladder is not None:
        written.append(ladder_plot(ladder, out_dir / f"{stem}-patch_ladder.png"))
    if memory_curve:
        written.append(bench_dense_block.memory_curve(out_dir / f"{stem}-dense_block_memory.png"))
    return written


def summary(results: list[BenchResult]) -> str:
    return markdown_table(
        ["benchmark", "summary"], [{"benchmark": r.name, "summary": r.summary} for r in results]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--no-readme",
        action="store_true",
        help="leave README.md's and docs/benchmark-results.md's tables as they are",
    )
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    args = parser.parse_args(argv)
    only = [name for name in args.only.split(",") if name]
    results = run_all(args.device, only)
    memory_curve = any(r.name == "dense_block" for r in results)
    written = write_all(results, args.out_dir, memory_curve=memory_curve)
    if not args.no_readme:
        import update_readme

        update_readme.main()
    print("\nwritten:\n  " + "\n  ".join(map(str, written)))
    print("\n" + summary(results))


if __name__ == "__main__":
    main()
