"""`make real`: accuracy on real prostate MRI, trained and scored by the library's own pipeline.

Data: ../shared/data/real/mrus-prostate (50 T2-weighted cases with manual whole-gland masks, Decathlon
layout, 64x69x69 voxels at 1.5 mm; see ../shared/data/README.md). Fixed split by case number (some
patients may appear in several consecutive observations): the first 40 cases by name train, the last
10 are held out and never seen before scoring. Nothing is copied: the
two sets are folders of symbolic links in a temporary directory.

Steps: `train` with the CLI's defaults for real data (no validation split: the held-out cases are
for scoring only, so the last checkpoint is scored), `predict` the held-out images, `evaluate` them
against their masks (PROMISE12 measures). Writes bench/results/<date>-real-<device>.md/.csv (per-case
Dice, HD95, ABD, RVD, aRVD, apex/base Dice; settings; wall time), the training curve and a few overlay
PNGs beside them, and refreshes README.md's "Accuracy on real MRI" table.

    python bench/real_data.py [--iters N] [--model M] [--patch D H W] [--batch B] [--no-readme]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, markdown_table, slug  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "real" / "mrus-prostate"
N_TRAIN, N_HELD_OUT = 40, 10
OVERLAYS = 3  # overlay PNGs kept: the worst, the median and the best held-out case
COLUMNS = ("case", "status", "dice", "hd95_mm", "abd_mm", "rvd_percent", "abs_rvd_percent", "apex_dice",
           "base_dice")  # fmt: skip
README_START, README_END = "<!-- real:results -->", "<!-- /real:results -->"


def split(data: Path) -> tuple[list, list]:
    """(training cases, held-out cases) of the fixed split, by name."""
    from prostate_kernels.data import discover_cases

    cases = sorted(discover_cases(data, require_labels=True), key=lambda c: c.name)
    if len(cases) != N_TRAIN + N_HELD_OUT:
        raise SystemExit(f"real_data: expected {N_TRAIN + N_HELD_OUT} cases in {data}, found {len(cases)}")
    return cases[:N_TRAIN], cases[N_TRAIN:]


def link_dataset(cases: list, folder: Path) -> Path:
    """A Decathlon folder of symbolic links to the cases (no copy of the data)."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for case in cases:
        (folder / "imagesTr" / case.image.name).symlink_to(case.image.resolve())
        (folder / "labelsTr" / case.label.name).symlink_to(case.label.resolve())
    return folder


PREDICTIONS = {  # name -> (test-time mirroring, largest connected component); the last is the headline
    "plain": (False, False),
    "largest component": (False, True),
    "mirroring + largest component": (True, True),
}


