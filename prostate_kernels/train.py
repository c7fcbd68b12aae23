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
import csv
import io
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from prostate_kernels import cuda_graph_training
from prostate_kernels.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from prostate_kernels.data import (
    ConfigError,
    DataError,
    TrainingStopped,
    check_image,
    discover_cases,
    read_channels,
    read_mask,
)
from prostate_kernels.data.io import as_channels, as_labels, channel_count, check_channels
from prostate_kernels.data.resample import resample_case, resample_image
from prostate_kernels.data.sampling import IterationDataset, PatchSampler, training_case, zscore_channels
from prostate_kernels.determinism import deterministic_mode
from prostate_kernels.devices import available_cores, memory_bytes
from prostate_kernels.layout import in_layout, keep_grads_in_param_strides, model_in_layout
from prostate_kernels.memory_bound import step_memory
from prostate_kernels.models import build_model, downsampling
from prostate_kernels.predict import predict_probabilities
from prostate_kernels.progress import progress_bar
from prostate_kernels.safe_files import RunLock, atomic_write, created_directory, remove_stale_temporaries

RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.csv", "training_curve.png")  # what a run writes
EPOCH_ITERS = 100  # iterations per "epoch" for the epoch-based schedules (patches are sampled, not swept)


@dataclass(frozen=True)
class PaperSettings:
    """A network's training defaults from the paper (sections 4.2-4.4)."""

    patch: tuple[int, int, int]  # (D, H, W); for 2-D networks (slices, H, W)
    batch: int
    lr: float
    decay: tuple[str, float, int]  # ("time", rate, 0): lr / (1 + rate * it); ("step", factor, epochs)
    slices: int = 0  # > 0: a 2-D network fed stacks of this many slices as channels


PAPER = {
    "unet3d": PaperSettings((16, 256, 256), 2, 1e-3, ("time", 1e-4, 0)),
    "deeplabv3plus_2d": PaperSettings((13, 256, 256), 3, 1e-4, ("step", 0.5, 50), slices=13),
    "deeplabv3plus_3d": PaperSettings((16, 128, 128), 2, 1e-4, ("step", 0.5, 50)),
    "tiramisu3d_p4a": PaperSettings((16, 64, 64), 2, 1e-4, ("time", 1e-4, 0)),
    "tiramisu3d_p3a": PaperSettings((16, 64, 64), 2, 1e-4, ("time", 1e-4, 0)),
    "tiramisu3d_p3b": PaperSettings((16, 64, 64), 2, 1e-4, ("time", 1e-4, 0)),
    "tiramisu3d_tiny": PaperSettings((16, 32, 32), 8, 2e-3, ("time", 1e-3, 0)),  # CPU demo, not the paper
}
LOSSES = ("bce", "dice", "bce+dice")
SCHEDULES = ("paper", "poly")  # the paper's decay per model; nnU-Net's poly: lr * (1 - it / iters) ** 0.9
AMP = ("auto", "bf16", "fp16", "off")


@dataclass
class TrainConfig:
    data: Path
    out: Path
    model: str = "tiramisu3d_p3a"
    patch: tuple[int, int, int] | None = None  # default: the paper's, per model
    batch: int | None = None
    iters: int = 1000
    loss: str = "bce+dice"
    lr: float | None = None
    weight_decay: float = 1e-4
    schedule: str = "paper"
    amp: str = "auto"  # bf16 on CUDA, off on the CPU
    val_every: int = 100
    val_cases: int = 2
    checkpoint_every: int | None = None  # default: val_every
    resume: bool = False
    label: int | tuple[int, ...] | None = None  # the masks' label(s) to learn (several: their union)
    # the images' channel(s) (multi-channel images: 4-D, or vector voxels); several: the network's input
    # channels, in this order (the Decathlon's prostate task: (0, 1), T2 and ADC)
    channel: int | tuple[int, ...] | None = None
    spacing: tuple[float, float, float] | None = None  # (Z, Y, X) mm: resample every case to it first
    seed: int = 0
    workers: int = 0
    flips: bool = True
    augment: bool = True  # rotation, scaling and intensity augmentation (data/sampling.py)
    deterministic: bool = False  # torch.use_deterministic_algorithms for the run (deterministic_mode)
    cuda_graphs: bool = False  # forward and backward replayed from CUDA graphs (cuda_graph_training.py)
    channels_last: bool = False  # the model's weights and each batch channels-last (layout.py)
    progress: bool = True
    model_kwargs: dict = field(default_factory=dict)

    def settings(self) -> PaperSettings:
        if self.model not in PAPER:
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(PAPER)}")
        return PAPER[self.model]


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
MAX_SEED = 2**32 - 1  # numpy's legacy seed range; seed * 1000 + rank stays far inside torch's 64 bits


