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


def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x channels-last (a 5-D volume batch: channels_last_3d; 4-D: channels_last) when asked, else x
    itself. A tensor of another rank is returned as it is (it has no channels-last layout)."""
    if not channels_last or x.dim() not in (4, 5):
        return x
    return x.to(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


def model_in_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """model with every 4-D and 5-D parameter and buffer (the conv weights) channels-last when asked, in
    place: the parameters stay the same objects, so an optimizer built on them keeps working. Returns
    model."""
    if channels_last:
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                tensor.data = in_layout(tensor.data, True)
    return model
