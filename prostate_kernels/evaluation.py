"""`evaluate`: PROMISE12 measures of predicted masks against references, per case, with a summary table,
evaluation.csv and overlay pictures.

Every reference is scored: a missing, unreadable, empty or non-binary prediction counts as a failure
(Dice 0, the worst distances), never dropped from a mean.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prostate_kernels.data import DataError, Volume, check_binary, check_same_grid, read_mask, read_volume
from prostate_kernels.data.cases import IMAGE_SUFFIXES, discover_cases, is_image_file, stem, suffix
from prostate_kernels.data.orientation import DEFAULT_ORIENTATION, reoriented
from prostate_kernels.metrics import promise12_measures
from prostate_kernels.prediction_record import PredictionRecord
from prostate_kernels.safe_files import (
    atomic_write,
    output_directory,
    refuse_existing,
    remove_dead_temporaries,
)

SUMMARY_COLUMNS = ("dice", "hd95_mm", "abd_mm", "rvd_percent", "abs_rvd_percent", "apex_dice", "base_dice")


def _reference_cases(ref: Path) -> list[tuple[str, Path]]:
    """(case name, reference mask) pairs: a dataset's labelled cases, else every image in `ref`."""
    if not ref.is_dir():
        raise DataError(ref, "no such file or directory" if not ref.exists() else "expected a directory")
    try:
        cases = [(case.name, case.label) for case in discover_cases(ref) if case.label is not None]
    except DataError:
        cases = []
    if not cases:
        cases = [
            (stem(p).removesuffix("_segmentation"), p) for p in sorted(ref.iterdir()) if is_image_file(p)
        ]
    if not cases:
        raise DataError(ref, "no reference masks found")
    return cases


def _prediction_for(name: str, reference: Path, pred: Path) -> Path | None:
    """<name>_segmentation<ext> in `pred` (any image suffix), else a file named like the reference."""
    for ext in (suffix(reference), *IMAGE_SUFFIXES):
        candidate = pred / f"{name}_segmentation{ext}"
        if candidate.is_file():
            return candidate
    same_name = pred / reference.name
    return same_name if same_name.is_file() else None


def _pairs(pred: Path, ref: Path) -> list[tuple[str, Path, Path | None]]:
    """(case, reference, prediction or None when missing) for every reference; DataError when a prediction
    is its reference's own file (--pred and --ref the same directory)."""
    pairs: list[tuple[str, Path, Path | None]]
    if pred.is_file() and ref.is_file():
        pairs = [(stem(pred).removesuffix("_segmentation"), ref, pred)]
    elif not pred.is_dir():
        raise DataError(pred, "no such file or directory" if not pred.exists() else "expected a directory")
    else:
        pairs = [
            (name, reference, _prediction_for(name, reference, pred))
            for name, reference in _reference_cases(ref)
        ]
    itself = [case for case, reference, prediction in pairs
              if prediction is not None and prediction.resolve() == reference.resolve()]  # fmt: skip
    if itself:
        more = f" and {len(itself) - 3} more" if len(itself) > 3 else ""
        raise DataError(pred, f"--pred and --ref name the same files ({', '.join(itself[:3])}{more}): "
                              "each reference would be scored against itself")  # fmt: skip
    return pairs


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


def evaluate_files(
    pred: Path,
    ref: Path,
    label: int | Sequence[int] | None = None,
    images: Path | None = None,
    out: Path | None = None,
    overwrite: bool = False,
) -> tuple[list[str], list[str]]:
    """PROMISE12 measures per reference case: a table on screen, evaluation.csv and overlays in `out`.

    Every reference is scored: a missing or unusable prediction as an empty one (Dice 0, the worst
    distances), so the means never leave a case out. Returns (failure messages, missing case names).
    Never writes over an existing file unless `overwrite` (the files of an earlier evaluation); checked
    before any case is scored.
    """
    pred, ref = Path(pred), Path(ref)
    if images is not None and not Path(images).is_dir():
        raise DataError(images, "--images: no such directory")
    out = Path(out) if out is not None else (pred if pred.is_dir() else pred.parent)
    rows, failures, missing = [], [], []
    pairs = _pairs(pred, ref)
    beside = ref if ref.is_dir() else ref.parent
    decathlon = beside / "imagesTr" if beside.name != "labelsTr" else beside.parent / "imagesTr"
    image_folders = (images, beside, decathlon)  # a Decathlon dataset's images are in imagesTr/
    image_of = {case: _image_for(p, *image_folders) for case, _, p in pairs if p is not None}  # for overlays
    _check_evaluation_targets(image_of, out, overwrite)
    if out.is_dir():
        remove_dead_temporaries(out)
    mixed = _mixed_settings([p for _, _, p in pairs if p is not None])
    if mixed:
        print(mixed)
    for case, ref_path, pred_path in pairs:
        try:
            reference = read_mask(ref_path, None, label)
        except DataError as exc:
            failures.append(str(exc))
            continue
        prediction, status = None, "missing"
        if pred_path is not None:
            try:
                prediction = read_volume(pred_path)
                check_same_grid(reference, prediction, of="reference")
                check_binary(prediction)
                status = "ok"
            except DataError as exc:
                failures.append(str(exc))
                prediction, status = None, "unusable"
        else:
            missing.append(case)
        predicted = prediction.array != 0 if prediction is not None else np.zeros(reference.array.shape, bool)
        if status == "ok" and not predicted.any():
            status = "empty"
        measures = promise12_measures(predicted, reference.array, reference.spacing_zyx, reference.direction)
        rows.append({"case": case, "status": status, **measures})
        if prediction is not None:
            _overlay(case, predicted, reference, image_of[case], out, measures["dice"], failures, overwrite)
    if pred.is_dir() and rows:
        scored = {prediction.resolve() for _, _, prediction in pairs if prediction is not None}
        extra = [p.name for p in sorted(pred.iterdir())
                 if is_image_file(p) and "_segmentation" in p.name and p.resolve() not in scored]  # fmt: skip
        if extra:
            print(f"not scored (no reference): {', '.join(extra)}")
    if rows:
        output_directory(out, "--out")
        _write_csv(rows, out / "evaluation.csv", replace=overwrite)
        print(summary_table(rows))
        print(f"\nper-case measures: {out / 'evaluation.csv'}")
    return failures, missing


