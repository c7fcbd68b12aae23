"""prostate-kernels export: a checkpoint's network as a torch.export program that runs without the library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import make_phantoms, train_args
from prostate_kernels.models import build_model

from prostate_kernels import use_backend
from prostate_kernels.checkpoint import save_checkpoint
from prostate_kernels.cli import main
from prostate_kernels.data import DataError
from prostate_kernels.export import export_checkpoint, read_metadata
from prostate_kernels.trained_model import load_trained_model

# Loads the program and runs it in a process where importing prostate_kernels fails.
RUN_WITHOUT_THE_LIBRARY = """
import json, sys, torch

class NoLibrary:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "prostate_kernels":
            raise ModuleNotFoundError(f"{name} is blocked in this test")

sys.meta_path.insert(0, NoLibrary())
extra = {"prostate_kernels.json": ""}
program = torch.export.load(sys.argv[1], extra_files=extra)
with torch.no_grad():
    torch.save(program.module()(torch.load(sys.argv[2])), sys.argv[3])
assert not any(name.startswith("prostate_kernels") for name in sys.modules)
print(json.loads(extra["prostate_kernels.json"])["model"])
"""


def assert_device_free(program: torch.export.ExportedProgram) -> None:
    """No node of the program (nested graphs included) makes a tensor on a fixed device, and none is
    dead: moved with .to(device), it computes there only. (The dense blocks' unused seed tensors were
    aten.zeros(..., device=cpu) nodes in every eval program.)"""
    graphs = [
        m.graph
        for m in program.graph_module.modules()
        if isinstance(getattr(m, "graph", None), torch.fx.Graph)
    ]
    nodes = [n for graph in graphs for n in graph.nodes if n.op == "call_function"]
    assert nodes
    assert [str(n.target) for n in nodes if "device" in n.kwargs] == []
    assert [str(n.target) for n in nodes if not n.users] == []


def _network_logits(checkpoint: Path, x: torch.Tensor) -> torch.Tensor:
    model, _ = load_trained_model(checkpoint, torch.device("cpu"))
    with use_backend("torch"), torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    phantoms = make_phantoms(root / "phantoms")
    assert main(train_args(phantoms, root / "run", 2)) == 0
    return root / "run" / "checkpoint.pt"


def test_the_program_runs_without_the_library_and_gives_the_networks_logits(trained, tmp_path, capsys):
    out = tmp_path / "net.pt2"
    assert main(["export", "--checkpoint", str(trained), "--out", str(out)]) == 0
    assert "net.pt2: tiramisu3d_tiny, input Nx1x8x32x32 float32 windows" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["input_shape"] == ["N", 1, 8, 32, 32] and meta["patch"] == [8, 32, 32]
    assert meta["image_channels"] is None and meta["slices"] == 0 and meta["spacing_zyx_mm"] is None
    assert meta["orientation"] == "LPS"  # train's default: the caller reorients its images so first
    low, high = meta["trained_spacing_range"]  # the phantoms' voxels, about 3.6 x 0.6 x 0.6 mm
    assert 3 < low[0] <= high[0] < 4.1 and 0.5 < low[2] <= high[2] < 0.7
    assert_device_free(torch.export.load(str(out)))
    x = torch.randn(3, 1, 8, 32, 32)  # a batch size the export did not see
    torch.save(x, tmp_path / "x.pt")
    files = [str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    ran = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_THE_LIBRARY, *files], capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip() == "tiramisu3d_tiny"
    torch.testing.assert_close(
        torch.load(tmp_path / "y.pt"), _network_logits(trained, x), rtol=1e-4, atol=1e-5
    )


def test_a_2d_network_on_two_channels_exports_its_slice_stacks_and_channels(tmp_path):
    """A checkpoint of DeepLabv3+ 2-D on 13-slice stacks of 2 image channels: input (N, 26, h, w)."""
    torch.manual_seed(0)
    kwargs = {"in_channels": 26, "width": 0.25, "middle_blocks": 1}
    model = build_model("deeplabv3plus_2d", **kwargs)
    state = {"model": "deeplabv3plus_2d", "model_kwargs": kwargs, "state_dict": model.state_dict(),
             "patch": [13, 32, 32], "slices": 13, "channel": [0, 1], "spacing": [3.0, 0.6, 0.6]}  # fmt: skip
    checkpoint = save_checkpoint(state, tmp_path / "best.pt")
    exported = export_checkpoint(checkpoint, tmp_path / "d.pt2")
    meta = exported.metadata
    assert meta["input_shape"] == ["N", 26, 32, 32] and meta["image_channels"] == [0, 1]
    assert meta["slices"] == 13 and meta["spacing_zyx_mm"] == [3.0, 0.6, 0.6]
    assert meta["orientation"] is None  # a checkpoint that records none: each file's own axes
    program = torch.export.load(str(tmp_path / "d.pt2")).module()
    x = torch.randn(5, 26, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program(x), _network_logits(checkpoint, x), rtol=1e-4, atol=1e-5)


def test_any_size_programs_take_every_allowed_window_and_refuse_the_others(trained, tmp_path, capsys):
    """--any-size: the window's sides are free multiples of the network's downsampling (>= 2 of them)."""
    out = tmp_path / "any.pt2"
    assert main(["export", "--checkpoint", str(trained), "--out", str(out), "--any-size"]) == 0
    assert ("input Nx1xDxHxW float32 windows (N from 1 to 1024; D, H, W multiples of 4, 4, 4 from 8, 8, 8 up "
            "to 1024)") in capsys.readouterr().out  # fmt: skip
    meta = read_metadata(out)
    assert meta["input_shape"] == ["N", 1, "D", "H", "W"] and meta["window_multiple"] == [4, 4, 4]
    assert meta["min_window"] == [8, 8, 8] and meta["max_window"] == 1024 and meta["patch"] == [8, 32, 32]
    program = torch.export.load(str(out))
    assert_device_free(program)
    program = program.module()
    for shape in ((3, 1, 12, 36, 44), (1, 1, 8, 8, 8), (2, 1, 8, 32, 32)):  # none of them the traced one
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(program(x), _network_logits(trained, x), rtol=1e-4, atol=1e-5)
    refusals = {(1, 1, 10, 32, 32): r"% 4 == 0", (1, 1, 4, 32, 32): r">= 8", (1, 1, 2048, 8, 8): r"<= 1024"}
    for shape, guard in refusals.items():  # not a multiple of 4; one multiple only; too deep
        with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[2\] " + guard), torch.no_grad():
            program(torch.randn(shape))


@pytest.mark.parametrize(
    ("name", "kwargs", "patch", "sizes"),
    [
        ("unet3d", {"filters": [4, 8, 16, 32]}, [8, 32, 32], (16, 40, 24)),  # the patch's depth: 1 multiple
        ("deeplabv3plus_3d", {"width": 0.25, "middle_blocks": 1}, [16, 32, 32], (12, 48, 80)),
        ("deeplabv3plus_2d", {"width": 0.25, "middle_blocks": 1, "in_channels": 13}, [13, 32, 32], (48, 80)),
    ],
)
def test_the_other_networks_export_with_any_size(name, kwargs, patch, sizes, tmp_path):
    """DeepLabv3+'s resize fixed its sizes to the traced ones (int() of symbolic sizes) until 2026-12-05."""
    torch.manual_seed(0)
    slices = patch[0] if name.endswith("2d") else 0
    state = {"model": name, "model_kwargs": kwargs, "state_dict": build_model(name, **kwargs).state_dict(),
             "patch": patch, "slices": slices}  # fmt: skip
    checkpoint = save_checkpoint(state, tmp_path / "best.pt")
    exported = export_checkpoint(checkpoint, tmp_path / "net.pt2", any_size=True)
    assert exported.max_difference <= 1e-5
    program = torch.export.load(str(tmp_path / "net.pt2")).module()
    x = torch.randn(2, 13 if slices else 1, *sizes)
    with torch.no_grad():
        torch.testing.assert_close(program(x), _network_logits(checkpoint, x), rtol=1e-4, atol=1e-5)


