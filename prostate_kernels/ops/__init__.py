"""One op per file: Triton kernels -> launcher -> registered op (torch.library) or autograd.Function.

window_ops.py          sliding-window gather / accumulate / normalise ops (C++, Triton, PyTorch twin)
window_accumulate.py   their Triton kernels (the GPU side)
"""
