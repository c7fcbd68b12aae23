"""BatchNorm folded into a per-channel affine map: batch_norm(x) = x * scale + shift.

The PyTorch form of where (mean, var, gamma, beta, eps) become (scale, shift): the dense block's PyTorch
engine and the fused separable inference normalise through it; the Triton side folds with the same
formula in ops/channel_stats.py (_store_fold: the statistics kernel's epilogue and a fold kernel; tests
compare the two). And the one running-statistics update of nn.BatchNorm3d's (the fused layer and the
dense block both use it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

STATS_ROWS = ("mean", "var", "scale", "shift", "rstd")  # the rows of a (5, C) BatchNorm statistics tensor


def fold_batch_norm(
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, shift, rstd), each (C,) in mean's dtype (the caller picks the arithmetic's precision by
    the dtype of mean and var): rstd = 1 / sqrt(var + eps), scale = gamma * rstd, shift = beta - mean *
    scale; gamma None means 1, beta None means 0 (a BatchNorm without affine parameters)."""
    rstd = torch.rsqrt(var + eps)
    scale = gamma.to(mean.dtype) * rstd if gamma is not None else rstd
    shift = (beta.to(mean.dtype) if beta is not None else torch.zeros_like(mean)) - mean * scale
    return scale, shift, rstd


def given_stats_grads(
    scale: torch.Tensor, rstd: torch.Tensor, sum_gz_xhat: torch.Tensor, sum_gz: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dmean, dL/dvar) (C,) for a BatchNorm that normalised with statistics given to it (a
    synchronised BatchNorm's group statistics, ops/sync_batch_norm.py): z = scale * (x - mean) + beta with
    scale = gamma * rstd, rstd = 1 / sqrt(var + eps), so dL/dmean = -scale * sum(gz) and dL/dvar = -scale *
    rstd / 2 * sum(gz * xhat), from the per-channel sums that the BatchNorm parameters' gradients are."""
    return -scale * sum_gz, -0.5 * scale * rstd * sum_gz_xhat


def update_running_stats_(
    updates: Sequence[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]],
    count: int | torch.Tensor,
    momentum: float,
) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance, for each
    (running_mean, running_var, batch mean, batch biased variance) of `updates` (a None running tensor is
    skipped); count: values per channel behind the batch statistics (an int, or a 0-d tensor on
    the statistics' device: a synchronised count under torch.compile). Three foreach ops update them all
    (a dense block's units at once): on a GPU each torch op costs host time, and the layers are
    host-bound below the largest shapes. Per element the same arithmetic as nn.BatchNorm3d's update."""
    running = [r for r, _, _, _ in updates if r is not None] + [r for _, r, _, _ in updates if r is not None]
    if not running:
        return
    means = [mean for r, _, mean, _ in updates if r is not None]
    variances = [var for _, r, _, var in updates if r is not None]
    with torch.no_grad():
        unbiased = torch._foreach_mul(variances, count / (count - 1)) if variances else []
        torch._foreach_mul_(running, 1 - momentum)
        torch._foreach_add_(running, means + list(unbiased), alpha=momentum)


__all__ = ["STATS_ROWS", "fold_batch_norm", "given_stats_grads", "update_running_stats_"]
