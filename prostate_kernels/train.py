"""Training on PROMISE12-style data: balanced patches, Adam, checkpoints that resume exactly, DDP.

    prostate-kernels train --data DIR --model tiramisu3d_p3a --iters 20000 --out runs/p3a
    torchrun --nproc-per-node 4 -m prostate_kernels train ...          (DistributedDataParallel)

The last `val_cases` cases (in name order) are held out and scored by sliding-window Dice every
`val_every` iterations. Every checkpoint (atomic; model, optimizer, scheduler, every rank's RNG state,
iteration) lets `--resume` continue exactly where training stopped: the batches are a pure function of
(seed, rank, iteration), so a resumed run sees the same data, dropout and updates as an unbroken one.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from prostate_kernels import cuda_graph_training, sync_training
from prostate_kernels.checkpoint import save_checkpoint
from prostate_kernels.cpu_bf16 import check_bf16_training
from prostate_kernels.data import (
    ConfigError,
    DataError,
    TrainingStopped,
    check_image,
    discover_cases,
    read_channels,
    read_mask,
)
from prostate_kernels.data.cases import passed_over
from prostate_kernels.data.io import as_channels
from prostate_kernels.data.orientation import reoriented
from prostate_kernels.data.resample import resample_case, resample_image
from prostate_kernels.data.sampling import IterationDataset, PatchSampler, training_case, zscore_channels
from prostate_kernels.determinism import deterministic_mode
from prostate_kernels.layout import in_layout, keep_grads_in_param_strides, model_in_layout
from prostate_kernels.metrics_log import MetricsLog
from prostate_kernels.models import build_model
from prostate_kernels.predict import predict_probabilities
from prostate_kernels.process_group import joined_process_group, process_device, rank_zero_work
from prostate_kernels.progress import progress_bar
from prostate_kernels.safe_files import RunLock, created_directory, remove_stale_temporaries
from prostate_kernels.stop_requests import StopRequests, TrainingInterrupted, ignore_stop_signals
from prostate_kernels.torchrun_env import process_layout
from prostate_kernels.train_config import (
    PAPER,
    PaperSettings,
    TrainConfig,
    check_batch_fits,
    check_config,
    model_kwargs,
    run_patch,
)
from prostate_kernels.train_recipe import PolyDecay, amp_dtype_for, loss_function, lr_schedule
from prostate_kernels.train_state import checkpoint_state, gather_rng, restore, resume_differences
from prostate_kernels.trained_spacing import spacing_range, spread_note

RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.csv", "training_curve.png")  # what a run writes


# ------------------------------------------------------------------------------------------ data


@dataclass
class HeldOut:
    name: str
    image: np.ndarray  # (C, D, H, W), each channel z-scored
    mask: np.ndarray  # (D, H, W)


def load_cases(config: TrainConfig, log, arrays: list | None = None) -> tuple[list, list[HeldOut]]:
    """(training cases, held-out cases); unreadable cases are reported and skipped.

    arrays: (name, image, mask) triples already in memory, used as they are instead of config.data's
    files (no reorienting or resampling: they are taken to be in config.orientation and at the training
    resolution already); an image is (D, H, W) or (C, D, H, W) for a run on C channels."""
    cases = [] if arrays is not None else discover_cases(config.data, require_labels=True)
    unused = [] if arrays is not None else passed_over(config.data, cases)
    if unused:
        log(f"not used (not named CaseNN like the {len(cases)} case(s) beside them): "
            f"{', '.join(p.name for p in unused)}")  # fmt: skip
    loaded, problems = list(arrays or []), []
    spacings: list = [None] * len(loaded)  # (Z, Y, X) mm of the voxels the network sees, per loaded case
    for case in cases:
        try:
            images = read_channels(case.image, as_channels(config.channel))  # one 3-D Volume per channel
            for image in images:
                check_image(image)
            assert case.label is not None  # discover_cases(require_labels=True)
            mask = read_mask(case.label, images[0], config.label)  # on the image's grid, as stored
            # the mask on the image's exact geometry (equal within GEOMETRY_TOLERANCE), so both take the
            # same axes even for a direction midway between two orientations
            mask = reoriented(replace(images[0].like(mask.array), path=mask.path), config.orientation)
            images = [reoriented(image, config.orientation) for image in images]
            if config.spacing is not None:  # images linearly, masks by nearest neighbour
                images[0], mask = resample_case(images[0], mask, config.spacing)  # the mask once
                images[1:] = [resample_image(image, config.spacing) for image in images[1:]]
            if mask.array.all():
                raise DataError(case.label, "mask covers every voxel: no background to learn from")
            loaded.append((case.name, np.stack([image.array for image in images]), mask.array))
            spacings.append(images[0].spacing_zyx)
        except DataError as exc:
            problems.append(str(exc))
    for problem in problems:
        log(f"skipped: {problem}")
    if len(loaded) <= config.val_cases:
        raise DataError(
            config.data, f"{len(loaded)} usable cases, need more than --val-cases {config.val_cases}"
        )
    n_train = len(loaded) - config.val_cases
    train = [training_case(img, msk, name, spacing) for (name, img, msk), spacing
             in zip(loaded[:n_train], spacings[:n_train], strict=True)]  # fmt: skip
    held = [HeldOut(name, zscore_channels(img), msk) for name, img, msk in loaded[n_train:]]
    return train, held


# -------------------------------------------------------------------------------------- training


def train(config: TrainConfig, log: Callable[[str], object] = print, arrays: list | None = None) -> Path:
    """Trains, validates and checkpoints into config.out; returns the path of the last checkpoint.

    arrays: train on these (name, image (D, H, W), mask (D, H, W)) triples instead of reading
    config.data (bench/real_cv.py: cases packed once, on a machine without SimpleITK).

    config.out must hold no earlier run (RUN_FILES; other files are left alone), or (with config.resume) be
    an earlier run's directory; rank 0 holds an exclusive lock on it for the whole run, so two trainings
    never write into one directory (under torchrun every rank stops when rank 0 is refused it).

    SIGINT or SIGTERM during the iterations ends the one in progress, writes checkpoint.pt at it and raises
    TrainingInterrupted (stop_requests.py); a second signal acts at once, as without this.
    """
    check_config(config)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "--out is an existing file, expected a run directory")
    layout = process_layout()  # torchrun's environment, checked: one process without it
    world, device = layout.world, process_device(layout)
    # refused before any process joins the group: every one says the same line and none waits on another
    refused = config.cuda_graphs and cuda_graph_training.refusal(device, world)
    refused = refused or (config.sync_batchnorm and sync_training.refusal(device, world))
    if refused:
        raise ConfigError(refused)
    check_bf16_training(amp_dtype_for(config.amp, device), device)  # a CPU whose bf16 conv3d is wrong
    check_batch_fits(config, device)
    with joined_process_group(world, device) as rank, _run_directory(out, config.resume, rank, world, log):
        with deterministic_mode(config.deterministic):
            if config.deterministic and rank == 0:
                log("deterministic algorithms on: the library's kernels take untimed tiles; a PyTorch op "
                    "without a deterministic version warns and runs (docs/determinism.md)")  # fmt: skip
            return _train(config, rank, world, device, log, arrays)


@contextlib.contextmanager
def _run_directory(out: Path, resume: bool, rank: int, world: int, log) -> Iterator[None]:
    """The run directory for the `with` block: rank 0 creates it, holds its RunLock and checks that it
    holds no earlier run (unless resuming); the other ranks write nothing there. A failure of rank 0's
    (the lock of a training running there, an earlier run) stops every rank (rank_zero_work)."""
    with contextlib.ExitStack() as held:
        with rank_zero_work(world):
            if rank == 0:
                held.enter_context(created_directory(out, "--out"))
                held.enter_context(RunLock(out))
                _check_run_directory(out, resume)
                for tmp in remove_stale_temporaries(out):
                    log(f"removed {tmp.name}, left by a checkpoint write that was killed")
        yield


def _check_run_directory(out: Path, resume: bool) -> None:
    """DataError when `out` holds an earlier run and we were not asked to resume it."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not resume:
        raise DataError(out, f"holds an earlier training run ({', '.join(found)}): pass --resume to continue "
                             "it, or choose a new --out")  # fmt: skip


