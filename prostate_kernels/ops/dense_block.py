"""Memory-efficient dense block: one shared buffer, per-channel statistics computed once, no recompute
of any 3x3x3 convolution.

Buffer B (N, C0 + L*k, D, H, W): the input is copied into channels [0, C0); layer l reads channels
[0, C_l) (C_l = C0 + l*k) and writes its k new channels (after dropout) into [C_l, C_l + k). The block's
output *is* B (or its new channels, a view).

A layer is one or two *units*, each BatchNorm -> ReLU -> conv (stride 1, "same" padding, no bias):
  plain (FC-DenseNet, Tiramisu):  B[:, :C_l] -> unit (3x3x3, k)                      -> new channels
  bottleneck (DenseNet-BC):       B[:, :C_l] -> unit (1x1x1, W) -> T (N, W, D, H, W) -> unit (3x3x3, k)
W = bn_size * k, the bottleneck width. T lives only while its layer runs: backward recomputes it (one
1x1x1 convolution per layer) instead of keeping L of them, so a BC block keeps no more than a plain one.

Batch statistics of a channel of B are computed once, when the channel is copied in or produced, and
serve every later layer; T's statistics are computed when T is and kept (W floats per layer). Each unit
keeps its own BN affine parameters and running statistics, updated once per forward. Backward walks the
layers in reverse and accumulates into one gradient buffer G shaped like B. Saved for backward: B, the
per-channel means and variances, each unit's BatchNorm folded (scale, shift, rstd: backward does not fold
again), the dropout seeds; nothing of size N*D*H*W per layer.

Two engines run the same walk: Triton kernels (the fused layer of ops/bn_relu_conv3d_triton.py: the
normalised activation is recomputed inside the conv tiles, so backward needs no extra pass) and the
PyTorch twin (CPU and fallback: backward recomputes one unit's BN -> ReLU at a time and takes the conv's
gradients from aten's convolution_backward).

With a process group (nn.SyncBatchNorm), every statistics of the walk is the group's (one all_gather
each, ops/sync_batch_norm.py), and backward adds each unit's gradient through them (one all_reduce per
unit) to G: GroupSync, _unit_backward.

Entry: dense_block() (input checks: nn/arguments.py's check_input, called by nn.DenseBlock3d before it
touches any running statistic); it picks the engine (backend.resolve) and the convolutions' dtype (autocast).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from prostate_kernels import backend
from prostate_kernels.layout import grad_like
from prostate_kernels.ops.batch_norm import fold_batch_norm, given_stats_grads, update_running_stats_
from prostate_kernels.ops.conv_geometry import ConvGeometry, conv_geometry
from prostate_kernels.ops.once_differentiable import once_differentiable
from prostate_kernels.ops.seeded_dropout import (
    apply_dropout_,
    check_seeds,
    dropout_uniform,
    scale_from_uniform_,
)
from prostate_kernels.ops.sync_batch_norm import (
    add_input_grad_through_stats_,
    combine_over_group,
    group_count,
    local_stats,
    reduce_stats_grads,
    resolve_group,
)
from prostate_kernels.ops.tensor_subclasses import takes_tensor_subclasses

GEOMETRY = conv_geometry((3, 3, 3), 1, 1, 1)  # every layer's (last) conv: 3x3x3, padding 1
BOTTLENECK_GEOMETRY = conv_geometry((1, 1, 1), 1, 0, 1)  # a DenseNet-BC layer's first conv


class UnitParams(NamedTuple):
    """One unit's tensors: its conv weight (C_out, C_in, kD, kH, kW), BatchNorm affine parameters and
    running statistics (C_in,) (None: not tracked, or no affine parameters)."""

    weight: torch.Tensor
    bn_weight: torch.Tensor | None
    bn_bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None


@dataclass(frozen=True)
class UnitSpec:
    """One unit's BatchNorm settings for this forward (see nn.dense.batch_norm_step)."""

    batch_stats: bool
    momentum: float
    eps: float
    update_running: bool


def units_per_layer(bottleneck: int) -> int:
    """Units per layer: 2 (bottleneck unit, then 3x3x3 unit) when bottleneck (W) > 0, else 1."""
    return 2 if bottleneck else 1


@dataclass(frozen=True)
class GroupSync:
    """Batch statistics over the processes of `group` (nn.SyncBatchNorm's): every unit with batch
    statistics normalises with those of the group's batches together, and its input gradient flows
    through them on every process. count: the values per channel behind them (every process's N * D * H
    * W summed). Every process of the group runs the block alike: the same collectives in the same order
    (forward: one all_reduce of the count, then one all_gather per statistics computed, with no read on
    the host; backward: one all_reduce per such unit)."""

    group: dist.ProcessGroup
    count: int


