"""Checkpoints: written atomically (temporary file, fsync, rename), read with weights_only=True.

A checkpoint is a dict of tensors and plain Python values only: the model's name and constructor
arguments, its state_dict, the optimizer's and scheduler's state, every rank's RNG states and the
iteration, so that training resumes exactly where it stopped and prediction rebuilds the model alone.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from prostate_kernels.data.errors import DataError
from prostate_kernels.safe_files import atomic_write

FORMAT = "prostate_kernels/1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Writes `state` to `path` without ever leaving a truncated file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:  # readers see the old checkpoint or the new one, never a part
        torch.save({"format": FORMAT, **state}, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by save_checkpoint; DataError naming the file for anything else."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "is a directory, expected a checkpoint file (such as RUN/best.pt)")
    if not path.exists():
        raise DataError(path, "checkpoint not found")
    if not path.is_file():  # reading a named pipe would wait forever, a device forever or in vain
        raise DataError(path, "not a regular file (a pipe, socket or device), expected a checkpoint file")
    if not _is_zip_archive(path):  # torch.save writes a zip archive; a truncated one has no directory
        raise DataError(path, "not a checkpoint: not a file torch.save wrote, or one cut short")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:150]}"
        raise DataError(path, f"not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(path, f"not a prostate_kernels checkpoint (expected format {FORMAT!r})")
    return state


def _is_zip_archive(path: Path) -> bool:
    """zipfile.is_zipfile, which raises BadZipFile itself for an end record of a ZIP64 archive that names
    several disks (a damaged checkpoint ended predict in that traceback)."""
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:
        return False


def load_model_weights(model: torch.nn.Module, state_dict: object, path: str | Path, name: str) -> None:
    """load_state_dict with a one-line DataError when the weights belong to another network, are not a
    dict of tensors, or hold NaN or infinite values (a damaged file: its network would predict nothing,
    silently, where every probability is NaN)."""
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise DataError(path, f"malformed checkpoint: its weights are of type {type(state_dict).__name__!r}, "
                              "not a dict of tensors")  # fmt: skip
    damaged = [key for key, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if damaged:
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        raise DataError(path, f"damaged checkpoint: weights {damaged[0]!r}{more} hold NaN or infinite values")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        # "Error(s) in loading state_dict for X:" then one tab-indented line per kind of mismatch
        what = "; ".join(line.strip() for line in str(exc).splitlines()[1:]) or str(exc)
        raise DataError(path, f"weights do not fit model {name!r} ({what[:200]})") from None
