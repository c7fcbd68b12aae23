"""`train --channels-last` and `predict --channels-last` (layout.py): the same math in another memory
layout. The runs here are on the CPU (PyTorch's kernels); the library's kernels are checked in both
layouts by their own tests."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import make_phantoms, run_cli, train_args
from prostate_kernels.models import build_model

from prostate_kernels import use_backend
from prostate_kernels.checkpoint import load_checkpoint
from prostate_kernels.layout import grad_like, in_layout, keep_grads_in_param_strides, model_in_layout
from prostate_kernels.nn import BNReLUConv3d, DenseBlock3d, DepthwiseConv3d
from prostate_kernels.predict import predict_probabilities
from prostate_kernels.train import TrainConfig, train
from prostate_kernels.trained_model import load_trained_model

CL = torch.channels_last_3d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("data"))


def _channels_last_only(t: torch.Tensor) -> bool:
    """Channels-last strides and not also NCDHW-contiguous (true of a volume with channels > 1)."""
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def _in_channels_last(tensors: list[torch.Tensor]) -> bool:
    """Every tensor channels-last, and some not NCDHW-contiguous (a weight of 1 input channel, or a 1x1x1
    one, has strides that are both)."""
    return all(t.is_contiguous(memory_format=CL) for t in tensors) and any(
        not t.is_contiguous() for t in tensors
    )


def test_in_layout_converts_volume_and_image_batches_and_leaves_other_ranks():
    x5, x4, x3 = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4)
    assert _channels_last_only(in_layout(x5, True))
    assert in_layout(x4, True).is_contiguous(memory_format=torch.channels_last)
    assert not in_layout(x4, True).is_contiguous()
    assert in_layout(x3, True) is x3 and in_layout(x5, False) is x5
    assert torch.equal(in_layout(x5, True), x5)  # the same values, other strides


def test_model_in_layout_converts_the_conv_weights_and_keeps_the_parameter_objects():
    model = build_model("tiramisu3d_tiny")
    before = list(model.parameters())
    values = [p.detach().clone() for p in before]
    assert model_in_layout(model, True) is model
    after = list(model.parameters())
    assert all(a is b for a, b in zip(after, before, strict=True))
    assert all(torch.equal(p, v) for p, v in zip(after, values, strict=True))
    weights = [p for p in after if p.dim() == 5]
    assert _in_channels_last(weights)
    untouched = build_model("tiramisu3d_tiny")
    assert model_in_layout(untouched, False) is untouched
    assert all(p.is_contiguous() for p in untouched.parameters())


def _config(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(model="tiramisu3d_tiny", patch=(8, 32, 32), batch=2, iters=3, val_every=3, val_cases=1,
                    checkpoint_every=3, progress=False, augment=False)  # fmt: skip
    return TrainConfig(data=data, out=out, **{**settings, **overrides})


def _losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _without_module_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """nn.Dropout draws its mask in memory order, so the two layouts drop other voxels from one seed; the
    dense blocks' seeded masks are drawn in logical order and stay on."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return model


# PyTorch's CPU BatchNorm is less exact channels-last: on this DeepLabv3+ its weight gradients differ from
# float64's by ~3e-3 (norm) against ~5e-5 in NCDHW, and by ~4e-5 with the BatchNorms run NCDHW (docs/
# memory-layout.md); U-Net's by up to 1.2e-3 from NCDHW's. A layout bug differs by O(1): the nn.Dropout
# masks, drawn in memory order, made the gradients differ by 0.5-3.6 (max-relative).
# fmt: off
@pytest.mark.parametrize("name, kwargs, shape, grad_tol", [
    ("tiramisu3d_tiny", {}, (2, 1, 8, 32, 32), 1e-4),
    ("unet3d", {}, (2, 1, 16, 32, 32), 5e-3),
    ("deeplabv3plus_3d", {"middle_blocks": 1, "width": 0.125}, (2, 1, 16, 64, 64), 2e-2),
])
# fmt: on
def test_a_channels_last_network_computes_what_the_ncdhw_one_does(name, kwargs, shape, grad_tol):
    """Training mode, float32: the output agrees with the NCDHW network's up to float32 rounding and is
    channels-last, and every gradient agrees to grad_tol in norm (gradients that are zero but for rounding,
    such as a bias that a BatchNorm follows, are skipped)."""
    torch.manual_seed(0)
    model = _without_module_dropout(build_model(name, **kwargs))
    x = torch.randn(shape)
    results = []
    for channels_last in (False, True):
        net = model_in_layout(copy.deepcopy(model), channels_last)
        torch.manual_seed(1)  # the dense blocks' dropout seeds
        y = net(in_layout(x, channels_last))
        y.square().mean().backward()
        results.append((y, [p.grad for p in net.parameters()]))
    (y, grads), (y_cl, grads_cl) = results
    # one output channel: both layouts' strides are contiguous; channels-last's has the channel stride 1
    assert y_cl.is_contiguous(memory_format=CL) and y_cl.stride(1) == 1 < y.stride(1)
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-4 * y.abs().max().item())
    scale = max(g.norm().item() for g in grads)
    names = [n for n, _ in model.named_parameters()]
    compared = 0
    for parameter, g_cl, g in zip(names, grads_cl, grads, strict=True):
        if g.norm() > 1e-4 * scale:
            compared += 1
            error = ((g_cl - g).norm() / g.norm()).item()
            assert error <= grad_tol, (parameter, error)
    assert compared > len(names) // 2