def _check_evaluation_targets(image_of: dict[str, Path | None], out: Path, overwrite: bool) -> None:
    """DataError before anything is scored or written: a file evaluate would write (evaluation.csv, the
    overlays of the cases whose image is found: image_of maps each predicted case to its image or None)
    exists already, unless `overwrite`. Neither name can be an input: a prediction, a reference and an
    image all carry an image suffix (IMAGE_SUFFIXES)."""
    targets = [out / "evaluation.csv"]
    targets += [_overlay_path(out, case) for case, image in image_of.items() if image is not None]
    if not overwrite:
        refuse_existing(targets, "evaluate never replaces existing files: choose another --out directory, "
                                 "or pass --overwrite to replace an earlier evaluation")  # fmt: skip


def _mixed_settings(predictions: list[Path]) -> str | None:
    """A warning when predict's record (prediction_record) in the predictions' directory says they were
    written by runs with different checkpoints or settings (--overwrite on some cases): their means are
    no one model's. None when they agree, or when no record says (files of another program)."""
    by_directory: dict[Path, list[str]] = {}
    for path in predictions:
        by_directory.setdefault(path.parent, []).append(path.name)
    for directory, names in by_directory.items():
        try:
            record = PredictionRecord(directory)
        except DataError:
            continue  # a damaged record says nothing; predict refuses it where it matters
        recorded = [name for name in names if record.digest_of(name) is not None]
        other = [name for name in recorded if record.digest_of(name) != record.digest_of(recorded[0])]
        if other:
            differ = "; ".join(record.differences(recorded[0], other[0]))
            return (f"warning: {len(other)} of the {len(recorded)} recorded predictions in {directory} were "
                    f"written with other checkpoints or settings than {recorded[0]} ({other[0]}: {differ}): "
                    "the means mix them")  # fmt: skip
    return None


def _overlay_path(out: Path, case: str) -> Path:
    return out / f"{case}_overlay.png"


def _overlay(
    case: str,
    predicted: np.ndarray,
    reference: Volume,
    image_path: Path | None,
    out: Path,
    dice: float,
    failures: list[str],
    replace: bool,
) -> None:
    """An overlay PNG when the case's image was found (image_path) and lies on the reference's grid;
    replace=False: not over a file that appeared since _check_evaluation_targets looked (a failure).
    Drawn in the default orientation (LPS): an axial slice seen from the feet, front at the top, the
    patient's left on the right, whatever axes the files store (a RAS file's slices were drawn upside
    down and mirrored, a sagittal series' sagittally)."""
    from prostate_kernels.plots import plot_overlay

    if image_path is None:
        return
    try:
        image = read_volume(image_path, channel=0)  # a multi-channel image's first (the Decathlon's T2)
        check_same_grid(reference, image, of="reference")
    except DataError as exc:
        failures.append(f"{exc} (no overlay for {case})")
        return
    output_directory(out, "--out")
    try:
        # image, prediction and reference on the reference's grid (checked), so all take the same axes
        axial_image, axial_prediction, axial_reference = (
            reoriented(reference.like(array), DEFAULT_ORIENTATION).array
            for array in (image.array, predicted, reference.array)
        )
        plot_overlay(axial_image, axial_prediction, axial_reference, _overlay_path(out, case),
                     title=f"{case}: Dice {dice:.3f}", replace=replace)  # fmt: skip
    except DataError as exc:
        failures.append(str(exc))


def _write_csv(rows: list[dict], path: Path, replace: bool) -> None:
    columns = list(rows[0])
    with atomic_write(path, "w", newline="", replace=replace) as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def summary_table(rows: list[dict]) -> str:
    """Plain-text table of the main measures per case, their mean and median over every case (NaN
    included: a NaN makes the mean NaN rather than leaving the case out), and the failed cases."""
    header = f"{'case':<16}{'status':>9}" + "".join(f"{c:>16}" for c in SUMMARY_COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        values = "".join(f"{row[c]:>16.3f}" for c in SUMMARY_COLUMNS)
        lines.append(f"{row['case']:<16}{row['status']:>9}" + values)
    lines.append("-" * len(header))
    for name, reduce in (("mean", np.mean), ("median", np.median)):
        values = "".join(f"{float(reduce([row[c] for row in rows])):>16.3f}" for c in SUMMARY_COLUMNS)
        lines.append(f"{name:<16}{'':>9}" + values)
    failed = [row["case"] for row in rows if row["status"] != "ok"]
    which = f" ({', '.join(failed)})" if failed else ""
    lines.append(f"{len(rows)} cases, {len(failed)} failed{which}: a missing, unusable or empty prediction "
                 "scores Dice 0 and the worst distance")  # fmt: skip
    return "\n".join(lines)
