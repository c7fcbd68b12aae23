"""Memory-efficient dense block: one shared buffer, per-channel statistics computed once, no recompute.

Buffer B (N, C0 + L*k, D, H, W), channels-last: the input is copied into channels [0, C0); layer l reads
channels [0, C_l) (C_l = C0 + l*k) through BN -> ReLU -> conv and writes its k new channels (after
dropout) into [C_l, C_l + k). The block's output *is* B (or its new channels, a view).

Batch statistics of a channel are computed once, when the channel is copied in or produced, and serve
every later layer (each layer keeps its own BN affine parameters and running statistics, updated once
per forward). Backward walks the layers in reverse and accumulates into one gradient buffer G shaped
like B. Saved for backward: B, per-channel mean and variance, the dropout seeds; nothing per layer.

Two engines run the same walk: Triton kernels (the fused layer of ops/bn_relu_conv3d_triton.py: the
normalised activation is recomputed inside the conv tiles, so backward needs no extra pass) and the
PyTorch twin (CPU and fallback: backward recomputes one layer's BN -> ReLU at a time and takes the conv's
gradients from aten's convolution_backward, so no convolution is recomputed and it too keeps nothing but
B).

Entry: dense_block() (input checks: check_input(), called by nn.DenseBlock3d before it touches any
running statistic); it picks the engine (backend.resolve) and the convolutions' dtype (autocast).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from prostate_kernels import backend
from prostate_kernels.ops.batch_norm import fold_batch_norm, update_running_stats_
from prostate_kernels.ops.conv_geometry import ConvGeometry, conv_geometry
from prostate_kernels.ops.seeded_dropout import dropout_scale

GEOMETRY = conv_geometry((3, 3, 3), 1, 1, 1)  # every dense layer: 3x3x3 conv, padding 1


class DenseLayerParams(NamedTuple):
    """One dense layer's tensors: its conv weight (k, C_l, 3, 3, 3), BatchNorm affine parameters and
    running statistics (C_l,) (None: not tracked, or no affine parameters)."""

    weight: torch.Tensor
    bn_weight: torch.Tensor | None
    bn_bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None


@dataclass(frozen=True)
class LayerSpec:
    """One dense layer's BatchNorm settings for this forward (see nn.BNReLUConv3d.batch_norm_step)."""

    batch_stats: bool
    momentum: float
    eps: float
    update_running: bool


@dataclass(frozen=True)
class BlockSpec:
    """What the block's forward and backward compute (the running-statistics updates are the entry's)."""

    in_channels: int
    growth: int
    batch_stats: tuple[bool, ...]  # per layer: normalise with the batch's statistics (else running ones)
    eps: tuple[float, ...]  # per layer
    dropout: float  # 0 in eval mode
    seeds: tuple[int, ...]  # one dropout seed per layer
    engine: str  # "triton" | "torch"
    compute_dtype: torch.dtype  # dtype of the convolutions' operands (the autocast dtype under autocast)

    @property
    def layers(self) -> int:
        return len(self.eps)

    @property
    def out_channels(self) -> int:
        return self.in_channels + self.layers * self.growth

    def width(self, layer: int) -> int:
        """C_l: channels layer `layer` reads."""
        return self.in_channels + layer * self.growth