def check_config(config: TrainConfig) -> None:
    """DataError naming the first bad setting."""
    settings = config.settings()
    if config.loss not in LOSSES:
        raise ConfigError(f"--loss {config.loss!r} is not one of {LOSSES}")
    if config.amp not in AMP:
        raise ConfigError(f"--amp {config.amp!r} is not one of {AMP}")
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule {config.schedule!r} is not one of {SCHEDULES}")
    for name in ("iters", "val_every", "checkpoint_every"):  # range() and len() take index-sized ints
        value = getattr(config, name)
        if value is not None and not 1 <= value <= sys.maxsize:  # checkpoint_every None: val_every's
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be in [1, {sys.maxsize}]")
    if config.batch is not None and config.batch < 1:
        raise ConfigError(f"--batch {config.batch} must be >= 1")
    if config.channel is not None:
        check_channels(as_channels(config.channel))
    for name in ("val_cases", "workers"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(config, name)} must be >= 0")
    if not 0 <= config.seed <= MAX_SEED:
        raise ConfigError(f"--seed {config.seed} must be in [0, {MAX_SEED}] (torch seeds each rank with "
                          "seed * 1000 + rank, a 64-bit value)")  # fmt: skip
    cores = available_cores()
    if config.workers > cores:
        raise ConfigError(f"--workers {config.workers} is more than the {cores} CPU cores this process may "
                          "use: each worker is a process of its own")  # fmt: skip
    # at most float32's largest: the parameters' dtype (Adam's update at --lr 1e300 overflowed in torch)
    if config.lr is not None and not (math.isfinite(config.lr) and 0 < config.lr <= FLOAT32_MAX):
        raise ConfigError(f"--lr {config.lr} must be a finite number in (0, {FLOAT32_MAX:.4g}]")
    if config.spacing is not None and (
        len(config.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in config.spacing)
    ):
        raise ConfigError(f"--spacing {tuple(config.spacing)} must be 3 finite sizes > 0 (Z Y X, mm)")
    if not (math.isfinite(config.weight_decay) and 0 <= config.weight_decay <= FLOAT32_MAX):
        raise ConfigError(
            f"--weight-decay {config.weight_decay} must be a finite number in [0, {FLOAT32_MAX:.4g}]"
        )
    patch = config.patch or settings.patch
    if len(patch) != 3 or min(patch) < 1:
        raise ConfigError(f"--patch {patch} must be 3 positive sizes (D H W)")
    model = _meta_model(config)  # only its downsampling is needed
    least = max(getattr(module, "min_training_batch", 1) for module in model.modules())
    batch = config.batch or settings.batch
    if batch < least:
        raise ConfigError(
            f"--batch {batch} must be >= {least} for {config.model}: its image-pooling BatchNorm (ASPP) "
            "sees one value per image, and batch statistics of one value are undefined"
        )
    factors = downsampling(model)
    factors = (1, *factors[1:]) if settings.slices else factors
    if any(p % f for p, f in zip(patch, factors, strict=True)):
        raise ConfigError(f"--patch {tuple(patch)} must be a multiple of {tuple(factors)} for {config.model}")
    if settings.slices and patch[0] != settings.slices:
        raise ConfigError(f"--patch depth {patch[0]} must be {settings.slices} slices for {config.model}")