def run(args: argparse.Namespace, work: Path) -> dict:
    """Trains once, then predicts and scores the held-out cases once per entry of PREDICTIONS."""
    from prostate_kernels.evaluation import evaluate_files
    from prostate_kernels.pipeline import predict_files
    from prostate_kernels.train import PAPER, TrainConfig, check_config, train

    train_cases, held_out = split(args.data)
    train_dir = link_dataset(train_cases, work / "train")
    held_dir = link_dataset(held_out, work / "held_out")
    given: dict[str, Any] = {  # the flags given; TrainConfig's defaults for the rest
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in (("patch", args.patch), ("batch", args.batch), ("loss", args.loss), ("lr", args.lr),
                     ("spacing", args.spacing)) if v is not None
    }  # fmt: skip
    config = TrainConfig(
        data=train_dir, out=work / "run", model=args.model, iters=args.iters, val_cases=0,
        val_every=max(1, args.iters // 10), progress=False, seed=args.seed, augment=args.augment,
        schedule=args.schedule, **given,
    )  # fmt: skip
    check_config(config)
    start = time.time()
    checkpoint = train(config)
    train_s = time.time() - start
    scored, failures = {}, []
    for name, (tta, largest) in PREDICTIONS.items():
        folder = work / slug(name)
        failures += predict_files(checkpoint, held_dir / "imagesTr", folder / "predictions", tta=tta,
                                  largest=largest)  # fmt: skip
        failures += evaluate_files(folder / "predictions", held_dir / "labelsTr", None, held_dir / "imagesTr",
                                   folder / "evaluation")[0]  # fmt: skip
        with (folder / "evaluation" / "evaluation.csv").open() as f:
            scored[name] = list(csv.DictReader(f))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return {
        "scored": scored,
        "failures": failures,
        "train_s": train_s,
        "total_s": time.time() - start,
        "settings": {
            "model": args.model,
            "iterations": args.iters,
            "patch": "x".join(map(str, state["patch"])),
            "batch": state["config"]["batch"] or PAPER[args.model].batch,
            "loss": state["config"]["loss"],
            "spacing (mm)": state["spacing"] or "the images' own (1.5)",
            "augmentation": "flips" + (", rotation, scaling, intensity" if args.augment else ""),
            "learning rate": f"{state['config']['lr'] or PAPER[args.model].lr:g}, {args.schedule} decay",
            "train cases": f"{len(train_cases)}, {train_cases[0].name}-{train_cases[-1].name}",
            "held-out cases": f"{len(held_out)}, {held_out[0].name}-{held_out[-1].name}",
        },  # fmt: skip
    }


def write(result: dict, env: dict, work: Path, out_dir: Path) -> Path:
    """<date>-real-<device>.md/.csv, the training curve and OVERLAYS overlay PNGs; returns the md."""
    from prostate_kernels.plots import plot_training_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{env['date'][:10]}-real-{slug(env['device'])[:40]}"
    headline = list(PREDICTIONS)[-1]
    tables = {name: [{c: row[c] for c in COLUMNS} for row in rows] for name, rows in result["scored"].items()}
    with (out_dir / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("prediction", *COLUMNS))
        writer.writeheader()
        for name, rows in tables.items():
            writer.writerows({"prediction": name, **row} for row in rows)
    plot_training_curve(work / "run" / "metrics.csv", out_dir / f"{stem}-training_curve.png")
    rows = tables[headline]
    by_dice = sorted(rows, key=lambda r: float(r["dice"]))
    for case in sorted({by_dice[0]["case"], by_dice[len(by_dice) // 2]["case"], by_dice[-1]["case"]}):
        source = work / slug(headline) / "evaluation" / f"{case}_overlay.png"
        if source.exists():
            shutil.copyfile(source, out_dir / f"{stem}-overlay-{case}.png")
    summary = [
        {"prediction": name, **{k: v for k, v in summarise(t)[0].items() if k}} for name, t in tables.items()
    ]
    lines = ["# Accuracy on real prostate MRI", ""] + [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- {k}: {v}" for k, v in result["settings"].items()]
    lines += [f"- training: {result['train_s']:.0f} s; training + {len(tables)} predictions of the held-out "
              f"cases + evaluation: {result['total_s']:.0f} s", "",
              f"## Held-out means, per way of predicting ({len(rows)} cases, same trained model)", "",
              markdown_table(list(summary[0]), summary), "",
              f"## {headline}: mean, median, range", "",
              markdown_table(list(summarise(rows)[0]), summarise(rows)), "",
              f"## Per case ({headline})", "", markdown_table(list(COLUMNS), rows), ""]  # fmt: skip
    if result["failures"]:
        lines += ["## Failures", ""] + [f"- {f}" for f in result["failures"]]
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def summarise(rows: list[dict]) -> list[dict]:
    """Mean, median, min and max of each measure over every held-out case (failures included)."""
    import statistics

    out = []
    for name, reduce in (
        ("mean", statistics.mean),
        ("median", statistics.median),
        ("min", min),
        ("max", max),
    ):
        out.append({"": name, **{c: f"{reduce(float(r[c]) for r in rows):.3f}" for c in COLUMNS[2:]}})
    return out


def update_readme(md: Path) -> None:
    """README's "Accuracy on real MRI" section: the settings and summary of the results file `md`."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_START not in text:
        return
    body = md.read_text().split("## Per case")[0].replace("# Accuracy on real prostate MRI\n", "").strip()
    body = body.replace("\n## ", "\n#### ")  # sub-headings below the README's section
    block = f"{README_START}\nFrom `bench/results/{md.name}` (`make real`):\n\n{body}\n{README_END}"
    head, rest = text.split(README_START, 1)
    readme.write_text(head + block + rest.split(README_END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    from prostate_kernels.train import PAPER

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    # defaults: the recipe chosen by held-out runs on this split (README, "Accuracy on real MRI")
    parser.add_argument("--model", default="unet3d", choices=sorted(PAPER))
    parser.add_argument("--iters", type=int, default=2500)
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 32, 32), metavar=("D", "H", "W"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--loss", default="bce+dice")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--spacing", type=float, nargs=3, default=(3.0, 3.0, 3.0), metavar=("Z", "Y", "X"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="rotation, scaling and intensity augmentation besides the flips")  # fmt: skip
    parser.add_argument("--schedule", default="paper", choices=("paper", "poly"))
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    if not (args.data / "imagesTr").is_dir():
        print(f"real_data: skipped: no real data at {args.data} (../shared/data/real/mrus-prostate beside "
              "the checkout; see ../shared/data/README.md)")  # fmt: skip
        return 0
    env = environment()
    with tempfile.TemporaryDirectory(prefix="prostate-kernels-real-") as tmp:
        result = run(args, Path(tmp))
        md = write(result, env, Path(tmp), args.out_dir)
    print(md.read_text().split("## Per case")[0])
    if not args.no_readme:
        update_readme(md)
    print(f"written: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
