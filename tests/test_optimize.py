"""prostate_kernels.optimize: the library's layers swapped into models built from plain modules.

The model as built is the reference (float64, CPU): after optimize, the same outputs, parameter
gradients and running statistics in training and eval mode, the same state_dict keys and the same
Parameter objects; what is not the same computation is left alone, with a reason in the report.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121
from prostate_kernels.models import MODEL_NAMES, build_model
from torch import nn

import prostate_kernels
from prostate_kernels.nn import DenseBlock3d, DepthwiseConv3d
from prostate_kernels.swap import AdoptedDenseBlock3d, FusedSequential, runs


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def _assert_same_training(
    original: nn.Module, optimized: nn.Module, x: torch.Tensor, steps: int = 2, rtol: float = 1e-10
):
    """Both models take `steps` training steps and an eval forward on x: the same outputs, gradients and
    buffers (running statistics, num_batches_tracked), to float64 precision: rtol relative to each
    tensor's largest value; gradients to 1e-8, since a BatchNorm's gradient upstream of another
    batch-statistics BatchNorm is a near-cancelling sum (DenseNet121's stem norm0: 2.2e-9 relative at
    64^3, every other gradient within 3.1e-13)."""
    for step in range(steps):
        outputs = []
        for model in (original, optimized):
            model.train()
            model.zero_grad(set_to_none=True)
            y = model(x * (1 + step))
            weights = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(step))
            (y * weights).sum().backward()  # random weights: no gradient vanishes by symmetry
            outputs.append(y.detach())
        assert _rel(outputs[1], outputs[0]) < rtol, f"step {step}: output"
        grads = dict(original.named_parameters())
        for name, p in optimized.named_parameters():
            assert _rel(p.grad, grads[name].grad) < 1e-8, f"step {step}: grad of {name}"
    buffers = dict(original.named_buffers())
    for name, b in optimized.named_buffers():
        if b.is_floating_point():
            assert _rel(b, buffers[name]) < rtol, f"buffer {name}"
        else:
            assert torch.equal(b, buffers[name]), f"buffer {name}"
    original.eval(), optimized.eval()
    with torch.no_grad():
        assert _rel(optimized(x), original(x)) < rtol, "eval output"


def test_monai_densenet121_3d_is_optimized_and_computes_the_same():
    torch.manual_seed(0)
    original = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).double()
    model = copy.deepcopy(original)
    params_before = [id(p) for p in model.parameters()]
    optimized, report = prostate_kernels.optimize(model)
    assert optimized is model
    assert [r.path for r in report.replaced] == [
        "features.denseblock1", "features.transition1", "features.denseblock2", "features.transition2",
        "features.denseblock3", "features.transition3", "features.denseblock4",
    ]  # fmt: skip
    assert report.left == []
    assert isinstance(model.features.denseblock3, AdoptedDenseBlock3d)
    assert model.features.denseblock3.bottleneck_channels == 128
    assert isinstance(model.features.transition1, FusedSequential)
    assert [id(p) for p in model.parameters()] == params_before  # an optimizer built before still works
    assert list(model.state_dict()) == list(original.state_dict())
    # 1e-8: DenseNet121's last block at 32^3 normalises 2 values per channel, which amplifies rounding
    # (measured: outputs 1.2e-10 relative)
    # 64^3, not 32^3: DenseNet121 divides by 32, and at 32^3 its last block's BatchNorms see 2 values per
    # channel, which amplified float64 rounding differences to 6.5e-8 in conv0's gradient and 2.3e-7 in
    # norm0's (over 1e-7 on one CPU, under it on another); at 64^3 (16 values) they are 1e-13 and 2.2e-9
    _assert_same_training(original, model, torch.randn((2, 1, 64, 64, 64), dtype=torch.float64), rtol=1e-8)
    # the state_dict loads both ways
    fresh = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).double()
    fresh.load_state_dict(model.state_dict())
    model.load_state_dict(original.state_dict())
    again, second = prostate_kernels.optimize(model)  # idempotent
    assert again is model and second.replaced == [] and second.left == []


@pytest.mark.parametrize("norm", [("batch", {"track_running_stats": False}), ("batch", {"momentum": None})])
def test_monai_densenet_with_other_batch_norm_settings(norm):
    torch.manual_seed(6)
    original = DenseNet121(
        spatial_dims=3, in_channels=1, out_channels=2, block_config=(2, 2), init_features=8, growth_rate=4,
        norm=norm,
    ).double()  # fmt: skip
    model = copy.deepcopy(original)
    _, report = prostate_kernels.optimize(model)
    assert len(report.replaced) == 3 and report.left == []
    _assert_same_training(original, model, torch.randn((2, 1, 16, 16, 16), dtype=torch.float64))


# A 3D DenseNet-BC in torchvision's layout (torchvision.models.densenet, Conv2d -> Conv3d): layers
# with norm1 .. conv2 children and a drop_rate, a ModuleDict block that concatenates every feature.
class _TorchvisionDenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm3d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv3d(in_channels, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm3d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(bn_size * growth, growth, 3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, features: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        x = torch.cat(features, 1) if isinstance(features, list) else features
        y = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return F.dropout(y, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else y


class _TorchvisionDenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, in_channels: int, growth: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", _TorchvisionDenseLayer(in_channels + i * growth, growth,
                                                                          bn_size, drop_rate))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def _torchvision_style_densenet(drop_rate: float = 0.0) -> nn.Module:
    return nn.Sequential(OrderedDict(
        conv0=nn.Conv3d(1, 8, 3, padding=1, bias=False),
        block1=_TorchvisionDenseBlock(3, 8, growth=4, bn_size=2, drop_rate=drop_rate),
        transition1=nn.Sequential(OrderedDict(norm=nn.BatchNorm3d(20), relu=nn.ReLU(inplace=True),
                                              conv=nn.Conv3d(20, 10, 1, bias=False), pool=nn.AvgPool3d(2))),
        block2=_TorchvisionDenseBlock(2, 10, growth=4, bn_size=2, drop_rate=drop_rate),
        norm5=nn.BatchNorm3d(18),
    ))  # fmt: skip


def test_torchvision_style_3d_densenet_is_optimized_and_computes_the_same():
    torch.manual_seed(1)
    original = _torchvision_style_densenet().double()
    model = copy.deepcopy(original)
    _, report = prostate_kernels.optimize(model)
    assert [(r.path, r.now) for r in report.replaced] == [
        ("block1", "AdoptedDenseBlock3d"),
        ("transition1", "FusedSequential"),
        ("block2", "AdoptedDenseBlock3d"),
    ]
    _assert_same_training(original, model, torch.randn((2, 1, 6, 8, 10), dtype=torch.float64), steps=3)


def test_a_submodule_replaced_after_optimize_is_the_one_used():
    """The adopted block looks its layers' modules up at every forward (nothing stale is cached)."""
    torch.manual_seed(5)
    original = _torchvision_style_densenet().double().eval()
    model = copy.deepcopy(original)
    prostate_kernels.optimize(model)
    for m in (original, model):
        norm = nn.BatchNorm3d(8).double().eval()
        nn.init.constant_(norm.weight, 2.0)
        m.block1.denselayer1.norm1 = norm
    x = torch.randn((2, 1, 4, 6, 8), dtype=torch.float64)
    with torch.no_grad():
        assert _rel(model(x), original(x)) < 1e-10


