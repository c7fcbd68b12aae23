"""What a training run is asked to do: TrainConfig, each network's defaults from the paper, and the checks
that refuse a bad setting, or a batch that cannot fit in memory, before anything is read or written.

Every check raises ConfigError naming the flag and its value (`prostate-kernels train` prints it as one
line). The resolved values a run uses (`run_patch`, `input_shape`, `model_kwargs`) are computed here
only, for the training loop, the checkpoint's record and the batch-size check alike.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prostate_kernels.data import ConfigError
from prostate_kernels.data.io import as_channels, channel_count, check_channels
from prostate_kernels.data.orientation import DEFAULT_ORIENTATION, check_orientation
from prostate_kernels.devices import available_cores, memory_bytes
from prostate_kernels.memory_bound import step_memory
from prostate_kernels.models import build_model, downsampling
from prostate_kernels.torchrun_env import process_layout
from prostate_kernels.train_recipe import amp_dtype_for


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
    # every case's voxel axes permuted and flipped to this orientation first (data/orientation.py);
    # None: as each file stores them
    orientation: str | None = DEFAULT_ORIENTATION
    seed: int = 0
    workers: int = 0
    flips: bool = True
    augment: bool = True  # rotation, scaling and intensity augmentation (data/sampling.py)
    deterministic: bool = False  # torch.use_deterministic_algorithms for the run (deterministic_mode)
    cuda_graphs: bool = False  # forward and backward replayed from CUDA graphs (cuda_graph_training.py)
    compile: bool = False  # the training step's forward and backward through torch.compile (Inductor)
    channels_last: bool = False  # the model's weights and each batch channels-last (layout.py)
    sync_batchnorm: bool = False  # under torchrun: BatchNorm over every process's batch (sync_training.py)
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
    check_orientation(config.orientation)
    if config.compile and config.cuda_graphs:
        raise ConfigError("--compile and --cuda-graphs: choose one (each replaces the eager training step; "
                          "torch.compile's own CUDA graphs are its mode 'reduce-overhead')")  # fmt: skip
    if not (math.isfinite(config.weight_decay) and 0 <= config.weight_decay <= FLOAT32_MAX):
        raise ConfigError(
            f"--weight-decay {config.weight_decay} must be a finite number in [0, {FLOAT32_MAX:.4g}]"
        )
    patch = config.patch or settings.patch
    if len(patch) != 3 or min(patch) < 1:
        raise ConfigError(f"--patch {patch} must be 3 positive sizes (D H W)")
    model = meta_model(config)  # only its downsampling is needed
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
    patch, batch = run_patch(config), config.batch or settings.batch
    shape = (batch, *input_shape(config, patch))
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
    step = step_memory(meta_model(config).train(), torch.empty(shape, device="meta"))
    halved = amp_dtype_for(config.amp, device) is not None
    largest, peak = (step.largest_tensor // 2, step.peak // 2) if halved else (step.largest_tensor, step.peak)
    if largest > total:  # the largest tensor of the forward or the backward
        refuse(f"one training step of {config.model} makes a {{}} tensor", largest)
    if device.type != "cpu":
        return
    ranks = process_layout().local_world  # torchrun's processes share this machine's memory
    if peak * ranks > total:
        what = (f"the training steps of {config.model} (forward and backward) of the {ranks} processes on "
                "this machine hold {} at once" if ranks > 1 else
                f"one training step of {config.model} (forward and backward) holds {{}} at once")  # fmt: skip
        refuse(what, peak * ranks)


def meta_model(config: TrainConfig) -> torch.nn.Module:
    """The run's network on the meta device: shapes, no weights allocated."""
    with torch.device("meta"):
        return build_model(config.model, **model_kwargs(config))


def run_patch(config: TrainConfig) -> tuple[int, int, int]:
    """The run's patch (D, H, W): --patch, else its network's default (check_patch has checked it)."""
    d, h, w = config.patch or config.settings().patch
    return d, h, w


def input_shape(config: TrainConfig, patch: tuple[int, int, int]) -> tuple[int, ...]:
    """One training input (C, *patch) without the batch: C = the image channels, times the slices of a
    2-D network's stacks (whose patch is (slices, h, w): input (C * slices, h, w))."""
    slices, channels = config.settings().slices, channel_count(config.channel)
    return (channels * slices, *patch[1:]) if slices else (channels, *patch)


def model_kwargs(config: TrainConfig) -> dict:
    slices, channels = config.settings().slices, channel_count(config.channel)
    in_channels = channels * slices if slices else channels
    # a single-channel 3-D network keeps its builder's default (checkpoints before channels record none)
    return {**({"in_channels": in_channels} if slices or channels > 1 else {}), **config.model_kwargs}


__all__ = [
    "AMP",
    "LOSSES",
    "PAPER",
    "SCHEDULES",
    "PaperSettings",
    "TrainConfig",
    "check_batch_fits",
    "check_config",
    "input_shape",
    "model_kwargs",
    "run_patch",
]
