"""The optimisation recipe of a training run: learning-rate schedules (LambdaLR factors of the iteration),
the losses on logits, and the autocast dtype of `--amp`."""

from __future__ import annotations

from collections.abc import Callable

import torch

EPOCH_ITERS = 100  # iterations per "epoch" for the epoch-based schedules (patches are sampled, not swept)

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, target in {0, 1}) -> scalar


def lr_schedule(decay: tuple[str, float, int]) -> Callable[[int], float]:
    """The factor of the base learning rate at each iteration, for LambdaLR:
    ("time", rate, _): lr / (1 + rate * it), Keras' `decay`, the paper's for U-Net 3D and Tiramisu 3D;
    ("step", factor, epochs): times `factor` every `epochs` epochs of EPOCH_ITERS, the paper's DeepLabv3+;
    ("poly", power, iterations): nnU-Net's (1 - it / iterations) ** power."""
    kind, rate, epochs = decay
    if kind == "time":
        return TimeDecay(rate)
    if kind == "poly":
        return PolyDecay(rate, epochs)
    return StepDecay(rate, epochs * EPOCH_ITERS)


class PolyDecay:
    """nnU-Net's schedule: (1 - it / iters) ** power, reaching 0 at the last iteration. `iters` is the
    run's --iters (a resumed run sets it to its own)."""

    def __init__(self, power: float, iters: int) -> None:
        self.power, self.iters = power, iters

    def __call__(self, it: int) -> float:
        return max(0.0, 1.0 - it / self.iters) ** self.power


class TimeDecay:
    """1 / (1 + rate * it)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, it: int) -> float:
        return 1.0 / (1.0 + self.rate * it)


class StepDecay:
    """factor ** (it // every)."""

    def __init__(self, factor: float, every: int) -> None:
        self.factor, self.every = factor, every

    def __call__(self, it: int) -> float:
        return self.factor ** (it // self.every)


def loss_function(name: str) -> Loss:
    """The loss `name` (train_config.LOSSES) of float32 logits and a target of the same shape: "bce",
    "dice" (soft Dice over the whole batch, smoothed by 1) or their sum "bce+dice"."""
    bce = torch.nn.BCEWithLogitsLoss()

    def soft_dice(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        return 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)

    def bce_dice(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return bce(logits, y) + soft_dice(logits, y)

    losses: dict[str, Loss] = {"bce": bce, "dice": soft_dice, "bce+dice": bce_dice}
    return losses[name]


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `--amp` (train_config.AMP) on `device`; None: no autocast. "auto" is bf16 on
    CUDA and off elsewhere."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


__all__ = [
    "EPOCH_ITERS",
    "Loss",
    "PolyDecay",
    "StepDecay",
    "TimeDecay",
    "amp_dtype_for",
    "loss_function",
    "lr_schedule",
]
