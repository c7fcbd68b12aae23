"""predict --window: stitch windows other than the training patch, or each volume whole in one window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_one_line_error, make_phantoms, run_cli, train_args

from prostate_kernels.cli import main
from prostate_kernels.data import read_volume
from prostate_kernels.data.sampling import zscore
from prostate_kernels.pipeline import inference_window
from prostate_kernels.trained_model import load_trained_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("window")
    assert main(train_args(make_phantoms(root / "phantoms"), root / "run", 2)) == 0
    return root / "run" / "checkpoint.pt"


@pytest.fixture(scope="module")
def odd_volume(tmp_path_factory) -> Path:
    """A 10x38x42 phantom: larger than the 8x32x32 patch, no side a multiple of the network's 4."""
    out = tmp_path_factory.mktemp("odd")
    assert main(["phantoms", "--out", str(out), "--n", "1", "--shape", "10", "38", "42"]) == 0
    return out / "Case00.mhd"


def _probabilities(checkpoint: Path, image: Path, out: Path, *extra: str) -> np.ndarray:
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(image), "--output", str(out),
            "--save-probabilities", "--no-tta", "--no-progress", *extra]  # fmt: skip
    assert main(args) == 0
    return read_volume(out / "Case00_probabilities.mhd").array


def test_whole_is_one_network_call_on_the_padded_volume(trained, odd_volume, tmp_path):
    """--window whole: the z-scored volume padded to 12x40x44 (half before, half after), one forward,
    cropped back: what a whole-volume inference computes, and not the sliding windows' result."""
    whole = _probabilities(trained, odd_volume, tmp_path / "whole", "--window", "whole")
    model, _ = load_trained_model(trained, torch.device("cpu"))
    image = torch.from_numpy(zscore(read_volume(odd_volume).array))[None, None]  # (1, 1, 10, 38, 42)
    padded = F.pad(image, (1, 1, 1, 1, 1, 1))  # W 42 -> 44, H 38 -> 40, D 10 -> 12
    with torch.no_grad():
        expected = torch.sigmoid(model(padded))[0, 0, 1:-1, 1:-1, 1:-1].numpy()
    np.testing.assert_allclose(whole, expected, rtol=0, atol=1e-5)
    windows = _probabilities(trained, odd_volume, tmp_path / "windows")
    assert np.abs(windows - whole).max() > 1e-3  # the patch's windows see other context


def test_a_window_equal_to_the_patch_changes_nothing_and_other_sizes_run(trained, odd_volume, tmp_path):
    default = _probabilities(trained, odd_volume, tmp_path / "a")
    assert np.array_equal(
        _probabilities(trained, odd_volume, tmp_path / "b", "--window", "8", "32", "32"), default
    )
    larger = _probabilities(trained, odd_volume, tmp_path / "c", "--window", "8", "36", "40")
    assert larger.shape == default.shape and np.isfinite(larger).all()


def test_window_sizes_the_network_cannot_take_are_refused_before_anything_is_written(
    trained, odd_volume, tmp_path
):
    out = tmp_path / "never"
    for window, message in (
        (["10", "32", "32"], "--window 10 32 32 must be a multiple of (4, 4, 4) for "),
        (["8", "32"], "argument --window: 8 32: give 3 sizes D H W, or whole"),
        (["whole", "8", "8"], "argument --window: whole 8 8: give 3 sizes D H W, or whole"),
        (["0", "32", "32"], "argument --window: 0 must be >= 1"),
        (["8", "x", "32"], "argument --window: 'x' is not an integer"),
    ):
        result = run_cli("predict", "--checkpoint", trained, "--input", odd_volume, "--output", out,
                         "--window", *window)  # fmt: skip
        assert_one_line_error(result, message)
        assert not out.exists()


