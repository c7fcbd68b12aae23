"""torch.compile through the fused ops (issue 14, section 2): the Triton paths are torch.library custom ops
with fake kernels and autograd, checked by torch.library.opcheck, and a model built from them compiles
with fullgraph=True, no graph break, and computes exactly what eager does (outputs, gradients, running
stats: the same kernels run in both).

On the CPU the Triton kernels run in the interpreter (backend "triton"); the compiled graphs use the
aot_eager backend, which runs the ops' real kernels (Inductor would need a C++ compiler for its own code).
"""

from __future__ import annotations

import copy

import pytest
import torch
from prostate_kernels.models import Tiramisu3D, build_model

from prostate_kernels import use_backend
from prostate_kernels.nn import BNReLUConv3d, DenseBlock3d, DepthwiseConv3d, SeparableConv3d
from prostate_kernels.ops import bn_relu_conv3d_triton, depthwise_conv3d_triton  # noqa: F401 - registers the ops


def _dense_layer_args(batch_stats: bool, requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 5, 4, 5, 6), generator=g).requires_grad_(requires_grad)
    weight = (torch.randn((7, 5, 3, 3, 3), generator=g) / 10).requires_grad_(requires_grad)
    bias = torch.randn(7, generator=g).requires_grad_(requires_grad)
    gamma = (1 + torch.rand(5, generator=g)).requires_grad_(requires_grad)
    beta = torch.randn(5, generator=g).requires_grad_(requires_grad)
    running = (torch.randn(5, generator=g), 1 + torch.rand(5, generator=g))
    return (x, weight, bias, gamma, beta, *running, batch_stats, 1e-5, [1, 1, 1], [1, 1, 1], [1, 1, 1],
            torch.float32)  # fmt: skip


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_bn_relu_conv3d_op_passes_opcheck(batch_stats, requires_grad):
    torch.library.opcheck(
        torch.ops.prostate_kernels.bn_relu_conv3d_forward.default,
        _dense_layer_args(batch_stats, requires_grad),
    )


@pytest.mark.parametrize("requires_grad", [True, False])
def test_depthwise_conv3d_op_passes_opcheck(requires_grad):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 6, 5, 6, 7), generator=g).requires_grad_(requires_grad)
    weight = torch.randn((6, 1, 3, 3, 3), generator=g).requires_grad_(requires_grad)
    bias = torch.randn(6, generator=g).requires_grad_(requires_grad)
    torch.library.opcheck(
        torch.ops.prostate_kernels.depthwise_conv3d_forward.default,
        (x, weight, bias, [1, 2, 1], [2, 1, 1], [2, 1, 1]),
    )


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        BNReLUConv3d(4, 8), DepthwiseConv3d(8, 3, padding=2, dilation=2), BNReLUConv3d(8, 3)
    )


def test_a_model_of_the_fused_ops_compiles_without_graph_breaks():
    x = torch.randn((2, 4, 5, 6, 7))
    with use_backend("triton"):
        explanation = torch._dynamo.explain(_model())(x)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    ops = {str(n.target) for graph in explanation.graphs for n in graph.graph.nodes}
    assert {
        "prostate_kernels.bn_relu_conv3d_forward.default",
        "prostate_kernels.depthwise_conv3d_forward.default",
    } <= ops


@pytest.mark.parametrize("training", [True, False])
def test_compiled_model_computes_what_eager_does(training):
    torch._dynamo.reset()
    eager, compiled = _model().train(training), _model().train(training)
    x = torch.randn((2, 4, 5, 6, 7), generator=torch.Generator().manual_seed(3))
    with use_backend("triton"):
        y_eager = eager(x.clone().requires_grad_(True))
        y_eager.square().sum().backward()
        fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
        x_c = x.clone().requires_grad_(True)
        y_c = fn(x_c)
        y_c.square().sum().backward()
    torch.testing.assert_close(y_c, y_eager, rtol=0, atol=0)
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=0, atol=0, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(b_c, b_e, rtol=0, atol=0, msg=name)  # running statistics updated alike


@pytest.mark.parametrize(("name", "batch"), [("tiramisu3d_p3a", 1), ("deeplabv3plus_3d", 2)])
def test_the_networks_compile_without_graph_breaks_on_the_cpu_path(name, batch):
    """Training mode (batch statistics, dropout seeds drawn in the graph), the default backend: on the CPU
    the dense blocks' PyTorch engine and the PyTorch twins of the other ops."""
    torch._dynamo.reset()
    model = build_model(name)
    explanation = torch._dynamo.explain(model)(torch.randn((batch, 1, 16, 32, 32)))
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    ops = {str(n.target) for graph in explanation.graphs for n in graph.graph.nodes}
    if name.startswith("tiramisu"):
        assert "prostate_kernels.dense_block_forward.default" in ops


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_compiled_tiramisu_trains_like_eager(backend):
    """A small Tiramisu 3D (one pooling level, 1-layer dense blocks: every kind of block and layer) without
    dropout (its masks come from the random stream, which compiled code may draw differently): one
    training step compiled (aot_eager, fullgraph) gives eager's gradients and running statistics."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Tiramisu3D((1, 1, 1), growth_rate=4, first_conv_filters=8, dropout=0.0)
    compiled = Tiramisu3D((1, 1, 1), growth_rate=4, first_conv_filters=8, dropout=0.0)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn((2, 1, 4, 6, 8), generator=torch.Generator().manual_seed(4))
    with use_backend(backend):
        eager(x).square().mean().backward()
        torch.compile(compiled, backend="aot_eager", fullgraph=True)(x).square().mean().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=0, atol=0, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(b_c, b_e, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_compiled_densenet_bc_block_trains_like_eager(backend):
    """The bottleneck (DenseNet-BC) block through torch.compile (aot_eager, fullgraph): the same output,
    gradients and running statistics (of both BatchNorms of every layer) as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = DenseBlock3d(4, growth_rate=4, num_layers=2, dropout=0.0, bn_size=2)
    compiled = copy.deepcopy(eager)
    x = torch.randn((2, 4, 3, 4, 5), generator=torch.Generator().manual_seed(5))
    with use_backend(backend):
        y_eager = eager(x)
        y_eager.square().mean().backward()
        y_compiled = torch.compile(compiled, backend="aot_eager", fullgraph=True)(x)
        y_compiled.square().mean().backward()
    torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=0, atol=0, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(b_c, b_e, rtol=0, atol=0, msg=name)


def test_dropout_and_fused_separable_inference_compile_on_the_triton_path():
    torch._dynamo.reset()
    block = DenseBlock3d(4, growth_rate=4, num_layers=2, dropout=0.2)
    with use_backend("triton"):
        explanation = torch._dynamo.explain(block)(torch.randn((2, 4, 3, 4, 5)))
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    separable = SeparableConv3d(4, 6, dilation=2).eval()
    with use_backend("triton"), torch.no_grad():
        explanation = torch._dynamo.explain(separable)(torch.randn((1, 4, 5, 6, 7)))
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    ops = {str(n.target) for graph in explanation.graphs for n in graph.graph.nodes}
    assert "prostate_kernels.separable_conv3d_inference.default" in ops
