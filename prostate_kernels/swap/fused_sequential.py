"""nn.Sequential whose runs of consecutive children (swap/runs.py) are computed by the library's ops.

The Sequential is replaced by a FusedSequential holding the very same children under the same names, so
the parameters are the same objects and the state_dict is unchanged (loads both ways); only forward
differs. The runs are found again at each forward, so editing the Sequential afterwards stays safe.
"""

from __future__ import annotations

import torch
from torch import nn

from prostate_kernels.swap.runs import find_runs, run_bn_relu_conv, try_separable


class FusedSequential(nn.Sequential):
    """An nn.Sequential whose BatchNorm3d -> ReLU -> Conv3d runs execute as the fused layer and whose
    separable (SepConv_BN) runs as one kernel in CUDA inference; every other child runs as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_modules(list(self._modules.values()), x, separable=True)


def run_modules(modules: list[nn.Module], x: torch.Tensor, separable: bool) -> torch.Tensor:
    """modules applied in order, each run (find_runs) by its op; a separable run whose kernel does not
    apply (training, autograd, not CUDA inference) runs its modules, its BN -> ReLU -> conv fused."""
    done = 0
    for run in find_runs(modules, separable):
        for module in modules[done : run.start]:
            x = module(x)
        part = modules[run.start : run.start + run.length]
        if run.kind == "bn_relu_conv":
            x = run_bn_relu_conv(part, x)
        else:
            y = try_separable(part, x)
            x = y if y is not None else run_modules(part, x, separable=False)
        done = run.start + run.length
    for module in modules[done:]:
        x = module(x)
    return x


def overrides_forward(sequential: nn.Sequential) -> bool:
    """A Sequential subclass with its own forward: its children are not known to run in order."""
    return type(sequential).forward is not nn.Sequential.forward


__all__ = ["FusedSequential", "overrides_forward", "run_modules"]
