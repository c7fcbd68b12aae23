"""`prostate-kernels demo`: phantoms -> training -> prediction of held-out phantoms -> PROMISE12
evaluation, all in one new directory, on a fresh machine with nothing to download."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from prostate_kernels.evaluation import evaluate_files
from prostate_kernels.pipeline import predict_files
from prostate_kernels.safe_files import require_empty_directory

DEMO_ITERS = {"tiramisu3d_tiny": 480}  # ~2.5 min on 2 CPU cores channels-last (~4.5 min NCDHW)
DEMO_MARKER = ".prostate-kernels-demo"  # says "a demo wrote this directory" (make demo may replace it)


def run_demo(
    out: Path, model: str = "tiramisu3d_tiny", iters: int | None = None, channels_last: bool | None = None
) -> list[str]:
    """Phantoms -> training -> prediction of held-out phantoms -> PROMISE12 evaluation, all in `out`;
    channels_last: train and predict in that layout (layout.py); None: on the CPU only, where the demo
    measured 1.37x faster in it (docs/memory-layout.md); a GPU's is not measured yet."""
    from prostate_kernels.data.phantoms import write_phantoms
    from prostate_kernels.plots import plot_training_curve
    from prostate_kernels.train import TrainConfig, check_config, train

    out = Path(out)
    start = time.time()
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    iters = iters if iters is not None else DEMO_ITERS.get(model, 1000)
    channels_last = not torch.cuda.is_available() if channels_last is None else channels_last
    config = TrainConfig(data=train_dir, out=out / "run", model=model, iters=iters, loss="bce+dice",
                         val_every=max(1, iters // 6), channels_last=channels_last)  # fmt: skip
    check_config(config)  # before anything is written
    require_empty_directory(out, "--out")
    (out / DEMO_MARKER).write_text("written by prostate-kernels demo: this directory is its output\n")
    write_phantoms(train_dir, n=10, seed=1)
    write_phantoms(test_dir, n=3, seed=2)
    print(f"[demo] phantoms: 10 for training (2 of them for validation), 3 held out -> {out / 'data'}")
    checkpoint = train(config)
    best = out / "run" / "best.pt"
    checkpoint = best if best.exists() else checkpoint
    plot_training_curve(out / "run" / "metrics.csv", out / "training_curve.png")
    layout = "channels-last" if channels_last else "NCDHW"
    print(f"[demo] trained {model} ({layout}) for {iters} iterations; using {checkpoint.name}")
    failures = predict_files(
        checkpoint, test_dir, out / "predictions", largest=True, channels_last=channels_last
    )
    failures += evaluate_files(out / "predictions", test_dir, None, None, out)[0]
    print(
        f"[demo] done in {time.time() - start:.0f} s: overlays, training_curve.png, evaluation.csv in {out}"
    )
    return failures
