"""DeepLabv3+'s aligned trilinear resize: under torch.use_deterministic_algorithms its backward is the
matmul adjoint (no upsample_trilinear3d_backward, which has no deterministic CUDA version), equal to
PyTorch's gradient in float64; the forward is F.interpolate's, flag or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from prostate_kernels.models import build_model
from prostate_kernels.models.resize import aligned_linear_weights, resize_aligned
from torch.utils._python_dispatch import TorchDispatchMode

from prostate_kernels import use_backend
from prostate_kernels.determinism import deterministic_mode

# (input spatial size, output size): up and down, odd sizes, one-slice (DeepLabv3+ 2D), one output
SIZES = [
    ((3, 5, 4), (7, 9, 13)),
    ((1, 4, 4), (1, 16, 16)),
    ((5, 6, 7), (2, 3, 1)),
    ((4, 1, 3), (4, 5, 3)),
]


class _AtenOps(TorchDispatchMode):
    """Names of the aten ops dispatched inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def _gradient(resize, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    resize(x).backward(gy)
    return x.grad


def _pytorch(size):
    return lambda x: F.interpolate(x, size=size, mode="trilinear", align_corners=True)


@pytest.mark.parametrize(("size_in", "size_out"), SIZES)
def test_deterministic_backward_equals_pytorchs_in_float64(size_in, size_out):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3, *size_in), generator=g, dtype=torch.float64)
    gy = torch.randn((2, 3, *size_out), generator=g, dtype=torch.float64)
    expected = _gradient(_pytorch(size_out), x, gy)
    with deterministic_mode(True), _AtenOps() as ops:
        got = _gradient(lambda t: resize_aligned(t, size_out), x, gy)
    assert "upsample_trilinear3d_backward" not in ops.names
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_deterministic_backward_passes_gradcheck():
    x = torch.randn((1, 2, 3, 4, 5), dtype=torch.float64, requires_grad=True)
    with deterministic_mode(True):
        assert torch.autograd.gradcheck(lambda t: resize_aligned(t, (5, 7, 3)), (x,))


def test_forward_is_the_same_bits_with_and_without_the_flag():
    x = torch.randn((2, 4, 3, 5, 6), requires_grad=True)
    plain = resize_aligned(x, (6, 10, 12))
    with deterministic_mode(True):
        flagged = resize_aligned(x, (6, 10, 12))
    assert flagged.grad_fn is not None and type(flagged.grad_fn) is not type(plain.grad_fn)
    assert torch.equal(plain, flagged)


def test_same_size_is_returned_as_is():
    x = torch.randn((1, 2, 3, 4, 5))
    assert resize_aligned(x, (3, 4, 5)) is x


def test_bf16_channels_last_gradient_keeps_dtype_and_layout_and_is_close_to_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 8, 4, 6, 5), generator=g).to(torch.bfloat16, memory_format=torch.channels_last_3d)
    gy = torch.randn((2, 8, 8, 11, 9), generator=g)
    expected = _gradient(_pytorch((8, 11, 9)), x.double(), gy.double())
    with deterministic_mode(True):
        got = _gradient(lambda t: resize_aligned(t, (8, 11, 9)), x, gy.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last_3d)
    # bf16's own rounding of the output gradient and of the result (8 bits of mantissa)
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("n_out", "n_in"), [(7, 3), (1, 4), (5, 1), (4, 9), (6, 6)])
def test_weights_rows_sum_to_one_and_reproduce_linear_interpolation(n_out, n_in):
    weights = aligned_linear_weights(n_out, n_in, torch.float64, torch.device("cpu"))
    assert weights.shape == (n_out, n_in) and (weights >= 0).all()
    assert (weights != 0).sum(dim=1).le(2).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(n_out, dtype=torch.float64))
    signal = torch.randn(1, 1, n_in, dtype=torch.float64)
    expected = F.interpolate(signal, size=n_out, mode="linear", align_corners=True)[0, 0]
    torch.testing.assert_close(signal[0, 0] @ weights.T, expected)


@pytest.mark.parametrize(("name", "shape"), [("deeplabv3plus_3d", (2, 1, 4, 16, 16)),
                                             ("deeplabv3plus_2d", (2, 3, 16, 16))])  # fmt: skip
def test_deeplab_backward_under_the_flag_has_no_nondeterministic_upsampling(name, shape):
    """Both resizes of the network (ASPP -> skip, logits -> input) take the adjoint under the flag, and
    the gradients equal those of PyTorch's upsampling backward (float64, CPU)."""
    torch.manual_seed(0)
    in_channels = {"in_channels": 3} if name.endswith("2d") else {}
    model = build_model(name, width=1 / 32, middle_blocks=1, **in_channels).double()
    x = torch.randn(shape, dtype=torch.float64)

    def gradients(deterministic: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same ASPP dropout mask
        with use_backend("torch"), deterministic_mode(deterministic):
            loss = model(x).square().mean()
            with _AtenOps() as ops:
                loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, ops.names

    plain, plain_ops = gradients(False)
    flagged, flagged_ops = gradients(True)
    assert "upsample_trilinear3d_backward" in plain_ops  # the test sees the op it is about
    assert "upsample_trilinear3d_backward" not in flagged_ops
    for n in plain:
        torch.testing.assert_close(flagged[n], plain[n], rtol=1e-9, atol=1e-12, msg=n)
