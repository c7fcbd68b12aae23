"""The end-to-end steps behind the CLI: predicting files, evaluating them, and the demo.

Each step works case by case: a bad case is recorded (returned as a message) and the others go on.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from prostate_kernels.checkpoint import load_checkpoint, load_model_weights
from prostate_kernels.data import (
    DataError,
    check_image,
    check_same_grid,
    read_mask,
    read_volume,
    write_volume,
)
from prostate_kernels.data.cases import IMAGE_SUFFIXES, discover_cases, stem, suffix
from prostate_kernels.data.sampling import zscore
from prostate_kernels.metrics import promise12_measures
from prostate_kernels.models import build_model
from prostate_kernels.predict import largest_component, predict_probabilities

SUMMARY_COLUMNS = ("dice", "hd95_mm", "abd_mm", "rvd_percent", "apex_dice", "base_dice")


# --------------------------------------------------------------------------------------- predict


def list_images(path: Path) -> list[Path]:
    """An image file itself, or a directory's images (a dataset's cases, else every non-mask image)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(path, "no such file or directory")
    try:
        return [case.image for case in discover_cases(path)]
    except DataError:
        images = [p for p in sorted(path.iterdir()) if _is_image(p) and "_segmentation" not in p.name]
        if not images:
            raise DataError(path, f"no images ({', '.join(IMAGE_SUFFIXES)}) found") from None
        return images


def _is_image(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES)


def load_trained_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    state = load_checkpoint(checkpoint, map_location=device)
    for key in ("model", "state_dict", "patch"):
        if key not in state:
            raise DataError(checkpoint, f"checkpoint lacks {key!r}")
    try:
        model = build_model(state["model"], **state.get("model_kwargs", {}))
    except (ValueError, TypeError) as exc:
        raise DataError(checkpoint, f"cannot build its model ({exc})") from None
    load_model_weights(model, state["state_dict"], checkpoint, state["model"])
    return model.to(device).eval(), state