@dataclass(frozen=True)
class BlockSpec:
    """What the block's forward and backward compute (the running-statistics updates are the entry's).
    Units are listed layer by layer: (bottleneck unit, unit) per layer when bottleneck > 0, else (unit,)."""

    in_channels: int
    growth: int
    bottleneck: int  # W, the width of T; 0: plain layers
    batch_stats: tuple[bool, ...]  # per unit: normalise with the batch's statistics (else running ones)
    eps: tuple[float, ...]  # per unit
    dropout: float  # 0 in eval mode
    seeds: torch.Tensor  # (L,) int64 on the block's device: one dropout seed per layer (seeded_dropout)
    engine: str  # "triton" | "torch"
    compute_dtype: torch.dtype  # dtype of the convolutions' operands (the autocast dtype under autocast)
    sync: GroupSync | None = None  # batch statistics over a process group (nn.SyncBatchNorm), else local

    @property
    def units_per_layer(self) -> int:
        return units_per_layer(self.bottleneck)

    @property
    def layers(self) -> int:
        return len(self.eps) // self.units_per_layer

    @property
    def out_channels(self) -> int:
        return self.in_channels + self.layers * self.growth

    def width(self, layer: int) -> int:
        """C_l: channels layer `layer` reads."""
        return self.in_channels + layer * self.growth

    def unit(self, layer: int, step: int) -> int:
        """Index of the `step`-th unit (0: the one reading B) of layer `layer`."""
        return layer * self.units_per_layer + step

    def unit_width(self, unit: int) -> int:
        """Channels unit `unit` normalises: C_l for a unit reading B, W for one reading T."""
        layer, step = divmod(unit, self.units_per_layer)
        return self.width(layer) if step == 0 else self.bottleneck

    def fold_offsets(self) -> list[int]:
        """Where each unit's (scale, shift, rstd) start in the flat folds of the forward (3 * its width
        floats each, units in order), and their total size last."""
        offsets = [0]
        for unit in range(len(self.eps)):
            offsets.append(offsets[-1] + 3 * self.unit_width(unit))
        return offsets

    @property
    def b_stats(self) -> bool:
        """Some unit normalises channels of B with batch statistics."""
        return any(self.batch_stats[self.unit(layer, 0)] for layer in range(self.layers))

    @property
    def t_stats(self) -> bool:
        """Some bottleneck output T is normalised with its batch statistics."""
        return self.bottleneck > 0 and any(
            self.batch_stats[self.unit(layer, 1)] for layer in range(self.layers)
        )


