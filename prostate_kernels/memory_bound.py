"""step_memory: what one training step or inference call allocates, simulated on the meta device.

On the meta device tensors have shapes and no values, so the step costs no memory and little time
whatever the batch: `train` uses it to refuse, with the numbers, a batch that cannot fit before the
host's out-of-memory killer ends the process with no message, and `predict` a window whose network
call cannot fit in the CPU's memory. Two measures of the same simulated step:
- the largest tensor one op allocates: it exists whole at some moment, so any device needs at least that;
- the peak of the bytes alive at once (parameters, the input, and every storage the forward and backward
  allocate, until its last reference dies, as eager PyTorch frees it): what the same ops need on a device
  that runs them as the meta device does. On the CPU that is the PyTorch path: a real forward and
  backward held 1.07-1.48x this peak (its growth in resident memory plus the parameters and input;
  tiny Tiramisu, U-Net 3D, Tiramisu p3a, DeepLabv3+ 3D at two sizes, 2026-12-05); a GPU's fused kernels
  keep less than the PyTorch twins that the meta device runs, so there it is no bound.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from prostate_kernels.backend import use_backend


@dataclass(frozen=True)
class StepMemory:
    largest_tensor: int  # bytes of the largest tensor one op of the step allocates
    peak: int  # the most bytes alive at once during the step, parameters and input included


class _LiveStorages(TorchDispatchMode):
    """Counts each storage an op allocates until it is freed (a weakref on the storage, which PyTorch keeps
    as one Python object for its lifetime); views and in-place results are skipped: their storage is
    another tensor's, counted when that one was made (or before the step, as the parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._counted: set[int] = set()  # id() of the live storages counted

    def count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = id(storage), storage.nbytes()
        self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        if key in self._counted:
            return
        self._counted.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, nbytes)

    def _freed(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(ret.alias_info is not None for ret in func._schema.returns):
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.count(leaf)
        return out


def step_memory(model: nn.Module, inputs: torch.Tensor) -> StepMemory:
    """model(inputs), then the backward of its output's sum when the output needs a gradient (not under
    torch.no_grad(): an inference call), model and inputs on the meta device (ValueError otherwise: on a
    real device the step would compute), through the PyTorch twins of the library's ops on any backend.
    The mode the model is in (train or eval) is the one measured.
    The parameters' gradients stay alive after the step, as in training."""
    devices = {inputs.device.type, *(p.device.type for p in model.parameters())}
    if devices != {"meta"}:
        raise ValueError(f"step_memory: model and inputs must be on the meta device, got {devices}")
    mode = _LiveStorages()
    for tensor in (*model.parameters(), *model.buffers(), inputs):
        mode.count(tensor)
    mode.largest = 0  # allocations of the step only
    # the PyTorch twins, whatever the process's backend: under set_backend("triton") the step failed, on a
    # GPU with "Triton runs on the CPU only through its interpreter", under the interpreter with "Cannot
    # copy out of meta tensor" (the compile gate runs the kernels on meta tensors its own way)
    with use_backend("torch"), mode:
        output = model(inputs)
        if output.requires_grad:
            output.float().sum().backward()
        del output
    return StepMemory(largest_tensor=mode.largest, peak=mode.peak)
