"""The paper's networks (U-Net 3D, DeepLabv3+, Tiramisu 3D), installed as prostate_kernels.models.

Not built yet: the models issue adds them here, on the library's layers.
"""

__all__: list[str] = []
