"""bench/gpu_suite.py's result files: one set per call, written over after each section (the first H200
run, 2026-12-04, left -run2, -run3 and -run4 copies, one per section), and the patch ladder's rungs kept
when the call is cut before the ladder ends (that run's ladder was cut and left no table)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_models  # noqa: E402
import gpu_suite  # noqa: E402
from common import BenchResult, free_stem  # noqa: E402

ENV = {"date": "2026-12-04 12:00 UTC", "device": "Some GPU", "device_kind": "cuda", "git_sha": "abc1234"}


def _fake_ladder(monkeypatch, fits: dict[str, int]) -> None:
    """The ladder's steps without a GPU: a rung trains when its voxels are at most fits[variant]."""
    monkeypatch.setattr(bench_models, "variant", lambda name, kind, device: (kind, "torch"))

    def step(model, backend, shape, channels_last=False):
        voxels = shape[1] * shape[2] * shape[3]
        if voxels > fits[model]:
            raise torch.OutOfMemoryError("fake")
        return 10.0, voxels / 1000

    monkeypatch.setattr(bench_models, "cuda_step", step)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


def test_each_save_of_a_call_writes_over_its_own_files_only(tmp_path):
    (tmp_path / "2026-12-04-some-gpu.md").write_text("an earlier call's results\n")
    stem = free_stem(ENV, tmp_path)
    assert stem == "2026-12-04-some-gpu-run2"
    first = BenchResult("models", [{"model": "m", "step_ms": "1"}], [], "one section")
    gpu_suite.save([first], ENV, tmp_path, stem)
    second = BenchResult("dense_block", [{"block": "b", "fwd_bwd_ms": "2"}], [], "two sections")
    gpu_suite.save([first, second], ENV, tmp_path, stem)
    assert sorted(p.name for p in tmp_path.glob("*.md")) == [
        "2026-12-04-some-gpu-run2.md",
        "2026-12-04-some-gpu.md",
    ]
    assert (tmp_path / "2026-12-04-some-gpu.md").read_text() == "an earlier call's results\n"
    written = (tmp_path / f"{stem}.md").read_text()
    assert "one section" in written and "two sections" in written


def test_the_ladder_hands_over_its_rungs_after_each_one(monkeypatch):
    _fake_ladder(monkeypatch, {"ours": 64 * 256 * 256, "eager": 32 * 128 * 128})
    partials: list[BenchResult] = []
    (final,) = bench_models.run("cuda", (), ladder=True, on_ladder_row=partials.append)
    rungs = len(bench_models.LADDER)
    assert len(partials) == 2 * rungs and [len(p.rows) for p in partials] == list(range(1, 2 * rungs + 1))
    assert all(p.summary.startswith(f"PARTIAL ({len(p.rows)} rungs)") for p in partials)
    assert partials[-1].rows == final.rows and not final.summary.startswith("PARTIAL")
    assert final.summary.startswith(
        "largest trainable patch: ours 4194304 voxels, naive 524288 voxels, ratio 8x"
    )
    assert [r["variant"] for r in final.rows] == ["eager"] * rungs + ["ours"] * rungs  # the quick ones first
    cut = [r for r in final.rows if r["variant"] == "eager" and r["trains"].startswith("OOM (not run")]
    assert [r["patch"] for r in cut] == ["64x256x256", "64x384x384"]  # past the first OOM: not run


def test_a_partial_ladder_is_written_with_its_plot(tmp_path, monkeypatch):
    _fake_ladder(monkeypatch, {"ours": 64 * 256 * 256, "eager": 32 * 128 * 128})
    partials: list[BenchResult] = []
    bench_models.run("cuda", (), ladder=True, on_ladder_row=partials.append)
    for partial in (partials[0], partials[len(bench_models.LADDER) + 1]):  # one naive rung; all + one of ours
        stem = free_stem(ENV, tmp_path)
        gpu_suite.save([partial], ENV, tmp_path, stem)
        assert "PARTIAL" in (tmp_path / f"{stem}.md").read_text()
        assert (tmp_path / f"{stem}-patch_ladder.png").stat().st_size > 0
