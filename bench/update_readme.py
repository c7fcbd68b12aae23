"""Copies the newest committed benchmark results into README.md (no hand-copied numbers).

Each README section between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` is replaced by the table of
the newest bench/results/*-NAME.csv, with the device, date and git sha of that run.

    python bench/update_readme.py
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from common import RESULTS_DIR, markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"
SHOWN = {  # result name -> columns shown in the README
    "sliding_window-cpu": [
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
    "dense_block-cpu": [
        "block",
        "in",
        "layers",
        "size",
        "variant",
        "kept_for_backward_MiB",
        "memory_vs_naive",
    ],
    "patch_ladder-cpu": ["variant", "patch", "voxels", "kept_for_backward_GiB"],
}


def newest(name: str) -> Path | None:
    files = sorted(RESULTS_DIR.glob(f"*-{name}.csv"))
    return files[-1] if files else None


def header(md_path: Path) -> str:
    """'device, date, git sha' from the markdown twin of a result csv."""
    fields = {}
    for line in md_path.read_text().splitlines():
        match = re.match(r"- (device|date|git_sha|torch): (.*)", line)
        if match:
            fields[match.group(1)] = match.group(2)
    return ", ".join(f"{k} {fields[k]}" for k in ("device", "date", "torch", "git_sha") if k in fields)


def section(name: str, columns: list[str]) -> str:
    path = newest(name)
    if path is None:
        return f"(no results for {name} yet: run its benchmark)"
    rows = list(csv.DictReader(path.open()))
    return f"Measured: {header(path.with_suffix('.md'))} ({path.name}).\n\n{markdown_table(columns, rows)}"


def main() -> None:
    text = README.read_text()
    for name, columns in SHOWN.items():
        pattern = re.compile(
            rf"(<!-- bench:{re.escape(name)} -->\n).*?(\n<!-- /bench:{re.escape(name)} -->)", re.S
        )
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- bench:{name} --> section")
        body = section(name, columns)
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    README.write_text(text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
