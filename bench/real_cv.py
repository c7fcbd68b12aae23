"""5-fold cross-validation on the 50 real prostate cases, trained on a GPU (issue 15, section 1).

The GPU machine has no SimpleITK and no ../shared, so the work is split in three steps:

    python bench/real_cv.py pack --out .gpu_data/real_cv.npz        # here: read + resample every case
    python3 bench/real_cv.py run --pack .gpu_data/real_cv.npz --out $OUT --budget-s 300   # on the GPU
    python bench/real_cv.py score --pack .gpu_data/real_cv.npz --predictions DIR   # here: PROMISE12

pack: every case of ../shared/data/real/mrus-prostate read by the library (read_volume, read_mask) and
resampled to the training spacing (images linearly, masks by nearest neighbour, as `train --spacing`),
into one npz (a temporary transfer file in a git-ignored folder; never committed).
run: per model, the 5 folds train at once (5 processes sharing the GPU), each by the library's own
`train` on its 40 training cases (fold k holds the cases 10k..10k+9 by name: consecutive observations may
share a patient, so they stay on one side), then predicts its 10 held-out cases with sliding windows and
test-time mirroring; the iterations per model are set from a training step timed first, so that the
folds fit the time budget. Writes real_cv-<model>.npz (float16 probabilities on the training grid) and
real_cv.json (settings, timings).
score: probabilities resampled back onto each case's own 1.5 mm grid exactly as `predict` does, 0.5
threshold, largest connected component, PROMISE12 measures against the manual mask ->
bench/results/<date>-real-cv-<device>.md/.csv and README's "Accuracy on real MRI" cross-validation table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "real" / "mrus-prostate"
FOLDS, N_CASES = 5, 50
SPACING = (3.0, 3.0, 3.0)  # (Z, Y, X) mm: make real's, chosen by its held-out runs
MODELS = {  # model -> (patch, batch, most iterations, share of the budget): make real's recipe for both
    "unet3d": ((32, 32, 32), 4, 2500, 0.3),
    "tiramisu3d_p3a": ((32, 32, 32), 4, 2500, 0.7),  # the slower step: the larger share
}
# Builds of the same network (same state_dict, same function) timed before training; the faster trains.
VARIANTS = {"tiramisu3d_p3a": {"memory-efficient": {}, "plain": {"memory_efficient": False}}}
README_START, README_END = "<!-- real-cv:results -->", "<!-- /real-cv:results -->"


def fold_of(index: int) -> int:
    """The fold of the index-th case by name: 10 consecutive cases per fold."""
    return index // (N_CASES // FOLDS)


def labelled_cases(data: Path) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) of the dataset's cases, by name (discover_cases refuses a case without a mask)."""
    from prostate_kernels.data import discover_cases

    cases = sorted(discover_cases(data, require_labels=True), key=lambda c: c.name)
    return [(c.name, c.image, c.label) for c in cases if c.label is not None]


# ------------------------------------------------------------------------------------------- pack


def pack(data: Path, out: Path) -> None:
    from prostate_kernels.data import read_mask, read_volume
    from prostate_kernels.data.resample import resample_case
    from prostate_kernels.safe_files import refuse_existing

    refuse_existing([out], "pack writes a new file: remove it or choose another --out")
    cases = labelled_cases(data)
    if len(cases) != N_CASES:
        raise SystemExit(f"real_cv: expected {N_CASES} cases in {data}, found {len(cases)}")
    arrays: dict[str, Any] = {"names": np.array([name for name, _, _ in cases]), "spacing": np.array(SPACING)}
    for i, (_, image_path, mask_path) in enumerate(cases):
        image = read_volume(image_path)
        mask = read_mask(mask_path, image)
        image, mask = resample_case(image, mask, SPACING)  # as train --spacing does
        arrays[f"image{i}"] = image.array.astype(np.float32)
        arrays[f"mask{i}"] = mask.array.astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"packed {len(cases)} cases at {SPACING} mm into {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def load_pack(path: Path) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    with np.load(path) as z:
        names = [str(n) for n in z["names"]]
        return names, [z[f"image{i}"] for i in range(len(names))], [z[f"mask{i}"] for i in range(len(names))]