def test_export_never_replaces_a_file_and_writes_nothing_it_could_not_check(trained, tmp_path, monkeypatch):
    out = tmp_path / "net.pt2"
    out.write_bytes(b"the user's file")
    assert main(["export", "--checkpoint", str(trained), "--out", str(out)]) == 2
    assert out.read_bytes() == b"the user's file"

    import prostate_kernels.export as export

    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # every difference, 0 included, is then too large
    with pytest.raises(DataError, match=r"the exported program's logits differ from the network's by up to "):
        export_checkpoint(trained, tmp_path / "other.pt2")
    monkeypatch.undo()

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot trace this\nsecond line")

    class NotADenseBlock:  # the blocks then stay shared-buffer blocks: this library's operator
        pass

    monkeypatch.setattr(export, "DenseBlock3d", NotADenseBlock)
    with pytest.raises(
        DataError, match=r"would call this library's operators \(prostate_kernels\.dense_block_fo"
    ):
        export_checkpoint(trained, tmp_path / "other.pt2")
    monkeypatch.undo()

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(
        DataError, match=r"torch.export cannot trace its network \(RuntimeError: cannot trace this\)"
    ):
        export_checkpoint(trained, tmp_path / "other.pt2")
    with pytest.raises(DataError, match=r"cannot trace its network with free window sizes \(export it "
                       r"without --any-size\) \(RuntimeError: cannot trace this\)"):  # fmt: skip
        export_checkpoint(trained, tmp_path / "other.pt2", any_size=True)
    monkeypatch.undo()

    def refusing_module(program):  # a program that raises on a window it should take (a size guard)
        def run(x):
            raise AssertionError("Guard failed: x.size()[2] // 8 != 1")

        return run

    monkeypatch.setattr(torch.export.ExportedProgram, "module", refusing_module)
    expected = r"fails on windows it should take \(AssertionError: Guard failed: x.size\(\)\[2\] // 8 != 1\)"
    with pytest.raises(DataError, match=expected + ": not written"):
        export_checkpoint(trained, tmp_path / "other.pt2", any_size=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt2"]  # no program, no temporary left


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("unet3d", {"filters": [4, 8, 16, 32]}), ("deeplabv3plus_3d", {"width": 0.25, "middle_blocks": 1})],
)
def test_the_other_3d_networks_export(name, kwargs, tmp_path):
    """U-Net 3D and DeepLabv3+ 3D (depthwise convs: PyTorch's grouped conv3d in the program)."""
    torch.manual_seed(0)
    state = {"model": name, "model_kwargs": kwargs, "state_dict": build_model(name, **kwargs).state_dict(),
             "patch": [16, 32, 32]}  # fmt: skip
    checkpoint = save_checkpoint(state, tmp_path / "best.pt")
    exported = export_checkpoint(checkpoint, tmp_path / "net.pt2")
    assert exported.max_difference <= 1e-5 and exported.metadata["input_shape"] == ["N", 1, 16, 32, 32]
    program = torch.export.load(str(tmp_path / "net.pt2"))
    assert_device_free(program)
    program = program.module()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program(x), _network_logits(checkpoint, x), rtol=1e-4, atol=1e-5)