def check_batch_fits(config: TrainConfig, device: torch.device) -> None:
    """ConfigError when one training step at the run's batch and patch cannot fit in the memory of
    `device` (memory_bound: a forward and backward simulated on the meta device, so at no cost; halved
    under 16-bit autocast, where activations may take 2 bytes): when one tensor alone is larger than that
    memory, or on the CPU when what the step holds at once is, times the processes torchrun started on
    this machine (the PyTorch path the meta device runs is the CPU's; a GPU's fused kernels keep less,
    and its out-of-memory error is caught and reported).
    Lower bounds on the step's peak: a batch they let through may still not fit, one they refuse cannot.
    Such a batch was ended by the host's out-of-memory killer, with no message."""
    total = memory_bytes(device)
    if total is None:
        return
    settings = config.settings()
    patch, batch = _run_patch(config), config.batch or settings.batch
    shape = (batch, *_input_shape(config, patch))
    size = "x".join(map(str, patch))

    def refuse(what: str, nbytes: int) -> None:
        per_patch = nbytes / batch
        most = int(total // per_patch)
        fit = (f"at most {most} patches fit that bound, fewer in practice" if most else
               "not one patch fits: choose a smaller --patch")  # fmt: skip
        raise ConfigError(
            f"--batch {batch} with --patch {size}: {what.format(f'{nbytes / 2**30:.3g} GiB')} "
            f"({per_patch / 2**20:.3g} MiB per patch), more than the {total / 2**30:.3g} GiB of memory of "
            f"{device}; {fit}"
        )

    inputs = math.prod(shape) * 4  # the float32 batch; checked first, a meta tensor past 2**63 bytes fails
    if inputs > total:
        refuse("the input batch alone is a {} tensor", inputs)
    step = step_memory(_meta_model(config).train(), torch.empty(shape, device="meta"))
    halved = _amp_dtype(config.amp, device) is not None
    largest, peak = (step.largest_tensor // 2, step.peak // 2) if halved else (step.largest_tensor, step.peak)
    if largest > total:  # the largest tensor of the forward or the backward
        refuse(f"one training step of {config.model} makes a {{}} tensor", largest)
    if device.type != "cpu":
        return
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes share this machine's memory
    if peak * ranks > total:
        what = (f"the training steps of {config.model} (forward and backward) of the {ranks} processes on "
                "this machine hold {} at once" if ranks > 1 else
                f"one training step of {config.model} (forward and backward) holds {{}} at once")  # fmt: skip
        refuse(what, peak * ranks)


def _meta_model(config: TrainConfig) -> torch.nn.Module:
    """The run's network on the meta device: shapes, no weights allocated."""
    with torch.device("meta"):
        return build_model(config.model, **_model_kwargs(config))


def _run_patch(config: TrainConfig) -> tuple[int, int, int]:
    """The run's patch (D, H, W): --patch, else its network's default (check_patch has checked it)."""
    d, h, w = config.patch or config.settings().patch
    return d, h, w


def _input_shape(config: TrainConfig, patch: tuple[int, int, int]) -> tuple[int, ...]:
    """One training input (C, *patch) without the batch: C = the image channels, times the slices of a
    2-D network's stacks (whose patch is (slices, h, w): input (C * slices, h, w))."""
    slices, channels = config.settings().slices, channel_count(config.channel)
    return (channels * slices, *patch[1:]) if slices else (channels, *patch)


def _model_kwargs(config: TrainConfig) -> dict:
    slices, channels = config.settings().slices, channel_count(config.channel)
    in_channels = channels * slices if slices else channels
    # a single-channel 3-D network keeps its builder's default (checkpoints before channels record none)
    return {**({"in_channels": in_channels} if slices or channels > 1 else {}), **config.model_kwargs}


# ------------------------------------------------------------------------------------------ data


@dataclass
class HeldOut:
    name: str
    image: np.ndarray  # (C, D, H, W), each channel z-scored
    mask: np.ndarray  # (D, H, W)


def load_cases(config: TrainConfig, log, arrays: list | None = None) -> tuple[list, list[HeldOut]]:
    """(training cases, held-out cases); unreadable cases are reported and skipped.

    arrays: (name, image, mask) triples already in memory, used as they are instead of config.data's
    files (no resampling: they are taken to be at the training resolution already); an image is (D, H, W)
    or (C, D, H, W) for a run on C channels."""
    cases = [] if arrays is not None else discover_cases(config.data, require_labels=True)
    loaded, problems = list(arrays or []), []
    for case in cases:
        try:
            images = read_channels(case.image, as_channels(config.channel))  # one 3-D Volume per channel
            for image in images:
                check_image(image)
            assert case.label is not None  # discover_cases(require_labels=True)
            mask = read_mask(case.label, images[0], config.label)
            if config.spacing is not None:  # images linearly, masks by nearest neighbour
                images[0], mask = resample_case(images[0], mask, config.spacing)  # the mask once
                images[1:] = [resample_image(image, config.spacing) for image in images[1:]]
            if mask.array.all():
                raise DataError(case.label, "mask covers every voxel: no background to learn from")
            loaded.append((case.name, np.stack([image.array for image in images]), mask.array))
        except DataError as exc:
            problems.append(str(exc))
    for problem in problems:
        log(f"skipped: {problem}")
    if len(loaded) <= config.val_cases:
        raise DataError(
            config.data, f"{len(loaded)} usable cases, need more than --val-cases {config.val_cases}"
        )
    n_train = len(loaded) - config.val_cases
    train = [training_case(img, msk, name) for name, img, msk in loaded[:n_train]]
    held = [HeldOut(name, zscore_channels(img), msk) for name, img, msk in loaded[n_train:]]
    return train, held


# -------------------------------------------------------------------------------------- training


def train(config: TrainConfig, log: Callable[[str], object] = print, arrays: list | None = None) -> Path:
    """Trains, validates and checkpoints into config.out; returns the path of the last checkpoint.

    arrays: train on these (name, image (D, H, W), mask (D, H, W)) triples instead of reading
    config.data (bench/real_cv.py: cases packed once, on a machine without SimpleITK).

    config.out must hold no earlier run (RUN_FILES; other files are left alone), or (with config.resume) be
    an earlier run's directory; rank 0 holds
    an exclusive lock on it for the whole run, so two trainings never write into one directory.
    """
    check_config(config)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "--out is an existing file, expected a run directory")
    rank, world, device = _setup_distributed()
    refused = config.cuda_graphs and cuda_graph_training.refusal(device, world)
    if refused:
        raise ConfigError(refused)
    check_batch_fits(config, device)
    if rank != 0:
        _check_run_directory(out, config.resume)
        with deterministic_mode(config.deterministic):
            return _train(config, rank, world, device, log, arrays)
    with created_directory(out, "--out"), RunLock(out):
        _check_run_directory(out, config.resume)
        for tmp in remove_stale_temporaries(out):
            log(f"removed {tmp.name}, left by a checkpoint write that was killed")
        with deterministic_mode(config.deterministic):
            if config.deterministic:
                log("deterministic algorithms on: the library's kernels take untimed tiles; a PyTorch op "
                    "without a deterministic version warns and runs (docs/determinism.md)")  # fmt: skip
            return _train(config, rank, world, device, log, arrays)


def _check_run_directory(out: Path, resume: bool) -> None:
    """DataError when `out` holds an earlier run and we were not asked to resume it."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not resume:
        raise DataError(out, f"holds an earlier training run ({', '.join(found)}): pass --resume to continue "
                             "it, or choose a new --out")  # fmt: skip


def _train(config: TrainConfig, rank: int, world: int, device: torch.device, log, arrays=None) -> Path:
    settings = config.settings()
    patch = _run_patch(config)
    batch, lr = config.batch or settings.batch, config.lr if config.lr is not None else settings.lr
    amp_dtype = _amp_dtype(config.amp, device)
    out = Path(config.out)
    ckpt_path = out / "checkpoint.pt"
    ckpt_every = config.checkpoint_every or config.val_every

    train_cases, held_out = load_cases(config, log if rank == 0 else (lambda *_: None), arrays)
    torch.manual_seed(config.seed * 1000 + rank)
    model = model_in_layout(
        build_model(config.model, **_model_kwargs(config)).to(device), config.channels_last
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    decay = ("poly", 0.9, config.iters) if config.schedule == "poly" else settings.decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(decay))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start, best = 0, -1.0
    if config.resume and ckpt_path.exists():
        start, best, saved = _restore(ckpt_path, model, optimizer, scheduler, scaler, rank, config.model)
        for lr_lambda in scheduler.lr_lambdas:  # poly's horizon is this run's --iters, not the saved one's
            if isinstance(lr_lambda, _PolyDecay):
                lr_lambda.iters = config.iters
        if rank == 0:
            log(f"resumed from {ckpt_path} at iteration {start}")
            changed = _resume_differences(saved, config, patch, batch, lr, world)
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

    sampler = PatchSampler(
        train_cases, patch, batch, config.seed, rank, config.flips, settings.slices, config.augment
    )
    loader = torch.utils.data.DataLoader(
        IterationDataset(sampler, start, config.iters), batch_size=None, num_workers=config.workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),  # its seed draw must not touch the global RNG
    )  # fmt: skip
    metrics = _MetricsLog(out / "metrics.csv", start) if rank == 0 else None
    bar = progress_bar(config.iters, "train", "it", initial=start) if rank == 0 and config.progress else None
    loss_fn = _loss(config.loss)
    window, log_every = [], max(1, config.val_every // 5)
    batches = loader
    if config.cuda_graphs:
        batches = _graphed(model, iter(loader), device, amp_dtype, config.channels_last, log)
    tic = time.time()
    for it, (x, y) in enumerate(batches, start=start + 1):
        x, y = (
            in_layout(x.to(device, non_blocking=True), config.channels_last),
            y.to(device, non_blocking=True),
        )
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(net(x).float(), y)
        if not _finite_on_every_rank(loss, world):
            stopped = f"loss is {loss.item()} at iteration {it}: training stopped (a smaller --lr may help)"
            raise TrainingStopped(f"{stopped}; {_last_checkpoint(ckpt_path)}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        window.append(loss.item())
        val_dice = None
        if held_out and (it % config.val_every == 0 or it == config.iters):
            if rank == 0:
                val_dice = validate(model, held_out, patch, settings.slices, device, amp_dtype)
            _barrier(world)
        if metrics is not None and (it % log_every == 0 or val_dice is not None):  # metrics: rank 0's
            lr_now = float(scheduler.get_last_lr()[0])
            metrics.write(it, float(np.mean(window)), lr_now, val_dice, time.time() - tic)
            window = []
        is_best = val_dice is not None and val_dice > best  # (val_dice exists on rank 0 only)
        best = max(best, val_dice) if val_dice is not None else best
        periodic = it % ckpt_every == 0 or it == config.iters
        rng = _gather_rng(world) if periodic else None  # a collective: every rank takes part
        if rank == 0 and (periodic or is_best):
            _check_finite_weights(model, it, ckpt_path)
            state = _state(
                config, model, optimizer, scheduler, scaler, rng or _gather_rng(1), it, best, patch
            )
            if periodic:
                save_checkpoint(state, ckpt_path)
            if is_best:
                save_checkpoint(state, out / "best.pt")
        if periodic:
            _barrier(world)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss.item():.4f}", **({"dice": f"{val_dice:.3f}"} if val_dice is not None else {})
            )
    if bar is not None:
        bar.close()
    if rank == 0 and (out / "metrics.csv").exists():
        from prostate_kernels.plots import plot_training_curve

        plot_training_curve(out / "metrics.csv", out / "training_curve.png")
    if world > 1:
        dist.destroy_process_group()
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


def _finite_on_every_rank(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (a collective when world > 1: all ranks stop together)."""
    finite = torch.isfinite(loss.detach()).to(torch.float32)
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


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


# --------------------------------------------------------------------------------------- helpers


def _schedule(decay: tuple[str, float, int]):
    kind, rate, epochs = decay
    if kind == "time":  # Keras' `decay`: lr / (1 + decay * iterations)
        return _TimeDecay(rate)
    if kind == "poly":  # ("poly", power, iterations)
        return _PolyDecay(rate, epochs)
    return _StepDecay(rate, epochs * EPOCH_ITERS)


class _PolyDecay:
    """nnU-Net's schedule: (1 - it / iters) ** power, reaching 0 at the last iteration."""

    def __init__(self, power: float, iters: int) -> None:
        self.power, self.iters = power, iters

    def __call__(self, it: int) -> float:
        return max(0.0, 1.0 - it / self.iters) ** self.power


class _TimeDecay:
    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, it: int) -> float:
        return 1.0 / (1.0 + self.rate * it)


