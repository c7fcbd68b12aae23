"""Microbenchmarks (pytest-benchmark), outside the test run: `pytest bench/ --benchmark-only`.

Small, fast cases that run anywhere (CPU): the stitching ops (C++ vs PyTorch twin), sliding-window
inference (ours vs MONAI), the dense block (shared buffer vs torch.cat). Each group compares providers on
the same inputs; the results are checked once before timing.
"""

from __future__ import annotations

import copy

import pytest
import torch

from prostate_kernels import HAS_EXT, sliding_window_inference, use_backend
from prostate_kernels.nn import DenseBlock3d
from prostate_kernels.ops.window_ops import window_ops_for
from prostate_kernels.windows import importance_map, window_starts

VOLUME, ROI = (1, 1, 16, 128, 128), (16, 64, 64)


@pytest.fixture(scope="module")
def stitching():
    x = torch.randn(VOLUME)
    positions = window_starts(VOLUME[2:], ROI, (0.5,) * 3)
    starts = torch.cat([torch.zeros_like(positions[:, :1]), positions], 1).contiguous()
    return x, starts, importance_map(ROI, "gaussian")


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.benchmark(group="window_gather")
def test_window_gather(benchmark, stitching, backend):
    if backend == "auto" and not HAS_EXT:
        pytest.skip("C++ extension not built")
    x, starts, _ = stitching
    with use_backend(backend):
        ops = window_ops_for(x.device)
    out = benchmark(ops.gather, x, starts, list(ROI))
    assert out.shape == (starts.shape[0], 1, *ROI)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.benchmark(group="window_accumulate")
def test_window_accumulate(benchmark, stitching, backend):
    if backend == "auto" and not HAS_EXT:
        pytest.skip("C++ extension not built")
    x, starts, importance = stitching
    with use_backend(backend):
        ops = window_ops_for(x.device)
    windows = ops.gather(x, starts, list(ROI))
    out = torch.zeros_like(x)
    benchmark(ops.accumulate_, out, None, windows, starts, importance)
    assert out.abs().sum() > 0


@pytest.mark.parametrize("provider", ["ours", "monai"])
@pytest.mark.benchmark(group="sliding_window_inference")
def test_sliding_window_inference(benchmark, stitching, provider):
    x = stitching[0]
    if provider == "monai":
        monai = pytest.importorskip("monai.inferers")
        fn = monai.sliding_window_inference
    else:
        fn = sliding_window_inference
    out = benchmark(fn, x, ROI, 8, lambda w: w, overlap=0.5, mode="gaussian")
    assert torch.allclose(out, x, atol=1e-5)  # identity predictor: blending gives the input back


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["shared-buffer", "torch.cat"])
@pytest.mark.benchmark(group="dense_block_fwd_bwd")
def test_dense_block(benchmark, memory_efficient):
    torch.manual_seed(0)
    block = DenseBlock3d(16, growth_rate=8, num_layers=4, dropout=0.0, memory_efficient=memory_efficient)
    reference = copy.deepcopy(block)
    reference.memory_efficient = not memory_efficient
    x = torch.randn(2, 16, 8, 32, 32, requires_grad=True)
    assert torch.allclose(block(x), reference(x), atol=1e-5)

    def step():
        block(x).sum().backward()

    benchmark(step)