def _train(config: TrainConfig, rank: int, world: int, device: torch.device, log, arrays=None) -> Path:
    settings = config.settings()
    patch = run_patch(config)
    batch, lr = config.batch or settings.batch, config.lr if config.lr is not None else settings.lr
    amp_dtype = amp_dtype_for(config.amp, device)
    out = Path(config.out)
    ckpt_path = out / "checkpoint.pt"
    ckpt_every = config.checkpoint_every or config.val_every

    train_cases, held_out = load_cases(config, log if rank == 0 else (lambda *_: None), arrays)
    spacings = [case.spacing_zyx for case in train_cases]
    seen = spacing_range(spacings)  # recorded in every checkpoint
    spread = spread_note(spacings)  # None at a --spacing: one size
    if spread and rank == 0:
        log(spread)
    torch.manual_seed(config.seed * 1000 + rank)
    model = model_in_layout(
        build_model(config.model, **model_kwargs(config)).to(device), config.channels_last
    )
    if config.sync_batchnorm and world > 1:
        model = sync_training.synchronised(model)
    elif config.sync_batchnorm and rank == 0:
        log("--sync-batchnorm: one process, so BatchNorm's batch is this process's as without it")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    decay = ("poly", 0.9, config.iters) if config.schedule == "poly" else settings.decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(decay))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start, best = 0, -1.0
    if config.resume and ckpt_path.exists():
        start, best, saved = restore(ckpt_path, model, optimizer, scheduler, scaler, rank, config.model)
        for lr_lambda in scheduler.lr_lambdas:  # poly's horizon is this run's --iters, not the saved one's
            if isinstance(lr_lambda, PolyDecay):
                lr_lambda.iters = config.iters
        if rank == 0:
            log(f"resumed from {ckpt_path} at iteration {start}")
            changed = resume_differences(saved, config, patch, batch, lr, world)
            if changed:
                log(f"warning: resuming with settings that differ from the checkpoint's: {'; '.join(changed)}"
                    " (the run goes on, but no longer as the unbroken run would have)")  # fmt: skip
            if start >= config.iters:
                log(f"warning: {ckpt_path.name} is at iteration {start}, --iters is {config.iters}: "
                    "nothing left to train (a larger --iters continues)")  # fmt: skip
    elif config.resume and rank == 0:
        log(f"no {ckpt_path.name} in {out} yet: starting from iteration 0")
    if not held_out and rank == 0:
        log("no held-out cases (--val-cases 0): no validation, no best.pt; predict with checkpoint.pt")
    if world > 1:
        keep_grads_in_param_strides(model)  # DDP's buckets have each parameter's exact strides
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    # the training step's module: validation and the checkpoints use `model` itself (eager, its own keys)
    step = torch.compile(net) if config.compile else net

    sampler = PatchSampler(
        train_cases, patch, batch, config.seed, rank, config.flips, settings.slices, config.augment
    )
    loader = torch.utils.data.DataLoader(
        IterationDataset(sampler, start, config.iters), batch_size=None, num_workers=config.workers,
        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(config.seed),  # its seed draw must not touch the global RNG
    )  # fmt: skip
    metrics = MetricsLog(out / "metrics.csv", start) if rank == 0 else None
    bar = progress_bar(config.iters, "train", "it", initial=start) if rank == 0 and config.progress else None
    loss_fn = loss_function(config.loss)
    window, log_every = [], max(1, config.val_every // 5)
    # the DataLoader's workers are forked here, before StopRequests' watcher thread starts: a fork of a
    # process with threads may deadlock its child (Python 3.12 warns), and the child would copy its pipe
    batches = iter(loader)
    if config.cuda_graphs:
        batches = _graphed(model, batches, device, amp_dtype, config.channels_last, log)
    tic = time.time()
    # StopRequests: Ctrl-C or SIGTERM ends this iteration, with checkpoint.pt at it
    with StopRequests() as stop, _named_compile_failure(config.compile):
        for it, (x, y) in enumerate(batches, start=start + 1):
            x, y = (
                in_layout(x.to(device, non_blocking=True), config.channels_last),
                y.to(device, non_blocking=True),
            )
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(step(x).float(), y)
            finite, stopping = _agreed_on_every_rank(loss, stop.signum is not None, world)
            if not finite:
                stopped = (
                    f"loss is {loss.item()} at iteration {it}: training stopped (a smaller --lr may help)"
                )
                raise TrainingStopped(f"{stopped}; {_last_checkpoint(ckpt_path)}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            window.append(loss.item())
            if config.compile and it == start + 1 and rank == 0:
                log(f"--compile: the first iteration (compiling the step) took {time.time() - tic:.1f} s")
            stopping = stopping and it < config.iters  # (the last iteration ends the run anyway)
            validating = bool(held_out) and (it % config.val_every == 0 or it == config.iters)
            periodic = it % ckpt_every == 0 or it == config.iters or stopping
            val_dice = None
            # rank 0 alone validates and writes metrics.csv and the checkpoints; each rank_zero_work block is
            # entered by every rank at the same iterations, and rank 0's failure there stops them all
            if validating or it % log_every == 0 or stopping:
                with rank_zero_work(world):
                    if rank == 0 and validating:
                        val_dice = validate(model, held_out, patch, settings.slices, device, amp_dtype)
                    if metrics is not None:  # rank 0's
                        lr_now = float(scheduler.get_last_lr()[0])
                        metrics.write(it, float(np.mean(window)), lr_now, val_dice, time.time() - tic)
                window = []
            is_best = val_dice is not None and val_dice > best  # (val_dice exists on rank 0 only)
            best = max(best, val_dice) if val_dice is not None else best
            rng = gather_rng(world) if periodic else None  # a collective: every rank takes part
            if periodic or validating:  # (is_best only where validating)
                with rank_zero_work(world):
                    if rank == 0 and (periodic or is_best):
                        _check_finite_weights(model, it, ckpt_path)
                        rngs = rng or gather_rng(1)  # best.pt alone (no gather this iteration): rank 0's
                        state = checkpoint_state(
                            config, model, optimizer, scheduler, scaler, rngs, it, best, patch, seen
                        )
                        if periodic:
                            save_checkpoint(state, ckpt_path)
                        if is_best:
                            save_checkpoint(state, out / "best.pt")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss.item():.4f}", **({"dice": f"{val_dice:.3f}"} if val_dice is not None else {})
                )
            if stopping:
                if bar is not None:
                    bar.close()
                raise TrainingInterrupted(it, stop.signum, ckpt_path.name)
    if bar is not None:
        bar.close()
    if rank == 0 and (out / "metrics.csv").exists():
        from prostate_kernels.plots import plot_training_curve

        plot_training_curve(out / "metrics.csv", out / "training_curve.png")
    return ckpt_path