class _StepDecay:
    def __init__(self, factor: float, every: int) -> None:
        self.factor, self.every = factor, every

    def __call__(self, it: int) -> float:
        return self.factor ** (it // self.every)


def _loss(name: str):
    bce = torch.nn.BCEWithLogitsLoss()

    def soft_dice(logits, y):
        p = torch.sigmoid(logits)
        return 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)

    return {
        "bce": bce,
        "dice": soft_dice,
        "bce+dice": lambda logits, y: bce(logits, y) + soft_dice(logits, y),
    }[name]


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def _setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank = dist.get_rank()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", rank))
            torch.cuda.set_device(local)
            return rank, world, torch.device("cuda", local)
        return rank, world, torch.device("cpu")
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _gather_rng(world: int) -> dict:
    """Every rank's torch RNG states (CPU, and CUDA where present), gathered on all ranks."""
    mine = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if world == 1:
        return {"ranks": [mine]}
    states = [None] * world
    dist.all_gather_object(states, mine)
    return {"ranks": states}


def _state(config, model, optimizer, scheduler, scaler, rng, it, best, patch) -> dict:
    settings = config.settings()
    return {
        "model": config.model,
        "model_kwargs": _model_kwargs(config),
        "patch": list(patch),
        "slices": settings.slices,
        "spacing": list(config.spacing) if config.spacing is not None else None,
        "label": list(as_labels(config.label)) if config.label is not None else None,
        "channel": list(as_channels(config.channel)) if config.channel is not None else None,
        "iteration": it,
        "best_val_dice": best,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }


