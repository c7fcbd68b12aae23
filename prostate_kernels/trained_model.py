"""A trained network from its checkpoint, as predict and export use it: the settings it was trained with
checked (patch, slices, spacing, channels), one window of its patch tried on the meta device before any
weight is allocated, then the network built, its weights loaded, in eval mode on the device asked for."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from prostate_kernels.checkpoint import load_checkpoint, load_model_weights
from prostate_kernels.data import ConfigError, DataError
from prostate_kernels.data.io import channel_count
from prostate_kernels.data.orientation import check_orientation
from prostate_kernels.devices import memory_bytes
from prostate_kernels.layout import model_in_layout
from prostate_kernels.models import build_model
from prostate_kernels.trained_spacing import RANGE_KEY


def load_trained_model(
    checkpoint: Path, device: torch.device, channels_last: bool = False
) -> tuple[torch.nn.Module, dict]:
    """(the checkpoint's network in eval mode on device, in the layout asked for, its state)."""
    state = load_checkpoint(checkpoint, map_location=device)
    for key in ("model", "state_dict", "patch"):
        if key not in state:
            raise DataError(checkpoint, f"checkpoint lacks {key!r}")
    _check_recorded_settings(state, checkpoint)
    _check_window_fits_model(state, checkpoint, device)  # before any weight is allocated
    model = build_network(state, checkpoint)
    load_model_weights(model, state["state_dict"], checkpoint, state["model"])
    return model_in_layout(model.to(device), channels_last).eval(), state


def _check_recorded_settings(state: dict, checkpoint: Path) -> None:
    """A checkpoint's patch is 3 positive ints, its slices an int >= 0, its spacing (if any) 3 sizes > 0,
    its orientation (if any) a code, its trained_spacing_range (if any) well formed and its channel (if
    any) an int >= 0 or a list of different ones: else a DataError."""
    patch, slices = state["patch"], state.get("slices", 0)
    if (
        not isinstance(patch, (list, tuple))
        or len(patch) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in patch)
    ):
        raise DataError(checkpoint, f"malformed checkpoint: patch {patch!r} is not 3 positive ints")
    if not isinstance(slices, int) or isinstance(slices, bool) or slices < 0:
        raise DataError(checkpoint, f"malformed checkpoint: slices {slices!r} is not an int >= 0")
    spacing = state.get("spacing")
    if spacing is not None and (
        not isinstance(spacing, (list, tuple))
        or len(spacing) != 3
        or not all(_positive_number(v) for v in spacing)
    ):
        raise DataError(checkpoint, f"malformed checkpoint: spacing {spacing!r} is not 3 sizes > 0 (mm)")
    try:  # absent (checkpoints before it was recorded): None
        check_orientation(state.get("orientation"))
    except ConfigError:
        raise DataError(checkpoint, f"malformed checkpoint: orientation {state.get('orientation')!r} is not "
                                    "an orientation code (LPS)") from None  # fmt: skip
    seen = state.get(RANGE_KEY)  # None, or [[min Z, Y, X], [max Z, Y, X]] with min <= max
    if seen is not None and (
        not isinstance(seen, (list, tuple))
        or len(seen) != 2
        or not all(isinstance(row, (list, tuple)) and len(row) == 3 for row in seen)
        or not all(_positive_number(v) for row in seen for v in row)
        or not all(low <= high for low, high in zip(seen[0], seen[1], strict=True))
    ):
        raise DataError(checkpoint, f"malformed checkpoint: {RANGE_KEY} {state.get(RANGE_KEY)!r} is not "
                                    "[[min Z, Y, X], [max Z, Y, X]] of sizes > 0 (mm)")  # fmt: skip
    channel = state.get("channel")
    channels = [channel] if isinstance(channel, int) else channel
    if channel is not None and (
        not isinstance(channels, (list, tuple))
        or not channels
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels)
        or len(set(channels)) != len(channels)
    ):
        raise DataError(
            checkpoint,
            f"malformed checkpoint: channel {channel!r} is not an int >= 0 or a list of different ones",
        )


def window_shape(state: dict, window: Sequence[int] | None = None) -> tuple[int, ...]:
    """One input window of a checkpoint's network: (1, C, *window) for C image channels; a 2-D network's
    slice stacks (window (k, h, w)): (1, C * k, h, w). window: (D, H, W), default its training patch."""
    patch, slices, channels = (
        tuple(state["patch"] if window is None else window),
        state.get("slices", 0),
        channel_count(state.get("channel")),
    )
    return (1, channels * slices, *patch[1:]) if slices else (1, channels, *patch)


def build_network(state: dict, checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's network, untrained, on the default device; DataError when it cannot be built."""
    try:
        return build_model(state["model"], **state.get("model_kwargs", {}))
    except (ValueError, TypeError) as exc:
        raise DataError(checkpoint, f"cannot build its model ({exc})") from None


def _check_window_fits_model(state: dict, checkpoint: Path, device: torch.device) -> None:
    """DataError unless one window of the checkpoint's patch (its slices as channels for a 2-D network)
    fits the device's memory and is an input its network takes: checked by a forward of the network
    built on the meta device (shapes only, no values), whose models name what they expected. A patch or
    slices that disagreed with the network ended predict in the network's ValueError traceback."""
    patch, slices, window = tuple(state["patch"]), state.get("slices", 0), window_shape(state)
    need, total = math.prod(window) * 4, memory_bytes(device)
    if total is not None and need > total:
        raise DataError(checkpoint, f"malformed checkpoint: one window of its patch {list(patch)} takes "
                                    f"{need / 2**30:.3g} GiB in float32, more than the {total / 2**30:.3g} "
                                    f"GiB of memory of {device}")  # fmt: skip
    with torch.device("meta"):
        network = build_network(state, checkpoint).eval()
        try:
            with torch.no_grad():
                network(torch.empty(window))
        except ValueError as exc:
            raise DataError(checkpoint, f"malformed checkpoint: its patch {list(patch)} and slices {slices} "
                                        f"do not make an input of its network ({exc})") from None  # fmt: skip


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
