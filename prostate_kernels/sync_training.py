"""`train --sync-batchnorm`: under torchrun, every BatchNorm of the network normalises with the batch of
all processes together (torch.nn.SyncBatchNorm.convert_sync_batchnorm before DDP wraps the model; the
library's fused layers then take their statistics over the group too: ops/sync_batch_norm.py).

CUDA only: DistributedDataParallel refuses a model with nn.SyncBatchNorm layers on the CPU ("SyncBatchNorm
layers only work with GPU modules"), so the flag is refused there before anything is read or written.
"""

from __future__ import annotations

import torch
from torch import nn


def refusal(device: torch.device, world: int) -> str | None:
    """Why `--sync-batchnorm` cannot run here, or None when it can (one process: nothing to synchronise,
    which the caller says)."""
    if world > 1 and device.type != "cuda":
        return (
            f"--sync-batchnorm needs CUDA devices; this run is on {device.type}, where "
            "DistributedDataParallel refuses nn.SyncBatchNorm layers"
        )
    return None


def synchronised(model: nn.Module) -> nn.Module:
    """model with every BatchNorm an nn.SyncBatchNorm over the whole world (the same parameters and
    buffers, the same state_dict keys: checkpoints load into the plain network)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


__all__ = ["refusal", "synchronised"]
