"""Per-volume z-score and the paper's class-balanced patch sampling.

Half the patch centres of every batch lie on prostate voxels and half on background, as the paper
samples; optional random flips, and optional augmentation (`augment`): a rotation about the slice axis
(within +-ROTATION_DEGREES), an isotropic scaling (1 +- SCALE_RANGE) and an intensity scaling and shift
of the z-scored image (1 +- INTENSITY_SCALE, +-INTENSITY_SHIFT), as nnU-Net's and MONAI's defaults do
in kind. Sampling is a pure function of (seed, rank, iteration): a batch can be
drawn again exactly (resumed training continues with the very batches it would have seen), in any
DataLoader worker, without state to save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import EllipsisType

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

ROTATION_DEGREES = 15.0
SCALE_RANGE = 0.1
INTENSITY_SCALE = 0.1
INTENSITY_SHIFT = 0.1


def zscore(array: np.ndarray) -> np.ndarray:
    """(array - mean) / std as float32 (std > 0: check_image rejects constant images).

    Computed in float64 on the array divided by its largest magnitude, so intensities up to the
    float64 range (1e37 in a float32 image, say) neither overflow the sums nor the squares."""
    array = array.astype(np.float64)
    scale = np.abs(array).max()
    array = array / scale if scale > 0 else array
    return ((array - array.mean()) / array.std()).astype(np.float32)


def zscore_channels(image: np.ndarray) -> np.ndarray:
    """An image's channels (C, D, H, W), each z-scored by its own mean and std (T2 and ADC have unrelated
    intensity scales); a (D, H, W) image is one channel: (1, D, H, W)."""
    image = image[None] if image.ndim == 3 else image
    return np.stack([zscore(channel) for channel in image])


@dataclass
class TrainingCase:
    image: np.ndarray  # (C, D, H, W) float32, each channel z-scored
    mask: np.ndarray  # (D, H, W) uint8 0/1
    foreground: np.ndarray  # flat indices of mask voxels
    name: str = ""
    spacing_zyx: tuple[float, float, float] | None = None  # mm, the voxels' (None: not known)


def training_case(
    image: np.ndarray, mask: np.ndarray, name: str = "", spacing_zyx: tuple[float, float, float] | None = None
) -> TrainingCase:
    """image: (D, H, W), or (C, D, H, W) for several channels; mask (D, H, W) on the same grid."""
    return TrainingCase(
        zscore_channels(image), mask.astype(np.uint8), np.flatnonzero(mask), name, spacing_zyx
    )


class PatchSampler:
    """Batches of patches (B, C, d, h, w) of the cases' C image channels and masks (B, 1, d, h, w).

    slices: 0 for 3-D patches of size `patch`; k > 0 for the 2-D networks' slice stacks: k neighbouring
    slices of each image channel as channels (B, C * k, h, w), channel-major (image channel c's slice j
    is channel c * k + j), with the centre slice's mask (B, 1, h, w) (`patch` is then (k, h, w)).
    """

    def __init__(
        self,
        cases: list[TrainingCase],
        patch: tuple[int, int, int],
        batch: int,
        seed: int = 0,
        rank: int = 0,
        flips: bool = True,
        slices: int = 0,
        augment: bool = False,
    ) -> None:
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        self.cases, self.patch, self.batch = cases, tuple(patch), batch
        self.seed, self.rank, self.flips, self.slices = seed, rank, flips, slices
        self.augment = augment

    def draw(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, iteration])
        images, masks = [], []
        for i in range(self.batch):
            case = self.cases[rng.integers(len(self.cases))]
            centre = self._centre(case, rng, on_prostate=i % 2 == 0)
            image, mask = _crop(case.image, centre, self.patch), _crop(case.mask, centre, self.patch)
            if self.flips:
                for axis in (0, 1, 2):  # of the patch: the image's axis + 1, after its channels
                    if rng.random() < 0.5:
                        image, mask = np.flip(image, axis + 1), np.flip(mask, axis)
            image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
            if self.augment:
                image, mask = augmented(image, mask, rng)
            images.append(image)
            masks.append(mask)
        x = torch.from_numpy(np.stack(images))  # (B, C, d, h, w)
        y = torch.from_numpy(np.stack(masks).astype(np.float32))  # (B, d, h, w)
        if self.slices:  # (B, C * k, h, w) slice stacks, centre slice's mask (B, 1, h, w)
            return x.flatten(1, 2), y[:, self.slices // 2][:, None]
        return x, y[:, None]

    @staticmethod
    def _centre(case: TrainingCase, rng: np.random.Generator, on_prostate: bool) -> tuple[int, ...]:
        shape = case.mask.shape
        if on_prostate:
            return tuple(
                int(v) for v in np.unravel_index(case.foreground[rng.integers(len(case.foreground))], shape)
            )
        for _ in range(100):  # background: uniform over the volume, retried off the gland
            centre = tuple(int(rng.integers(s)) for s in shape)
            if not case.mask[centre]:
                return centre
        return centre


def augmented(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch, image (C, D, H, W) and mask (D, H, W), rotated about the D (slice) axis, scaled about its
    centre (image linearly, mask by nearest neighbour, zero outside), then the image's intensities (all
    channels alike) scaled and shifted."""
    angle = math.radians(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES))
    scale = rng.uniform(1 - SCALE_RANGE, 1 + SCALE_RANGE)
    d, h, w = mask.shape
    c, s = math.cos(angle), math.sin(angle)
    # affine_grid's normalised coordinates (x along W, y along H, z along D) map output to input; the
    # rotation is in voxel units, so the off-diagonal terms carry the H/W aspect ratio
    theta = torch.tensor(
        [[c, -s * h / w, 0.0, 0.0], [s * w / h, c, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float32
    )
    theta[:, :3] /= scale
    grid = F.affine_grid(theta[None], [1, 1, d, h, w], align_corners=False)
    image_in = torch.from_numpy(image.astype(np.float32))[None]  # (1, C, D, H, W)
    mask_in = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, D, H, W)
    image_out = F.grid_sample(image_in, grid, mode="bilinear", align_corners=False)[0]
    mask_out = F.grid_sample(mask_in, grid, mode="nearest", align_corners=False)[0, 0]
    gain = rng.uniform(1 - INTENSITY_SCALE, 1 + INTENSITY_SCALE)
    offset = rng.uniform(-INTENSITY_SHIFT, INTENSITY_SHIFT)
    return (image_out.numpy() * gain + offset).astype(image.dtype), mask_out.numpy().astype(mask.dtype)


def _crop(volume: np.ndarray, centre: tuple[int, ...], patch: tuple[int, ...]) -> np.ndarray:
    """patch-sized block of `volume`'s last three axes centred on `centre`, zero-filled where it leaves the
    volume; leading axes (an image's channels) are kept whole: (..., D, H, W) -> (..., *patch)."""
    out = np.zeros((*volume.shape[:-3], *patch), dtype=volume.dtype)
    src: list[slice | EllipsisType] = [Ellipsis]
    dst: list[slice | EllipsisType] = [Ellipsis]
    for c, p, s in zip(centre, patch, volume.shape[-3:], strict=True):
        start = c - p // 2
        lo, hi = max(start, 0), min(start + p, s)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = volume[tuple(src)]
    return out


class IterationDataset(Dataset):
    """Item i is the batch of iteration first + i (for a DataLoader with batch_size=None)."""

    def __init__(self, sampler: PatchSampler, first: int, last: int) -> None:
        self.sampler, self.first, self.last = sampler, first, last

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.draw(self.first + index)