def predict_files(
    checkpoint: Path,
    inputs: Path,
    output: Path,
    overlap: float = 0.5,
    mode: str = "gaussian",
    tta: bool = False,
    save_probabilities: bool = False,
    largest: bool = False,
    device: str | None = None,
) -> list[str]:
    """Writes <name>_segmentation (and <name>_probabilities) with each input's geometry; returns failures."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, state = load_trained_model(checkpoint, dev)
    patch, slices = tuple(state["patch"]), int(state.get("slices", 0))
    amp = torch.bfloat16 if dev.type == "cuda" else None
    failures = []
    for path in list_images(inputs):
        try:
            start = time.time()
            image = read_volume(path)
            check_image(image)
            prob = predict_probabilities(model, zscore(image.array), patch, slices, dev, overlap, mode, tta,
                                         amp_dtype=amp)  # fmt: skip
            mask = (prob > 0.5).astype(np.uint8)
            if largest:
                mask = largest_component(mask)
            name, ext = stem(path), suffix(path)
            write_volume(image.like(mask), Path(output) / f"{name}_segmentation{ext}")
            if save_probabilities:
                write_volume(image.like(prob.astype(np.float32)), Path(output) / f"{name}_probabilities{ext}")
            print(f"{path.name}: {int(mask.sum())} voxels segmented in {time.time() - start:.1f} s")
        except DataError as exc:
            failures.append(str(exc))
    return failures


# -------------------------------------------------------------------------------------- evaluate


def _pairs(pred: Path, ref: Path) -> list[tuple[Path, Path]]:
    if pred.is_file() and ref.is_file():
        return [(pred, ref)]
    if not pred.is_dir():
        raise DataError(pred, "no such file or directory" if not pred.exists() else "expected a directory")
    if not ref.is_dir():
        raise DataError(ref, "no such file or directory" if not ref.exists() else "expected a directory")
    preds = [p for p in sorted(pred.iterdir()) if _is_image(p) and "_probabilities" not in p.name]
    if not preds:
        raise DataError(pred, "no prediction masks found")
    return [(p, ref / p.name) for p in preds]


def _image_for(mask_path: Path, *folders: Path | None) -> Path | None:
    """The image a mask belongs to: <name><ext> for <name>_segmentation<ext>, in the given folders."""
    name = stem(mask_path).removesuffix("_segmentation")
    for folder in folders:
        if folder is None:
            continue
        for ext in (suffix(mask_path), *IMAGE_SUFFIXES):
            candidate = Path(folder) / f"{name}{ext}"
            if candidate.is_file():
                return candidate
    return None


def evaluate_files(pred: Path, ref: Path, label: int | None = None, images: Path | None = None,
                   out: Path | None = None) -> list[str]:  # fmt: skip
    """PROMISE12 measures per case: a table on screen, evaluation.csv and overlays in `out`."""
    from prostate_kernels.plots import plot_overlay

    pred, ref = Path(pred), Path(ref)
    out = Path(out) if out is not None else (pred if pred.is_dir() else pred.parent)
    out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    for pred_path, ref_path in _pairs(pred, ref):
        try:
            reference = read_mask(ref_path, None, label)
            prediction = read_volume(pred_path)
            check_same_grid(reference, prediction)
            measures = promise12_measures(prediction.array != 0, reference.array, reference.spacing_zyx)
            rows.append({"case": stem(pred_path).removesuffix("_segmentation"), **measures})
            image_path = _image_for(pred_path, images, ref if ref.is_dir() else ref.parent)
            if image_path is not None:
                image = read_volume(image_path)
                case = rows[-1]["case"]
                plot_overlay(image.array, prediction.array != 0, reference.array, out / f"{case}_overlay.png",
                             title=f"{rows[-1]['case']}: Dice {measures['dice']:.3f}")  # fmt: skip
        except DataError as exc:
            failures.append(str(exc))
    if rows:
        _write_csv(rows, out / "evaluation.csv")
        print(summary_table(rows))
        print(f"\nper-case measures: {out / 'evaluation.csv'}")
    return failures


def _write_csv(rows: list[dict], path: Path) -> None:
    columns = list(rows[0])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def summary_table(rows: list[dict]) -> str:
    """Plain-text table of the main measures per case and their mean."""
    header = f"{'case':<16}" + "".join(f"{c:>13}" for c in SUMMARY_COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['case']:<16}" + "".join(f"{row[c]:>13.3f}" for c in SUMMARY_COLUMNS))
    means = [np.nanmean([row[c] for row in rows]) if any(not math.isnan(row[c]) for row in rows) else math.nan
             for c in SUMMARY_COLUMNS]  # fmt: skip
    lines.append("-" * len(header))
    lines.append(f"{'mean':<16}" + "".join(f"{m:>13.3f}" for m in means))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ demo


DEMO_ITERS = {"tiramisu3d_tiny": 480}  # ~4 min on 2 CPU cores


def run_demo(out: Path, model: str = "tiramisu3d_tiny", iters: int | None = None) -> list[str]:
    """Phantoms -> training -> prediction of held-out phantoms -> PROMISE12 evaluation, all in `out`."""
    from prostate_kernels.data.phantoms import write_phantoms
    from prostate_kernels.plots import plot_training_curve
    from prostate_kernels.train import TrainConfig, train

    out = Path(out)
    start = time.time()
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    write_phantoms(train_dir, n=10, seed=1)
    write_phantoms(test_dir, n=3, seed=2)
    print(f"[demo] phantoms: 10 for training (2 of them for validation), 3 held out -> {out / 'data'}")
    iters = iters or DEMO_ITERS.get(model, 1000)
    config = TrainConfig(data=train_dir, out=out / "run", model=model, iters=iters, loss="bce+dice",
                         val_every=max(1, iters // 6))  # fmt: skip
    checkpoint = train(config)
    best = out / "run" / "best.pt"
    checkpoint = best if best.exists() else checkpoint
    plot_training_curve(out / "run" / "metrics.csv", out / "training_curve.png")
    print(f"[demo] trained {model} for {iters} iterations; using {checkpoint.name}")
    failures = predict_files(checkpoint, test_dir, out / "predictions", largest=True)
    failures += evaluate_files(out / "predictions", test_dir, None, None, out)
    print(
        f"[demo] done in {time.time() - start:.0f} s: overlays, training_curve.png, evaluation.csv in {out}"
    )
    return failures