@takes_tensor_subclasses
def dense_block(
    x: torch.Tensor,
    growth: int,
    units: Sequence[UnitParams],
    specs: Sequence[UnitSpec],
    dropout: float,
    seeds: torch.Tensor,
    bottleneck: int = 0,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The whole memory-efficient block (N, C0 + L*k, D, H, W) on the backend's engine, the convolutions
    in the autocast dtype when autocast is on; each unit's running statistics updated once (specs).
    x: checked by nn/arguments.py's check_input; units/specs: layer by layer, 2 per layer when
    bottleneck (W) > 0, else 1;
    dropout: 0 in eval mode; seeds: (L,) int64, one dropout seed per layer (seeded_dropout.draw_seeds on
    x's device keeps the step free of host copies, which a CUDA graph capture needs);
    process_group: units with batch statistics take them over the batches of every process of this
    torch.distributed group together, as nn.SyncBatchNorm does (GroupSync; every process of the group must
    call the block alike, an empty local batch included; under torch.compile the custom ops take the
    group by name and run its collectives, no graph break). None: this process's batch."""
    check_seeds("dense_block", seeds)
    per_layer = units_per_layer(bottleneck)
    if len(units) != len(specs) or len(units) != per_layer * seeds.numel():
        raise ValueError(
            f"dense_block: {len(units)} units and {len(specs)} specs for {seeds.numel()} layers "
            f"({per_layer} per layer with bottleneck={bottleneck})"
        )
    seeds = seeds.to(x.device)  # the masks are drawn where x is (no copy when the seeds are there already)
    # an empty batch (a synchronised block's process with no samples) takes the twin, as the fused layer does
    engine = "triton" if backend.resolve(x.device) == "triton" and x.shape[0] > 0 else "torch"
    compute_dtype = backend.autocast_dtype(x.device) or x.dtype
    # absent tensors (no affine parameters, untracked running statistics) travel as empty placeholders: a
    # None inside a list argument makes torch.library's autograd flatten the inputs and their gradients
    # differently (the backward then fails)
    params = [t if t is not None else x.new_empty((0,), dtype=torch.float32) for unit in units for t in unit]
    batch_stats, eps = [s.batch_stats for s in specs], [float(s.eps) for s in specs]
    synced_over = process_group if any(batch_stats) else None  # running statistics alone need no collective
    count: int | torch.Tensor = x.numel() // x.shape[1]  # values per channel behind the batch statistics
    with backend.autocast_off(x.device):  # compute_dtype already says what autocast wants
        if torch.compiler.is_compiling():  # the custom op, an opaque node torch.compile traces
            buffer, b_stats, t_stats, _, group_total = dense_block_forward(
                x, params, growth, bottleneck, batch_stats, eps, float(dropout), seeds, engine, compute_dtype,
                synced_over.group_name if synced_over is not None else "",
            )  # fmt: skip
            count = group_total if synced_over is not None else count
        else:  # eager: the same functions with less dispatch on the host, the group itself in GroupSync
            sync = _group_sync(synced_over, x) if synced_over is not None else None
            settings = (growth, bottleneck, batch_stats, eps, float(dropout), engine, compute_dtype, sync)
            buffer, b_stats, t_stats, _ = DenseBlockFunction.apply(x, seeds, settings, *params)
            count = sync.count if sync is not None else count
    updates: dict[float, list] = {}  # momentum -> the units' (running mean, running var, batch mean, var)
    for index, (unit, spec) in enumerate(zip(units, specs, strict=True)):
        if not (spec.batch_stats and spec.update_running):
            continue
        layer, step = divmod(index, per_layer)
        if step == 0:  # reads B[:, :C_l]
            batch_mean, batch_var = b_stats[:, : x.shape[1] + layer * growth].unbind(0)
        else:  # reads the layer's T
            batch_mean, batch_var = t_stats[:, layer * bottleneck : (layer + 1) * bottleneck].unbind(0)
        updates.setdefault(spec.momentum, []).append(
            (unit.running_mean, unit.running_var, batch_mean, batch_var)
        )
    for momentum, group in updates.items():
        update_running_stats_(group, count, momentum)
    return buffer


def _group_sync(group: dist.ProcessGroup, x: torch.Tensor) -> GroupSync:
    """GroupSync over `group` for a block whose input (or buffer) is x: the group's count, one
    all_reduce (a host read of its result), which every process of the group makes alike."""
    return GroupSync(group, group_count(x.numel() // x.shape[1], group, x.device, tuple(x.shape)))


def _named_group_sync(group_name: str, x: torch.Tensor) -> GroupSync | None:
    """The custom ops' GroupSync: over the group named group_name, or None for "" (the entry passes a
    name only when some unit takes batch statistics)."""
    return _group_sync(resolve_group(group_name), x) if group_name else None


_WIDTH = len(UnitParams._fields)  # tensors per unit in the custom ops' flat parameter list


def _unit(params: Sequence[torch.Tensor | None], unit: int) -> UnitParams:
    """Unit `unit`'s tensors out of the flat parameter list of the custom ops (an empty placeholder or a
    None: absent)."""
    weight, *vectors = (_present(t) for t in params[_WIDTH * unit : _WIDTH * (unit + 1)])
    if weight is None:
        raise ValueError(f"dense block unit {unit} has no conv weight")
    return UnitParams(weight, *vectors)


def _present(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or t.numel() == 0 else t


def _spec(
    in_channels, growth, bottleneck, batch_stats, eps, dropout, seeds, engine, compute_dtype, sync=None
):
    return BlockSpec(
        in_channels, growth, bottleneck, tuple(batch_stats), tuple(eps), dropout, seeds, engine,
        compute_dtype, sync,
    )  # fmt: skip


def _fake_stats_dtype(x: torch.Tensor, any_batch_stats: bool) -> torch.dtype:
    """dtype of the statistics the forward returns (for its fake kernel)."""
    return torch.float64 if x.dtype == torch.float64 and any_batch_stats else torch.float32


# The block as torch.library custom ops (forward, backward, fake kernels, autograd), so that torch.compile
# traces through a Tiramisu: opaque nodes in its graph. Functional: the forward returns the per-channel
# batch statistics and the entry updates the running ones from them. Parameters travel as one flat list
# (UnitParams per unit); gradients that do not exist come back as empty tensors. A process group
# travels by name (group_name, "" for none): the forward makes the group's count (one all_reduce) and
# returns it, and the backward takes it back (no collective of its own for it), then the walk's collectives.


def _forward_op_impl(
    x: torch.Tensor,
    params: list[torch.Tensor],  # UnitParams per unit, absent ones as empty placeholders
    growth: int,
    bottleneck: int,
    batch_stats: list[bool],
    eps: list[float],
    dropout: float,
    seeds: torch.Tensor,
    engine: str,
    compute_dtype: torch.dtype,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(buffer B, b_stats, t_stats, folds, count): B (N, C0 + L*k, D, H, W); b_stats (2, C0 + (L-1)*k) the
    batch mean and biased variance of B's channels that layers read, t_stats (2, L*W) those of every
    layer's T (each empty when no unit uses them); folds each unit's BatchNorm as (scale, shift, rstd),
    flat, units in order (BlockSpec.fold_offsets): backward reuses them instead of folding again; count:
    with a group, the values per channel behind the statistics (0-d float64 on x's device), else empty."""
    sync = _named_group_sync(group_name, x)
    outputs = _forward_outputs(x, params, growth, bottleneck, batch_stats, eps, dropout, seeds, engine,
                               compute_dtype, sync)  # fmt: skip
    count = (
        torch.tensor(float(sync.count), dtype=torch.float64, device=x.device)
        if sync
        else x.new_empty((0,), dtype=torch.float64)
    )
    return *outputs, count


def _forward_outputs(
    x, params, growth, bottleneck, batch_stats, eps, dropout, seeds, engine, compute_dtype,
    sync: GroupSync | None = None,
):  # fmt: skip
    """_forward_op_impl's outputs, the statistics over sync's group when given (the eager block's path)."""
    spec = _spec(
        x.shape[1], growth, bottleneck, batch_stats, eps, dropout, seeds, engine, compute_dtype, sync
    )
    buffer, stats = _forward(x, spec, params)
    empty = x.new_empty((0,), dtype=torch.float32)
    b_stats, t_stats, folds = (s if s is not None else empty.clone() for s in stats)
    return buffer, b_stats, t_stats, folds


dense_block_forward = torch.library.custom_op(
    "prostate_kernels::dense_block_forward", _forward_op_impl, mutates_args=()
)


@dense_block_forward.register_fake
def _(x, params, growth, bottleneck, batch_stats, eps, dropout, seeds, engine, compute_dtype, group_name):
    n, c0, *size = x.shape
    layers = len(eps) // units_per_layer(bottleneck)
    spec = _spec(c0, growth, bottleneck, batch_stats, eps, dropout, seeds, engine, compute_dtype)
    buffer = torch.empty((n, c0 + layers * growth, *size), dtype=x.dtype, device=x.device,
                         memory_format=_ENGINES[engine].buffer_format)  # fmt: skip
    b = (2, c0 + (layers - 1) * growth) if spec.b_stats else (0,)
    t = (2, layers * bottleneck) if spec.t_stats else (0,)
    return (
        buffer,
        x.new_empty(b, dtype=_fake_stats_dtype(x, spec.b_stats)),
        x.new_empty(t, dtype=_fake_stats_dtype(x, spec.t_stats)),
        x.new_empty((spec.fold_offsets()[-1],), dtype=_fake_stats_dtype(x, True)),
        x.new_empty(() if group_name else (0,), dtype=torch.float64),
    )


def _backward_op_impl(
    grad_output: torch.Tensor,
    buffer: torch.Tensor,
    stats: list[torch.Tensor],
    params: list[torch.Tensor | None],
    growth: int,
    bottleneck: int,
    batch_stats: list[bool],
    eps: list[float],
    dropout: float,
    seeds: torch.Tensor,
    engine: str,
    compute_dtype: torch.dtype,
    count: torch.Tensor,
    group_name: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(grad x, [grad weight, grad bn weight, grad bn bias] per unit), each missing one empty.
    stats: the forward's (b_stats, t_stats, folds); count: the forward's (the group's values per channel,
    0-d float64, read here on the host; empty without a group)."""
    sync = GroupSync(resolve_group(group_name), int(count.item())) if group_name else None
    return _backward_outputs(grad_output, buffer, stats, params, growth, bottleneck, batch_stats, eps,
                             dropout, seeds, engine, compute_dtype, sync=sync)  # fmt: skip


def _backward_outputs(
    grad_output, buffer, stats, params, growth, bottleneck, batch_stats, eps, dropout, seeds, engine,
    compute_dtype, count=None, *, sync: GroupSync | None = None,
):  # fmt: skip
    """_backward_op_impl's outputs, through the group's statistics when sync is given (the eager block).
    count: the op's argument, unread (sync holds the group's count)."""
    in_channels = buffer.shape[1] - len(eps) // units_per_layer(bottleneck) * growth
    spec = _spec(
        in_channels, growth, bottleneck, batch_stats, eps, dropout, seeds, engine, compute_dtype, sync
    )
    present = [s if s.numel() else None for s in stats]
    grad_x, grads = _backward(grad_output, spec, buffer, present, params)
    empty = buffer.new_empty((0,))
    return grad_x, [g if g is not None else empty.clone() for g in grads]


dense_block_backward = torch.library.custom_op(
    "prostate_kernels::dense_block_backward", _backward_op_impl, mutates_args=()
)


@dense_block_backward.register_fake
def _(
    grad_output, buffer, stats, params, growth, bottleneck, batch_stats, eps, dropout, seeds, engine,
    compute_dtype, count, group_name,
):  # fmt: skip
    n, c, *size = buffer.shape
    layers = len(eps) // units_per_layer(bottleneck)
    # grad x is the input's channels of the gradient buffer G, a view with G's strides (no copy), which
    # Inductor checks against these
    grad_buffer = torch.empty((n, c, *size), dtype=buffer.dtype, device=buffer.device,
                              memory_format=_ENGINES[engine].buffer_format)  # fmt: skip
    grad_x = grad_buffer[:, : c - layers * growth]
    grads = []
    for unit in range(len(eps)):
        weight, gamma, beta, _, _ = _unit(params, unit)
        grads += [torch.empty_like(weight)]  # grad_like's strides
        grads += [t.new_empty(t.shape) if t is not None else buffer.new_empty((0,)) for t in (gamma, beta)]
    return grad_x, grads


def _setup_context(ctx, inputs, output) -> None:
    """For the custom op (inputs end with group_name) and DenseBlockFunction alike; output: (buffer,
    b_stats, t_stats, folds, count), count empty without a group (the backward op takes it back)."""
    x, params, growth, bottleneck, batch_stats, eps, dropout, seeds, engine, compute_dtype, *group = inputs
    buffer, *stats = output
    # a unit normalised by batch statistics needs no running statistics in backward; they are not saved
    # (the entry updates them in place after this op)
    params = [
        None if (i % _WIDTH >= 3 and batch_stats[i // _WIDTH]) else _present(p) for i, p in enumerate(params)
    ]
    ctx.save_for_backward(buffer, seeds, *stats, *(p for p in params if p is not None))
    ctx.present = [p is not None for p in params]
    ctx.settings = (growth, bottleneck, batch_stats, eps, dropout)
    ctx.engine, ctx.compute_dtype = engine, compute_dtype
    ctx.group_name = group[0] if group else ""
    ctx.set_materialize_grads(False)  # no zero gradients made for the statistics and folds (3 torch ops)


def _gradients(ctx, grad_output, backward) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """(grad x, a gradient per entry of the flat parameter list, None where absent or a running
    statistic), through `backward` (the backward custom op, or its implementation in eager mode)."""
    if grad_output is None:  # the buffer took no part in what backward differentiates
        return None, [None] * len(ctx.present)
    buffer, seeds, *rest = ctx.saved_tensors
    stats, count, saved = rest[:3], rest[3], iter(rest[4:])
    params = [next(saved) if present else None for present in ctx.present]
    grad_x, grads = backward(
        grad_output, buffer, stats, params, *ctx.settings, seeds, ctx.engine, ctx.compute_dtype, count
    )
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    for unit in range(len(ctx.settings[3])):
        for i in range(3):  # weight, bn_weight, bn_bias; no gradient for the running statistics
            if params[_WIDTH * unit + i] is not None:
                param_grads[_WIDTH * unit + i] = grads[3 * unit + i]
    return grad_x, param_grads


def _backward_autograd(ctx, grad_output, *_grad_stats):
    backward = functools.partial(torch.ops.prostate_kernels.dense_block_backward, group_name=ctx.group_name)
    grad_x, param_grads = _gradients(ctx, grad_output, backward)
    return grad_x, param_grads, *([None] * 9)


dense_block_forward.register_autograd(_backward_autograd, setup_context=_setup_context)


class DenseBlockFunction(torch.autograd.Function):
    """The block for eager execution, as FusedBNReLUConv3d is for the fused layer: the same forward and
    backward implementations without the custom ops' dispatch (list arguments go through pytree there).
    apply(x, seeds, (growth, bottleneck, batch_stats, eps, dropout, engine, compute_dtype, sync), *params);
    sync: a GroupSync (statistics over a process group, the group object itself) or None."""

    @staticmethod
    def forward(ctx, x, seeds, settings, *params):
        growth, bottleneck, batch_stats, eps, dropout, engine, compute_dtype, sync = settings
        inputs = (
            x,
            list(params),
            growth,
            bottleneck,
            batch_stats,
            eps,
            dropout,
            seeds,
            engine,
            compute_dtype,
        )
        outputs = _forward_outputs(*inputs, sync=sync)
        _setup_context(ctx, inputs, (*outputs, x.new_empty((0,), dtype=torch.float64)))
        ctx.sync = sync
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @once_differentiable(
        "DenseBlock3d (the shared-buffer dense block)",
        "DenseBlock3d(..., memory_efficient=False), the torch.cat block, can be differentiated twice",
    )
    def backward(ctx, grad_output, *_grad_stats):
        grad_x, param_grads = _gradients(
            ctx, grad_output, functools.partial(_backward_outputs, sync=ctx.sync)
        )
        return grad_x, None, None, *param_grads


class _Stats(NamedTuple):
    """Batch statistics (mean; biased variance) of the forward: B's channels (2, C0 + (L-1)*k) and every
    layer's T (2, L*W); and each unit's BatchNorm folded (scale, shift, rstd), flat
    (BlockSpec.fold_offsets)."""

    b: torch.Tensor | None
    t: torch.Tensor | None
    folds: torch.Tensor

    def fold_rows(self, offsets: list[int], unit: int) -> torch.Tensor:
        """Unit `unit`'s share of folds, a (3, its width) view: rows scale, shift, rstd."""
        start, end = offsets[unit], offsets[unit + 1]
        return self.folds[start:end].view(3, (end - start) // 3)

    def fold(self, offsets: list[int], unit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit `unit`'s (scale, shift, rstd), views of folds."""
        scale, shift, rstd = self.fold_rows(offsets, unit).unbind(0)
        return scale, shift, rstd

    def of_b(self, c_l: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The statistics of B[:, :c_l]."""
        if self.b is None:
            return None, None
        mean, var = self.b[:, :c_l].unbind(0)
        return mean, var

    def of_t(self, layer: int, width: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The statistics of layer `layer`'s T (width W)."""
        if self.t is None:
            return None, None
        mean, var = self.t[:, layer * width : (layer + 1) * width].unbind(0)
        return mean, var


def _normalising(spec: BlockSpec, params, unit: int, batch_mean, batch_var):
    """(mean, var) that `unit` normalises with: the batch's (given) or its running ones."""
    if spec.batch_stats[unit]:
        return batch_mean, batch_var
    p = _unit(params, unit)
    if p.running_mean is None or p.running_var is None:  # BlockSpec takes batch statistics then
        raise ValueError(f"dense block unit {unit}: no running statistics to normalise with")
    return _stat_dtype(p.running_mean), _stat_dtype(p.running_var)


def _unit_forward(
    engine, spec: BlockSpec, params, unit: int, x, batch_mean, batch_var, geometry, out, fold, folded,
    dropout=None,
):  # fmt: skip
    """out = conv(relu(BN(x))) for unit `unit` (batch_mean/var: x's batch statistics, if computed).
    fold: the unit's (3, C) rows (scale, shift, rstd) of the block's flat folds: its BatchNorm is folded
    into them here (forward), or they hold the forward's fold already (folded: backward's recompute of T).
    dropout: (draws, p) of the layer's seeded mask, applied to out (a layer's last unit), or None."""
    weight, gamma, beta, _, _ = _unit(params, unit)
    mean, var = _normalising(spec, params, unit, batch_mean, batch_var)
    if folded:
        fold = fold.unbind(0)
    else:
        fold = engine.fold(mean, var, gamma, beta, spec.eps[unit], out=fold)
    engine.layer_forward(
        x, weight, gamma, beta, mean, var, spec.eps[unit], fold, geometry, spec.compute_dtype, out, dropout
    )


def _unit_backward(
    engine, spec: BlockSpec, params, unit: int, x, grad_out, batch_mean, batch_var, fold, geometry,
    grad_input, accumulate: bool,
):  # fmt: skip
    """[grad weight, grad bn weight, grad bn bias] of `unit` (fold: its forward's (scale, shift, rstd));
    its input gradient written (accumulate: added) into grad_input.

    With spec.sync, a unit with batch statistics normalised with the group's: the engine differentiates
    with those held fixed, and the gradient through them (summed over the group: one all_reduce, which
    every process makes, one with an empty batch too) is added to grad_input."""
    weight, gamma, beta, _, _ = _unit(params, unit)
    mean, var = _normalising(spec, params, unit, batch_mean, batch_var)
    synced = spec.sync is not None and spec.batch_stats[unit]
    if x.shape[0] > 0:
        grad_w, sum_gz_xhat, sum_gz = engine.layer_backward(
            x, grad_out, weight, gamma, beta, mean, var, spec.eps[unit], fold,
            spec.batch_stats[unit] and not synced, geometry, spec.compute_dtype, grad_input, accumulate,
            sums=(synced or gamma is not None, synced or beta is not None),
        )  # fmt: skip
    else:  # an empty batch (aten's BatchNorm backward faults on one): nothing flows, nothing is summed
        grad_w, sum_gz_xhat, sum_gz = torch.zeros_like(weight), torch.zeros_like(mean), torch.zeros_like(mean)
    if synced:
        assert spec.sync is not None and sum_gz_xhat is not None and sum_gz is not None
        scale, _, rstd = fold
        g_mean, g_var = reduce_stats_grads(
            *given_stats_grads(scale, rstd, sum_gz_xhat, sum_gz), spec.sync.group
        )
        if x.shape[0] > 0:
            add_input_grad_through_stats_(grad_input, x, mean, g_mean, g_var, spec.sync.count)
    return [
        grad_like(grad_w, weight),
        sum_gz_xhat.to(gamma.dtype) if gamma is not None else None,
        sum_gz.to(beta.dtype) if beta is not None else None,
    ]


def _bottleneck(
    engine, spec: BlockSpec, params, layer: int, inputs, batch_mean, batch_var, fold, folded
) -> torch.Tensor:
    """T (N, W, D, H, W): layer `layer`'s bottleneck unit applied to inputs = B[:, :C_l] (fold, folded:
    as _unit_forward's)."""
    n, _, *size = inputs.shape
    t = torch.empty((n, spec.bottleneck, *size), dtype=inputs.dtype, device=inputs.device,
                    memory_format=engine.buffer_format)  # fmt: skip
    _unit_forward(engine, spec, params, spec.unit(layer, 0), inputs, batch_mean, batch_var,
                  BOTTLENECK_GEOMETRY, out=t, fold=fold, folded=folded)  # fmt: skip
    return t


def _batch_stats(
    engine, spec: BlockSpec, x: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) of x's channels (N, C, D, H, W), written into out's rows (2, C): this
    process's batch, or with spec.sync that of the group's batches together (one all_gather)."""
    if spec.sync is None:
        return engine.stats(x, out=out)
    mean, var = local_stats(x, out.dtype)
    count, group = x.numel() // x.shape[1], spec.sync.group
    mean, var, _ = combine_over_group(mean, var, count, group, tuple(x.shape), total=spec.sync.count)
    out[0].copy_(mean)
    out[1].copy_(var)
    return out[0], out[1]


def _forward(x: torch.Tensor, spec: BlockSpec, params) -> tuple[torch.Tensor, _Stats]:
    engine = _ENGINES[spec.engine]
    n, c0, *size = x.shape
    buffer = torch.empty(
        (n, spec.out_channels, *size), dtype=x.dtype, device=x.device, memory_format=engine.buffer_format
    )
    buffer[:, :c0].copy_(x)
    # statistics of B's channels that some layer reads (filled as channels arrive) and of every T
    dtype = engine.stats_dtype(x)
    b = torch.empty((2, spec.width(spec.layers - 1)), dtype=dtype, device=x.device) if spec.b_stats else None
    t = (
        torch.empty((2, spec.layers * spec.bottleneck), dtype=dtype, device=x.device)
        if spec.t_stats
        else None
    )
    # scale, shift, rstd of each unit in turn, each unit's folded into its share (fold_offsets)
    offsets = spec.fold_offsets()
    stats = _Stats(b, t, torch.empty((offsets[-1],), dtype=dtype, device=x.device))
    if b is not None:
        _batch_stats(engine, spec, x, out=b[:, :c0])
    for layer in range(spec.layers):
        c_l = spec.width(layer)
        inputs = buffer[:, :c_l]
        batch_mean, batch_var = stats.of_b(c_l)
        if spec.bottleneck:
            fold = stats.fold_rows(offsets, spec.unit(layer, 0))
            inputs = _bottleneck(
                engine, spec, params, layer, inputs, batch_mean, batch_var, fold, folded=False
            )
            batch_mean, batch_var = (None, None)
            if t is not None:
                w = spec.bottleneck
                batch_mean, batch_var = _batch_stats(
                    engine, spec, inputs, out=t[:, layer * w : (layer + 1) * w]
                )
        new = buffer[:, c_l : c_l + spec.growth]
        unit = spec.unit(layer, spec.units_per_layer - 1)
        dropout = None
        if spec.dropout > 0:  # the layer's seeded draws; the engine applies the mask as it writes `new`
            dropout = (dropout_uniform(spec.seeds, layer, tuple(new.shape), x.device), spec.dropout)
        _unit_forward(engine, spec, params, unit, inputs, batch_mean, batch_var, GEOMETRY, out=new,
                      fold=stats.fold_rows(offsets, unit), folded=False, dropout=dropout)  # fmt: skip
        del inputs  # a bottleneck layer's T is freed here and recomputed in backward
        if b is not None and layer + 1 < spec.layers:
            _batch_stats(engine, spec, new, out=b[:, c_l : c_l + spec.growth])
    return buffer, stats


def _backward(grad_output, spec: BlockSpec, buffer, stats, params):
    """(grad of x, per unit [grad weight, grad bn weight, grad bn bias] flattened, None where absent).
    stats: the forward's (b_stats, t_stats, folds), None where not computed."""
    engine = _ENGINES[spec.engine]
    stats = _Stats(*stats)
    offsets = spec.fold_offsets()
    grad = grad_output.to(buffer.dtype).clone(memory_format=engine.buffer_format)  # G, accumulated into
    grads: list[list[torch.Tensor | None]] = [[None] * 3 for _ in spec.eps]
    for layer in reversed(range(spec.layers)):
        c_l = spec.width(layer)
        grad_new = grad[:, c_l : c_l + spec.growth]
        if spec.dropout > 0:  # in place: G's new channels are read by this layer's backward only
            apply_dropout_(grad_new, spec.seeds, layer, spec.dropout)
        inputs, grad_inputs = buffer[:, :c_l], grad[:, :c_l]
        b_mean, b_var = stats.of_b(c_l)
        if not spec.bottleneck:
            grads[layer] = _unit_backward(engine, spec, params, layer, inputs, grad_new, b_mean, b_var,
                                          stats.fold(offsets, layer), GEOMETRY, grad_inputs,
                                          accumulate=True)  # fmt: skip
            continue
        first = spec.unit(layer, 0)
        t = _bottleneck(engine, spec, params, layer, inputs, b_mean, b_var,
                        stats.fold_rows(offsets, first), folded=True)  # recomputed  # fmt: skip
        grad_t = torch.empty_like(t)
        t_mean, t_var = stats.of_t(layer, spec.bottleneck)
        unit = spec.unit(layer, 1)
        grads[unit] = _unit_backward(engine, spec, params, unit, t, grad_new, t_mean, t_var,
                                     stats.fold(offsets, unit), GEOMETRY, grad_t,
                                     accumulate=False)  # fmt: skip
        del t
        grads[first] = _unit_backward(engine, spec, params, first, inputs, grad_t, b_mean, b_var,
                                      stats.fold(offsets, first), BOTTLENECK_GEOMETRY, grad_inputs,
                                      accumulate=True)  # fmt: skip
    return grad[:, : spec.in_channels], [g for unit_grads in grads for g in unit_grads]


# --------------------------------------------------------------------------------------- engines


class _TritonEngine:
    """Units on the fused Triton kernels: the normalised activation is never written."""

    buffer_format = torch.channels_last_3d  # channel slices are K-contiguous for the implicit GEMM

    @staticmethod
    def stats(x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance) of x's channels, written into out ((2, C)) when given."""
        from prostate_kernels.ops.channel_stats import channel_stats

        return channel_stats(x, out=out)

    @staticmethod
    def stats_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float32

    @staticmethod
    def fold(mean, var, gamma, beta, eps, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(scale, shift, rstd): BatchNorm folded into out's rows (3, C), one launch."""
        from prostate_kernels.ops.channel_stats import fold_batch_norm_into

        return fold_batch_norm_into(mean, var, gamma, beta, eps, out).unbind(0)

    @staticmethod
    def layer_forward(
        x, weight, gamma, beta, mean, var, eps, fold, geometry, compute_dtype, out, dropout
    ) -> None:  # fmt: skip
        from prostate_kernels.ops.bn_relu_conv3d_triton import conv_forward

        scale, shift, _ = fold
        conv_forward(x, weight, None, scale, shift, geometry, compute_dtype, out=out, dropout=dropout)

    @staticmethod
    def layer_backward(
        x, grad_out, weight, gamma, beta, mean, var, eps, fold, batch_stats, geometry, compute_dtype,
        grad_input, accumulate, sums,
    ):  # fmt: skip
        """(grad weight, sum of gz * xhat, sum of gz) (the sums (C,) float32, made whichever `sums` asks
        for), the input gradient written (accumulate: added) into grad_input."""
        from prostate_kernels.ops.bn_relu_conv3d_triton import conv_input_grad, conv_weight_grad

        scale, shift, rstd = fold
        g_w, _ = conv_weight_grad(x, grad_out, scale, shift, geometry, compute_dtype, with_bias=False)
        _, sum_gz_xhat, sum_gz = conv_input_grad(
            x, grad_out, weight, scale, shift, mean, rstd, geometry, compute_dtype, batch_stats,
            grad_input=grad_input, accumulate=accumulate,
        )  # fmt: skip
        return g_w, sum_gz_xhat, sum_gz


class _TorchEngine:
    """The PyTorch twin: plain ops. Backward recomputes one unit's BN -> ReLU (cheap, elementwise) and
    takes the conv's gradients from aten's convolution_backward, so no convolution is recomputed."""

    # CPU convolutions prefer NCDHW, and there a channel slice of one image is contiguous; a channels-last
    # buffer measured no faster for a channels-last model (Tiramisu tiny, 8x1x16x32x32, float32, 2 cores:
    # a training step 335 ms against 326 ms with this buffer)
    buffer_format = torch.contiguous_format

    @staticmethod
    def stats(x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance) of x's channels, written into out ((2, C)) when given."""
        var, mean = torch.var_mean(_stat_dtype(x), dim=(0, 2, 3, 4), unbiased=False)
        if out is None:
            return mean, var
        out[0].copy_(mean)
        out[1].copy_(var)
        return out[0], out[1]

    @staticmethod
    def stats_dtype(x: torch.Tensor) -> torch.dtype:
        return _stat_dtype(x).dtype

    @staticmethod
    def fold(mean, var, gamma, beta, eps, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(scale, shift, rstd): fold_batch_norm in mean's precision, written into out's rows (3, C)."""
        for row, value in zip(out, fold_batch_norm(mean, var, gamma, beta, eps), strict=True):
            row.copy_(value)
        return out.unbind(0)

    @staticmethod
    def layer_forward(
        x, weight, gamma, beta, mean, var, eps, fold, geometry, compute_dtype, out, dropout
    ) -> None:  # fmt: skip
        # normalise with the shared statistics (given as running ones: nothing is updated here)
        a = F.batch_norm(
            _stat_dtype(x), mean, var, _as(gamma, mean), _as(beta, mean), False, 0.0, eps
        ).relu_()
        g = geometry
        out.copy_(
            F.conv3d(a.to(compute_dtype), weight.to(compute_dtype), None, g.stride, g.padding, g.dilation)
        )
        if dropout is not None:
            uniform, p = dropout
            out.mul_(scale_from_uniform_(uniform, p))

    @staticmethod
    def layer_backward(
        x, grad_out, weight, gamma, beta, mean, var, eps, fold, batch_stats, geometry, compute_dtype,
        grad_input, accumulate, sums,
    ):  # fmt: skip
        """(grad weight, sum of gz * xhat, sum of gz) (the sums (C,) in mean's dtype; sums: which to make,
        else None), the input gradient written (accumulate: added) into grad_input."""
        # The BatchNorm -> ReLU backward by aten's kernels (this runs inside a custom op, where autograd does
        # not record): a = ReLU(BN(x)) as in forward, grad_z = grad_a where a > 0 (threshold_backward), then
        # BatchNorm's own backward, through the batch statistics (mean, rstd) when they normalised x, else
        # with (mean, var) as fixed running statistics: the formula of the Triton finalize kernel.
        xs = _stat_dtype(x)
        gamma_s = _as(gamma, mean)
        a = F.batch_norm(xs, mean, var, gamma_s, _as(beta, mean), False, 0.0, eps).relu_()
        g = geometry
        grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out.to(compute_dtype), a.to(compute_dtype), weight.to(compute_dtype), None,
            list(g.stride), list(g.padding), list(g.dilation), False, [0, 0, 0], 1, [True, True, False],
        )  # fmt: skip
        # grad_a in a's dtype and strides first: a channels-last weight makes it channels-last, and
        # threshold_backward over two layouts is slow on the CPU (Tiramisu tiny channels-last, 2 cores: 36
        # ms of a 330 ms step; 17 ms, plus 9 ms more of copies, this way)
        grad_z = torch.ops.aten.threshold_backward(grad_like(grad_a, a), a, 0)
        del a
        _, _, rstd = fold
        grad_x, d_gamma, d_beta = torch.ops.aten.native_batch_norm_backward(
            grad_z, xs, gamma_s, None if batch_stats else mean, None if batch_stats else var,
            mean if batch_stats else None, rstd if batch_stats else None, batch_stats, eps, [True, *sums],
        )  # fmt: skip
        grad_input.add_(grad_x) if accumulate else grad_input.copy_(grad_x)
        return grad_w, d_gamma, d_beta


def _stat_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the precision of BatchNorm's arithmetic: float64 stays, everything else float32."""
    return x if x.dtype == torch.float64 else x.float()


def _as(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return t.to(like.dtype) if t is not None else None


_ENGINES: dict[str, type[_TritonEngine] | type[_TorchEngine]] = {
    "triton": _TritonEngine,
    "torch": _TorchEngine,
}


__all__ = [
    "BOTTLENECK_GEOMETRY",
    "GEOMETRY",
    "BlockSpec",
    "ConvGeometry",
    "UnitParams",
    "UnitSpec",
    "dense_block",
]
