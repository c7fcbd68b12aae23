"""The one-line summaries that bench/update_readme.py copies into the README name the cases they quote."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_depthwise  # noqa: E402


def test_the_depthwise_summary_names_its_best_and_worst_cases():
    """Rows of the H200 run (2026-12-04): its summary said only 'worst 0.09x', hiding the 3.06x at C=728."""
    columns = ("C", "size", "dilation", "fwd_bwd_speedup_vs_best_pytorch", "of_floor_fwd")
    rows = [
        dict(zip(columns, values, strict=True))
        for values in ((728, "16x64x64", 1, "3.06", "0.16"), (128, "4x16x16", 1, "0.09", "0.00"),
                       (128, "16x64x64", 12, "1.90", "0.07"))
    ]  # fmt: skip
    assert bench_depthwise.ours_summary(rows) == (
        "fwd+bwd vs PyTorch: best 3.06x (C=728 16x64x64 d1), worst 0.09x (C=128 4x16x16 d1); "
        "fwd floor fraction: best 0.16 (C=728 16x64x64 d1), worst 0.00 (C=128 4x16x16 d1)"
    )
