"""The memory layout a network trains and predicts in: NCDHW (PyTorch's default) or channels-last.

Channels-last stores each voxel's channels together (NDHWC strides; the logical shape stays (N, C, D, H,
W)), so the math is the same and only the order of the bytes differs. A model converted with
`model_in_layout(model, True)` has channels-last conv weights, and PyTorch's convolutions then write
channels-last outputs; the library's kernels take either layout and keep it. What it changes is speed:
  - the library's depthwise conv (DeepLabv3+) takes its halo kernels only on a channels-last input;
  - the dense blocks keep their feature maps channels-last whatever the model's layout, so an NCDHW
    Tiramisu copies into and out of that layout around each block;
  - PyTorch's own convs, pooling and norms run other code (cuDNN, oneDNN) in each layout.
Measured side by side by bench/bench_memory_format.py; `train --channels-last` and `predict
--channels-last` choose it (off by default).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


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
    (grad_like, below). Under DistributedDataParallel a 2-process CPU run of Tiramisu 3D tiny still
    prints one "Grad strides do not match bucket view strides" warning per process, for a 1x1x1 weight
    whose gradient arrives NCDHW-strided (not traced further; DDP copies every gradient into its buckets
    either way).
    """
    if channels_last:
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                if tensor.dim() in (4, 5):
                    tensor.data = tensor.data.to(memory_format=_channels_last_format(tensor))
    return model


def grad_like(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """grad (param's shape) in param's dtype and strides: itself when it has both, else one copy. A
    parameter's gradient in the parameter's own layout is what autograd keeps as it is; another layout is
    copied again by AccumulateGrad (a channels-last conv weight given an NCDHW gradient), or, where the
    strides differ only in size-1 dimensions (1x1x1 kernels), kept with strides that
    DistributedDataParallel's gradient buckets (laid out like the parameter) do not match."""
    if grad.dtype == param.dtype and grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)
