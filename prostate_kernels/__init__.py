"""prostate_kernels: fused GPU kernels and memory-efficient layers for 3D prostate segmentation in MRI.

Public API (importing is cheap: no Triton compilation, no SimpleITK, no GPU query at import time):
    sliding_window_inference   overlap-weighted sliding-window inference (C++ / Triton stitching)
    SlidingWindowInferer       its settings held in an object, as MONAI's (for MONAI's evaluators, bundles)
    RoiTooLargeError           a roi_size padding inputs past their device's memory (ValueError, MemoryError)
    nn                         drop-in modules: BNReLUConv3d (fused BatchNorm -> ReLU -> Conv3d, the dense
                               layer), DenseBlock3d, BottleneckDenseLayer3d, DepthwiseConv3d,
                               SeparableConv3d, ASPP3d
    functional                 the ops as functions (bn_relu_conv3d, depthwise_conv3d, window_* stitching)
    models                     the paper's networks (import prostate_kernels.models; build_model(name))
    set_backend, get_backend, use_backend   choose Triton kernels, the PyTorch twin, or "auto"
    HAS_EXT                    whether the C++ extension prostate_kernels._C loaded
    optimize                   swap the library's layers into any model (MONAI DenseNet, Sequentials, ...)
"""

from prostate_kernels import functional, nn
from prostate_kernels._ext import HAS_EXT
from prostate_kernels.backend import get_backend, set_backend, use_backend
from prostate_kernels.inference import RoiTooLargeError, sliding_window_inference
from prostate_kernels.inferer import SlidingWindowInferer
from prostate_kernels.swap import optimize

__version__ = "0.1.0"

__all__ = [
    "HAS_EXT",
    "RoiTooLargeError",
    "SlidingWindowInferer",
    "__version__",
    "functional",
    "get_backend",
    "nn",
    "optimize",
    "set_backend",
    "sliding_window_inference",
    "use_backend",
]