# Settings that change what a resumed run computes: (TrainConfig field, its flag). The layout is one:
# nn.Dropout draws its masks in memory order, so the two layouts drop other voxels.
RESUME_SETTINGS = (("loss", "--loss"), ("weight_decay", "--weight-decay"), ("schedule", "--schedule"),
                   ("amp", "--amp"), ("seed", "--seed"), ("flips", "flips"), ("augment", "--augment"),
                   ("spacing", "--spacing"), ("label", "--label"), ("channel", "--channel"),
                   ("val_cases", "--val-cases"),
                   ("deterministic", "--deterministic"), ("channels_last", "--channels-last"))  # fmt: skip


def _resume_differences(
    saved: dict, config: TrainConfig, patch, batch: int, lr: float, world: int
) -> list[str]:
    """'--flag NEW (was OLD)' for each setting of this run that differs from the checkpoint's (`saved`:
    the checkpoint's state; patch, batch and lr as resolved for this run, defaults filled in; world: the
    processes training now, against the ranks whose RNG states it holds). A setting the checkpoint does
    not record is not compared; None (no --spacing, no --label) is a value."""
    before = saved.get("config") or {}
    settings = config.settings()

    def plain(value):
        return tuple(value) if isinstance(value, list) else value

    def setting(name: str, value):  # one int is that label or channel, as checkpoints before lists record
        readers: dict[str, Callable[[Any], object]] = {"label": as_labels, "channel": as_channels}
        return readers.get(name, plain)(value)

    pairs = [("--patch", tuple(patch), plain(saved.get("patch", tuple(patch)))),
             ("--batch", batch, before.get("batch") or settings.batch),
             ("--lr", lr, before["lr"] if before.get("lr") is not None else settings.lr)]  # fmt: skip
    pairs += [(flag, setting(name, getattr(config, name)), setting(name, before[name]))
              for name, flag in RESUME_SETTINGS if name in before]  # fmt: skip
    if "rng" in saved:  # each rank draws its own patches and dropout: another count draws other ones
        pairs.append(("torchrun --nproc-per-node", world, len(saved["rng"]["ranks"])))
    return [f"{flag} {now} (was {was})" for flag, now, was in pairs if now != was]


