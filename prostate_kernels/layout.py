"""The memory layout a network trains and predicts in: NCDHW (PyTorch's default) or channels-last.

Channels-last stores each voxel's channels together (NDHWC strides; the logical shape stays (N, C, D, H,
W)), so the math is the same and only the order of the bytes differs. A model converted with
`model_in_layout(model, True)` has channels-last conv weights, and PyTorch's convolutions then write
channels-last outputs; the library's kernels take either layout and keep it. What it changes is speed:
  - the library's depthwise conv (DeepLabv3+) takes its halo kernels only on a channels-last input; on
    the CPU it runs a channels-last input of 1024+ channels NCDHW (ops/depthwise_conv3d.py: oneDNN's
    channels-last depthwise conv measured slower there);
  - the dense blocks keep their feature maps in one layout whatever the model's (channels-last on CUDA,
    NCDHW on the CPU), so the other layout copies into and out of it around each block;
  - PyTorch's own convs, pooling and norms run other code (cuDNN, oneDNN) in each layout.
Measured side by side by bench/bench_memory_format.py; `train --channels-last` and `predict
--channels-last` choose it (off by default).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _channels_last_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.dim() == 5 else torch.channels_last


def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x channels-last (a 5-D volume batch: channels_last_3d; 4-D: channels_last) when asked, else x
    itself. A tensor of another rank is returned as it is (it has no channels-last layout).

    A batch of one channel has strides that are both NCDHW- and channels-last-contiguous; Tensor.to
    gives it channels-last's (channel stride 1), where .contiguous(memory_format=...) would leave it as it
    is and PyTorch's convolutions would then keep the whole network NCDHW."""
    if not channels_last or x.dim() not in (4, 5):
        return x
    return x.to(memory_format=_channels_last_format(x))


def model_in_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """model with every 4-D and 5-D parameter and buffer (the conv weights) channels-last when asked, in
    place: the parameters stay the same objects, so an optimizer built on them keeps working. Returns
    model.

    Tensor.to also restrides the weights whose strides are both layouts' (one input channel, as the first
    conv's; 1x1x1 kernels): PyTorch's convolutions write channels-last when their input or their weight
    is, and some inputs come NCDHW-strided (a BatchNorm of the 1-channel input, a torch.cat, the CPU dense
    blocks). The library's layers return each weight's gradient in the weight's own strides
    (grad_like, below); for PyTorch's own layers under DistributedDataParallel, see
    keep_grads_in_param_strides.
    """
    if channels_last:
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                if tensor.dim() in (4, 5):
                    tensor.data = tensor.data.to(memory_format=_channels_last_format(tensor))
    return model


def contiguous_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t contiguous in dtype with at most one copy, the cast included (a kernel's weight relayout under
    autocast reads the float32 parameter once); t itself when it already is both. (`Tensor.to` alone
    ignores memory_format when it does not cast.)"""
    if t.dtype == dtype:
        return t.contiguous()
    return t.to(dtype, memory_format=torch.contiguous_format)


def grad_like(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """grad (param's shape) in param's dtype and strides: itself when it has both; a view when its strides
    differ only in dimensions of size 1 (a 1x1x1 kernel's NCDHW and channels-last strides address the same
    bytes); else one copy. A parameter's gradient in the parameter's own layout is what autograd keeps as
    it is; another layout is copied again by AccumulateGrad (a channels-last conv weight given an NCDHW
    gradient), or, where the strides differ only in size-1 dimensions, kept with strides that
    DistributedDataParallel's gradient buckets (laid out like the parameter) do not match."""
    if grad.dtype != param.dtype:
        return torch.empty_like(param).copy_(grad)
    if grad.stride() == param.stride():
        return grad
    if _same_addresses(grad, param):
        return grad.as_strided(param.size(), param.stride(), grad.storage_offset())
    return torch.empty_like(param).copy_(grad)


def _same_addresses(grad: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether grad's element (i0, i1, ...) lies at the same distance from its start as param's: the same
    shape, and the same stride in every dimension longer than 1 (the index of a size-1 dimension is 0, so
    its stride never counts)."""
    return grad.shape == param.shape and all(
        size == 1 or a == b for size, a, b in zip(param.shape, grad.stride(), param.stride(), strict=True)
    )


def keep_grads_in_param_strides(model: nn.Module) -> list[RemovableHandle]:
    """Lays every gradient that autograd keeps out in its parameter's exact strides, for
    DistributedDataParallel (call before wrapping the model). Returns the hooks' handles.

    AccumulateGrad keeps a gradient whose strides differ from its parameter's only in dimensions of size
    1, and DDP, whose buckets have the parameter's exact strides, then warns once per process "Grad strides
    do not match bucket view strides". PyTorch's own CPU conv3d does this for channels-last 1x1x1 weights
    when it runs on one thread (torchrun's default OMP_NUM_THREADS=1): their weight gradients come back
    NCDHW-strided. Such a gradient addresses the same bytes in the same order, so the fix is a view
    (grad_like), not a copy. Only parameters with a size-1 dimension get a hook: no other can differ this
    way, and every other mismatch is already copied by AccumulateGrad into the parameter's layout."""

    def restride(param: torch.Tensor) -> None:
        if param.grad is not None:
            param.grad = grad_like(param.grad, param)  # the gradient itself when its strides already match

    return [
        param.register_post_accumulate_grad_hook(restride)
        for param in model.parameters()
        if param.requires_grad and param.dim() > 1 and 1 in param.shape
    ]
