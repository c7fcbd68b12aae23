"""Tensor subclasses that override torch functions (MONAI's MetaTensor) through the library's ops: each
op is one call to the subclass, as torch.nn.functional's ops are, runs on a plain alias, and gives the
plain tensor's values and gradients back in the subclass."""

from __future__ import annotations

import pytest
import torch

from prostate_kernels import functional, use_backend
from prostate_kernels import nn as pnn


class Logged(torch.Tensor):
    """A subclass that records every torch function it sees (as MetaTensor's bookkeeping sees them)."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def _ops(g):
    x = torch.randn((2, 3, 5, 6, 7), generator=g)
    conv, depthwise, bias = (torch.randn(s, generator=g) for s in ((4, 3, 3, 3, 3), (3, 1, 3, 3, 3), (3,)))
    norm = [torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)]
    return x, [
        ("bn_relu_conv3d", functional.bn_relu_conv3d,
         lambda a, p: (a, p[0], None, p[1], p[2], None, None, True), [conv, *norm]),
        ("depthwise_conv3d", functional.depthwise_conv3d, lambda a, p: (a, p[0], p[1], 1, 2, 2),
         [depthwise, bias]),
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("which", [0, 1], ids=["bn_relu_conv3d", "depthwise_conv3d"])
def test_a_functional_op_is_one_call_to_the_subclass_with_the_plain_results(backend, which):
    x, ops = _ops(torch.Generator().manual_seed(0))
    name, op, arguments, params = ops[which]
    results = []
    for wrap in (False, True):
        inp = x.clone().requires_grad_(True)
        leaves = [p.clone().requires_grad_(True) for p in params]
        Logged.seen = []
        with use_backend(backend):
            y = op(*arguments(inp.as_subclass(Logged) if wrap else inp, leaves))
        assert Logged.seen == ([op] if wrap else [])  # the op alone: nothing it does inside
        assert type(y) is (Logged if wrap else torch.Tensor)
        y.as_subclass(torch.Tensor).square().sum().backward()
        results.append([y.detach().as_subclass(torch.Tensor), inp.grad, *(p.grad for p in leaves)])
    for plain, subclass in zip(*results, strict=True):
        assert torch.equal(plain, subclass)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_dense_block_is_one_call_to_the_subclass_with_the_plain_results(backend):
    torch.manual_seed(0)
    block = pnn.DenseBlock3d(3, 2, 2, dropout=0.0)
    x = torch.randn((2, 3, 4, 5, 3), generator=torch.Generator().manual_seed(1))
    results = []
    for wrap in (False, True):
        block.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        Logged.seen = []
        with use_backend(backend):
            y = block(inp.as_subclass(Logged) if wrap else inp)
        # the block's own argument checks see x (shape, dtype, device); the op is one call
        assert type(y) is (Logged if wrap else torch.Tensor)
        assert (
            not wrap or Logged.seen.count(Logged.seen[-1]) == 1 and Logged.seen[-1].__name__ == "dense_block"
        )
        y.as_subclass(torch.Tensor).square().sum().backward()
        results.append(
            [y.detach().as_subclass(torch.Tensor), inp.grad, *(p.grad for p in block.parameters())]
        )
    for plain, subclass in zip(*results, strict=True):
        assert torch.equal(plain, subclass)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_monai_network_optimised_trains_on_metatensors_as_on_tensors(backend):
    """MONAI's data pipelines give MetaTensors: an optimized MONAI DenseNet took them through Triton's
    interpreter as far as MetaTensor's own new_empty (a TypeError) and lost their affine on the way out."""
    monai_data = pytest.importorskip("monai.data")
    nets = pytest.importorskip("monai.networks.nets")
    import prostate_kernels

    torch.manual_seed(0)
    net = nets.DenseNet(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                        block_config=(2, 2))  # fmt: skip
    report = prostate_kernels.optimize(net)[1]
    assert len(report.replaced) == 3
    x = torch.randn((2, 1, 16, 16, 16), generator=torch.Generator().manual_seed(2))
    affine = torch.diag(torch.tensor([0.6, 0.6, 3.0, 1.0], dtype=torch.float64))
    results = []
    for inp in (x, monai_data.MetaTensor(x.clone(), affine=affine)):
        net.zero_grad(set_to_none=True)
        with use_backend(backend):
            y = net(inp)
        y.float().square().sum().backward()
        results.append([y.detach().as_subclass(torch.Tensor), *(p.grad for p in net.parameters())])
        assert type(y) is type(inp)
    assert torch.equal(y.affine, affine)
    for plain, meta in zip(*results, strict=True):
        assert torch.equal(plain, meta)
