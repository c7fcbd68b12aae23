"""Copies the newest benchmark results into README.md and docs/benchmark-results.md (no hand-copied
numbers).

Both are rebuilt from the newest combined results files (bench/run_all.py's
<date>-<device>[-runN].csv/.md) of each device kind, GPU runs first: per benchmark, the newest run that
measured it, named with its device, date, versions and git sha. README.md's section between
`<!-- bench:results -->` and `<!-- /bench:results -->` gets each run's summary rows;
docs/benchmark-results.md (generated whole) gets those and each benchmark's main table. Both say which
figures are still unmeasured on a GPU when no GPU run has been committed.

    python bench/update_readme.py
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from common import RESULTS_DIR, markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"
TABLES = README.parent / "docs" / "benchmark-results.md"  # generated whole: every table
SHOWN = {  # benchmark -> columns shown in the README (rows: all)
    "sliding_window": [
        "mode",
        "sw_batch_size",
        "ours_ms",
        "monai_ms",
        "twin_ms",
        "floor_ms",
        "speedup_vs_monai",
        "ours_over_floor",
        "target_2x_monai",
        "target_1.5x_floor",
    ],
    "bn_relu_conv3d": [
        "shape",
        "provider",
        "fwd_ms",
        "bwd_ms",
        "fwd_bwd_ms",
        "speedup_vs_eager",
        "speedup_vs_compile",
        "gflop_fwd_bwd",
        "mb_moved_fwd_bwd",
        "floor_ms_fwd_bwd",
        "of_floor_fwd_bwd",
    ],
    "dense_block": [
        "block",
        "in",
        "layers",
        "size",
        "variant",
        "fwd_bwd_ms",
        "time_vs_naive",
        "of_floor_fwd_bwd",
        "memory_MiB",
        "kept_for_backward_MiB",
        "memory_vs_naive",
    ],
    "depthwise": [
        "C",
        "size",
        "dilation",
        "provider",
        "fwd_ms",
        "fwd_bwd_ms",
        "mb_moved_fwd",
        "floor_ms_fwd",
        "of_floor_fwd",
        "fwd_bwd_speedup_vs_best_pytorch",
    ],
    "models": ["model", "input", "variant", "step_ms", "peak_MiB", "gflop", "of_floor"],
    "memory_format": [
        "model",
        "input",
        "batch",
        "variant",
        "ncdhw_ms",
        "channels_last_ms",
        "channels_last_speedup",
        "ncdhw_MiB",
        "channels_last_MiB",
    ],
    "cuda_graphs": ["case", "variant", "eager_ms", "graph_ms", "graph_speedup", "ours_graph_vs_this_graph"],
    "patch_ladder": ["variant", "patch", "voxels", "kept_for_backward_GiB", "trains", "peak_MiB"],
    "optimize": [
        "model",
        "input",
        "step_ms",
        "time_vs_monai",
        "peak_MiB",
        "kept_for_backward_MiB",
        "memory_vs_monai",
    ],  # fmt: skip
}
SHOWN["optimize_highresnet"] = SHOWN["optimize"]
UNMEASURED_WITHOUT_GPU = (
    "the fused BN-ReLU-Conv3d kernels, the shared-storage dense block's time and peak memory, the "
    "depthwise kernels, the Triton sliding-window stitching, the networks' training steps and the "
    "trainable-patch ladder"
)


def header(md_path: Path) -> dict[str, str]:
    fields = {}
    for line in md_path.read_text().splitlines():
        match = re.match(r"- (\w+): (.*)", line)
        if match and match.group(1) not in fields:
            fields[match.group(1)] = match.group(2)
    return fields


def runs_by_kind() -> dict[str, list[Path]]:
    """The combined results csv files per device kind ("cpu", "cuda"), newest first: by date, then by
    name (a later run of one day on one device is saved as <date>-<device>-run2, -run3, ...)."""
    runs: dict[str, list[Path]] = {}
    for path in sorted(RESULTS_DIR.glob("*.csv"), key=lambda p: (p.name[:10], _run_number(p)), reverse=True):
        with path.open() as f:
            if "benchmark" not in (next(csv.reader(f), []) or []):
                continue
        runs.setdefault(header(path.with_suffix(".md")).get("device_kind", "cpu"), []).append(path)
    return runs


def _run_number(path: Path) -> int:
    match = re.search(r"-run(\d+)$", path.stem)
    return int(match.group(1)) if match else 1


def section(paths: list[Path]) -> tuple[str, str]:
    """Each benchmark from the newest of `paths` (runs of one device kind, newest first) that has it:
    (every run used, named with its device, date, versions and git sha, and its summary rows; the same
    followed by each benchmark's main table)."""
    used: dict[Path, list[str]] = {}
    for name in SHOWN:
        path = next((p for p in paths if any(r["benchmark"] == name for r in csv.DictReader(p.open()))), None)
        if path is not None:
            used.setdefault(path, []).append(name)
    lines = []
    for path, names in used.items():
        env = header(path.with_suffix(".md"))
        versions = f"torch {env.get('torch')}, triton {env.get('triton')}, git {env.get('git_sha')}"
        lines += [
            f"{', '.join(names)}: measured on {env.get('device')} ({env.get('date')}), {versions}: "
            f"`bench/results/{path.stem}.md`.",
            "",
        ]
        summary = re.search(r"## Summary\n\n(.*?)\n\n", path.with_suffix(".md").read_text(), re.S)
        if summary:  # its header, separator and the rows of the benchmarks taken from this run
            table = summary.group(1).splitlines()
            rows = table[:2] + [r for r in table[2:] if r.split("|")[1].strip() in names]
            lines += ["\n".join(rows), ""]
    tables = []
    for name in SHOWN:
        path = next((p for p, names in used.items() if name in names), None)
        if path is None:
            continue
        subset = [r for r in csv.DictReader(path.open()) if r["benchmark"] == name]
        shown = [c for c in SHOWN[name] if any(r.get(c) for r in subset)]
        tables += [f"**{name}** (`{path.stem}`)", "", markdown_table(shown, subset), ""]
    return "\n".join(lines).rstrip(), "\n".join(lines + tables).rstrip()


def bodies(runs: dict[str, list[Path]]) -> tuple[str, str]:
    """The generated texts (summaries only; with every table): the GPU runs' section, then the CPU
    runs'."""
    parts = [section(runs[kind]) for kind in ("cuda", "cpu") if kind in runs]
    texts = []
    for which in (0, 1):
        chosen = [part[which] for part in parts]
        if "cuda" not in runs:
            chosen.append(f"Not measured on a GPU yet: {UNMEASURED_WITHOUT_GPU}.")
        texts.append("\n\n".join(chosen) if chosen else "(no results yet: run `make bench`)")
    return texts[0], texts[1]


def main() -> None:
    text = README.read_text()
    pattern = re.compile(r"(<!-- bench:results -->\n).*?(\n<!-- /bench:results -->)", re.S)
    if not pattern.search(text):
        raise SystemExit("README.md has no <!-- bench:results --> section")
    summaries, everything = bodies(runs_by_kind())
    TABLES.write_text(
        "# Benchmark results\n\n"
        "Generated by `bench/update_readme.py` from the newest results files under `bench/results/` (do\n"
        "not edit by hand: `make bench` reruns it). What each benchmark measures:\n"
        "[benchmarks.md](benchmarks.md).\n\n" + everything + "\n"
    )
    print(f"updated {TABLES}")
    summaries += "\n\nEvery table: [docs/benchmark-results.md](docs/benchmark-results.md)."
    README.write_text(pattern.sub(lambda m: m.group(1) + summaries + m.group(2), text))
    print(f"updated {README}")


if __name__ == "__main__":
    main()