# -------------------------------------------------------------------------------------------- run


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a dry run of the steps


def step_seconds(model_name: str, patch, batch: int, model_kwargs: dict, steps: int = 15) -> float:
    """Seconds per training step (bf16 autocast, random data) after warm-up: autotuning and compilation
    happen here, once, and fill Triton's cache for the fold processes."""
    import torch
    from prostate_kernels.models import build_model

    device = device_name()
    model = build_model(model_name, **model_kwargs).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn((batch, 1, *patch), device=device)
    y = (torch.rand((batch, 1, *patch), device=device) > 0.5).float()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.time()
    for _ in range(steps):
        step()
    sync()
    return (time.time() - start) / steps


def run(pack_path: Path, out: Path, models: list[str], budget_s: float, max_iters: int | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="real_cv_"))
    report: dict[str, Any] = {"spacing_mm": SPACING, "folds": FOLDS, "models": {}}
    t0 = time.time()
    for i, model in enumerate(models):
        patch, batch, most, weight = MODELS[model]
        timed = {
            variant: step_seconds(model, patch, batch, kwargs)
            for variant, kwargs in VARIANTS.get(model, {"default": {}}).items()
        }
        variant = min(timed, key=lambda v: timed[v])
        seconds = timed[variant]
        left = budget_s - (time.time() - t0)
        share = left * weight / sum(MODELS[m][3] for m in models[i:])
        # the folds share one GPU: budget as if their steps ran one after another, 15% for prediction
        iters = max(50, min(most, int(0.85 * share / (FOLDS * seconds))))
        iters = min(iters, max_iters or iters)
        steps = ", ".join(f"{v} {t * 1e3:.0f} ms" for v, t in timed.items())
        print(f"{model}: step alone {steps} -> {variant}, {iters} iterations per fold", flush=True)
        start = time.time()
        kwargs = json.dumps(VARIANTS.get(model, {}).get(variant, {}))
        command = [sys.executable, __file__, "fold", "--pack", str(pack_path), "--model", model,
                   "--iters", str(iters), "--out", str(work), "--model-kwargs", kwargs]  # fmt: skip
        threads = {**os.environ, "OMP_NUM_THREADS": "3"}
        procs = [subprocess.Popen([*command, "--fold", str(k)], env=threads) for k in range(FOLDS)]
        codes = [p.wait() for p in procs]
        folds = [
            json.loads((work / f"{model}-fold{k}.json").read_text()) for k in range(FOLDS) if codes[k] == 0
        ]
        merged: dict[str, Any] = {}
        for k in range(FOLDS):
            if codes[k] == 0:
                with np.load(work / f"{model}-fold{k}.npz") as z:
                    merged.update({name: z[name] for name in z.files})
        np.savez_compressed(out / f"real_cv-{model}.npz", **merged)
        report["models"][model] = {
            "patch": patch, "batch": batch, "iterations": iters, "variant": variant,
            "step_ms_alone": {v: round(t * 1e3, 1) for v, t in timed.items()},
            "wall_s_5_folds": round(time.time() - start, 1), "exit_codes": codes, "folds": folds,
        }  # fmt: skip
        (out / "real_cv.json").write_text(json.dumps(report, indent=1))
        print(f"{model}: 5 folds in {time.time() - start:.0f} s, exit codes {codes}", flush=True)


