"""The int64-offset path of every conv kernel (INT64, chosen for tensors past 2**31 elements) computes
what the int32 path computes: forced on small tensors through the interpreter, against float64.

Huge tensors themselves are checked on a GPU (bench/gpu_checks.py); here the kernels' INT64 branches,
which no small tensor would otherwise reach, are run and compared.
"""

from __future__ import annotations

import pytest
import test_bn_relu_conv3d as dense
import test_depthwise_conv3d as depthwise
import torch

from prostate_kernels.ops import bn_relu_conv3d_triton, depthwise_conv3d_triton
from prostate_kernels.ops.launch import INT32_SPAN, check_voxels, needs_int64


@pytest.fixture
def force_int64(monkeypatch):
    seen = []

    def always(*tensors, extra=()):
        seen.append(True)
        return True

    monkeypatch.setattr(bn_relu_conv3d_triton, "needs_int64", always)
    monkeypatch.setattr(depthwise_conv3d_triton, "needs_int64", always)
    return seen


@pytest.mark.parametrize("case", [dense.CASES[1], dense.CASES[3]], ids=lambda c: c.name)
def test_dense_layer_with_int64_offsets(force_int64, case):
    g = torch.Generator().manual_seed(0)
    x, params = dense.make_input(case, g), dense.make_params(case, g)
    got, gy = dense.run(x, params, case, True, "triton")
    expected, _ = dense.run(x, params, case, True, "torch", dtype=torch.float64, grad_out=gy)
    assert force_int64  # the launchers asked, and were told int64
    for key, value in expected.items():
        assert dense.max_rel_error(got[key], value) < dense.RTOL32, key


@pytest.mark.parametrize("case", [depthwise.CASES[2], depthwise.CASES[4]], ids=lambda c: c.name)
def test_depthwise_with_int64_offsets(force_int64, case):
    g = torch.Generator().manual_seed(0)
    x = depthwise.make_input(case, g)
    w = torch.randn((case.c, 1, 3, 3, 3), generator=g)
    b = torch.randn((case.c,), generator=g) if case.bias else None
    got, gy = depthwise.run(case, x, w, b, "triton", torch.float32)
    expected, _ = depthwise.run(case, x, w, b, "torch", torch.float64, gy)
    assert force_int64
    for key, value in expected.items():
        if value is not None:
            assert depthwise.rel(got[key], value) < depthwise.RTOL32, key


@pytest.mark.parametrize("int64", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize(
    "shape,offset",
    [((3, 37, 5, 7, 11), 1.0), ((2, 5, 9, 24, 21), 100.0)],  # 5 partials; 36 partials (> one merge tile)
)
def test_channel_stats_int32_and_int64_offsets(monkeypatch, int64, layout, shape, offset):
    """The per-channel statistics kernels (partials with triton_index's voxel decode, then their float64
    merge; INT64 forced or not) against float64 var_mean, odd shapes of either layout; a mean of 100
    against a spread of 2 checks that the merge does not cancel."""
    from prostate_kernels.ops import channel_stats as stats

    monkeypatch.setattr(stats, "needs_int64", lambda *tensors, extra=(): int64)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g) * 2 + offset).to(memory_format=layout)
    mean, var = stats.channel_stats(x)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (shape[1],)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3, 4), unbiased=False)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-5, atol=1e-6)


def test_channel_stats_into_a_column_slice():
    """out=: the dense block gathers its channels' statistics in one (2, C) tensor, a slice per call."""
    from prostate_kernels.ops.channel_stats import channel_stats

    x = torch.randn((2, 6, 3, 4, 5), generator=torch.Generator().manual_seed(6)) + 2
    gathered = torch.full((2, 11), -7.0)
    mean, var = channel_stats(x, out=gathered[:, 3:9])
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3, 4), unbiased=False)
    torch.testing.assert_close(gathered[0, 3:9].double(), mean_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gathered[1, 3:9].double(), var_ref, rtol=1e-5, atol=1e-6)
    assert mean.data_ptr() == gathered[0, 3:].data_ptr() and var.data_ptr() == gathered[1, 3:].data_ptr()
    assert (gathered[:, :3] == -7).all() and (gathered[:, 9:] == -7).all()
    with pytest.raises(ValueError, match=r"float32 \(2, 6\) view"):
        channel_stats(x, out=gathered[:, 3:8])


