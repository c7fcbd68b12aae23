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
    in_channels: int
    growth: int
    layers: tuple[LayerSpec, ...]
    dropout: float  # 0 in eval mode
    seeds: tuple[int, ...]  # one dropout seed per layer
    engine: str  # "triton" | "torch"
    compute_dtype: torch.dtype  # dtype of the convolutions' operands (the autocast dtype under autocast)

    @property
    def out_channels(self) -> int:
        return self.in_channels + len(self.layers) * self.growth

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
    seeds: Sequence[int],
) -> torch.Tensor:
    """The whole memory-efficient block (N, C0 + L*k, D, H, W) on the backend's engine, the convolutions
    in the autocast dtype when autocast is on. x: checked by check_input; specs: each layer's BatchNorm
    step; dropout: 0 in eval mode; seeds: one dropout seed per layer."""
    spec = BlockSpec(
        in_channels=x.shape[1], growth=growth, layers=tuple(specs), dropout=dropout, seeds=tuple(seeds),
        engine="triton" if backend.resolve(x.device) == "triton" else "torch",
        compute_dtype=backend.autocast_dtype(x.device) or x.dtype,
    )  # fmt: skip
    params = [tensor for layer in layers for tensor in layer]
    with backend.autocast_off(x.device):  # spec.compute_dtype already says what autocast wants
        return _DenseBlockFunction.apply(x, spec, *params)


def _layer(params: Sequence[torch.Tensor | None], layer: int) -> DenseLayerParams:
    """Layer `layer`'s tensors out of the flat argument list of _DenseBlockFunction."""
    width = len(DenseLayerParams._fields)
    return DenseLayerParams(*params[width * layer : width * (layer + 1)])


class _DenseBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec: BlockSpec, *params):
        engine = _ENGINES[spec.engine]
        n, c0, *size = x.shape
        buffer = torch.empty(
            (n, spec.out_channels, *size),
            dtype=x.dtype,
            device=x.device,
            memory_format=engine.buffer_format,
        )
        buffer[:, :c0].copy_(x)
        mean, var = engine.stats(x) if _any_batch_stats(spec) else (None, None)
        for layer, layer_spec in enumerate(spec.layers):
            weight, gamma, beta, running_mean, running_var = _layer(params, layer)
            c_l = spec.width(layer)
            x_l = buffer[:, :c_l]
            if layer_spec.batch_stats:
                mu, sigma2 = mean[:c_l], var[:c_l]
                if layer_spec.update_running:
                    _update_running(running_mean, running_var, mu, sigma2, x_l, layer_spec.momentum)
            else:
                mu, sigma2 = _stat_dtype(running_mean), _stat_dtype(running_var)
            new = buffer[:, c_l : c_l + spec.growth]
            engine.layer_forward(
                x_l, weight, gamma, beta, mu, sigma2, layer_spec.eps, spec.compute_dtype, out=new
            )
            if spec.dropout > 0:
                new.mul_(dropout_scale(spec.seeds[layer], tuple(new.shape), spec.dropout, x.device))
            if _any_batch_stats(spec) and layer + 1 < len(spec.layers):
                new_mean, new_var = engine.stats(new)
                mean, var = torch.cat([mean, new_mean]), torch.cat([var, new_var])
        ctx.spec = spec
        ctx.save_for_backward(buffer, mean, var, *params)
        return buffer

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        spec: BlockSpec = ctx.spec
        engine = _ENGINES[spec.engine]
        buffer, mean, var, *params = ctx.saved_tensors
        grad = grad_output.to(buffer.dtype).clone(memory_format=engine.buffer_format)  # G, accumulated into
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        for layer in reversed(range(len(spec.layers))):
            layer_spec = spec.layers[layer]
            weight, gamma, beta, running_mean, running_var = _layer(params, layer)
            c_l = spec.width(layer)
            grad_new = grad[:, c_l : c_l + spec.growth]
            if spec.dropout > 0:
                scale = dropout_scale(spec.seeds[layer], tuple(grad_new.shape), spec.dropout, grad.device)
                grad_new = (grad_new * scale).to(grad.dtype)
            if layer_spec.batch_stats:
                mu, sigma2 = mean[:c_l], var[:c_l]
            else:
                mu, sigma2 = _stat_dtype(running_mean), _stat_dtype(running_var)
            g_w, g_gamma, g_beta = engine.layer_backward(
                buffer[:, :c_l], grad_new, weight, gamma, beta, mu, sigma2, layer_spec, spec.compute_dtype,
                grad_input=grad[:, :c_l],
            )  # fmt: skip
            width = len(DenseLayerParams._fields)
            param_grads[width * layer : width * layer + 3] = [
                g_w,
                g_gamma,
                g_beta,
            ]  # weight, bn_weight, bn_bias
        grad_x = grad[:, : spec.in_channels]
        return (grad_x, None, *param_grads)


def _any_batch_stats(spec: BlockSpec) -> bool:
    return any(layer.batch_stats for layer in spec.layers)


def _update_running(running_mean, running_var, mean, var, x, momentum) -> None:
    update_running_stats_(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)


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
        x, grad_new, weight, gamma, beta, mean, var, layer_spec: LayerSpec, compute_dtype, grad_input
    ):
        from prostate_kernels.ops.bn_relu_conv3d_triton import conv_input_grad, conv_weight_grad

        scale, shift, rstd = fold_batch_norm(mean, var, gamma, beta, layer_spec.eps)
        g_w, _ = conv_weight_grad(x, grad_new, scale, shift, GEOMETRY, compute_dtype, with_bias=False)
        _, d_gamma, d_beta = conv_input_grad(
            x, grad_new, weight, scale, shift, mean, rstd, GEOMETRY, compute_dtype, layer_spec.batch_stats,
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
    def layer_backward(x, grad_new, weight, gamma, beta, mean, var, layer_spec, compute_dtype, grad_input):
        x_, g_, b_ = (t.detach().requires_grad_(True) if t is not None else None for t in (x, gamma, beta))
        with torch.enable_grad():
            if layer_spec.batch_stats:  # the statistics of x, recomputed: autograd sees their dependence on x
                z = F.batch_norm(_stat_dtype(x_), None, None, g_, b_, True, 0.0, layer_spec.eps)
            else:
                z = F.batch_norm(_stat_dtype(x_), mean, var, g_, b_, False, 0.0, layer_spec.eps)
            a = torch.relu(z)
        g = GEOMETRY
        grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_new.to(compute_dtype), a.detach().to(compute_dtype), weight.detach().to(compute_dtype), None,
            list(g.stride), list(g.padding), list(g.dilation), False, [0, 0, 0], 1, [True, True, False],
        )  # fmt: skip
        wanted = [t for t in (x_, g_, b_) if t is not None]
        grads = iter(torch.autograd.grad(a, wanted, grad_a.to(a.dtype)))
        g_x, g_gamma, g_beta = (next(grads) if t is not None else None for t in (x_, g_, b_))
        grad_input.add_(g_x)
        return grad_w.to(weight.dtype), g_gamma, g_beta


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