def test_torchvision_style_dropout_rate_is_carried_over():
    model = _torchvision_style_densenet(drop_rate=0.25)
    prostate_kernels.optimize(model)
    assert model.block1.dropout == 0.25
    model.train()
    y = model.block1(torch.randn((2, 8, 4, 4, 4)))
    new = y[:, 8:]
    assert 0.1 < (new == 0).float().mean().item() < 0.4  # elementwise dropout at 0.25 on the new features


def test_dry_run_changes_nothing_and_reports_the_same():
    model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, block_config=(2, 2))
    modules_before = list(model.named_modules())
    state = copy.deepcopy(model.state_dict())
    same, dry = prostate_kernels.optimize(model, dry_run=True)
    assert same is model and list(model.named_modules()) == modules_before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    _, real = prostate_kernels.optimize(copy.deepcopy(model))
    assert dry.dry_run and not real.dry_run
    assert dry.replaced == real.replaced and len(real.replaced) == 3
    assert "would replace 3 module(s)" in str(dry)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_optimize_leaves_the_librarys_own_models_as_they_are(name):
    model = build_model(name)
    modules_before = list(model.named_modules())
    same, report = prostate_kernels.optimize(model)
    assert same is model and report.replaced == [] and report.left == []
    assert list(model.named_modules()) == modules_before


