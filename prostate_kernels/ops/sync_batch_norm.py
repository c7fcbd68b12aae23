"""Batch statistics shared by the processes of a torch.distributed group: nn.SyncBatchNorm's semantics
for the fused layers.

Under nn.SyncBatchNorm every process normalises with the mean and biased variance of the global batch
(the samples of every process of the group together), and the input gradient of every process flows
through those shared statistics. The fused layers take that in two parts:

  synced_batch_stats(x, group) -> (mean, var, count): the global statistics, a differentiable function
      of the local x. Forward: one all_gather of each process's (count, mean, var), combined exactly in
      float64 (counts may differ between processes, an empty local batch counts 0). Backward: one
      all_reduce (sum) of the statistics' gradients over the group, then
      dx = (g_mean + 2 (x - mean) g_var) / count, which is nn.SyncBatchNorm's input gradient once the
      normalisation's own gradient (the fused op's, with the statistics held fixed) is added to it.
  the fused op normalising with those statistics as given, differentiable with respect to them
      (ops/bn_relu_conv3d.py).

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


def synced_batch_stats(x: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased variance, count) per channel of the batch of every process of `group` together:
    mean and var (C,) float32 (float64 for a float64 x), differentiable with respect to x (N, C, D, H, W);
    count: the values per channel behind them (every process's N * D * H * W summed)."""
    mean, var, count = _SyncedBatchStats.apply(x, group)
    return mean, var, int(count)


def _local_stats(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
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


class _SyncedBatchStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup):
        c = x.shape[1]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        local_count = x.numel() // c if c else 0
        mean, var = _local_stats(x, dtype)
        # (1 + 2C) float64: count, mean, var (float64 keeps counts past 2^24 voxels exact)
        row = torch.cat([mean.new_full((1,), float(local_count)), mean, var]).to(torch.float64)
        gathered = _gather(row, group)  # (world, 1 + 2C)
        counts, means, variances = gathered[:, :1], gathered[:, 1 : 1 + c], gathered[:, 1 + c :]
        total = float(counts.sum())  # one host sync: the count sizes the update and the gradient
        if total <= 1:
            raise ValueError(
                f"synchronised BatchNorm: batch statistics need more than 1 value per channel over the "
                f"process group, got {total:.0f} (this process's x has shape {tuple(x.shape)})"
            )
        global_mean = (counts * means).sum(0) / total
        # Chan's combination: each process's variance plus its mean's deviation from the global one
        global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / total
        global_mean, global_var = global_mean.to(dtype), global_var.to(dtype)
        ctx.save_for_backward(x, global_mean)
        ctx.group, ctx.total = group, total
        count = torch.tensor(total, dtype=torch.float64)
        ctx.mark_non_differentiable(count)
        return global_mean, global_var, count

    @staticmethod
    def backward(ctx, g_mean, g_var, _g_count):
        x, mean = ctx.saved_tensors
        c = mean.shape[0]
        g_mean = g_mean if g_mean is not None else mean.new_zeros((c,))
        g_var = g_var if g_var is not None else mean.new_zeros((c,))
        # every process's loss reads the same statistics: their gradients add up over the group
        summed = torch.cat([g_mean, g_var]).to(mean.dtype)
        dist.all_reduce(summed, dist.ReduceOp.SUM, ctx.group)
        g_mean, g_var = (t.view(1, c, 1, 1, 1) for t in summed.split(c))
        if x.numel() == 0 or not ctx.needs_input_grad[0]:
            return None, None
        # d mean / dx = 1 / count; d var / dx = 2 (x - mean) / count
        gx = (g_mean + 2 * (x.to(mean.dtype) - mean.view(1, c, 1, 1, 1)) * g_var) / ctx.total
        return gx.to(x.dtype), None


__all__ = ["sync_group", "synced_batch_stats"]
