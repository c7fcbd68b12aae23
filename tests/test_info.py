"""prostate-kernels info: the install's report, and --check, which runs every layer against float64."""

from __future__ import annotations

import importlib.metadata
import re

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli

from prostate_kernels import HAS_EXT, get_backend, self_check, use_backend
from prostate_kernels.cli import main
from prostate_kernels.ops import bn_relu_conv3d_triton


def test_info_names_the_versions_the_extension_and_what_each_op_runs_on_the_cpu(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and f"triton {importlib.metadata.version('triton')}" in out
    assert "C++ extension prostate_kernels._C: " + ("loaded" if HAS_EXT else "not loaded") in out
    assert "TRITON_INTERPRET=1" in out  # the tests run under the interpreter
    if torch.version.cuda is None:
        assert "CUDA: none (torch " in out and "is a CPU build)" in out
    # the "auto" backend on the CPU: the PyTorch twins, the C++ extension for the stitching
    assert "  BNReLUConv3d, DenseBlock3d: PyTorch twin\n" in out
    assert "  sliding-window stitching: " + ("C++ extension" if HAS_EXT else "PyTorch twin") in out
    assert "checks against" not in out  # nothing runs without --check


def test_info_check_runs_every_layer_on_each_backend_and_all_agree_with_float64(capsys):
    """Under the interpreter the CPU runs "auto" (the twins, the C++ stitching) and the Triton kernels, in
    float32 and under bf16 autocast."""
    assert main(["info", "--check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("  pass") or line.startswith("  FAIL")]
    bf16 = sum(case.bf16 for case in self_check.CASES)
    assert len(rows) == 2 * len(self_check.CASES) + bf16 and all(row.startswith("  pass") for row in rows)
    assert sum(" triton " in row for row in rows) == len(self_check.CASES) + bf16
    assert sum(", bf16 autocast: " in row and "(eager PyTorch: " in row for row in rows) == bf16
    assert f"{len(rows)} of {len(rows)} checks passed" in out


def test_a_kernel_that_computes_a_wrong_gradient_fails_its_check_and_the_exit_status(monkeypatch, capsys):
    real = bn_relu_conv3d_triton.conv_weight_grad

    def five_percent_off(*args, **kwargs):
        grad_weight, grad_bias = real(*args, **kwargs)
        return grad_weight * 1.05, grad_bias

    monkeypatch.setattr(bn_relu_conv3d_triton, "conv_weight_grad", five_percent_off)
    monkeypatch.setattr(self_check, "CASES", self_check.CASES[:2])  # the fused layer, train and eval
    assert main(["info", "--check", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert len(failed) == 2 and "cpu     triton BNReLUConv3d train fwd+bwd: 5.0e-02" in failed[0]
    found = re.search(r"triton BNReLUConv3d train fwd\+bwd, bf16 autocast: (\S+) \(eager PyTorch: (\S+)\)",
                      failed[1])  # fmt: skip
    assert float(found[1]) > max(2 * float(found[2]), self_check.BF16_FLOOR)  # 4.7e-02 against 3.8e-03
    assert "4 of 6 checks passed" in out  # the twins' rows and the eval rows


def test_a_kernel_that_raises_is_a_failed_row_and_the_other_checks_go_on(monkeypatch, capsys):
    def unavailable(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device\nsecond line")

    monkeypatch.setattr(bn_relu_conv3d_triton, "conv_forward", unavailable)
    monkeypatch.setattr(self_check, "CASES", self_check.CASES[:2])
    assert main(["info", "--check", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert len(failed) == 4 and all(
        "RuntimeError: no kernel image is available for execution on the device (" in row for row in failed
    )
    assert "2 of 6 checks passed" in out and "second line" not in out


def test_run_checks_leaves_the_random_state_and_the_backend_as_they_were(monkeypatch):
    """A library call: the caller's torch.manual_seed stream and backend setting are theirs."""
    monkeypatch.setattr(self_check, "CASES", self_check.CASES[:1])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with use_backend("torch"):
        seen = []
        results = self_check.run_checks([torch.device("cpu")], seen.append)
        assert get_backend() == "torch"
    assert torch.equal(torch.rand(3), expected)
    assert [r.implementation for r in results] == ["torch", "triton", "triton"] and seen == results
    assert [r.precision for r in results] == ["float32", "float32", "bf16 autocast"]


def test_bf16_passes_tensor_by_tensor_within_twice_eagers_error_or_below_the_floor():
    def result(errors, eager):
        return self_check.CheckResult("cuda:0", "triton", "layer", errors, 0.0, "", "bf16 autocast", eager)

    assert result((0.05, 0.001), (0.03, 0.001)).passed  # 0.05 <= 2 x 0.03
    assert not result((0.07, 0.001), (0.03, 0.001)).passed  # over 2x eager's, over the floor
    assert result((0.009,), (0.0001,)).passed  # below BF16_FLOOR whatever eager's
    assert not result((0.05, 0.001), (0.001, 0.05)).passed  # the same largest error, on another tensor
    assert not result(None, (0.001,)).passed and not result((0.001,), None).passed
    assert self_check.CheckResult("cpu", "torch", "layer", (1e-4, 2e-5), 0.0).passed
    assert not self_check.CheckResult("cpu", "torch", "layer", (1.1e-4,), 0.0).passed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_info_refuses_a_device_this_machine_lacks():
    assert_one_line_error(run_cli("info", "--device", "cuda"), "argument --device", "no CUDA device")


def test_a_device_named_twice_is_described_once_and_the_command_has_a_version(capsys):
    assert main(["info", "--device", "cpu", "cpu"]) == 0
    assert capsys.readouterr().out.count("\ncpu: ") == 1
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    from prostate_kernels import __version__

    assert exited.value.code == 0 and capsys.readouterr().out == f"prostate-kernels {__version__}\n"