def test_a_lookalike_block_that_computes_otherwise_is_left_alone():
    """Dense-layer children, but the features come out in another order: the probe catches it."""

    class Reversed(_TorchvisionDenseBlock):
        def forward(self, x):
            features = [x]
            for layer in self.values():
                features.append(layer(features))
            return torch.cat(features[::-1], 1)  # the shape of a dense block's output, not its content

    model = nn.Sequential(Reversed(2, 8, growth=8, bn_size=2, drop_rate=0.0))
    block = model[0]
    _, report = prostate_kernels.optimize(model)
    assert model[0] is block
    assert report.replaced == []
    assert report.left[0].path == "0" and report.left[0].what == "Reversed (dense block)"
    assert "differs from a dense block's on the probe" in report.left[0].reason
    # its layers' BatchNorm -> ReLU -> Conv runs are attributes of a custom module: reported, not touched
    assert [s.path for s in report.left[1:]] == [f"0.denselayer{i}.norm{j}" for i in (1, 2) for j in (1, 2)]


def test_monai_channel_dropout_is_left_but_its_layers_are_fused():
    """MONAI's 3D DenseNet drops whole channels (nn.Dropout3d); DenseBlock3d's dropout is elementwise,
    so the blocks stay, and their BatchNorm -> ReLU -> Conv runs are fused one by one instead."""
    torch.manual_seed(2)
    original = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, block_config=(2, 2),
                           dropout_prob=0.2).double()  # fmt: skip
    model = copy.deepcopy(original)
    _, report = prostate_kernels.optimize(model)
    left = {s.path: s.reason for s in report.left}
    assert set(left) == {"features.denseblock1", "features.denseblock2"}
    assert "Dropout3d" in left["features.denseblock1"]
    assert isinstance(model.features.denseblock1.denselayer2.layers, FusedSequential)
    original.eval(), model.eval()
    x = torch.randn((2, 1, 16, 16, 16), dtype=torch.float64)
    with torch.no_grad():
        assert _rel(model(x), original(x)) < 1e-10


def test_hooks_stop_a_replacement():
    model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, block_config=(2, 2))
    model.features.denseblock1.denselayer1.register_forward_hook(lambda *args: None)
    block = model.features.denseblock1
    _, report = prostate_kernels.optimize(model)
    assert model.features.denseblock1 is block
    assert (
        "hooks are registered on ['denselayer1']"
        in {s.path: s.reason for s in report.left}["features.denseblock1"]
    )


def test_sequentials_and_depthwise_convs():
    torch.manual_seed(3)
    original = nn.Sequential(OrderedDict(
        depthwise=nn.Conv3d(6, 6, 3, padding=2, dilation=2, groups=6),
        norm=nn.BatchNorm3d(6), relu=nn.ReLU(), conv=nn.Conv3d(6, 4, 3, padding=1),
        norm_g=nn.BatchNorm3d(4), relu_g=nn.ReLU(), grouped=nn.Conv3d(4, 4, 1, groups=2),
        reflect=nn.Conv3d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),
    )).double()  # fmt: skip
    model = copy.deepcopy(original)
    optimized, report = prostate_kernels.optimize(model)
    assert optimized is not model and isinstance(optimized, FusedSequential)  # the model itself replaced
    assert [(r.path, r.now) for r in report.replaced] == [
        ("", "FusedSequential"),
        ("depthwise", "DepthwiseConv3d"),
    ]
    assert {s.path: s.reason for s in report.left} == {
        "norm_g": "grouped Conv3d (groups=2) is not supported",
        "reflect": "padding_mode 'reflect' is not supported (only 'zeros')",
    }
    assert (
        type(optimized.depthwise) is DepthwiseConv3d and optimized.depthwise.weight is model.depthwise.weight
    )
    _assert_same_training(original, optimized, torch.randn((2, 6, 5, 6, 7), dtype=torch.float64))


def test_sync_batchnorm_runs_are_fused():
    """convert_sync_batchnorm before optimize (MONAI's DDP recipe) left every run unfused, unreported; the
    fused layer takes a SyncBatchNorm's group statistics (tests/test_sync_batch_norm.py)."""
    torch.manual_seed(5)
    original = nn.Sequential(OrderedDict(
        norm=nn.BatchNorm3d(3), relu=nn.ReLU(), conv=nn.Conv3d(3, 4, 3, padding=1),
    )).double()  # fmt: skip
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original))
    optimized, report = prostate_kernels.optimize(synced)
    assert [(r.path, r.now) for r in report.replaced] == [("", "FusedSequential")]
    assert type(optimized.norm) is nn.SyncBatchNorm and not report.left
    # one process, no torch.distributed: SyncBatchNorm is BatchNorm, as torch's own is
    _assert_same_training(original, optimized, torch.randn((2, 3, 5, 6, 7), dtype=torch.float64))


