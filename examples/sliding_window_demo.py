"""Sliding-window inference demo: a whole volume, the paper's 64x64x16 patch, Gaussian blending, mirroring.

The predictor here is a fixed, clearly artificial stand-in, not a trained network: 3D smoothing of the
z-scored image followed by a sigmoid, i.e. "probability of bright tissue". What the demo shows is the
inference engine: window placement, batched prediction with a progress bar, float32 overlap-weighted
stitching in C++, test-time flips, the result against MONAI's sliding_window_inference, and a picture.
A trained network segments through the same engine with `prostate-kernels predict` (README).

    python examples/sliding_window_demo.py                          # synthetic volume, no data needed
    python examples/sliding_window_demo.py --volume CASE.nii.gz --out DIR   # any SimpleITK-readable file

Writes DIR/sliding_window_demo.png (default DIR: sliding_window_demo_out), never over an existing file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prostate_kernels
from prostate_kernels import sliding_window_inference
from prostate_kernels.data import DataError, check_image, read_volume
from prostate_kernels.plots import save_figure
from prostate_kernels.safe_files import output_directory, refuse_existing

ROI = (16, 64, 64)  # (D, H, W): the paper's 64x64x16 patch


def synthetic_volume(shape=(40, 256, 256), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """A T2-like toy: dim pelvis, a bright lobed ellipsoid 'gland', smooth bias field, noise."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = shape
    z, y, x = torch.meshgrid(
        torch.linspace(-1, 1, d), torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij"
    )
    body = ((y / 0.9) ** 2 + (x / 0.95) ** 2 < 1).float()
    gland = (
        (z / 0.45) ** 2 + ((y + 0.1) / 0.22) ** 2 + (x / 0.28) ** 2 + 0.05 * torch.sin(6 * x) < 1
    ).float()
    bias = 1 + 0.3 * x + 0.2 * y
    image = (0.4 * body + 0.8 * gland) * bias + 0.08 * torch.randn(shape, generator=g)
    return image, gland


def stand_in_predictor(windows: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) z-scored windows -> (B, 1, D, H, W) 'probabilities': blur + sigmoid. Not a model."""
    kernel = torch.ones((1, 1, 3, 5, 5), dtype=windows.dtype) / 75
    smooth = F.conv3d(windows, kernel, padding=(1, 2, 2))
    return torch.sigmoid(4 * (smooth - 1.5))


def save_picture(image: torch.Tensor, prob: torch.Tensor, truth: torch.Tensor | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = image.shape[0] // 2
    panels = [("input (middle slice)", image[z], "gray"), ("blended probability", prob[z], "magma")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (title, data, cmap) in zip(axes[:2], panels, strict=True):
        ax.imshow(data.numpy(), cmap=cmap)
        ax.set_title(title)
    axes[2].imshow(image[z].numpy(), cmap="gray")
    axes[2].contour((prob[z] > 0.5).numpy(), levels=[0.5], colors="yellow", linewidths=1)
    if truth is not None:
        axes[2].contour(truth[z].numpy(), levels=[0.5], colors="cyan", linewidths=1)
    axes[2].set_title("mask > 0.5 (yellow)" + (", phantom truth (cyan)" if truth is not None else ""))
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--volume", type=Path, help="an image file (.nii.gz, .mhd, ...); default: synthetic")
    parser.add_argument("--out", type=Path, default=Path("sliding_window_demo_out"))
    args = parser.parse_args()
    picture = args.out / "sliding_window_demo.png"
    try:
        refuse_existing([picture], "this demo never replaces a file: choose another --out")
        if args.volume is not None:
            volume = read_volume(args.volume)  # a 3-D scalar image, else a DataError naming the file
            check_image(volume)
            image, truth = torch.from_numpy(volume.array.astype("float32")), None
        else:
            image, truth = synthetic_volume()
        output_directory(args.out, "--out")
    except DataError as exc:
        parser.exit(2, f"error: {exc}\n")  # one line, the CLI's status for a user error
    x = ((image - image.mean()) / image.std())[None, None]  # z-score (the paper's normalisation)
    print(f"volume {tuple(image.shape)} (D, H, W), roi {ROI}, C++ extension: {prostate_kernels.HAS_EXT}")

    start = time.perf_counter()
    prob = sliding_window_inference(
        x, ROI, 8, stand_in_predictor, overlap=0.5, mode="gaussian", progress=True, flip_axes=(2,)
    )
    print(f"sliding-window inference with W-mirroring: {time.perf_counter() - start:.2f} s")

    try:
        from monai.inferers import sliding_window_inference as monai_swi

        ours = sliding_window_inference(x, ROI, 8, stand_in_predictor, overlap=0.5, mode="gaussian")
        theirs = monai_swi(x, ROI, 8, stand_in_predictor, overlap=0.5, mode="gaussian")
        print(f"max |ours - MONAI| without mirroring: {(ours - theirs).abs().max().item():.2e}")
    except ImportError:
        print("MONAI not installed: skipping the comparison")

    mask = prob[0, 0] > 0.5
    if truth is not None:
        dice = 2 * (mask & (truth > 0)).sum() / (mask.sum() + (truth > 0).sum())
        print(f"Dice of the thresholded stand-in against the phantom gland: {dice.item():.3f}")
    save_picture(image, prob[0, 0], truth, picture)
    print(f"picture: {picture}")


if __name__ == "__main__":
    main()
