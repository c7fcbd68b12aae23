"""Double backward (differentiating a gradient) through the Triton ops: a clear error naming the op and the
remedy, never a second-order term dropped without a word; and the remedy each error names does
differentiate twice (gradgradcheck in float64)."""

from __future__ import annotations

import re

import pytest
import torch

from prostate_kernels import use_backend
from prostate_kernels.nn import BNReLUConv3d, DenseBlock3d, DepthwiseConv3d

SHAPE = (2, 4, 3, 4, 5)  # (N, C, D, H, W), odd spatial sizes


def _ops():
    """(module, the op named in its error, words of the remedy) for each op with a Triton backward."""
    return {
        "layer": (lambda: BNReLUConv3d(4, 3), "bn_relu_conv3d", 'use_backend("torch")'),
        "depthwise": (
            lambda: DepthwiseConv3d(4, dilation=2, padding=2),
            "depthwise_conv3d",
            'use_backend("torch")',
        ),
        "block": (lambda: DenseBlock3d(4, 3, 2, dropout=0.0), "DenseBlock3d", "memory_efficient=False"),
    }


@pytest.mark.parametrize("name", ["layer", "depthwise", "block"])
def test_a_gradient_penalty_through_the_triton_op_names_the_op_and_the_remedy(name):
    build, op, remedy = _ops()[name]
    torch.manual_seed(0)
    module, x = build(), torch.randn(SHAPE, requires_grad=True)
    with use_backend("triton"):
        (grad_x,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match=rf"^{op}.*differentiated again.*{re.escape(remedy)}"):
            grad_x.square().sum().backward()


@pytest.mark.parametrize("name", ["layer", "depthwise", "block"])
def test_a_second_order_term_is_not_dropped_when_the_incoming_gradient_is_constant(name):
    """y.sum()'s gradient (ones) does not require grad. torch's once_differentiable then returned the op's
    gradient as a constant, and a loss with another term through x differentiated twice without the op's
    share (x.grad was 6x plus nothing from the op; the depthwise conv's weight got no gradient)."""
    build, op, _ = _ops()[name]
    torch.manual_seed(0)
    module, x = build(), torch.randn(SHAPE, requires_grad=True)
    with use_backend("triton"):
        loss = module(x).sum() + x.pow(3).sum()
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
        with pytest.raises(RuntimeError, match=f"^{op}"):
            grad_x.sum().backward()


def test_a_plain_backward_returns_gradients_without_a_graph():
    module, x = BNReLUConv3d(4, 3), torch.randn(SHAPE, requires_grad=True)
    with use_backend("triton"):
        module(x).square().sum().backward()
    assert x.grad is not None and x.grad.grad_fn is None and not x.grad.requires_grad
    assert all(p.grad is not None and p.grad.grad_fn is None for p in module.parameters())


@pytest.mark.parametrize("name", ["layer", "depthwise", "block"])
def test_the_remedy_in_the_error_differentiates_twice(name):
    torch.manual_seed(0)
    if name == "block":
        module, backend = DenseBlock3d(4, 2, 2, dropout=0.0, memory_efficient=False), "triton"
    else:
        module, backend = _ops()[name][0](), "torch"
    module = module.double()
    x = torch.randn(1, 4, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda x: module(x), (x,), eps=1e-6, atol=1e-5)
