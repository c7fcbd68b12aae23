"""Sliding-window inference demo: a whole volume, the paper's 64x64x16 patch, Gaussian blending, mirroring.

No trained network exists yet in this repository (the models and pipeline issues add them), so the
predictor here is a fixed, clearly artificial one: 3D smoothing of the z-scored image followed by a
sigmoid, i.e. "probability of bright tissue". What the demo shows is the inference engine: window
placement, batched prediction with a progress bar, float32 overlap-weighted stitching in C++, test-time
flips, the result against MONAI's sliding_window_inference, and a picture.

    python examples/sliding_window_demo.py --out demo_out                   # synthetic volume, no data needed
    python examples/sliding_window_demo.py --volume CASE.nii.gz --out demo_out   # any SimpleITK-readable file
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prostate_kernels
from prostate_kernels import sliding_window_inference

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


def read_volume(path: Path) -> torch.Tensor:
    import SimpleITK as sitk

    return torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype("float32"))


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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--volume", type=Path, help="an image file (.nii.gz, .mhd, ...); default: synthetic")
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.volume is not None:
        image, truth = read_volume(args.volume), None
    else:
        image, truth = synthetic_volume()
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
    picture = args.out / "sliding_window_demo.png"
    save_picture(image, prob[0, 0], truth, picture)
    print(f"picture: {picture}")


if __name__ == "__main__":
    main()
