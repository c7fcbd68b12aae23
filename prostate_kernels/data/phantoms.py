"""Synthetic T2-weighted pelvis phantoms with exact prostate masks, written with PROMISE12 names.

Each phantom: a body ellipse of fat and muscle texture; a bright fluid bladder above the gland and a
dark rectum behind it (hard negatives); two femoral heads; the gland, a lobed ellipsoid (radius
modulated by low-order harmonics of angle and height) of random size, shape, position, in-plane
rotation and contrast, brighter at its rim (peripheral zone) than at its centre; a smooth multiplicative
bias field; Rician noise; anisotropic spacing around 0.6 x 0.6 x 3.6 mm. The mask is the gland exactly
(voxel centres inside the lobed surface). Deterministic in the seed.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prostate_kernels.data.errors import DataError
from prostate_kernels.data.io import Volume, write_volume
from prostate_kernels.safe_files import companions

DEFAULT_SHAPE = (24, 128, 128)  # (D, H, W)


@dataclass(frozen=True)
class Phantom:
    image: Volume
    mask: Volume


def make_phantom(seed: int, shape: tuple[int, int, int] = DEFAULT_SHAPE) -> Phantom:
    rng = np.random.default_rng(seed)
    d, h, w = shape
    spacing = (rng.uniform(0.55, 0.65), rng.uniform(0.55, 0.65), rng.uniform(3.2, 4.0))  # (x, y, z) mm
    sz, sy, sx = spacing[2], spacing[1], spacing[0]
    # physical coordinates in mm, centred on the volume
    z = (np.arange(d) - (d - 1) / 2)[:, None, None] * sz
    y = (np.arange(h) - (h - 1) / 2)[None, :, None] * sy
    x = (np.arange(w) - (w - 1) / 2)[None, None, :] * sx
    half_y, half_x = h * sy / 2, w * sx / 2

    image = np.zeros(shape, dtype=np.float64)
    body = (y / (0.95 * half_y)) ** 2 + (x / (0.98 * half_x)) ** 2 < 1
    texture = _smooth_noise(rng, shape, 4) * 0.08
    image += body * (0.32 + texture)
    for side in (-1, 1):  # femoral heads: dark cortical ring, grey marrow
        cx = side * 0.72 * half_x
        r = np.sqrt((x - cx) ** 2 + (y - 0.05 * half_y) ** 2 + (z / 1.6) ** 2)
        image = np.where(r < 14, 0.25, image)
        image = np.where((r >= 14) & (r < 16), 0.05, image)

    # gland: centre, radii (mm), in-plane rotation, lobes
    centre = np.array([rng.uniform(-6, 6), rng.uniform(-6, 6) + 4, rng.uniform(-8, 8)])  # (z, y, x)
    scale = rng.uniform(0.8, 1.2)
    radii = np.array([rng.uniform(13, 17), rng.uniform(10, 13), rng.uniform(13, 18)]) * scale  # (z, y, x)
    theta = rng.uniform(-0.3, 0.3)
    zz, yy, xx = z - centre[0], y - centre[1], x - centre[2]
    yr = np.cos(theta) * yy - np.sin(theta) * xx
    xr = np.sin(theta) * yy + np.cos(theta) * xx
    angle = np.arctan2(yr, xr)
    lobes = 1 + rng.uniform(0.03, 0.12) * np.cos(2 * angle + rng.uniform(0, np.pi))
    lobes = lobes + rng.uniform(0.0, 0.06) * np.cos(3 * angle) + rng.uniform(-0.08, 0.08) * (zz / radii[0])
    rho = np.sqrt((zz / radii[0]) ** 2 + (yr / radii[1]) ** 2 + (xr / radii[2]) ** 2) / lobes
    gland = rho < 1.0

    # bladder above-front, rectum behind
    bladder_c = centre + np.array([radii[0] * 0.9 + 10, -radii[1] * 0.6, 0])
    bladder = ((z - bladder_c[0]) / 22) ** 2 + ((y - bladder_c[1]) / 20) ** 2 + (
        (x - bladder_c[2]) / 28
    ) ** 2 < 1
    rectum_c = centre + np.array([-4, radii[1] + 11, rng.uniform(-3, 3)])
    rectum = ((z - rectum_c[0]) / 30) ** 2 + ((y - rectum_c[1]) / 9) ** 2 + ((x - rectum_c[2]) / 12) ** 2 < 1
    image = np.where(bladder & body, 0.85 + texture, image)
    image = np.where(rectum & body & ~gland, 0.12 + 0.5 * texture, image)

    contrast = rng.uniform(0.16, 0.3)
    rim = np.clip((rho - 0.55) / 0.45, 0, 1)  # peripheral zone brighter than the central gland
    gland_intensity = 0.32 + contrast * (0.4 + 0.8 * rim) + 0.6 * texture
    image = np.where(gland, gland_intensity, image)
    capsule = (rho >= 1.0) & (rho < 1.08)  # thin dark capsule around the gland
    image = np.where(capsule & body, image * 0.75, image)

    bias = 1 + 0.25 * (x / half_x) * rng.uniform(-1, 1) + 0.25 * (y / half_y) * rng.uniform(-1, 1)
    bias = bias + 0.1 * (z / (d * sz / 2)) * rng.uniform(-1, 1)
    image = image * bias
    sigma = rng.uniform(0.02, 0.04)
    image = np.sqrt((image + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)  # Rician
    image = (image * 1000).astype(np.int16)  # scanner-like integer intensities

    origin = (-(w - 1) / 2 * sx, -(h - 1) / 2 * sy, -(d - 1) / 2 * sz)
    direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    image_volume = Volume(image, spacing, origin, direction)
    return Phantom(image_volume, image_volume.like(gland.astype(np.uint8)))


def write_phantoms(out_dir: str | Path, n: int = 8, seed: int = 0, shape=DEFAULT_SHAPE) -> list[Path]:
    """n phantoms as out_dir/CaseNN.mhd (+ .raw) and CaseNN_segmentation.mhd; returns the image paths.
    Files are never replaced: DataError naming one that exists (before anything is written, or when
    another run wrote it meanwhile).

    DataError, with none of this call's files left, when a phantom would be unusable: a volume smaller
    than the gland (a few cm across) can come out all gland, or of one intensity."""
    out_dir = Path(out_dir)
    _check_disk(out_dir, n, shape)  # first: --n 10**20 names are not listed
    names = [f"Case{i:02d}" for i in range(n)]
    _check_none_exist(out_dir, names)
    images: list[Path] = []
    written: list[Path] = []  # headers and their voxel files this call wrote, to remove after a refusal
    try:
        for i, name in enumerate(names):
            phantom = make_phantom(seed * 100_003 + i, shape)
            _check_usable(phantom, out_dir, name, shape)
            images.append(out_dir / f"{name}.mhd")
            for volume, path in (
                (phantom.image, images[-1]),
                (phantom.mask, out_dir / f"{name}_segmentation.mhd"),
            ):
                write_volume(volume, path, replace=False)  # whole or not at all
                written += companions(path)
    except DataError:
        for path in written:  # this call's own files only
            with contextlib.suppress(OSError):  # the DataError is the one to report
                path.unlink(missing_ok=True)
        raise
    return images


def _check_none_exist(out_dir: Path, names: list[str]) -> None:
    """DataError naming the first of the phantoms' files (CaseNN.mhd/.raw and the masks') that exists in
    out_dir: write_phantoms(dir) into a dataset of the user's own replaced its Case00.mhd."""
    for name in names:
        for header in (f"{name}.mhd", f"{name}_segmentation.mhd"):
            for path in companions(out_dir / header):
                if path.exists():
                    raise DataError(path, "exists already: phantoms never replace a file; choose a directory "
                                          "without CaseNN files")  # fmt: skip


