"""build_model(name): the paper's networks by name, with keyword overrides."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .deeplabv3plus import DeepLabV3Plus
from .tiramisu3d import tiramisu3d_p3a, tiramisu3d_p3b, tiramisu3d_p4a, tiramisu3d_tiny
from .unet3d import UNet3D

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "unet3d": UNet3D,
    "deeplabv3plus_2d": lambda **kw: DeepLabV3Plus(**{"spatial_dims": 2, "in_channels": 13, **kw}),
    "deeplabv3plus_3d": lambda **kw: DeepLabV3Plus(**{"spatial_dims": 3, "in_channels": 1, **kw}),
    "tiramisu3d_p4a": tiramisu3d_p4a,
    "tiramisu3d_p3a": tiramisu3d_p3a,
    "tiramisu3d_p3b": tiramisu3d_p3b,
    "tiramisu3d_tiny": tiramisu3d_tiny,
}
MODEL_NAMES: tuple[str, ...] = tuple(BUILDERS)


def build_model(name: str, **overrides: Any) -> nn.Module:
    """A fresh network: one of MODEL_NAMES, its constructor's keyword arguments overridden."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return BUILDERS[name](**overrides)
