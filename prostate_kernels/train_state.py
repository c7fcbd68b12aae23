"""What a training checkpoint holds beyond the weights, and how `--resume` puts it back: every rank's RNG
states, the optimizer, scheduler and scaler, the run's settings (compared with the resumed run's), all
checked part by part so that a damaged or edited checkpoint is named, never a traceback."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from prostate_kernels.checkpoint import load_checkpoint, load_model_weights
from prostate_kernels.data import DataError
from prostate_kernels.data.io import as_channels, as_labels
from prostate_kernels.data.orientation import STORED
from prostate_kernels.train_config import TrainConfig, model_kwargs
from prostate_kernels.trained_spacing import RANGE_KEY


def gather_rng(world: int) -> dict:
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


def checkpoint_state(
    config: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    rng: dict,
    it: int,
    best: float,
    patch: tuple[int, int, int],
    spacing_range: list | None = None,
) -> dict:
    """What a checkpoint of iteration `it` holds: the network's name and build arguments, its patch,
    slices, spacing, orientation, label(s) and channel(s) (all that `predict` needs), the weights, the
    optimizer, scheduler and scaler states, every rank's RNG states (`rng`: gather_rng's), the best
    validation Dice so far and the run's settings (what `resume_differences` compares). spacing_range: the
    voxel sizes the network was trained on (trained_spacing.spacing_range), for predict's warning."""
    settings = config.settings()
    return {
        "model": config.model,
        "model_kwargs": model_kwargs(config),
        "patch": list(patch),
        "slices": settings.slices,
        "spacing": list(config.spacing) if config.spacing is not None else None,
        "orientation": config.orientation,
        RANGE_KEY: spacing_range,
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
                   ("spacing", "--spacing"), ("orientation", "--orientation"), ("label", "--label"),
                   ("channel", "--channel"),
                   ("val_cases", "--val-cases"),
                   ("deterministic", "--deterministic"), ("channels_last", "--channels-last"),
                   ("sync_batchnorm", "--sync-batchnorm"),
                   ("compile", "--compile"))  # fmt: skip
# What a run that did not record a setting used: runs before orientations were recorded kept each file's
# axes (None), so resuming one under the default LPS is a change worth the warning.
UNRECORDED = {"orientation": None}


def resume_differences(
    saved: dict, config: TrainConfig, patch, batch: int, lr: float, world: int
) -> list[str]:
    """'--flag NEW (was OLD)' for each setting of this run that differs from the checkpoint's (`saved`:
    the checkpoint's state; patch, batch and lr as resolved for this run, defaults filled in; world: the
    processes training now, against the ranks whose RNG states it holds). A setting the checkpoint does
    not record is not compared (except UNRECORDED's); None (no --spacing, no --label) is a value."""
    before = saved.get("config") or {}
    settings = config.settings()

    def plain(value):
        return tuple(value) if isinstance(value, list) else value

    def setting(name: str, value):  # one int is that label or channel, as checkpoints before lists record
        readers: dict[str, Callable[[Any], object]] = {
            "label": as_labels,
            "channel": as_channels,
            "orientation": lambda code: code or STORED,
        }
        return readers.get(name, plain)(value)

    pairs = [("--patch", tuple(patch), plain(saved.get("patch", tuple(patch)))),
             ("--batch", batch, before.get("batch") or settings.batch),
             ("--lr", lr, before["lr"] if before.get("lr") is not None else settings.lr)]  # fmt: skip
    recorded = {**UNRECORDED, **before} if before else before
    pairs += [(flag, setting(name, getattr(config, name)), setting(name, recorded[name]))
              for name, flag in RESUME_SETTINGS if name in recorded]  # fmt: skip
    if "rng" in saved:  # each rank draws its own patches and dropout: another count draws other ones
        pairs.append(("torchrun --nproc-per-node", world, len(saved["rng"]["ranks"])))
    return [f"{flag} {now} (was {was})" for flag, now, was in pairs if now != was]


def restore(path, model, optimizer, scheduler, scaler, rank, name) -> tuple[int, float, dict]:
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


__all__ = ["RESUME_SETTINGS", "checkpoint_state", "gather_rng", "restore", "resume_differences"]