def test_channels_last_training_trains_and_its_checkpoint_says_so(data, tmp_path):
    """Without nn.Dropout (drawn in memory order), 3 Adam steps of the two layouts see the same losses up
    to float32 rounding; the weights are saved channels-last, as they trained."""
    no_dropout = {"model_kwargs": {"dropout": 0.0}}
    train(_config(data, tmp_path / "ncdhw", **no_dropout))
    train(_config(data, tmp_path / "cl", channels_last=True, **no_dropout))
    plain, cl = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("ncdhw", "cl"))
    assert cl["config"]["channels_last"] is True and plain["config"]["channels_last"] is False
    np.testing.assert_allclose(_losses(tmp_path / "cl"), _losses(tmp_path / "ncdhw"), rtol=1e-4)
    weights = {k: v for k, v in cl["state_dict"].items() if v.dim() == 5}
    assert _in_channels_last(list(weights.values()))


def test_resuming_in_the_other_layout_is_named_and_trains_on(data, tmp_path, capsys):
    """The layout changes what a resumed run computes (nn.Dropout's masks are drawn in memory order), so a
    resume in the other layout says so; the NCDHW checkpoint's weights and Adam state go on channels-last."""
    run = tmp_path / "run"
    train(_config(data, run, iters=2, val_every=2, checkpoint_every=2))
    capsys.readouterr()
    train(_config(data, run, iters=3, val_every=3, checkpoint_every=3, resume=True, channels_last=True))
    assert "--channels-last True (was False)" in capsys.readouterr().out
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["iteration"] == 3 and state["config"]["channels_last"] is True
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_a_channels_last_checkpoint_predicts_alike_in_either_layout(data, tmp_path):
    train(_config(data, tmp_path / "cl", channels_last=True, iters=2, val_every=2, checkpoint_every=2))
    checkpoint = tmp_path / "cl" / "checkpoint.pt"
    image = np.random.default_rng(0).standard_normal((9, 35, 33)).astype(np.float32)
    probabilities = {}
    for channels_last in (False, True):
        model, state = load_trained_model(checkpoint, torch.device("cpu"), channels_last)
        weights = [p for p in model.parameters() if p.dim() == 5]
        assert _in_channels_last(weights) if channels_last else all(w.is_contiguous() for w in weights)
        probabilities[channels_last] = predict_probabilities(model, image, tuple(state["patch"]), 0, "cpu")
    np.testing.assert_allclose(probabilities[True], probabilities[False], atol=1e-5)


