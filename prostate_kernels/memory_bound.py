"""largest_tensor_bytes: a lower bound on a forward's peak memory, from one forward on the meta device.

A forward's peak memory is at least the size of the largest tensor it allocates, since that tensor exists
whole at some moment. On the meta device tensors have shapes and no values, so the forward costs no
memory and little time whatever the batch: `train` uses it to refuse, with the numbers, a batch that
cannot fit before the host's out-of-memory killer ends the process with no message."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LargestAllocation(TorchDispatchMode):
    """Records the bytes of the largest tensor an op returns, views and in-place results excepted (their
    storage is another tensor's, counted when that one was made)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(ret.alias_info is not None for ret in func._schema.returns):
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.bytes = max(self.bytes, leaf.numel() * leaf.element_size())
        return out


def largest_tensor_bytes(model: nn.Module, inputs: torch.Tensor) -> int:
    """The bytes of the largest tensor that model(inputs) allocates, model and inputs on the meta device
    (ValueError otherwise: on a real device the forward would compute). The mode the model is in (train
    or eval) is the one measured; gradients are recorded as in training."""
    devices = {inputs.device.type, *(p.device.type for p in model.parameters())}
    if devices != {"meta"}:
        raise ValueError(f"largest_tensor_bytes: model and inputs must be on the meta device, got {devices}")
    with _LargestAllocation() as mode:
        model(inputs)
    return mode.bytes