@pytest.mark.parametrize("affine", ["gamma-beta", "none", "gamma", "beta"])
def test_batch_norm_stats_fold_like_fold_batch_norm(affine):
    """The merge kernel's fold (scale, shift, rstd in float64 from the unrounded statistics) against
    fold_batch_norm of float64 var_mean; a missing gamma is 1, a missing beta 0."""
    from prostate_kernels.ops.batch_norm import STATS_ROWS, fold_batch_norm
    from prostate_kernels.ops.channel_stats import batch_norm_stats

    g = torch.Generator().manual_seed(4)
    x = torch.randn((2, 37, 5, 7, 11), generator=g) * 2 + 3
    gamma = torch.rand(37, generator=g) + 0.5 if "gamma" in affine else None
    beta = torch.randn(37, generator=g) if "beta" in affine else None
    stats = batch_norm_stats(x, gamma, beta, 1e-3)
    assert stats.dtype == torch.float32 and stats.shape == (5, 37)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3, 4), unbiased=False)
    gamma64, beta64 = (t.double() if t is not None else None for t in (gamma, beta))
    expected = (mean, var, *fold_batch_norm(mean, var, gamma64, beta64, 1e-3))
    for name, got, want in zip(STATS_ROWS, stats.unbind(0), expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("affine", ["gamma-beta", "none", "gamma", "beta"])
@pytest.mark.parametrize("rows", [3, 5])
def test_fold_kernel_like_fold_batch_norm(affine, rows):
    """The fold kernel (a dense block unit's fold, or running statistics in eval mode) against
    fold_batch_norm in float64: statistics of another dtype (bfloat16 running statistics) and a strided
    channel slice in, a row-strided share of a larger tensor out (its neighbours untouched), mean and var
    copied first for a (5, C) out; a wrong out named."""
    from prostate_kernels.ops.batch_norm import fold_batch_norm
    from prostate_kernels.ops.channel_stats import fold_batch_norm_into

    g = torch.Generator().manual_seed(8)
    stats = torch.rand((2, 90), generator=g, dtype=torch.float64) * 3
    mean, var = stats[0, ::2].to(torch.bfloat16), stats[1, 1::2].float()  # (45,), strides 2 and 2
    gamma = torch.rand(45, generator=g) + 0.5 if "gamma" in affine else None
    beta = torch.randn(45, generator=g) if "beta" in affine else None
    big = torch.full((rows, 60), -7.0)
    out = fold_batch_norm_into(mean, var, gamma, beta, 1e-3, out=big[:, 5:50])
    assert out.data_ptr() == big[0, 5:].data_ptr()
    assert (big[:, :5] == -7).all() and (big[:, 50:] == -7).all()
    m64, v64 = mean.double(), var.double()
    gamma64, beta64 = (t.double() if t is not None else None for t in (gamma, beta))
    expected = (*((m64, v64) if rows == 5 else ()), *fold_batch_norm(m64, v64, gamma64, beta64, 1e-3))
    for i, (got, want) in enumerate(zip(out.unbind(0), expected, strict=True)):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7, msg=f"row {i}")
    with pytest.raises(
        ValueError, match=r"out must be float32 \(3, 45\) or \(5, 45\), got torch.float32 \(4, 45\)"
    ):
        fold_batch_norm_into(mean, var, gamma, beta, 1e-3, out=torch.empty((4, 45)))
    with pytest.raises(ValueError, match="channel stride 1"):
        fold_batch_norm_into(mean, var, gamma, beta, 1e-3, out=torch.empty((45, 3)).t())


def test_needs_int64_looks_at_spans_not_only_sizes():
    small = torch.empty(4, 5, device="meta")
    assert not needs_int64(small)
    assert needs_int64(torch.empty(2**31, device="meta"))
    # 3 elements, but 2**31 apart: a strided view of a huge buffer
    assert needs_int64(torch.empty(1, device="meta").as_strided((3,), (2**30,)))
    assert needs_int64(small, extra=(INT32_SPAN,))
    with pytest.raises(ValueError, match=r"depthwise_conv3d: 2147483647 voxels in one call"):
        check_voxels("depthwise_conv3d", 2**31 - 1)