def test_the_program_and_its_metadata_reproduce_predict_with_monais_sliding_window(trained, tmp_path):
    """What a deployment would do with the file alone: z-score the image as the metadata says, stitch the
    program's windows with MONAI's sliding_window_inference: predict's probabilities (same overlap and
    Gaussian blending, no mirroring)."""
    import json

    import numpy as np
    from monai.inferers import sliding_window_inference

    from prostate_kernels.data import read_volume

    phantoms = trained.parents[1] / "phantoms"
    assert main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "net.pt2")]) == 0
    case, pred = phantoms / "Case00.mhd", tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained), "--input", str(case), "--output", str(pred),
                 "--no-tta", "--save-probabilities", "--no-progress"]) == 0  # fmt: skip
    extra = {"prostate_kernels.json": ""}
    program = torch.export.load(str(tmp_path / "net.pt2"), extra_files=extra).module()
    meta = json.loads(extra["prostate_kernels.json"])
    image = read_volume(case).array.astype(np.float64)
    z = torch.from_numpy(((image - image.mean()) / image.std()).astype(np.float32))[None, None]
    with torch.no_grad():
        prob = sliding_window_inference(
            z, tuple(meta["patch"]), 4, lambda w: torch.sigmoid(program(w)), overlap=0.5, mode="gaussian"
        )[0, 0].numpy()
    expected = read_volume(pred / "Case00_probabilities.mhd").array
    np.testing.assert_allclose(prob, expected, atol=1e-5)
