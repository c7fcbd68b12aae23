"""The paper's networks (U-Net 3D, DeepLabv3+ 2D/3D, Tiramisu 3D), installed as prostate_kernels.models.

    build_model(name, **overrides)   by name: unet3d, deeplabv3plus_2d, deeplabv3plus_3d, tiramisu3d_p4a,
                                     tiramisu3d_p3a, tiramisu3d_p3b, tiramisu3d_tiny
    count_parameters(model, convention)   "torch", "keras" (with BN moving statistics) or "conv"
    downsampling(model)   its total downsampling (D, H, W): input sizes are multiples of it

Every network outputs one channel of logits at the input's spatial size and takes inputs whose spatial
sizes are multiples of its total downsampling (`model.downsampling`); other sizes raise ValueError.
Training needs a batch of at least 2 where a BatchNorm sees one value per image (DeepLab's image pooling).
"""

from .common import count_parameters, downsampling
from .deeplabv3plus import DeepLabV3Plus
from .registry import MODEL_NAMES, build_model
from .tiramisu3d import Tiramisu3D, tiramisu3d_p3a, tiramisu3d_p3b, tiramisu3d_p4a, tiramisu3d_tiny
from .unet3d import UNet3D

__all__ = [
    "MODEL_NAMES",
    "DeepLabV3Plus",
    "Tiramisu3D",
    "UNet3D",
    "build_model",
    "count_parameters",
    "downsampling",
    "tiramisu3d_p3a",
    "tiramisu3d_p3b",
    "tiramisu3d_p4a",
    "tiramisu3d_tiny",
]