def test_a_module_repeated_in_a_sequential_keeps_every_position():
    """nn.Sequential(bn, relu, conv, bn, ...) applies one BatchNorm twice. named_children() lists it once,
    and optimize built its FusedSequential from that: the second application was dropped (a different
    model, no error)."""
    torch.manual_seed(4)
    norm, relu = nn.BatchNorm3d(4), nn.ReLU()
    original = nn.Sequential(
        norm, relu, nn.Conv3d(4, 4, 3, padding=1), norm, relu, nn.Conv3d(4, 4, 3, padding=1)
    ).double()
    optimized, report = prostate_kernels.optimize(copy.deepcopy(original))
    assert isinstance(optimized, FusedSequential) and list(optimized._modules) == list(original._modules)
    assert report.replaced[0].detail == "(0, 1, 2) fused; (3, 4, 5) fused"
    _assert_same_training(original, optimized, torch.randn((2, 4, 5, 6, 7), dtype=torch.float64))
    depthwise = nn.Conv3d(4, 4, 3, padding=1, groups=4).double()
    model = nn.Sequential(depthwise, nn.ReLU(), depthwise)
    optimized, report = prostate_kernels.optimize(model)
    assert optimized[0] is optimized[2] and type(optimized[2]) is DepthwiseConv3d
    assert [r.path for r in report.replaced] == ["0"]  # replaced once, at both positions


def _sepconv(depth_activation: bool) -> nn.Sequential:
    """DeepLabv3+'s SepConv_BN written as a plain Sequential (SeparableConv3d's computation)."""
    dw = nn.Conv3d(6, 6, 3, padding=(1, 2, 2), dilation=(1, 2, 2), groups=6, bias=False)
    pw = nn.Conv3d(6, 5, 1, bias=False)
    if depth_activation:
        layers = [dw, nn.BatchNorm3d(6), nn.ReLU(), pw, nn.BatchNorm3d(5), nn.ReLU()]
    else:
        layers = [nn.ReLU(), dw, nn.BatchNorm3d(6), pw, nn.BatchNorm3d(5)]
    return nn.Sequential(nn.Conv3d(3, 6, 1), *layers)


@pytest.mark.parametrize("depth_activation", [True, False])
def test_separable_runs_take_one_kernel_in_inference_and_train_as_before(depth_activation):
    torch.manual_seed(4)
    original = _sepconv(depth_activation)
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
    model = copy.deepcopy(original)
    optimized, report = prostate_kernels.optimize(model)
    assert [r.now for r in report.replaced] == ["FusedSequential", "DepthwiseConv3d"]
    assert "separable: one kernel in CUDA inference" in report.replaced[0].detail
    # inference: the fused separable kernel (Triton, interpreted here), against the modules one by one
    original.eval(), optimized.eval()
    x = torch.randn((2, 3, 4, 6, 7))
    with torch.no_grad(), prostate_kernels.use_backend("triton"):
        with patch("prostate_kernels.swap.runs.separable_inference", wraps=runs.separable_inference) as spy:
            y = optimized(x)
        assert spy.call_count == 1
        torch.testing.assert_close(y, original(x), rtol=1e-4, atol=1e-5)
    # training: the modules one by one (the BatchNorm -> ReLU -> 1x1x1 conv of depth_activation fused)
    _assert_same_training(
        original.double(), optimized.double(), torch.randn((2, 3, 4, 6, 7), dtype=torch.float64)
    )


def test_runs_outside_a_sequential_are_reported_not_touched():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.relu, self.conv = nn.BatchNorm3d(3), nn.ReLU(), nn.Conv3d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.relu(self.norm(x))) + x

    model = Custom()
    _, report = prostate_kernels.optimize(model)
    assert report.replaced == [] and [s.path for s in report.left] == ["norm"]
    assert "forward is not known to apply them" in report.left[0].reason


def test_the_native_densenet_bc_block_is_not_touched():
    block = DenseBlock3d(4, growth_rate=4, num_layers=2, bn_size=4)
    _, report = prostate_kernels.optimize(nn.Sequential(block))
    assert report.replaced == [] and report.left == []


