"""optimize(model): the library's layers swapped into a model built from plain PyTorch (or MONAI) modules.

walk.py              optimize(): the walk, what is tried where, the report
dense_blocks.py      3D DenseNet-BC blocks (MONAI, torchvision layout) -> AdoptedDenseBlock3d (probed)
fused_sequential.py  FusedSequential: an nn.Sequential whose runs run as the library's ops
runs.py              the runs: BatchNorm3d -> ReLU -> Conv3d (fused layer), SepConv_BN (separable kernel)
depthwise.py         Conv3d(groups == C_in == C_out) -> DepthwiseConv3d
report.py            OptimizeReport (replaced / left, with reasons)
"""

from prostate_kernels.swap.dense_blocks import AdoptedDenseBlock3d
from prostate_kernels.swap.fused_sequential import FusedSequential
from prostate_kernels.swap.report import LeftAlone, OptimizeReport, Replacement
from prostate_kernels.swap.walk import optimize

__all__ = ["AdoptedDenseBlock3d", "FusedSequential", "LeftAlone", "OptimizeReport", "Replacement", "optimize"]