def _restore(path, model, optimizer, scheduler, scaler, rank, name) -> tuple[int, float, dict]:
    """(iteration, best validation Dice, the checkpoint) with the model, optimizer, scheduler, scaler and
    this rank's RNG restored from it. A damaged or edited checkpoint is a DataError naming the part that
    could not be restored (each ended resume in a KeyError, TypeError or ValueError traceback); the run
    then writes nothing."""
    state = load_checkpoint(path)
    if state.get("model") != name:
        raise DataError(path, f"checkpoint of model {state.get('model')!r}, not {name!r}")
    iteration, best = state.get("iteration"), state.get("best_val_dice")
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise DataError(path, f"malformed checkpoint: iteration {iteration!r} is not an int >= 0")
    if not isinstance(best, (int, float)) or isinstance(best, bool) or not math.isfinite(best):
        raise DataError(path, f"malformed checkpoint: best_val_dice {best!r} is not a number")
    load_model_weights(model, state.get("state_dict"), path, name)
    parts = {
        "optimizer": optimizer.load_state_dict,
        "scheduler": scheduler.load_state_dict,
        "scaler": scaler.load_state_dict,
        "rng": lambda rng: _restore_rng(rng["ranks"], rank),
    }
    for part, restore in parts.items():
        if part not in state:
            raise DataError(path, f"malformed checkpoint: it lacks the {part} state")
        try:
            restore(state[part])
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
            reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
            raise DataError(
                path, f"malformed checkpoint: its {part} state cannot be restored ({reason})"
            ) from None
    return iteration, float(best), state