def test_an_optimized_monai_densenet_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, block_config=(2, 2), init_features=8,
                        growth_rate=4)  # fmt: skip
    prostate_kernels.optimize(model)
    explanation = torch._dynamo.explain(model)(torch.randn((2, 1, 16, 16, 16)))
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    ops = {str(n.target) for graph in explanation.graphs for n in graph.graph.nodes}
    assert "prostate_kernels.dense_block_forward.default" in ops  # (the CPU path's fused layer: aten ops)


def test_not_a_module_raises():
    with pytest.raises(TypeError, match="optimize expects an nn.Module, got dict"):
        prostate_kernels.optimize({})


def test_monai_highresnet_blocks_are_fused_across_its_adn_and_convolution_sequentials():
    """MONAI's HighResNet puts each BatchNorm3d -> ReLU in an ADN and the dilated Conv3d after it in a
    Convolution, both plain nn.Sequential subclasses inside its blocks' `layers` Sequential: the runs span
    them, 2 per block, 18 in all."""
    from monai.networks.nets import HighResNet

    torch.manual_seed(6)
    original = HighResNet(spatial_dims=3, in_channels=1, out_channels=2).double()
    model = copy.deepcopy(original)
    params_before = [id(p) for p in model.parameters()]
    optimized, report = prostate_kernels.optimize(model)
    assert optimized is model and report.left == []
    assert [(r.path, r.detail) for r in report.replaced] == [
        (f"blocks.{i}.layers", "(0.N, 0.A, 1.conv) fused; (2.N, 2.A, 3.conv) fused") for i in range(1, 10)
    ]
    assert isinstance(model.blocks[4].layers, FusedSequential)
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict()) == list(original.state_dict())
    fused_calls = []
    real = prostate_kernels.swap.fused_sequential.run_bn_relu_conv
    with patch("prostate_kernels.swap.fused_sequential.run_bn_relu_conv",
               lambda modules, x: fused_calls.append(modules[2].dilation) or real(modules, x)):  # fmt: skip
        _assert_same_training(original, model, torch.randn((2, 1, 10, 12, 9), dtype=torch.float64))
    # every block's two convs ran fused, at the dilations 1, 2, 4 of its three stages, in each forward
    assert fused_calls[:18] == [(d, d, d) for d in (1, 2, 4) for _ in range(6)]
    assert len(fused_calls) == 3 * 18  # two training steps and the eval forward


class _Residual(nn.Sequential):
    """A Sequential subclass with its own forward: its children are not applied as a chain."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def test_nested_plain_sequentials_are_opened_and_others_are_not():
    torch.manual_seed(7)

    def conv() -> nn.Conv3d:
        return nn.Conv3d(4, 4, 3, padding=1)

    norm_relu = nn.Sequential(nn.BatchNorm3d(4), nn.ReLU())
    original = nn.Sequential(OrderedDict(
        a=norm_relu, b=nn.Sequential(nn.Sequential(conv())),  # a run across two nested chains
        c=_Residual(nn.BatchNorm3d(4), nn.ReLU(), conv()),  # its own forward: fused inside, not opened
        d=nn.Sequential(nn.BatchNorm3d(4)), e=nn.ReLU(), f=conv(),
    )).double()  # fmt: skip
    model = copy.deepcopy(original)
    optimized, report = prostate_kernels.optimize(model)
    assert [(r.path, r.now, r.detail) for r in report.replaced] == [
        ("", "FusedSequential", "(a.0, a.1, b.0.0) fused; (d.0, e, f) fused"),
    ]
    assert [(s.path, s.reason) for s in report.left] == [
        ("c.0", "children of _Residual, whose forward is not known to apply them one after the other"),
    ]
    assert type(optimized.a) is nn.Sequential and type(optimized.b[0]) is nn.Sequential  # not replaced
    _assert_same_training(original, optimized, torch.randn((2, 4, 5, 6, 7), dtype=torch.float64))
    _, dry = prostate_kernels.optimize(copy.deepcopy(original), dry_run=True)
    assert [(r.path, r.detail) for r in dry.replaced] == [(r.path, r.detail) for r in report.replaced]


def test_a_nested_sequential_with_hooks_is_not_opened():
    torch.manual_seed(8)
    inner = nn.Sequential(nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1))
    calls = []
    inner.register_forward_hook(lambda *args: calls.append(1))
    original = nn.Sequential(nn.BatchNorm3d(4), inner).double()
    optimized, report = prostate_kernels.optimize(original)
    assert report.replaced == [] and optimized is original
    original(torch.randn((2, 4, 3, 4, 5), dtype=torch.float64))
    assert calls == [1]
