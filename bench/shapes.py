"""Benchmark shapes in one place, derived from the paper's networks (not typed in by hand)."""

from __future__ import annotations

from dataclasses import dataclass

PATCH = (16, 64, 64)  # the paper's 64x64x16 patch as (D, H, W)
TIRAMISU_P3A_LAYERS = (7, 8, 9, 12, 15, 16, 17)  # down blocks, bottleneck, up blocks
GROWTH = 16
FIRST_CONV = 48


@dataclass(frozen=True)
class DenseLayerShape:
    block: str  # e.g. "down1", "bottleneck", "up3"
    layer: int  # index inside its block
    c_in: int
    size: tuple[int, int, int]  # (D, H, W) of the block's resolution

    @property
    def label(self) -> str:
        return f"{self.block}.{self.layer} C_in={self.c_in} {self.size[0]}x{self.size[1]}x{self.size[2]}"


def halved(size: tuple[int, int, int]) -> tuple[int, int, int]:
    """The resolution after a transition down (2x2x2 pooling, floor)."""
    d, h, w = size
    return d // 2, h // 2, w // 2


def tiramisu_dense_layers(
    layers: tuple[int, ...] = TIRAMISU_P3A_LAYERS, patch: tuple[int, int, int] = PATCH
) -> list[DenseLayerShape]:
    """Every dense layer's input channels and resolution in an FC-DenseNet (Tiramisu) forward pass.

    Down block i reads its input plus the features of its earlier layers; a transition down halves the
    resolution; the up path concatenates the skip with the up-sampled *new* features of the block below.
    """
    n_pool = len(layers) // 2
    shapes, skips, channels = [], [], FIRST_CONV
    size = patch
    for i in range(n_pool):
        for j in range(layers[i]):
            shapes.append(DenseLayerShape(f"down{i + 1}", j, channels + j * GROWTH, size))
        channels += layers[i] * GROWTH
        skips.append((channels, size))
        size = halved(size)
    for j in range(layers[n_pool]):
        shapes.append(DenseLayerShape("bottleneck", j, channels + j * GROWTH, size))
    new_features = layers[n_pool] * GROWTH
    for i in range(n_pool):
        skip_channels, size = skips[n_pool - 1 - i]
        channels = skip_channels + new_features
        block_layers = layers[n_pool + 1 + i]
        for j in range(block_layers):
            shapes.append(DenseLayerShape(f"up{i + 1}", j, channels + j * GROWTH, size))
        new_features = block_layers * GROWTH
    return shapes


def benchmark_dense_layers(resolutions=((16, 64, 64), (8, 32, 32), (4, 16, 16))) -> list[DenseLayerShape]:
    """Per resolution: the smallest and largest C_in of the down path and of the up path."""
    picked = []
    for size in resolutions:
        at_size = [s for s in tiramisu_dense_layers() if s.size == tuple(size)]
        for path in ("down", "up"):
            on_path = sorted((s for s in at_size if s.block.startswith(path)), key=lambda s: s.c_in)
            if on_path:
                picked += [on_path[0], on_path[-1]] if len(on_path) > 1 else on_path
    return picked