def _graphed(model, batches, device, amp_dtype, channels_last: bool, log):
    """The batches of the run, once model's training forward and backward are CUDA graphs captured on
    the first batch (which is then trained on as the first iteration, like every other). The graphs'
    input is that batch in the run's layout: later batches are copied into it, into that layout."""
    first = next(batches, None)
    if first is None:  # nothing left to train
        return iter(())
    start = time.time()
    sample = in_layout(first[0].to(device), channels_last)
    cuda_graph_training.capture_training_step(model, sample, amp_dtype)
    log(f"--cuda-graphs: forward and backward captured in {time.time() - start:.1f} s (autotuning included)")
    return itertools.chain([first], batches)


@contextlib.contextmanager
def _named_compile_failure(compiling: bool) -> Iterator[None]:
    """torch.compile's failure to compile the training step (no working C++ compiler, an Inductor fault)
    as one ConfigError naming --compile, where the compiler's traceback ended the run. Without --compile
    (`compiling` False) every exception passes untouched, and torch._dynamo is not imported."""
    if not compiling:
        yield
        return
    from torch._dynamo.exc import BackendCompilerFailed  # (torch.compile has imported it already)

    try:
        yield
    except BackendCompilerFailed as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--compile: torch.compile could not compile the training step ({cause}); "
                          "train without --compile") from exc  # fmt: skip