def test_the_channels_last_flags_reach_the_run_and_the_prediction(data, tmp_path):
    run = tmp_path / "run"
    result = run_cli(*train_args(data, run, 1, "--channels-last"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_checkpoint(run / "checkpoint.pt")["config"]["channels_last"] is True
    out = tmp_path / "pred"
    result = run_cli("predict", "--checkpoint", run / "checkpoint.pt", "--input", data, "--output", out,
                     "--no-tta", "--channels-last", "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if "_segmentation" in p.name)


def test_the_demo_trains_and_predicts_channels_last_on_the_cpu(tmp_path):
    """`demo` defaults to channels-last where no GPU is seen (the layout measured faster for its network on
    the CPU); its checkpoint records it."""
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", out, "--iters", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tiramisu3d_tiny (channels-last)" in result.stdout
    assert load_checkpoint(out / "run" / "checkpoint.pt")["config"]["channels_last"] is True


# fmt: off
@pytest.mark.parametrize("make, shape", [
    (lambda: BNReLUConv3d(5, 6), (2, 5, 3, 4, 5)),
    (lambda: BNReLUConv3d(5, 6, kernel_size=1, padding=0), (2, 5, 3, 4, 5)),
    (lambda: DenseBlock3d(3, 4, 2, dropout=0.0), (2, 3, 3, 4, 5)),
    (lambda: DenseBlock3d(3, 4, 2, dropout=0.0, bn_size=2), (2, 3, 3, 4, 5)),
    (lambda: DepthwiseConv3d(6, 3, padding=1), (2, 6, 3, 4, 5)),
], ids=["fused-3x3x3", "fused-1x1x1", "dense-block", "dense-block-bc", "depthwise"])
# fmt: on
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_the_library_s_layers_give_each_weight_its_gradient_in_its_own_strides(make, shape, backend):
    """Channels-last weights (1x1x1 ones included) get gradients with their exact strides, so autograd
    keeps them without another copy and DDP's buckets match them; the values are the NCDHW model's."""
    torch.manual_seed(0)
    module = make()
    x = torch.randn(shape)
    grads = []
    for channels_last in (False, True):
        net = model_in_layout(copy.deepcopy(module), channels_last)
        with use_backend(backend):
            net(in_layout(x, channels_last)).square().sum().backward()
        weights = [p for p in net.parameters() if p.dim() == 5]
        assert weights and all(p.grad.stride() == p.stride() for p in weights), [
            (p.grad.stride(), p.stride()) for p in weights
        ]
        grads.append([p.grad for p in weights])
    for g, g_cl in zip(*grads, strict=True):
        torch.testing.assert_close(g_cl, g, rtol=1e-4, atol=1e-5)


def test_grad_like_restrides_size_one_differences_as_a_view_and_copies_the_rest():
    """A 1x1x1 weight's NCDHW and channels-last strides address the same bytes: grad_like returns a view
    with the weight's strides (no copy); other layouts and dtypes are copied into the weight's layout."""
    weight = torch.randn(8, 16, 1, 1, 1).to(memory_format=torch.channels_last_3d)
    assert weight.stride() == (16, 1, 16, 16, 16)
    grad = torch.randn(8, 16, 1, 1, 1)  # NCDHW strides (16, 1, 1, 1, 1)
    view = grad_like(grad, weight)
    assert view.stride() == weight.stride() and view.data_ptr() == grad.data_ptr()
    assert torch.equal(view, grad)
    weight3 = torch.randn(4, 5, 3, 3, 3).to(memory_format=torch.channels_last_3d)
    grad3 = torch.randn(4, 5, 3, 3, 3)
    copied = grad_like(grad3, weight3)
    assert copied.stride() == weight3.stride() and copied.data_ptr() != grad3.data_ptr()
    assert torch.equal(copied, grad3)
    half = grad_like(grad.half(), weight)
    assert half.dtype == weight.dtype and half.stride() == weight.stride()
    assert grad_like(grad, grad) is grad


class _NCDHWWeightGrad(torch.autograd.Function):
    """y = x * w.sum(); hands w its gradient contiguous (NCDHW-strided), as PyTorch's one-thread CPU
    conv3d does for a channels-last 1x1x1 weight."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w.sum()

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        return gy * w.sum(), torch.full(w.shape, float((gy * x).sum()))


def test_keep_grads_in_param_strides_lays_the_kept_gradient_out_like_its_parameter():
    """AccumulateGrad keeps a gradient whose strides differ from its parameter's only in size-1
    dimensions; the hook restrides it (DDP's buckets compare exact strides), accumulation included."""
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(8, 16, 1, 1, 1).to(memory_format=torch.channels_last_3d))
    module.b = torch.nn.Parameter(torch.randn(8))  # no size-1 dimension: no hook
    x = torch.randn(3)
    _NCDHWWeightGrad.apply(x, module.w).sum().backward()
    assert module.w.grad.stride() == (16, 1, 1, 1, 1)  # what autograd keeps without the hook
    module.w.grad = None
    handles = keep_grads_in_param_strides(module)
    assert len(handles) == 1
    for _ in range(2):  # the second backward accumulates into the kept gradient
        (_NCDHWWeightGrad.apply(x, module.w) * module.b.sum()).sum().backward()
    assert module.w.grad.stride() == module.w.stride()
    expected = 2 * (x.sum() * module.b.sum()).item()
    torch.testing.assert_close(module.w.grad, torch.full(module.w.shape, expected))
    for handle in handles:
        handle.remove()
