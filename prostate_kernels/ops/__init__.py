"""The ops. Each op has one public entry, in its own module, that validates its arguments (errors name
the offending value), picks the implementation (backend.resolve), applies autocast and dispatches;
functional.py re-exports the entries and the nn modules hold parameters and call them.

An op's Triton side (launchers + autograd.Function) lives in <op>_triton.py and its kernels in
<op>_kernels.py: they import Triton, which the entry imports only on first use, so that
`import prostate_kernels` stays cheap (tests/test_package.py). The PyTorch twin of every op is in
reference.py.

entries
    bn_relu_conv3d.py        fused BatchNorm -> ReLU -> Conv3d (the dense layer)
    dense_block.py           memory-efficient dense block, FC-DenseNet or DenseNet-BC layers (shared
                             buffer; Triton and PyTorch engines)
    depthwise_conv3d.py      3D depthwise (atrous) conv; the fused eval-mode separable conv
    window_ops.py            sliding-window gather / accumulate / normalise (C++, Triton, PyTorch twin)
Triton sides
    bn_relu_conv3d_triton.py, bn_relu_conv3d_kernels.py, channel_stats.py (batch statistics in one pass)
    depthwise_conv3d_triton.py, depthwise_conv3d_kernels.py
    window_accumulate.py
shared helpers (one per concept)
    batch_norm.py            BatchNorm folded into (scale, shift)
    conv_geometry.py         per-axis kernel/stride/padding/dilation, output size, int-or-triple
    launch.py                autotuning per size bucket, dot precision, output layout, int64 decisions
    triton_index.py          tile offsets, voxel decode, offset widths (in the kernels)
    dot_operands.py          tl.dot operands (TF32 rounding)
    seeded_dropout.py        dropout masks regenerated from a seed
    sync_batch_norm.py       batch statistics over a process group (nn.SyncBatchNorm's, for the fused op)
    (window starts of shared positions: windows.starts_of_positions)

prostate_kernels.swap (optimize) is not an op: it swaps these ops' modules into other models.
"""
