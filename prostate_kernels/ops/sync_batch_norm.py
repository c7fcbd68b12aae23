"""Batch statistics shared by the processes of a torch.distributed group: nn.SyncBatchNorm's semantics
for the fused layers.

Under nn.SyncBatchNorm every process normalises with the mean and biased variance of the global batch
(the samples of every process of the group together), and the input gradient of every process flows
through those shared statistics. The fused layers take that in two parts:

  synced_batch_stats(x, group) -> (mean, var, count): the global statistics, a differentiable function
      of the local x (an autograd.Function in eager mode; under torch.compile the custom ops
      prostate_kernels::synced_batch_stats and its backward, which take the group by name, so that the
      layer stays in the graph). Forward: one all_gather of each process's (count, mean, var),
      combined exactly in float64 (counts may differ between processes, an empty local batch counts 0).
      Backward: one all_reduce (sum) of the statistics' gradients over the group, then
      dx = (g_mean + 2 (x - mean) g_var) / count, which is nn.SyncBatchNorm's input gradient once the
      normalisation's own gradient (the fused op's, with the statistics held fixed) is added to it.
  the fused op normalising with those statistics as given, differentiable with respect to them
      (ops/bn_relu_conv3d.py).

The memory-efficient dense block (ops/dense_block.py) runs its own walk with the same pieces, without
autograd: group_count, combine_over_group for each statistics it computes, and in backward
reduce_stats_grads and add_input_grad_through_stats_ per unit.

Both collectives are the same whatever engine a process runs (Triton or the PyTorch twin), so that the
processes of a group always meet in the same calls. Weight and bias gradients stay local: DDP averages
them, as it does nn.SyncBatchNorm's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from prostate_kernels import backend


def sync_group(norm: nn.Module) -> dist.ProcessGroup | None:
    """The process group whose batch statistics `norm` normalises with in this forward (nn.SyncBatchNorm's
    rule: an nn.SyncBatchNorm in training mode, torch.distributed initialised, a group of more than one
    process), else None (the local batch's statistics, or the running ones)."""
    if not isinstance(norm, nn.SyncBatchNorm) or not norm.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = norm.process_group if norm.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def synced_batch_stats(
    x: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """(mean, biased variance, count) per channel of the batch of every process of `group` together:
    mean and var (C,) float32 (float64 for a float64 x), differentiable with respect to x (N, C, D, H, W);
    count: the values per channel behind them (every process's N * D * H * W summed), an int in eager
    mode, a 0-d float64 tensor on x's device under torch.compile (the graph holds no host read)."""
    if torch.compiler.is_compiling():
        return _synced_batch_stats_op(x, group.group_name)
    mean, var, count = _SyncedBatchStats.apply(x, group)
    return mean, var, int(count)


def resolve_group(group_name: str) -> dist.ProcessGroup:
    """The process group registered as `group_name` (ProcessGroup.group_name): how the custom ops take a
    group, since their schemas have no ProcessGroup type (torch's functional collectives do the same)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)  # type: ignore[arg-type]  # GroupName: a str NewType


def _group_stats(x: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased variance, count) of the group's batches together (synced_batch_stats' forward)."""
    c = x.shape[1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean, var = local_stats(x, dtype)
    return combine_over_group(mean, var, x.numel() // c if c else 0, group, tuple(x.shape))


def _grad_through_group_stats(
    x: torch.Tensor,
    mean: torch.Tensor,
    g_mean: torch.Tensor | None,
    g_var: torch.Tensor | None,
    total: float | torch.Tensor,
    group: dist.ProcessGroup,
    needed: bool = True,
) -> torch.Tensor | None:
    """synced_batch_stats' backward: dL/dx (x's dtype) through the group's statistics, from this process's
    gradients w.r.t. them (None: zero), summed over the group first (every process makes that
    all_reduce, one with an empty batch too); None for an empty x or when not `needed`."""
    g_mean = g_mean if g_mean is not None else torch.zeros_like(mean)
    g_var = g_var if g_var is not None else torch.zeros_like(mean)
    # before the exits below: every process takes part in the all_reduce
    g_mean, g_var = reduce_stats_grads(g_mean.to(mean.dtype), g_var, group)
    if x.numel() == 0 or not needed:
        return None
    return input_grad_through_stats(x, mean, g_mean, g_var, total).to(x.dtype)


def local_stats(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) (C,) of x in dtype: the Triton statistics kernel where x takes the Triton
    engine, torch.var_mean otherwise and while torch.compile traces (which would trace into the kernel's
    launch); zeros for an empty batch (it counts 0 in the combination)."""
    c = x.shape[1]
    if x.numel() == 0:
        return x.new_zeros((c,), dtype=dtype), x.new_zeros((c,), dtype=dtype)
    if backend.resolve(x.device) == "triton" and dtype == torch.float32 and not torch.compiler.is_compiling():
        from prostate_kernels.ops.channel_stats import channel_stats

        return channel_stats(x)
    var, mean = torch.var_mean(x.to(dtype), dim=(0, 2, 3, 4), unbiased=False)
    return mean, var


def _gather(row: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(world, len(row)): every process's `row`, in rank order. One all_gather_into_tensor into a flat
    output, the form NCCL and Gloo both take (Gloo refuses the stacked (world, len) one; torch 2.11 and
    2.13 checked with Gloo, which torch's own SyncBatchNorm still gathers as a list for)."""
    out = row.new_empty((dist.get_world_size(group) * row.numel(),))
    dist.all_gather_into_tensor(out, row, group)
    return out.view(-1, row.numel())


def combine_over_group(
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    group: dist.ProcessGroup,
    shape: tuple[int, ...],
    total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased variance, count) of the group's batches together, from this process's (mean, var)
    (C,) over `count` values per channel (0: an empty batch, its statistics unread): one all_gather of
    every process's (count, mean, var), combined in float64 (Chan's formula), returned in mean's dtype.
    Every process of the group must call it alike. shape: this process's input's, for the error; total:
    the group's count when known already (group_count), which saves reading the gathered counts on the
    host."""
    c = mean.shape[0]
    # (1 + 2C) float64: count, mean, var (float64 keeps counts past 2^24 voxels exact)
    row = torch.cat([mean.new_full((1,), float(count)), mean, var]).to(torch.float64)
    gathered = _gather(row, group)  # (world, 1 + 2C)
    counts, means, variances = gathered[:, :1], gathered[:, 1 : 1 + c], gathered[:, 1 + c :]
    if total is None:
        total = _checked_total(float(counts.sum()), shape)  # one host sync: it sizes update and gradient
    global_mean = (counts * means).sum(0) / total
    # Chan's combination: each process's variance plus its mean's deviation from the global one
    global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / total
    return global_mean.to(mean.dtype), global_var.to(mean.dtype), total


def group_count(count: int, group: dist.ProcessGroup, device: torch.device, shape: tuple[int, ...]) -> int:
    """The values per channel of the group's batches together, from this process's `count` (one
    all_reduce on `device`, the one its backend takes x's tensors on). Every process must call it alike.
    shape: this process's input's, for the error."""
    total = torch.tensor([float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(total, dist.ReduceOp.SUM, group)
    return _checked_total(float(total), shape)


def _checked_total(total: float, shape: tuple[int, ...]) -> int:
    """total as an int; a ValueError unless it is more than 1 (a variance needs two values)."""
    if total <= 1:
        raise ValueError(
            f"synchronised BatchNorm: batch statistics need more than 1 value per channel over the "
            f"process group, got {total:.0f} (this process's x has shape {shape})"
        )
    return int(total)


def reduce_stats_grads(
    g_mean: torch.Tensor, g_var: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients (C,) of the loss w.r.t. the group's statistics, summed over the group (every
    process's loss reads the same statistics): one all_reduce. Every process must call it alike."""
    c = g_mean.shape[0]
    summed = torch.cat([g_mean, g_var.to(g_mean.dtype)])
    dist.all_reduce(summed, dist.ReduceOp.SUM, group)
    g_mean, g_var = summed.split(c)
    return g_mean, g_var


def input_grad_through_stats(
    x: torch.Tensor,
    mean: torch.Tensor,
    g_mean: torch.Tensor,
    g_var: torch.Tensor,
    total: float | torch.Tensor,
) -> torch.Tensor:
    """dL/dx through the group's statistics, in mean's dtype, shaped like x (N, C, D, H, W): d mean / dx =
    1 / total and d var / dx = 2 (x - mean) / total, g_mean and g_var (C,) already summed over the group
    (reduce_stats_grads); total: a number, or a 0-d tensor on x's device (under torch.compile)."""
    c = mean.shape[0]
    g_mean, g_var, mean = (t.view(1, c, 1, 1, 1) for t in (g_mean, g_var, mean))
    return (g_mean + 2 * (x.to(mean.dtype) - mean) * g_var) / total


# bytes of the float temporaries add_input_grad_through_stats_ makes at a time (a slice of channels)
CHUNK_BYTES = 1 << 26


def add_input_grad_through_stats_(
    grad_input: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    g_mean: torch.Tensor,
    g_var: torch.Tensor,
    total: float,
    chunk_bytes: int = CHUNK_BYTES,
) -> None:
    """grad_input += input_grad_through_stats(x, ...), a slice of channels at a time so that its
    temporaries stay near chunk_bytes whatever x's size (the memory-efficient dense block adds it into
    its shared gradient buffer, which it keeps small)."""
    per_channel = max(1, x.numel() // max(1, x.shape[1]) * mean.element_size())
    step = max(1, chunk_bytes // per_channel)
    for start in range(0, x.shape[1], step):
        c = slice(start, start + step)
        grad_input[:, c].add_(input_grad_through_stats(x[:, c], mean[c], g_mean[c], g_var[c], total))


class _SyncedBatchStats(torch.autograd.Function):
    """synced_batch_stats in eager mode: the group object itself, no custom-op dispatch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup):
        mean, var, total = _group_stats(x, group)
        ctx.save_for_backward(x, mean)
        ctx.group, ctx.total = group, total
        count = torch.tensor(total, dtype=torch.float64)
        ctx.mark_non_differentiable(count)
        return mean, var, count

    @staticmethod
    def backward(ctx, g_mean, g_var, _g_count):
        x, mean = ctx.saved_tensors
        grad = _grad_through_group_stats(
            x, mean, g_mean, g_var, ctx.total, ctx.group, ctx.needs_input_grad[0]
        )
        return grad, None


# synced_batch_stats under torch.compile: custom ops, opaque nodes in the graph that run the collectives
# when the graph runs; the group travels by name. count comes back as a 0-d float64 tensor on x's device,
# and the backward divides by it there (no host read in either).


def _stats_op_impl(x: torch.Tensor, group_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, var, count): synced_batch_stats' forward over the group named group_name."""
    mean, var, total = _group_stats(x, resolve_group(group_name))
    return mean, var, torch.tensor(float(total), dtype=torch.float64, device=x.device)


_synced_batch_stats_op = torch.library.custom_op(
    "prostate_kernels::synced_batch_stats", _stats_op_impl, mutates_args=()
)


@_synced_batch_stats_op.register_fake
def _(x, group_name):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    return (
        x.new_empty((c,), dtype=dtype),
        x.new_empty((c,), dtype=dtype),
        x.new_empty((), dtype=torch.float64),
    )


def _stats_backward_op_impl(
    x: torch.Tensor, mean: torch.Tensor, g_mean: torch.Tensor, g_var: torch.Tensor, count: torch.Tensor,
    group_name: str,
) -> torch.Tensor:  # fmt: skip
    """dL/dx through the statistics (zeros for an empty x)."""
    grad = _grad_through_group_stats(x, mean, g_mean, g_var, count, resolve_group(group_name))
    return grad if grad is not None else torch.zeros_like(x)


_synced_batch_stats_backward_op = torch.library.custom_op(
    "prostate_kernels::synced_batch_stats_backward", _stats_backward_op_impl, mutates_args=()
)


@_synced_batch_stats_backward_op.register_fake
def _(x, mean, g_mean, g_var, count, group_name):
    return torch.empty_like(x)


def _stats_setup_context(ctx, inputs, output) -> None:
    x, group_name = inputs
    mean, _, count = output
    ctx.save_for_backward(x, mean, count)
    ctx.group_name = group_name
    ctx.mark_non_differentiable(count)


def _stats_backward(ctx, g_mean, g_var, _g_count):
    x, mean, count = ctx.saved_tensors
    g_mean = g_mean if g_mean is not None else torch.zeros_like(mean)
    g_var = g_var if g_var is not None else torch.zeros_like(mean)
    return _synced_batch_stats_backward_op(x, mean, g_mean, g_var, count, ctx.group_name), None


_synced_batch_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup_context)


__all__ = [
    "add_input_grad_through_stats_",
    "combine_over_group",
    "group_count",
    "input_grad_through_stats",
    "local_stats",
    "reduce_stats_grads",
    "resolve_group",
    "sync_group",
    "synced_batch_stats",
]