def _check_usable(phantom: Phantom, out_dir: Path, name: str, shape: tuple[int, int, int]) -> None:
    """DataError naming --shape when the phantom has nothing to learn: one intensity (train refuses the
    image), or no voxel outside the gland (a mask of all ones)."""
    size = "x".join(map(str, shape))
    image, mask = phantom.image.array, phantom.mask.array
    constant = image.min() == image.max()
    if constant or mask.all():
        what = "one intensity" if constant else "gland in every voxel"
        raise DataError(out_dir, f"--shape {size} is too small for a phantom ({name} would have {what}: the "
                                 "gland is a few cm across, the voxels 0.6 mm in-plane); choose a larger one "
                                 "(default 24 128 128)")  # fmt: skip


def _check_disk(out_dir: Path, n: int, shape: tuple[int, int, int]) -> None:
    """DataError naming --n and --shape when n phantoms need more bytes or files than out_dir's file
    system has free (--n 10**20 wrote 900,000 files and 3.5 GB before it was stopped). Each phantom is
    an int16 image and a uint8 mask, 4 files with the .mhd headers (under 1 KiB each)."""
    need = n * (math.prod(shape) * 3 + 4 * 1024)
    if not hasattr(os, "statvfs"):  # Windows
        return
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())  # out_dir may not exist yet
    disk = os.statvfs(existing)
    free, files = disk.f_bavail * disk.f_frsize, disk.f_favail
    size = "x".join(map(str, shape))
    if need > free:
        raise DataError(out_dir, f"--n {n} phantoms of --shape {size} take {need / 2**30:.3g} GiB, more "
                                 f"than the {free / 2**30:.3g} GiB free on its file system")  # fmt: skip
    if files and 4 * n > files:  # f_favail 0: a file system that does not count files
        raise DataError(out_dir, f"--n {n} phantoms are {4 * n} files, more than the {files} its file "
                                 "system can still hold")  # fmt: skip


def _smooth_noise(rng: np.random.Generator, shape, factor: int) -> np.ndarray:
    """Smooth random texture in [-1, 1]: coarse noise upsampled by nearest-neighbour and box-blurred."""
    coarse = rng.uniform(-1, 1, tuple(max(2, s // factor) for s in shape))
    reps = [int(np.ceil(s / c)) for s, c in zip(shape, coarse.shape, strict=True)]
    fine = np.repeat(np.repeat(np.repeat(coarse, reps[0], 0), reps[1], 1), reps[2], 2)
    fine = fine[: shape[0], : shape[1], : shape[2]]
    for axis in (1, 2):
        fine = (np.roll(fine, 1, axis) + fine + np.roll(fine, -1, axis)) / 3
    return fine