def test_a_window_beyond_the_machines_memory_is_one_line_and_leaves_nothing(
    trained, odd_volume, tmp_path, monkeypatch, capsys
):
    """--window 4096 4096 4096 ended predict in a ValueError traceback. On the CPU its network call is
    refused per case (2.9e4 GiB at once); past that check (on a GPU it does not run), the padded volume
    alone (256 GiB) is refused by sliding_window_inference before allocating (a ValueError that is also a
    MemoryError)."""
    from prostate_kernels import pipeline

    out = tmp_path / "never"
    result = run_cli("predict", "--checkpoint", trained, "--input", odd_volume, "--output", out,
                     "--window", "4096", "4096", "4096")  # fmt: skip
    assert_one_line_error(result, "one network call of tiramisu3d_tiny on a 4096x4096x4096 window holds",
                          "choose a smaller --window")  # fmt: skip
    assert not out.exists()
    monkeypatch.setattr(pipeline, "_check_call_fits", lambda *args: None)
    args = ["predict", "--checkpoint", str(trained), "--input", str(odd_volume), "--output", str(out)]
    assert main([*args, "--window", "4096", "4096", "4096"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of memory (roi_size (4096, 4096, 4096)"), err
    assert "256 GiB" in err and "try a smaller --window" in err
    assert not out.exists()


def test_torchs_cpu_allocator_failing_is_one_line(trained, odd_volume, tmp_path, monkeypatch, capsys):
    """A window that pads within memory but whose network outputs do not fit: torch's CPU allocator
    raises a RuntimeError naming itself (not MemoryError, not torch.OutOfMemoryError)."""

    def allocation_fails(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
            "tried to allocate 4000000000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr("prostate_kernels.pipeline.predict_probabilities", allocation_fails)
    args = [
        "predict",
        "--checkpoint",
        str(trained),
        "--input",
        str(odd_volume),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of memory ([enforce fail"), err
    assert "4000000000000 bytes" in err and "try a smaller --window" in err
    assert not (tmp_path / "o").exists()

    def other_runtime_error(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr("prostate_kernels.pipeline.predict_probabilities", other_runtime_error)
    with pytest.raises(RuntimeError, match="a bug of ours"):  # not hidden as out of memory
        main([*args[:-1], str(tmp_path / "p")])


def test_a_larger_window_runs_fewer_windows_per_network_call(trained, odd_volume, tmp_path, monkeypatch):
    """Calls hold the voxels of 4 training patches: a whole-volume window (and its mirror images, which
    share calls) must not run 4 at a time where the default windows ran 4 patches."""
    from prostate_kernels import pipeline

    three_d = {"patch": [8, 32, 32]}
    assert pipeline.windows_per_call(three_d, (8, 32, 32)) == 4
    assert pipeline.windows_per_call(three_d, (8, 64, 32)) == 2
    assert pipeline.windows_per_call(three_d, (12, 40, 44)) == 1  # the odd volume, whole
    assert pipeline.windows_per_call(three_d, (24, 128, 128)) == 1  # never 0
    assert pipeline.windows_per_call(three_d, (8, 16, 16)) == 16
    assert pipeline.windows_per_call({"patch": [13, 64, 64], "slices": 13}, (13, 128, 64)) == 2

    calls = []
    real = pipeline.predict_probabilities

    def recording(model, *args, **kwargs):  # the shape of every network call's input
        hook = model.register_forward_pre_hook(lambda module, inputs: calls.append(tuple(inputs[0].shape)))
        try:
            return real(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(pipeline, "predict_probabilities", recording)
    args = ["predict", "--checkpoint", str(trained), "--input", str(odd_volume), "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "whole"), "--window", "whole"]) == 0
    assert calls == [(1, 1, 12, 40, 44)] * 8  # one window, 8 mirror images, one per call
    calls.clear()
    assert main([*args, "--output", str(tmp_path / "patch")]) == 0
    assert {shape[1:] for shape in calls} == {(1, 8, 32, 32)} and max(s[0] for s in calls) == 4


def test_a_window_whose_network_call_cannot_fit_the_cpu_is_refused_per_case(
    trained, odd_volume, tmp_path, monkeypatch
):
    """The memory set between what one call on the patch's windows (4 of 8x32x32) and one on a 16x64x64
    window hold (simulated on the meta device): that window fails the case in one line, the patch runs."""
    from prostate_kernels.models import build_model

    from prostate_kernels import pipeline
    from prostate_kernels.checkpoint import load_checkpoint
    from prostate_kernels.memory_bound import step_memory

    state = load_checkpoint(trained)
    with torch.device("meta"), torch.no_grad():
        network = build_model(state["model"], **state.get("model_kwargs", {})).eval()
        patch_call = step_memory(network, torch.empty(4, 1, 8, 32, 32)).peak
        large_call = step_memory(network, torch.empty(1, 1, 16, 64, 64)).peak  # 1 window per call
    assert patch_call < large_call
    monkeypatch.setattr(pipeline, "memory_bytes", lambda device: (patch_call + large_call) // 2)
    out = tmp_path / "large"
    result = main(["predict", "--checkpoint", str(trained), "--input", str(odd_volume), "--output", str(out),
                   "--window", "16", "64", "64", "--no-progress"])  # fmt: skip
    assert result == 2 and not out.exists()  # every case failed: nothing written
    failures = pipeline.predict_files(trained, odd_volume, tmp_path / "again", window=(16, 64, 64))
    assert len(failures) == 1
    assert "Case00.mhd: one network call of tiramisu3d_tiny on a 16x64x64 window holds" in failures[0]
    assert "choose a smaller --window" in failures[0]
    assert main(["predict", "--checkpoint", str(trained), "--input", str(odd_volume), "--output",
                 str(tmp_path / "patch"), "--no-tta", "--no-progress"]) == 0  # fmt: skip


class _Network:
    def __init__(self, downsampling):
        self.downsampling = downsampling


def test_the_whole_window_rounds_each_side_up_to_the_networks_downsampling():
    three_d = {"patch": [16, 64, 64]}
    assert inference_window(three_d, _Network((8, 8, 8)), "whole", (20, 50, 70)) == (24, 56, 72)
    assert inference_window(three_d, _Network((8, 8, 8)), None, (20, 50, 70)) == (16, 64, 64)
    assert inference_window(three_d, _Network((8, 8, 8)), (8, 32, 48), (20, 50, 70)) == (8, 32, 48)
    two_d = {"patch": [13, 64, 64], "slices": 13}  # DeepLabv3+ 2-D: stacks of 13 slices, in-plane windows
    assert inference_window(two_d, _Network((1, 16, 16)), "whole", (20, 50, 70)) == (13, 64, 80)


def test_a_2d_network_takes_a_window_only_of_its_slices_depth(tmp_path):
    from prostate_kernels.models import build_model

    from prostate_kernels.checkpoint import save_checkpoint
    from prostate_kernels.data import ConfigError
    from prostate_kernels.pipeline import check_window

    kwargs = {"in_channels": 3, "width": 0.25, "middle_blocks": 1}
    model = build_model("deeplabv3plus_2d", **kwargs)
    state = {"model": "deeplabv3plus_2d", "model_kwargs": kwargs, "patch": [3, 32, 32], "slices": 3}
    checkpoint = save_checkpoint({**state, "state_dict": model.state_dict()}, tmp_path / "d.pt")
    check_window((3, 48, 64), state, model, checkpoint)
    check_window("whole", state, model, checkpoint)
    with pytest.raises(
        ConfigError, match=r"--window 4 48 64: .* stacks of 3 slices: its window's depth must be 3"
    ):
        check_window((4, 48, 64), state, model, checkpoint)
    with pytest.raises(ConfigError, match=r"--window 3 40 64 must be a multiple of \(1, 16, 16\)"):
        check_window((3, 40, 64), state, model, checkpoint)