def _agreed_on_every_rank(loss: torch.Tensor, stop_asked: bool, world: int) -> tuple[bool, bool]:
    """(whether the loss is finite on every rank, whether any rank was asked to stop): one collective when
    world > 1, so that all ranks stop after the same iteration."""
    finite = torch.isfinite(loss.detach()).to(torch.float32)
    flags = torch.stack([finite, finite.new_full((), float(not stop_asked))])  # (2,): 1 = go on
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    all_finite, none_asked = flags.tolist()
    return all_finite == 1.0, none_asked == 0.0


def _check_finite_weights(model: torch.nn.Module, it: int, ckpt_path: Path) -> None:
    """DataError before a checkpoint with NaN or infinite weights could replace a good one."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingStopped(f"weights became non-finite at iteration {it} ({bad[0]}, {len(bad)} tensors): "
                              f"training stopped; {_last_checkpoint(ckpt_path)}")  # fmt: skip


def _last_checkpoint(ckpt_path: Path) -> str:
    """Where the last good weights are, for the messages of a stopped run (only finite ones are saved)."""
    if ckpt_path.exists():
        return f"{ckpt_path} keeps the last checkpoint, written before it and finite"
    return f"no checkpoint was written to {ckpt_path.parent} before it"


def validate(
    model: torch.nn.Module,
    held_out: list[HeldOut],
    patch: tuple[int, int, int],
    slices: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> float:
    """Mean Dice of thresholded sliding-window predictions on the held-out cases."""
    dices = []
    for case in held_out:
        prob = predict_probabilities(model, case.image, patch, slices, device, amp_dtype=amp_dtype)
        pred, ref = prob > 0.5, case.mask.astype(bool)
        dices.append(2 * (pred & ref).sum() / max(pred.sum() + ref.sum(), 1))
    return float(np.mean(dices))


# TrainConfig and its checks live in train_config.py; they are named here too, where callers import them
__all__ = [
    "PAPER",
    "PaperSettings",
    "TrainConfig",
    "check_batch_fits",
    "check_config",
    "load_cases",
    "train",
    "validate",
]