def check_input(x: object, in_channels: int, weight: torch.Tensor, training: bool) -> None:
    """ValueError/TypeError naming the value: x must be (N, in_channels, D, H, W), floating point, in the
    dtype and on the device of the block's parameters (`weight`, any layer's conv weight); training
    needs more than one value per channel for the batch statistics."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != in_channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"DenseBlock3d expects (N, {in_channels}, D, H, W) input, got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"DenseBlock3d: x must be floating point, got {x.dtype}")
    if x.dtype != weight.dtype and backend.autocast_dtype(x.device) is None:
        raise TypeError(
            f"DenseBlock3d: x dtype {x.dtype} differs from the block's parameters ({weight.dtype}): "
            f"convert one of them (x.to({weight.dtype}) or block.to({x.dtype}))"
        )
    if x.device != weight.device:
        raise ValueError(f"DenseBlock3d: x is on {x.device} but the block's parameters on {weight.device}")
    if training and x.shape[0] > 0 and x[:, 0].numel() <= 1:
        raise ValueError(
            "DenseBlock3d: training needs more than 1 value per channel for the batch statistics, "
            f"got input size {tuple(x.shape)}"
        )


def dense_block(
    x: torch.Tensor,
    growth: int,
    layers: Sequence[DenseLayerParams],
    specs: Sequence[LayerSpec],
    dropout: float,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """The whole memory-efficient block (N, C0 + L*k, D, H, W) on the backend's engine, the convolutions
    in the autocast dtype when autocast is on; each layer's running statistics updated once (specs).
    x: checked by check_input; dropout: 0 in eval mode; seeds: (L,) int64, one dropout seed per layer."""
    engine = "triton" if backend.resolve(x.device) == "triton" else "torch"
    compute_dtype = backend.autocast_dtype(x.device) or x.dtype
    params = [tensor for layer in layers for tensor in layer]
    with backend.autocast_off(x.device):  # compute_dtype already says what autocast wants
        buffer, mean, var = dense_block_forward(
            x, params, growth, [s.batch_stats for s in specs], [float(s.eps) for s in specs], float(dropout),
            seeds, engine, compute_dtype,
        )  # fmt: skip
    count = x.numel() // x.shape[1]
    for layer, (params_l, spec) in enumerate(zip(layers, specs, strict=True)):
        if spec.batch_stats and spec.update_running:
            c_l = x.shape[1] + layer * growth
            update_running_stats_(
                params_l.running_mean, params_l.running_var, mean[:c_l], var[:c_l], count, spec.momentum
            )
    return buffer


_WIDTH = len(DenseLayerParams._fields)  # tensors per layer in the custom ops' flat parameter list


def _layer(params: Sequence[torch.Tensor | None], layer: int) -> DenseLayerParams:
    """Layer `layer`'s tensors out of the flat parameter list of the custom ops."""
    return DenseLayerParams(*params[_WIDTH * layer : _WIDTH * (layer + 1)])


def _spec(in_channels, growth, batch_stats, eps, dropout, seeds, engine, compute_dtype) -> BlockSpec:
    seeds = tuple(seeds.tolist())  # inside the custom ops: torch.compile never traces this
    return BlockSpec(
        in_channels, growth, tuple(batch_stats), tuple(eps), dropout, seeds, engine, compute_dtype
    )


# The block as torch.library custom ops (forward, backward, fake kernels, autograd), so that torch.compile
# traces through a Tiramisu: opaque nodes in its graph. Functional: the forward returns the per-channel
# batch statistics and the entry updates the running ones from them. Parameters travel as one flat list
# (DenseLayerParams per layer); gradients that do not exist come back as empty tensors.


