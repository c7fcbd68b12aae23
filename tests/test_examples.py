"""examples/: they run on a fresh checkout, fail in one line on bad input and never replace a file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import make_phantoms

DEMO = Path(__file__).resolve().parents[1] / "examples" / "sliding_window_demo.py"


def _run(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEMO), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)  # fmt: skip


@pytest.mark.skipif(not DEMO.exists(), reason="examples/ is not beside the tests")
def test_sliding_window_demo_on_a_volume_then_refuses_to_replace_its_picture(tmp_path):
    data = make_phantoms(tmp_path / "data", n=1)
    out = tmp_path / "out"
    result = _run("--volume", data / "Case00.mhd", "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max |ours - MONAI| without mirroring: 0.00e+00" in result.stdout
    picture = (out / "sliding_window_demo.png").read_bytes()
    assert picture.startswith(b"\x89PNG")
    again = _run("--volume", data / "Case00.mhd", "--out", out, cwd=tmp_path)
    assert again.returncode == 2 and "exists already" in again.stderr and "Traceback" not in again.stderr
    assert (out / "sliding_window_demo.png").read_bytes() == picture
    assert [p.name for p in out.iterdir()] == ["sliding_window_demo.png"]


@pytest.mark.skipif(not DEMO.exists(), reason="examples/ is not beside the tests")
def test_sliding_window_demo_names_a_bad_volume_in_one_line(tmp_path):
    result = _run("--volume", tmp_path / "missing.nii.gz", "--out", tmp_path / "out", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == [f"error: {tmp_path / 'missing.nii.gz'}: file not found"]
    assert not (tmp_path / "out").exists()