def fold(pack_path: Path, model_name: str, k: int, iters: int, work: Path, model_kwargs: dict) -> None:
    """Trains fold k with the library's `train` and predicts its held-out cases."""
    import torch

    from prostate_kernels.data.sampling import zscore
    from prostate_kernels.predict import predict_probabilities
    from prostate_kernels.train import TrainConfig, train
    from prostate_kernels.trained_model import load_trained_model

    torch.set_num_threads(3)
    names, images, masks = load_pack(pack_path)
    cases = list(zip(names, images, masks, strict=True))
    training = [case for i, case in enumerate(cases) if fold_of(i) != k]
    held = [(name, image) for i, (name, image, _) in enumerate(cases) if fold_of(i) == k]
    patch, batch = MODELS[model_name][:2]
    # orientation None: pack keeps each file's own axes, and score resamples back onto them
    config = TrainConfig(data=pack_path, out=work / f"{model_name}-fold{k}", model=model_name, patch=patch,
                         batch=batch, iters=iters, val_cases=0, val_every=max(1, iters // 5), progress=False,
                         seed=k, model_kwargs=model_kwargs, orientation=None)  # fmt: skip
    start = time.time()
    checkpoint = train(config, log=lambda *a: None, arrays=training)
    train_s = time.time() - start
    device = torch.device(device_name())
    model, state = load_trained_model(checkpoint, device)
    probs: dict[str, Any] = {}  # name -> float16 probabilities
    for name, image in held:
        prob = predict_probabilities(model, zscore(image), patch, device=device, tta=True,
                                     amp_dtype=torch.bfloat16 if device.type == "cuda" else None)  # fmt: skip
        probs[name] = prob.astype(np.float16)
    np.savez_compressed(work / f"{model_name}-fold{k}.npz", **probs)
    with open(work / f"{model_name}-fold{k}" / "metrics.csv") as f:
        last_loss = f.read().strip().splitlines()[-1].split(",")[1]
    summary = {"fold": k, "train_s": round(train_s, 1), "predict_s": round(time.time() - start - train_s, 1),
               "held_out": [n for n, _ in held], "last_logged_loss": last_loss}  # fmt: skip
    (work / f"{model_name}-fold{k}.json").write_text(json.dumps(summary))


# ------------------------------------------------------------------------------------------ score


def score(data: Path, predictions: Path, results: Path, readme: bool) -> Path:
    """PROMISE12 measures of each model's cross-validated predictions on the cases' own grids."""
    import statistics

    from common import environment, markdown_table, slug

    from prostate_kernels.data import read_mask, read_volume
    from prostate_kernels.data.resample import resample_onto, resample_to_spacing
    from prostate_kernels.metrics import promise12_measures
    from prostate_kernels.predict import largest_component

    report = json.loads((predictions / "real_cv.json").read_text())
    cases = labelled_cases(data)
    columns = ("dice", "hd95_mm", "abd_mm", "rvd_percent", "abs_rvd_percent", "apex_dice", "base_dice")
    rows, summary = [], []
    for model, info in report["models"].items():
        with np.load(predictions / f"real_cv-{model}.npz") as z:
            probs = {name: z[name].astype(np.float32) for name in z.files}
        model_rows = []
        for i, (case_name, image_path, mask_path) in enumerate(cases):
            image = read_volume(image_path)
            reference = read_mask(mask_path, image)
            if case_name in probs:
                grid = resample_to_spacing(image, tuple(report["spacing_mm"]))
                prob = resample_onto(grid.like(probs[case_name]), image)
                predicted = largest_component((prob > 0.5).astype(np.uint8)).astype(bool)
                status = "ok" if predicted.any() else "empty"
            else:  # a fold that failed: its cases are scored as empty predictions, never dropped
                predicted, status = np.zeros(reference.array.shape, bool), "missing"
            m = promise12_measures(predicted, reference.array, reference.spacing_zyx, reference.direction)
            model_rows.append({"model": model, "fold": fold_of(i), "case": case_name, "status": status,
                               **{c: f"{m[c]:.3f}" for c in columns}})  # fmt: skip
        rows += model_rows
        for name, reduce in (("mean", statistics.mean), ("median", statistics.median), ("min", min),
                             ("max", max)):  # fmt: skip
            values = {c: f"{reduce(float(r[c]) for r in model_rows):.3f}" for c in columns}
            summary.append({"model": model, "": name, **values})
        fold_dice = [
            statistics.mean(float(r["dice"]) for r in model_rows if r["fold"] == k) for k in range(FOLDS)
        ]
        info["fold_mean_dice"] = ", ".join(f"{d:.3f}" for d in fold_dice)
        info["failed_cases"] = sum(r["status"] != "ok" for r in model_rows)
    env = environment()
    stem = f"{env['date'][:10]}-real-cv-{slug(report.get('device', 'gpu'))[:40]}"
    results.mkdir(parents=True, exist_ok=True)
    with (results / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    settings = [{"model": m, "build": i["variant"], "patch": "x".join(map(str, i["patch"])),
                 "batch": i["batch"], "iterations per fold": i["iterations"],
                 "step ms (alone)": ", ".join(f"{v} {t}" for v, t in i["step_ms_alone"].items()),
                 "5 folds wall s": i["wall_s_5_folds"], "fold mean Dice": i["fold_mean_dice"],
                 "failed cases": i["failed_cases"]} for m, i in report["models"].items()]  # fmt: skip
    lines = ["# 5-fold cross-validation on real prostate MRI (50 cases)", "",
             f"- trained and predicted on: {report.get('device', '?')} ({report.get('versions', '')})",
             f"- scored on: {env['device']} (`python bench/real_cv.py score`), {env['date']}",
             f"- git sha: {report.get('git_sha', '?')}",
             f"- spacing {tuple(report['spacing_mm'])} mm, bce+dice, flips + rotation/scaling/intensity "
             "augmentation, the paper's learning rate and decay, bf16 autocast; prediction: sliding windows "
             "(overlap 0.5, gaussian), test-time mirroring, 0.5 threshold, largest component, resampled back "
             "onto each case's own 1.5 mm grid; PROMISE12 measures against the manual masks",
             "- folds: 10 consecutive cases by name each (fold k = cases 10k..10k+9); the 5 folds of a model "
             "trained at once on one GPU; iterations set from a timed step to fit the device budget", "",
             "## Settings and timings", "", markdown_table(list(settings[0]), settings), "",
             "## All 50 held-out predictions per model", "", markdown_table(list(summary[0]), summary), "",
             "## Per case", "", markdown_table(list(rows[0]), rows), ""]  # fmt: skip
    md = results / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    if readme:
        text = (ROOT / "README.md").read_text()
        if README_START in text:
            body = "\n".join(lines[: lines.index("## Per case")]).replace("# 5-fold", "#### 5-fold")
            body = body.replace("\n## ", "\n##### ")
            block = f"{README_START}\nFrom `bench/results/{md.name}`:\n\n{body}\n{README_END}"
            head, rest = text.split(README_START, 1)
            (ROOT / "README.md").write_text(head + block + rest.split(README_END, 1)[1])
    print(md)
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--pack", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--models", default=",".join(MODELS))
    r.add_argument("--budget-s", type=float, default=300.0)
    r.add_argument("--git-sha", default="")
    r.add_argument("--max-iters", type=int, default=None, help="cap on the iterations (a dry run)")
    f = sub.add_parser("fold")
    f.add_argument("--pack", type=Path, required=True)
    f.add_argument("--model", required=True, choices=sorted(MODELS))
    f.add_argument("--fold", type=int, required=True)
    f.add_argument("--iters", type=int, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--model-kwargs", type=json.loads, default={})
    s = sub.add_parser("score")
    s.add_argument("--data", type=Path, default=DATA)
    s.add_argument("--predictions", type=Path, required=True)
    s.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    s.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.data, args.out)
    elif args.command == "run":
        import torch

        if not torch.cuda.is_available():
            print("real_cv run: no CUDA device, running on the CPU (a dry run)")
        run(
            args.pack,
            args.out,
            [m.strip() for m in args.models.split(",") if m.strip()],
            args.budget_s,
            args.max_iters,
        )
        report = json.loads((args.out / "real_cv.json").read_text())
        import triton

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
        report.update({"device": device, "git_sha": args.git_sha,
                       "versions": f"torch {torch.__version__}, triton {triton.__version__}"})  # fmt: skip
        (args.out / "real_cv.json").write_text(json.dumps(report, indent=1))
    elif args.command == "fold":
        fold(args.pack, args.model, args.fold, args.iters, args.out, args.model_kwargs)
    else:
        score(args.data, args.predictions, args.results, not args.no_readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
