"""The probe of PyTorch's bf16 conv3d backward on the CPU (cpu_bf16.py), and train's refusal of --amp bf16
where it fails. On the AMD EPYC (Zen 4) these were written on, oneDNN's bf16 weight gradient of a 3x3x3
conv3d is wrong for inputs 2 slices deep; other CPUs may compute it right: each test holds on either."""

from __future__ import annotations

import itertools

import pytest
import torch
from cli_helpers import make_phantoms, train_args

from prostate_kernels import cpu_bf16
from prostate_kernels.cli import main
from prostate_kernels.data import ConfigError


def _weight_grad_error(shape: tuple[int, ...], out_channels: int) -> float:
    """conv3d's (3x3x3, padding 1) weight gradient under CPU bf16 autocast against float64 on the same
    bf16-rounded operands, relative to the exact gradient's largest value (written apart from the probe)."""
    g = torch.Generator().manual_seed(sum(shape) + out_channels)
    x = torch.randn(shape, generator=g).bfloat16()
    w = (torch.randn((out_channels, shape[1], 3, 3, 3), generator=g) * 0.1).bfloat16()
    grad_y = torch.randn((shape[0], out_channels, *shape[2:]), generator=g).bfloat16()
    w_low = w.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.conv3d(x.float(), w_low, padding=1)
    y.backward(grad_y)
    w64 = w.double().requires_grad_()
    torch.nn.functional.conv3d(x.double(), w64, padding=1).backward(grad_y.double())
    return ((w_low.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()).nan_to_num(torch.inf).item()


def test_the_probe_passes_a_right_convolution():
    """PyTorch's own conv3d without oneDNN computes the gradient right: the probe measures bf16's
    rounding there (3.6e-3 measured), well inside its tolerance."""
    with torch.backends.mkldnn.flags(enabled=False), torch.no_grad():  # (no_grad: the probe takes grads)
        assert cpu_bf16.probe_error() < cpu_bf16.TOLERANCE / 5


def test_the_probe_agrees_with_a_sweep_of_2_slice_convolutions():
    """On this CPU either some 2-slice-deep shape's bf16 weight gradient is wrong and the probe says so,
    or none is and the probe passes (the probe's own shape is not in the sweep)."""
    shapes = [(2, c, 2, hw, hw) for c, hw in itertools.product((16, 32, 48), (8, 16))]
    errors = {(shape, k): _weight_grad_error(shape, k) for shape in shapes for k in (4, 16)}
    wrong = {key: error for key, error in errors.items() if cpu_bf16.is_faulty(error)}
    # a shape that is not 2 slices deep is right on either kind of CPU
    assert _weight_grad_error((2, 24, 3, 8, 8), 16) < cpu_bf16.TOLERANCE
    assert cpu_bf16.is_faulty(cpu_bf16.probe_error()) == bool(wrong), (cpu_bf16.probe_error(), wrong)


def test_train_refuses_bf16_where_the_probe_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cpu_bf16, "bf16_conv3d_weight_grad_error", lambda: 1.1)
    data = make_phantoms(tmp_path / "data")
    capsys.readouterr()
    assert main(train_args(data, tmp_path / "run", 2, "--amp", "bf16")) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "--amp bf16 on this CPU" in said[0] and "off by 1.1" in said[0], said
    assert said[0].endswith("train with --amp off on the CPU")
    assert not (tmp_path / "run").exists()


def test_the_probe_decides_bf16_on_the_cpu_alone(monkeypatch):
    """A passing probe lets bf16 train; float32, fp16 and a CUDA device are never probed."""
    monkeypatch.setattr(cpu_bf16, "bf16_conv3d_weight_grad_error", lambda: 0.004)
    cpu_bf16.check_bf16_training(torch.bfloat16, torch.device("cpu"))

    def not_probed():
        raise AssertionError("probed")

    monkeypatch.setattr(cpu_bf16, "bf16_conv3d_weight_grad_error", not_probed)
    for dtype, device in ((None, "cpu"), (torch.float16, "cpu"), (torch.bfloat16, "cuda")):
        cpu_bf16.check_bf16_training(dtype, torch.device(device))
    with pytest.raises(AssertionError, match="probed"):
        cpu_bf16.check_bf16_training(torch.bfloat16, torch.device("cpu"))


def test_info_names_the_verdict(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "bf16_conv3d_weight_grad_error", lambda: 1.1)
    assert cpu_bf16.bf16_training_verdict().startswith(
        "bf16 conv3d weight gradients wrong (a probe off by 1.1"
    )
    monkeypatch.setattr(cpu_bf16, "bf16_conv3d_weight_grad_error", lambda: 0.0036)
    assert cpu_bf16.bf16_training_verdict().startswith("bf16 conv3d weight gradients right")
    with pytest.raises(ConfigError):  # (the refusal is the ConfigError the CLI prints in one line)
        monkeypatch.setattr(cpu_bf16, "bf16_conv3d_weight_grad_error", lambda: float("inf"))
        cpu_bf16.check_bf16_training(torch.bfloat16, torch.device("cpu"))
