"""The README's Python examples run as written (on the CPU: `.cuda()` and device="cuda" dropped) and
give what their comments say: shapes, channel counts, optimize's report, Table 1's counts.

The dense-block example once used a block left on the CPU on the layer example's CUDA tensor; on a
GPU it failed at once (on the CPU, where the devices are dropped, this test cannot see that). Each
block runs in the namespace the earlier ones left, as a reader would run them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def on_this_machine(code: str) -> str:
    """The example on CUDA when there is one, else on the CPU: only the device moves."""
    if torch.cuda.is_available():
        return code
    return code.replace(".cuda()", "").replace('device="cuda"', 'device="cpu"')


@pytest.mark.skipif(not README.exists(), reason="README.md is not beside the tests")
def test_the_readme_python_examples_run_and_give_what_they_say(capsys, tmp_path, monkeypatch):
    pytest.importorskip("monai")  # the optimize example wraps MONAI's DenseNet121
    blocks = python_blocks()
    assert len(blocks) == 7, "the README's Python examples changed: update the checks below"
    ns: dict = {}

    def run(i: int) -> dict:
        exec(compile(on_this_machine(blocks[i]), f"README.md python block {i + 1}", "exec"), ns)
        return ns

    run(0)
    assert ns["prob"].shape == (1, 1, 40, 512, 512) and ns["prob"].dtype == torch.float32
    assert float(ns["prob"].min()) >= 0 and float(ns["prob"].max()) <= 1  # sigmoid probabilities
    run(1)
    assert ns["y"].shape == (2, 16, 16, 64, 64)
    run(2)
    assert ns["block"].out_channels == 240 and ns["y"].shape == (2, 240, 16, 64, 64)
    assert ns["y"].device == ns["x"].device
    run(3)
    printed = capsys.readouterr().out
    assert printed.startswith("optimize: replaced 7 module(s), left 0 candidate(s)\n"), printed[:300]
    assert (
        "replaced features.denseblock1: _DenseBlock -> AdoptedDenseBlock3d (6 DenseNet-BC layers, 64 in"
        in printed
    )
    assert (
        "replaced features.transition1: _Transition -> FusedSequential ((norm, relu, conv) fused)" in printed
    )
    run(4)
    assert ns["sep"](torch.randn(1, 256, 4, 8, 8)).shape == (1, 256, 4, 8, 8)
    run(5)
    count_parameters, build_model = ns["count_parameters"], ns["build_model"]
    assert count_parameters(ns["model"], "conv") == 22_962_289  # "22,962,289 conv parameters"
    assert ns["downsampling"](ns["model"]) == (8, 8, 8)
    assert count_parameters(build_model("unet3d"), "keras") == 1_605_381
    # the export example reads p3a.pt2 and runs it on `windows`: a tiny Tiramisu's checkpoint exported
    # under that name (p3a itself takes ~40 s to export on a CPU), and windows of its patch
    from prostate_kernels.checkpoint import save_checkpoint
    from prostate_kernels.export import export_checkpoint

    state = {"model": "tiramisu3d_tiny", "state_dict": build_model("tiramisu3d_tiny").state_dict(),
             "patch": [16, 32, 32]}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    export_checkpoint(save_checkpoint(state, tmp_path / "best.pt"), "p3a.pt2")
    ns["windows"] = torch.randn(3, 1, 16, 32, 32)
    run(6)
    assert ns["meta"]["input_shape"] == ["N", 1, 16, 32, 32] and ns["logits"].shape == (3, 1, 16, 32, 32)
