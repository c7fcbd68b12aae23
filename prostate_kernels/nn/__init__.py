"""Drop-in modules built on the fused ops (state_dicts compatible with the eager modules they replace).

BNReLUConv3d      BatchNorm3d -> ReLU -> Conv3d in one op (the dense layer)
DenseBlock3d      dense block on one shared buffer: FC-DenseNet layers, or DenseNet-BC (bn_size > 0)
BottleneckDenseLayer3d  one DenseNet-BC layer (BN-ReLU-conv 1x1x1, BN-ReLU-conv 3x3x3)
DepthwiseConv3d   Conv3d(C, C, groups=C) on the tiled depthwise kernels
SeparableConv3d   depthwise -> BN -> pointwise -> BN (DeepLabv3+ SepConv), fused in inference
ASPP3d            atrous spatial pyramid pooling in 3D
"""

from prostate_kernels.nn.dense import BatchNormStep, BNReLUConv3d, BottleneckDenseLayer3d, DenseBlock3d
from prostate_kernels.nn.separable import ASPP3d, DepthwiseConv3d, SeparableConv3d

__all__ = [
    "ASPP3d",
    "BNReLUConv3d",
    "BatchNormStep",
    "BottleneckDenseLayer3d",
    "DenseBlock3d",
    "DepthwiseConv3d",
    "SeparableConv3d",
]
