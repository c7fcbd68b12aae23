"""BatchNorm folded into a per-channel affine map: batch_norm(x) = x * scale + shift.

The one place where (mean, var, gamma, beta, eps) become (scale, shift): the fused layer, the dense
block's engines and the fused separable inference all normalise through it; and the one running-
statistics update of nn.BatchNorm3d's (the fused layer and the dense block both use it).
"""

from __future__ import annotations

import torch


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


def update_running_stats_(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var * (count / (count - 1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


__all__ = ["fold_batch_norm", "update_running_stats_"]
