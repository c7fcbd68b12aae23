"""Pictures: the training curve (like the paper's figures 4-8) and per-case overlays (figure 9)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from prostate_kernels.safe_files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Training loss per logged iteration and validation Dice, from metrics.csv."""
    plt = _pyplot()
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 4))
    it = [int(r["iteration"]) for r in rows]
    ax.plot(it, [float(r["loss"]) for r in rows], label="training loss", color="tab:blue")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    dice = [(int(r["iteration"]), float(r["val_dice"])) for r in rows if r.get("val_dice") not in (None, "")]
    if dice:
        twin = ax.twinx()
        twin.plot(*zip(*dice, strict=True), marker="o", color="tab:orange", label="validation Dice")
        twin.set_ylabel("validation Dice")
        twin.set_ylim(0, 1)
        twin.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("Training")
    fig.tight_layout()
    save_figure(fig, out_png, dpi=110)
    return Path(out_png)


def plot_overlay(
    image: np.ndarray,
    prediction: np.ndarray,
    reference: np.ndarray | None,
    out_png,
    title: str = "",
    replace: bool = True,
) -> Path:
    """Centre slice of the gland: image, reference (green), prediction (red), side by side. replace=False:
    DataError where `out_png` exists when it is placed (safe_files.place)."""
    plt = _pyplot()
    mask = reference if reference is not None else prediction
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    z = int(slices[len(slices) // 2]) if len(slices) else image.shape[0] // 2
    panels = [("image", None), ("reference", reference), ("prediction", prediction)]
    panels = [p for p in panels if p[0] != "reference" or reference is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (name, seg) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(image[z], cmap="gray")
        if seg is not None:
            color = "lime" if name == "reference" else "red"
            ax.contour(seg[z], levels=[0.5], colors=color, linewidths=1.2)
        ax.set_title(f"{name} (slice {z})")
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out_png, dpi=100, replace=replace)
    return Path(out_png)


def save_figure(fig, out_png: str | Path, dpi: int, replace: bool = True) -> None:
    """`fig` as a PNG written whole or not at all (an earlier picture is never left half replaced), then
    closed. replace=False: atomic_write's."""
    try:
        with atomic_write(out_png, "wb", replace=replace) as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        _pyplot().close(fig)
