"""predict stitches on the network's GPU, falling back to CPU stitching on out-of-memory (said once)."""

from __future__ import annotations

import pytest
import torch

from prostate_kernels import predict


def _stitcher(fits_on_device: bool, calls: list):
    def stitch(on: torch.device) -> torch.Tensor:
        calls.append(on.type)
        if on.type != "cpu" and not fits_on_device:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return torch.full((1,), 7.0)

    return stitch


def test_out_of_memory_falls_back_to_cpu_stitching_and_says_so_once(capsys, monkeypatch):
    monkeypatch.setattr(predict, "_FELL_BACK", set())
    calls: list = []
    device = torch.device("meta")  # stands for a GPU here: any non-CPU device takes the same path
    for _ in range(2):
        assert predict.stitched_on_device_or_cpu(_stitcher(False, calls), device).item() == 7.0
    assert calls == ["meta", "cpu", "meta", "cpu"]
    assert capsys.readouterr().err.count("stitching on the CPU") == 1


def test_stitching_stays_on_the_device_when_the_buffers_fit(capsys, monkeypatch):
    monkeypatch.setattr(predict, "_FELL_BACK", set())
    calls: list = []
    assert predict.stitched_on_device_or_cpu(_stitcher(True, calls), torch.device("meta")).item() == 7.0
    assert calls == ["meta"] and capsys.readouterr().err == ""


def test_cpu_prediction_stitches_once_on_the_cpu():
    calls: list = []
    predict.stitched_on_device_or_cpu(_stitcher(False, calls), torch.device("cpu"))
    assert calls == ["cpu"]


def test_other_errors_are_not_swallowed():
    def broken(on):
        raise ValueError("predictor returned shape (1, 1, 2, 2, 2) for 4 windows")

    with pytest.raises(ValueError, match="predictor returned"):
        predict.stitched_on_device_or_cpu(broken, torch.device("meta"))
