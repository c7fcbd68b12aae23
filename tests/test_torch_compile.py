"""torch.compile through the fused ops (issue 14, section 2): the Triton paths are torch.library custom ops
with fake kernels and autograd, checked by torch.library.opcheck, and a model built from them compiles
with fullgraph=True, no graph break, and computes exactly what eager does (outputs, gradients, running
stats: the same kernels run in both).

On the CPU the Triton kernels run in the interpreter (backend "triton"); most compiled graphs use the
aot_eager backend, which runs the ops' real kernels as traced and so allows exact comparisons; one test
runs Inductor, torch.compile's default, which compiles the code around the ops with the C++ compiler.
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


def _input_in_layout(layout: str, channels: int, g: torch.Generator) -> torch.Tensor:
    """x (2, channels, 3, 4, 5): NCDHW, or a channel slice of a larger channels-last buffer (how a dense
    layer reads its input in place)."""
    if layout == "ncdhw":
        return torch.randn((2, channels, 3, 4, 5), generator=g)
    buffer = torch.randn((2, channels + 3, 3, 4, 5), generator=g).contiguous(
        memory_format=torch.channels_last_3d
    )
    return buffer[:, :channels]


@pytest.mark.parametrize("layout", ["ncdhw", "channels_last_slice"])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_bn_relu_conv3d_backward_op_passes_opcheck(layout, batch_stats):
    """The backward op itself (what a compiled graph's backward calls), whose fake kernel must give the
    real gradients' strides and offsets: Inductor assumes them."""
    g = torch.Generator().manual_seed(7)
    x = _input_in_layout(layout, 4, g)
    weight, bias = torch.randn((5, 4, 3, 3, 3), generator=g) / 10, torch.randn(5, generator=g)
    bn = (1 + torch.rand(4, generator=g), torch.randn(4, generator=g))
    running = (torch.randn(4, generator=g), 1 + torch.rand(4, generator=g))
    conv = ([1, 1, 1], [1, 1, 1], [1, 1, 1], torch.float32)
    _, stats = torch.ops.prostate_kernels.bn_relu_conv3d_forward(
        x, weight, bias, *bn, *running, batch_stats, 1e-5, *conv
    )
    gy = torch.randn((2, 5, 3, 4, 5), generator=g)
    needs = [True] * 5 + [not batch_stats] * 2  # the given statistics' gradients with running ones
    torch.library.opcheck(
        torch.ops.prostate_kernels.bn_relu_conv3d_backward.default,
        (gy, x, weight, stats, batch_stats, *conv, True, torch.float32, needs),
    )


@pytest.mark.parametrize("layout", ["ncdhw", "channels_last_slice"])
def test_depthwise_conv3d_backward_op_passes_opcheck(layout):
    g = torch.Generator().manual_seed(8)
    x = _input_in_layout(layout, 4, g)
    weight, bias = torch.randn((4, 1, 3, 3, 3), generator=g), torch.randn(4, generator=g)
    conv = ([1, 2, 1], [2, 1, 1], [2, 1, 1])
    y = torch.ops.prostate_kernels.depthwise_conv3d_forward(x, weight, bias, *conv)
    torch.library.opcheck(
        torch.ops.prostate_kernels.depthwise_conv3d_backward.default,
        (torch.randn(y.shape, generator=g), x, weight, *conv, True, [True, True, True]),
    )


def _dense_block_args(engine: str, bottleneck: int, g: torch.Generator) -> tuple:
    """The forward op's arguments for a 2-layer block (3 input channels, growth 2), every unit with batch
    statistics, no dropout, no process group."""
    units = []  # (C_in, C_out, kernel) per unit
    for layer in range(2):
        c_l = 3 + 2 * layer
        units += [(c_l, bottleneck, 1), (bottleneck, 2, 3)] if bottleneck else [(c_l, 2, 3)]
    params = []
    for c_in, c_out, k in units:
        params += [torch.randn((c_out, c_in, k, k, k), generator=g) / 5, 1 + torch.rand(c_in, generator=g),
                   torch.randn(c_in, generator=g), torch.zeros(c_in), torch.ones(c_in)]  # fmt: skip
    x = torch.randn((2, 3, 3, 4, 5), generator=g)
    return (x, params, 2, bottleneck, [True] * len(units), [1e-5] * len(units), 0.0, torch.tensor([1, 2]),
            engine, torch.float32, "")  # fmt: skip


@pytest.mark.parametrize("engine", ["torch", "triton"])
@pytest.mark.parametrize("bottleneck", [0, 4])
def test_dense_block_ops_pass_opcheck(engine, bottleneck):
    """Forward and backward op of the shared-buffer block. The backward's input gradient is a view of its
    gradient buffer, which the fake kernel once returned as a dense tensor: Inductor then failed in the
    first backward of any model with a DenseBlock3d (see test_inductor_compiles_a_training_step_...)."""
    g = torch.Generator().manual_seed(9)
    args = _dense_block_args(engine, bottleneck, g)
    x, params, *settings = args
    # each unit's weight, bn weight and bn bias train; its running statistics do not
    trained = [p.clone().requires_grad_(i % 5 < 3) for i, p in enumerate(params)]
    with_grad = (x.clone().requires_grad_(True), trained, *settings)
    torch.library.opcheck(torch.ops.prostate_kernels.dense_block_forward.default, with_grad)
    buffer, b_stats, t_stats, folds, count = torch.ops.prostate_kernels.dense_block_forward(*args)
    grad_output = torch.randn(buffer.shape, generator=g)
    *settings, group_name = settings
    torch.library.opcheck(
        torch.ops.prostate_kernels.dense_block_backward.default,
        (grad_output, buffer, [b_stats, t_stats, folds], params, *settings, count, group_name),
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
def test_inductor_compiles_a_training_step_through_the_ops(backend):
    """torch.compile's default backend (Inductor generates C++ for the code around the ops here) checks
    each custom op's real output strides against its fake kernel's: the dense block's input gradient is
    a view of its gradient buffer, which a fake kernel returning a dense tensor contradicted (an
    AssertionError in the first backward). A small Tiramisu 3D (every kind of block and layer), a
    DenseNet-BC block and a depthwise conv: one training step gives eager's results to float32's
    rounding (Inductor fuses the ops around ours differently)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = torch.nn.Sequential(
        Tiramisu3D((1, 1, 1), growth_rate=4, first_conv_filters=8, dropout=0.0),
        DenseBlock3d(1, growth_rate=2, num_layers=2, dropout=0.0, bn_size=2),
        DepthwiseConv3d(5, 3, padding=2, dilation=2),
    )
    compiled = copy.deepcopy(eager)
    x = torch.randn((2, 1, 4, 6, 8), generator=torch.Generator().manual_seed(6))
    x_eager, x_compiled = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    # no cached graph: a stale one keeps the strides of an older fake kernel
    with use_backend(backend), torch._inductor.config.patch(force_disable_caches=True):
        y_eager = eager(x_eager)
        y_eager.square().mean().backward()
        y_compiled = torch.compile(compiled, fullgraph=True)(x_compiled)
        y_compiled.square().mean().backward()
    torch.testing.assert_close(y_compiled, y_eager)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p_c.grad, p_e.grad, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(b_c, b_e, msg=name)


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
