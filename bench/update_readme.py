"""Copies the newest benchmark results into README.md (no hand-copied numbers).

The section between `<!-- bench:results -->` and `<!-- /bench:results -->` is rebuilt from the newest
combined results file (bench/run_all.py's <date>-<device>.csv/.md) of each device kind: the device, date,
versions and git sha of the run, its summary table and the main table of each benchmark; and a line
saying which figures are still unmeasured on a GPU when no GPU run has been committed.

    python bench/update_readme.py
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from common import RESULTS_DIR, markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"
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
    "patch_ladder": ["variant", "patch", "voxels", "kept_for_backward_GiB", "trains", "peak_MiB"],
}
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


def newest_runs() -> dict[str, Path]:
    """The newest combined results csv per device kind ("cpu", "cuda")."""
    runs: dict[str, Path] = {}
    for path in sorted(RESULTS_DIR.glob("*.csv"), key=lambda p: (p.name[:10], p.stat().st_mtime)):
        with path.open() as f:
            if "benchmark" not in (next(csv.reader(f), []) or []):
                continue
        kind = header(path.with_suffix(".md")).get("device_kind", "cpu")
        runs[kind] = path
    return runs


def section(path: Path) -> str:
    env = header(path.with_suffix(".md"))
    rows = list(csv.DictReader(path.open()))
    versions = f"torch {env.get('torch')}, triton {env.get('triton')}, git {env.get('git_sha')}"
    lines = [
        f"Measured on {env.get('device')} ({env.get('date')}), {versions}: `bench/results/{path.stem}.md`."
    ]
    summary = re.search(r"## Summary\n\n(.*?)\n\n", path.with_suffix(".md").read_text(), re.S)
    if summary:
        lines += ["", summary.group(1)]
    for name, columns in SHOWN.items():
        subset = [r for r in rows if r["benchmark"] == name]
        if not subset:
            continue
        shown = [c for c in columns if any(r.get(c) for r in subset)]
        lines += ["", f"**{name}**", "", markdown_table(shown, subset)]
    return "\n".join(lines)


def main() -> None:
    runs = newest_runs()
    parts = [section(runs[kind]) for kind in ("cuda", "cpu") if kind in runs]
    if "cuda" not in runs:
        parts.append(f"Not measured on a GPU yet: {UNMEASURED_WITHOUT_GPU}.")
    body = "\n\n".join(parts) if parts else "(no results yet: run `make bench`)"
    text = README.read_text()
    pattern = re.compile(r"(<!-- bench:results -->\n).*?(\n<!-- /bench:results -->)", re.S)
    if not pattern.search(text):
        raise SystemExit("README.md has no <!-- bench:results --> section")
    README.write_text(pattern.sub(lambda m: m.group(1) + body + m.group(2), text))
    print(f"updated {README}")


if __name__ == "__main__":
    main()