@torch.library.custom_op("prostate_kernels::dense_block_forward", mutates_args=())
def dense_block_forward(
    x: torch.Tensor,
    params: list[torch.Tensor | None],
    growth: int,
    batch_stats: list[bool],
    eps: list[float],
    dropout: float,
    seeds: torch.Tensor,
    engine: str,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(buffer B, mean, var): B (N, C0 + L*k, D, H, W); mean and var the batch statistics of B's first
    C0 + (L-1)*k channels (empty when no layer uses batch statistics)."""
    spec = _spec(x.shape[1], growth, batch_stats, eps, dropout, seeds, engine, compute_dtype)
    buffer, mean, var = _forward(x, spec, params)
    empty = x.new_empty((0,), dtype=torch.float32)
    return buffer, mean if mean is not None else empty, var if var is not None else empty.clone()


@dense_block_forward.register_fake
def _(x, params, growth, batch_stats, eps, dropout, seeds, engine, compute_dtype):
    n, c0, *size = x.shape
    layers = len(eps)
    buffer = torch.empty((n, c0 + layers * growth, *size), dtype=x.dtype, device=x.device,
                         memory_format=_ENGINES[engine].buffer_format)  # fmt: skip
    stats = (c0 + (layers - 1) * growth,) if any(batch_stats) else (0,)
    dtype = torch.float64 if x.dtype == torch.float64 and any(batch_stats) else torch.float32
    return buffer, x.new_empty(stats, dtype=dtype), x.new_empty(stats, dtype=dtype)


@torch.library.custom_op("prostate_kernels::dense_block_backward", mutates_args=())
def dense_block_backward(
    grad_output: torch.Tensor,
    buffer: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    params: list[torch.Tensor | None],
    growth: int,
    batch_stats: list[bool],
    eps: list[float],
    dropout: float,
    seeds: torch.Tensor,
    engine: str,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(grad x, [grad weight, grad bn weight, grad bn bias] per layer), each missing one empty."""
    in_channels = buffer.shape[1] - len(eps) * growth
    spec = _spec(in_channels, growth, batch_stats, eps, dropout, seeds, engine, compute_dtype)
    grad_x, grads = _backward(grad_output, spec, buffer, mean if mean.numel() else None, var, params)
    empty = buffer.new_empty((0,))
    return grad_x, [g if g is not None else empty.clone() for g in grads]


@dense_block_backward.register_fake
def _(
    grad_output, buffer, mean, var, params, growth, batch_stats, eps, dropout, seeds, engine, compute_dtype
):
    n, c, *size = buffer.shape
    grad_x = torch.empty((n, c - len(eps) * growth, *size), dtype=buffer.dtype, device=buffer.device,
                         memory_format=_ENGINES[engine].buffer_format)  # fmt: skip
    grads = []
    for layer in range(len(eps)):
        weight, gamma, beta, _, _ = _layer(params, layer)
        grads += [weight.new_empty(weight.shape)]
        grads += [t.new_empty(t.shape) if t is not None else buffer.new_empty((0,)) for t in (gamma, beta)]
    return grad_x, grads


def _setup_context(ctx, inputs, output) -> None:
    x, params, growth, batch_stats, eps, dropout, seeds, engine, compute_dtype = inputs
    buffer, mean, var = output
    # a layer normalised by its batch statistics needs no running statistics in backward; they are not
    # saved (the entry updates them in place after this op)
    params = [None if i % _WIDTH >= 3 and batch_stats[i // _WIDTH] else p for i, p in enumerate(params)]
    ctx.save_for_backward(buffer, mean, var, seeds, *(p for p in params if p is not None))
    ctx.present = [p is not None for p in params]
    ctx.settings = (growth, batch_stats, eps, dropout)
    ctx.engine, ctx.compute_dtype = engine, compute_dtype


def _backward_autograd(ctx, grad_output, _grad_mean, _grad_var):
    buffer, mean, var, seeds, *saved = ctx.saved_tensors
    saved_iter = iter(saved)
    params = [next(saved_iter) if present else None for present in ctx.present]
    grad_x, grads = torch.ops.prostate_kernels.dense_block_backward(
        grad_output, buffer, mean, var, params, *ctx.settings, seeds, ctx.engine, ctx.compute_dtype
    )
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    for layer in range(len(ctx.settings[2])):
        for i in range(3):  # weight, bn_weight, bn_bias; no gradient for the running statistics
            if params[_WIDTH * layer + i] is not None:
                param_grads[_WIDTH * layer + i] = grads[3 * layer + i]
    return grad_x, param_grads, None, None, None, None, None, None, None


dense_block_forward.register_autograd(_backward_autograd, setup_context=_setup_context)


def _forward(x: torch.Tensor, spec: BlockSpec, params) -> tuple[torch.Tensor, torch.Tensor | None, ...]:
    engine = _ENGINES[spec.engine]
    n, c0, *size = x.shape
    buffer = torch.empty(
        (n, spec.out_channels, *size), dtype=x.dtype, device=x.device, memory_format=engine.buffer_format
    )
    buffer[:, :c0].copy_(x)
    any_batch_stats = any(spec.batch_stats)
    mean, var = engine.stats(x) if any_batch_stats else (None, None)
    for layer in range(spec.layers):
        weight, gamma, beta, running_mean, running_var = _layer(params, layer)
        c_l = spec.width(layer)
        if spec.batch_stats[layer]:
            mu, sigma2 = mean[:c_l], var[:c_l]
        else:
            mu, sigma2 = _stat_dtype(running_mean), _stat_dtype(running_var)
        new = buffer[:, c_l : c_l + spec.growth]
        engine.layer_forward(buffer[:, :c_l], weight, gamma, beta, mu, sigma2, spec.eps[layer],
                             spec.compute_dtype, out=new)  # fmt: skip
        if spec.dropout > 0:
            new.mul_(dropout_scale(spec.seeds[layer], tuple(new.shape), spec.dropout, x.device))
        if any_batch_stats and layer + 1 < spec.layers:
            new_mean, new_var = engine.stats(new)
            mean, var = torch.cat([mean, new_mean]), torch.cat([var, new_var])
    return buffer, mean, var


def _backward(grad_output, spec: BlockSpec, buffer, mean, var, params):
    """(grad of x, per layer [grad weight, grad bn weight, grad bn bias] flattened, None where absent)."""
    engine = _ENGINES[spec.engine]
    grad = grad_output.to(buffer.dtype).clone(memory_format=engine.buffer_format)  # G, accumulated into
    grads: list[torch.Tensor | None] = [None] * (3 * spec.layers)
    for layer in reversed(range(spec.layers)):
        weight, gamma, beta, running_mean, running_var = _layer(params, layer)
        c_l = spec.width(layer)
        grad_new = grad[:, c_l : c_l + spec.growth]
        if spec.dropout > 0:
            scale = dropout_scale(spec.seeds[layer], tuple(grad_new.shape), spec.dropout, grad.device)
            grad_new = (grad_new * scale).to(grad.dtype)
        if spec.batch_stats[layer]:
            mu, sigma2 = mean[:c_l], var[:c_l]
        else:
            mu, sigma2 = _stat_dtype(running_mean), _stat_dtype(running_var)
        grads[3 * layer : 3 * layer + 3] = engine.layer_backward(
            buffer[:, :c_l], grad_new, weight, gamma, beta, mu, sigma2, spec.batch_stats[layer],
            spec.eps[layer], spec.compute_dtype, grad_input=grad[:, :c_l],
        )  # fmt: skip
    return grad[:, : spec.in_channels], grads


# --------------------------------------------------------------------------------------- engines


class _TritonEngine:
    """Layers on the fused Triton kernels: the normalised activation is never written."""

    buffer_format = torch.channels_last_3d  # channel slices are K-contiguous for the implicit GEMM

    @staticmethod
    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from prostate_kernels.ops.channel_stats import channel_stats

        return channel_stats(x)

    @staticmethod
    def layer_forward(x, weight, gamma, beta, mean, var, eps, compute_dtype, out) -> None:
        from prostate_kernels.ops.bn_relu_conv3d_triton import conv_forward

        scale, shift, _ = fold_batch_norm(mean, var, gamma, beta, eps)
        conv_forward(x, weight, None, scale, shift, GEOMETRY, compute_dtype, out=out)

    @staticmethod
    def layer_backward(
        x, grad_new, weight, gamma, beta, mean, var, batch_stats, eps, compute_dtype, grad_input
    ):
        from prostate_kernels.ops.bn_relu_conv3d_triton import conv_input_grad, conv_weight_grad

        scale, shift, rstd = fold_batch_norm(mean, var, gamma, beta, eps)
        g_w, _ = conv_weight_grad(x, grad_new, scale, shift, GEOMETRY, compute_dtype, with_bias=False)
        _, d_gamma, d_beta = conv_input_grad(
            x, grad_new, weight, scale, shift, mean, rstd, GEOMETRY, compute_dtype, batch_stats,
            grad_input=grad_input, accumulate=True,
        )  # fmt: skip
        return (
            g_w.to(weight.dtype),
            d_gamma.to(gamma.dtype) if gamma is not None else None,
            d_beta.to(beta.dtype) if beta is not None else None,
        )


class _TorchEngine:
    """The PyTorch twin: plain ops. Backward recomputes one layer's BN -> ReLU (cheap, elementwise) and
    takes the conv's gradients from aten's convolution_backward, so no convolution is recomputed."""

    # CPU convolutions prefer NCDHW, and there a channel slice of one image is contiguous
    buffer_format = torch.contiguous_format

    @staticmethod
    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        var, mean = torch.var_mean(_stat_dtype(x), dim=(0, 2, 3, 4), unbiased=False)
        return mean, var

    @staticmethod
    def layer_forward(x, weight, gamma, beta, mean, var, eps, compute_dtype, out) -> None:
        # normalise with the shared statistics (given as running ones: nothing is updated here)
        a = F.batch_norm(
            _stat_dtype(x), mean, var, _as(gamma, mean), _as(beta, mean), False, 0.0, eps
        ).relu_()
        g = GEOMETRY
        out.copy_(
            F.conv3d(a.to(compute_dtype), weight.to(compute_dtype), None, g.stride, g.padding, g.dilation)
        )

    @staticmethod
    def layer_backward(
        x, grad_new, weight, gamma, beta, mean, var, batch_stats, eps, compute_dtype, grad_input
    ):
        # The BatchNorm -> ReLU backward written out (this runs inside a custom op, where autograd does not
        # record): z = BN(x) as in forward, grad_z = grad_a where z > 0, then BatchNorm's own backward,
        # through the batch statistics when they normalised x (the formula of the Triton finalize kernel).
        xs = _stat_dtype(x)
        z = F.batch_norm(xs, mean, var, _as(gamma, mean), _as(beta, mean), False, 0.0, eps)
        g = GEOMETRY
        grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_new.to(compute_dtype), z.relu().to(compute_dtype), weight.to(compute_dtype), None,
            list(g.stride), list(g.padding), list(g.dilation), False, [0, 0, 0], 1, [True, True, False],
        )  # fmt: skip
        grad_z = torch.where(z > 0, grad_a.to(z.dtype), 0.0)
        scale, _, rstd = fold_batch_norm(mean, var, gamma, beta, eps)
        per_channel = (1, -1, 1, 1, 1)
        xhat = (xs - mean.view(per_channel)) * rstd.view(per_channel)
        d_beta = grad_z.sum(dim=(0, 2, 3, 4))
        d_gamma = (grad_z * xhat).sum(dim=(0, 2, 3, 4))
        if batch_stats:
            count = x.numel() // x.shape[1]
            grad_z = grad_z - (d_beta / count).view(per_channel) - xhat * (d_gamma / count).view(per_channel)
        grad_input.add_(grad_z * scale.view(per_channel))
        return (
            grad_w.to(weight.dtype),
            d_gamma.to(gamma.dtype) if gamma is not None else None,
            d_beta.to(beta.dtype) if beta is not None else None,
        )


def _stat_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the precision of BatchNorm's arithmetic: float64 stays, everything else float32."""
    return x if x.dtype == torch.float64 else x.float()


_ENGINES = {"triton": _TritonEngine, "torch": _TorchEngine}


__all__ = [
    "GEOMETRY",
    "BlockSpec",
    "ConvGeometry",
    "DenseLayerParams",
    "LayerSpec",
    "check_input",
    "dense_block",
]


def _as(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return t.to(like.dtype) if t is not None else None
