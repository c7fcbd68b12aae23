"""bench/update_readme.py: README.md gets each run's summary rows, docs/benchmark-results.md every table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import update_readme  # noqa: E402

README_AROUND = ("# project\n\nprose before\n\n", "\n\n## Layout\n\nprose after\n")


def _write_cpu_run(results: Path) -> None:
    """One combined CPU results file pair, as bench/run_all.py writes it."""
    results.mkdir()
    (results / "2026-12-03-some-cpu.csv").write_text(
        "benchmark,model,input,batch,variant,ncdhw_ms,channels_last_ms,channels_last_speedup\n"
        "memory_format,unet3d,16x64x64,2,ours,267.6,231.1,1.16\n"
    )
    (results / "2026-12-03-some-cpu.md").write_text(
        "# Benchmarks\n\n- date: 2026-12-03 21:48 UTC\n- device: Some CPU (2 cores)\n- device_kind: cpu\n"
        "- torch: 2.13.0+cpu\n- git_sha: abc1234\n- triton: 3.6.0\n\n## Summary\n\n"
        "| benchmark | summary |\n|---|---|\n"
        "| memory_format | channels-last step speed-up: unet3d ours 1.16x |\n"
        "\n## memory_format\n"
    )


@pytest.fixture
def paths(tmp_path, monkeypatch):
    results, readme, tables = tmp_path / "results", tmp_path / "README.md", tmp_path / "benchmark-results.md"
    _write_cpu_run(results)
    monkeypatch.setattr(update_readme, "RESULTS_DIR", results)
    monkeypatch.setattr(update_readme, "README", readme)
    monkeypatch.setattr(update_readme, "TABLES", tables)
    return readme, tables


def test_readme_gets_the_summaries_and_the_docs_page_every_table(paths):
    readme, tables = paths
    before, after = README_AROUND
    readme.write_text(before + "<!-- bench:results -->\nold numbers\n<!-- /bench:results -->" + after)

    update_readme.main()

    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after), "text outside the markers changed"
    assert "old numbers" not in text
    assert "| memory_format | channels-last step speed-up: unet3d ours 1.16x |" in text
    assert "git abc1234" in text and "`bench/results/2026-12-03-some-cpu.md`" in text
    assert "[docs/benchmark-results.md](docs/benchmark-results.md)" in text
    assert "| model | input |" not in text, "the README holds summaries only"
    assert "Not measured on a GPU yet" in text

    page = tables.read_text()
    assert page.startswith("# Benchmark results\n")
    assert "| memory_format | channels-last step speed-up: unet3d ours 1.16x |" in page
    assert "**memory_format** (`2026-12-03-some-cpu`)" in page
    assert "| unet3d | 16x64x64 | 2 | ours | 267.6 | 231.1 | 1.16 |" in page
    assert "Not measured on a GPU yet" in page


def test_a_readme_without_the_markers_is_refused_before_anything_is_written(paths):
    readme, tables = paths
    readme.write_text("# project\n\nno markers\n")
    with pytest.raises(SystemExit, match="bench:results"):
        update_readme.main()
    assert readme.read_text() == "# project\n\nno markers\n"
    assert not tables.exists()
