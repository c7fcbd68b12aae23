"""BatchNorm folded into a per-channel affine map: batch_norm(x) = x * scale + shift.

The one place where (mean, var, gamma, beta, eps) become (scale, shift): the fused layer, the dense
block's engines and the fused separable inference all normalise through it.
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


__all__ = ["fold_batch_norm"]
