"""The one-line summaries that bench/update_readme.py copies into the README name the cases they quote."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_depthwise  # noqa: E402
import bench_models  # noqa: E402


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


def _ladder_rows(key: str, values: dict[str, list]) -> list[dict]:
    rungs = (("16x64x64", 65536), ("16x128x128", 262144), ("32x128x128", 524288))
    return [{"variant": variant, "patch": patch, "voxels": voxels, key: value}
            for variant, column in values.items()
            for (patch, voxels), value in zip(rungs, column, strict=True)]  # fmt: skip


def test_the_ladder_summary_states_the_ratio_or_why_there_is_none():
    """The CPU ladder's summary crashed (None["patch"]) when no rung of ours fit naive's memory, and the GPU
    ladder's called a naive that trained no rung an 'infx' ratio with the target met."""
    key = "kept_for_backward_GiB"
    fits = _ladder_rows(key, {"eager": ["1.00", "4.00", "8.00"], "ours": ["0.10", "0.40", "0.80"]})
    assert bench_models.ladder_summary(fits, key) == (
        "within the 1.00 GiB naive keeps at 16x64x64, ours fits up to 32x128x128 (8x the voxels; "
        "target >= 8x: met)"
    )
    none_fit = _ladder_rows(key, {"eager": ["1.00", "4.00", "8.00"], "ours": ["2.00", "8.00", "16.00"]})
    assert bench_models.ladder_summary(none_fit, key) == (
        "within the 1.00 GiB naive keeps at 16x64x64, ours fits no rung (target >= 8x: MISSED)"
    )
    trained = _ladder_rows("trains", {"eager": ["yes", "yes", "no"], "ours": ["yes", "yes", "yes"]})
    assert bench_models.ladder_summary(trained, "trains") == (
        "largest trainable patch: ours 524288 voxels, naive 262144 voxels, ratio 2x (target >= 8x: MISSED)"
    )
    naive_none = _ladder_rows("trains", {"eager": ["no", "no", "no"], "ours": ["yes", "yes", "no"]})
    assert bench_models.ladder_summary(naive_none, "trains") == (
        "largest trainable patch: ours 262144 voxels, naive none of its rungs (target >= 8x: not measured)"
    )
