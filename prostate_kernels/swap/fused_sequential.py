"""nn.Sequential whose runs of consecutive children (swap/runs.py) are computed by the library's ops.

The Sequential is replaced by a FusedSequential holding the very same children under the same names, so
the parameters are the same objects and the state_dict is unchanged (loads both ways); only forward
differs. The runs are found again at each forward, so editing the Sequential afterwards stays safe.

Runs are looked for in the modules the Sequential applies one after the other: its children, with every
child that is itself a plain chain (an nn.Sequential or subclass keeping nn.Sequential's forward, with no
hooks: MONAI's ADN and Convolution blocks) opened up into its own, recursively. So a BatchNorm3d and ReLU
in one child (MONAI's ADN "NA") and the Conv3d in the next (MONAI's Convolution) form a run.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from prostate_kernels.swap.report import has_hooks
from prostate_kernels.swap.runs import find_runs, run_bn_relu_conv, try_separable


class FusedSequential(nn.Sequential):
    """An nn.Sequential whose BatchNorm3d -> ReLU -> Conv3d runs execute as the fused layer and whose
    separable (SepConv_BN) runs as one kernel in CUDA inference; every other child runs as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_modules([module for _, module in chained(self)], x, separable=True)


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


def is_chain(module: nn.Module) -> bool:
    """module applies its children one after the other and nothing else: an nn.Sequential (or subclass)
    with nn.Sequential's forward, or a FusedSequential (which computes the same), without hooks."""
    return (
        isinstance(module, nn.Sequential)
        and (isinstance(module, FusedSequential) or not overrides_forward(module))
        and not has_hooks(module)
    )


def chained(sequential: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(dotted name, module) of the modules `sequential` applies in order: its children, each chain among
    them (is_chain) replaced by its own children, recursively. A child held under two names appears twice
    (named_children() would list it once, and its second application would be lost)."""
    modules = []
    for name, child in sequential._modules.items():
        if child is None:
            continue
        if is_chain(child):
            modules.extend(chained(cast(nn.Sequential, child), f"{prefix}{name}."))
        else:
            modules.append((f"{prefix}{name}", child))
    return modules


__all__ = ["FusedSequential", "chained", "is_chain", "overrides_forward", "run_modules"]