def _restore_rng(ranks: list[dict], rank: int) -> None:
    """This rank's CPU (and CUDA) generator states, when the checkpoint's run had this rank."""
    if rank < len(ranks):
        torch.set_rng_state(ranks[rank]["cpu"])
        if torch.cuda.is_available() and ranks[rank]["cuda"]:
            torch.cuda.set_rng_state_all(ranks[rank]["cuda"])


class _MetricsLog:
    """metrics.csv; on resume, rows after the checkpoint's iteration are dropped (they will be redone)."""

    COLUMNS = ("iteration", "loss", "lr", "val_dice", "seconds")

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        rows = self._rows_up_to(path, start) if start and path.exists() else []
        with atomic_write(path, "w", newline="") as f:  # a kill here keeps the earlier history whole
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    @classmethod
    def _rows_up_to(cls, path: Path, start: int) -> list[dict[str, str]]:
        """The rows of an earlier metrics.csv up to iteration `start`. DataError, and the file left as it
        is, when it is not one this class wrote (edited, damaged): rewriting it would drop what could
        not be read, and reading it ended in a ValueError or UnicodeDecodeError traceback."""
        fix = "move it away to resume (the run then starts a new one)"
        if not path.is_file():  # reading a named pipe would wait forever
            raise DataError(path, f"not a regular file: {fix}")
        try:
            with path.open(newline="", encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise DataError(path, f"not UTF-8 text (byte {exc.start}): {fix}") from None
        # a last line without its newline is an append cut short (a kill, a full disk): not an error
        cut_short_line = text.count("\n") + 1 if text and not text.endswith("\n") else None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if tuple(reader.fieldnames or ()) != cls.COLUMNS:
            raise DataError(path, f"header {reader.fieldnames} is not {list(cls.COLUMNS)}: {fix}")
        rows = []
        for row in reader:
            # DictReader files extra values under the key None and fills missing ones with None
            if None in row or None in row.values() or not row["iteration"].isdigit():
                if reader.line_num == cut_short_line:
                    break  # a row is written before its iteration's checkpoint: this one is redone
                what = f"{len(cls.COLUMNS)} values starting with an iteration number"
                raise DataError(path, f"line {reader.line_num} is not a row of {what}: {fix}")
            rows.append(row)
        return [r for r in rows if int(r["iteration"]) <= start]

    def write(self, it: int, loss: float, lr: float, val_dice: float | None, seconds: float) -> None:
        """Appends one row, whole or not at all: an append that fails (a full disk) is cut back to the rows
        before it and raised as an OSError naming the file (a part of a row would stop --resume)."""
        row = io.StringIO(newline="")
        val = "" if val_dice is None else f"{val_dice:.4f}"
        csv.writer(row).writerow([it, f"{loss:.6f}", f"{lr:.3e}", val, f"{seconds:.1f}"])
        size = self.path.stat().st_size
        try:
            with self.path.open("a", newline="") as f:
                f.write(row.getvalue())
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None


__all__ = ["PAPER", "PaperSettings", "TrainConfig", "check_config", "train", "validate"]
