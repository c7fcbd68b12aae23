"""The voxel sizes a network was trained on, recorded in its checkpoint, and the grid predict shows it an
input on.

A network learns anatomy in voxels. Trained without `--spacing`, it saw each training case on the case's
own grid, and an input whose voxels are of another size shows it the anatomy at another scale: a U-Net 3D
trained on 3 mm voxels scored a mean Dice of 0.856 on 10 held-out real scans at 3 mm, 0.847 at 2.5 mm,
0.806 at 2.25 mm, 0.775 at 4 mm and 0.062 at 1.5 mm (the same scans resampled; README, "Orientation and
voxel size"), without a word. So `train` records the range of voxel sizes its network saw (per axis Z, Y,
X in the network's orientation: `--spacing` itself, or the smallest and largest of the training cases'
own), and `predict` (network_spacing) resamples an input whose voxels are outside that range, widened by
SPACING_TOLERANCE, on some axis: that axis to the range's nearest end, the others kept; its probabilities
go back onto the input's own grid. `predict --keep-voxel-size` keeps every input on its own grid and
warns instead (spacing_warning). A checkpoint trained with `--spacing` resamples every input to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPACING_TOLERANCE = 1.25  # act beyond: 1.2x from the training voxels cost 0.009 Dice, 1.33x 0.05-0.08
RANGE_KEY = "trained_spacing_range"  # in a checkpoint: [[min Z, min Y, min X], [max Z, max Y, max X]] mm


def spacing_range(spacings: Sequence[Sequence[float] | None]) -> list[list[float]] | None:
    """[[min], [max]] per axis of the training cases' (Z, Y, X) voxel sizes; None when a case's is
    unknown (cases handed over as arrays) or there are none."""
    if not spacings or any(s is None for s in spacings):
        return None
    return [[float(min(axis)) for axis in zip(*spacings, strict=True)],
            [float(max(axis)) for axis in zip(*spacings, strict=True)]]  # fmt: skip


def spread_note(spacings: Sequence[Sequence[float] | None]) -> str | None:
    """train's note when the training cases' (Z, Y, X) voxel sizes, trained without --spacing, span more
    than SPACING_TOLERANCE on an axis (PROMISE12's: 0.27-0.75 mm in-plane); None otherwise, and when a
    case's is unknown. Such a network learns the anatomy at several scales: a U-Net 3D trained on the 40
    real training cases, every other one resampled from 1.5 to 3 mm, scored a held-out Dice of 0.526 at
    1.5 mm and 0.759 at 3 mm, where the same network trained at --spacing 3 3 3 scored 0.856 at both."""
    seen = spacing_range(spacings)
    if seen is None or all(most <= least * SPACING_TOLERANCE for least, most in zip(*seen, strict=True)):
        return None
    spread = max(most / least for least, most in zip(*seen, strict=True))
    median = [float(np.median(axis)) for axis in zip(*spacings, strict=True)]
    return (
        f"note: the training cases' voxels span {_range_text(seen)} mm (Z Y X; {spread:.2g}x on an "
        "axis), so the network learns the anatomy at several scales (README, Orientation and voxel size: "
        "0.53-0.76 held-out Dice against 0.86 at one spacing); --spacing "
        f"{' '.join(f'{s:.3g}' for s in median)} (their median) trains it at one"
    )


def resamples_into_range(state: dict) -> bool:
    """Whether predict may resample an input into the checkpoint's training range: it records the range
    and no --spacing (a checkpoint with --spacing resamples every input to it; older ones record none)."""
    return state.get("spacing") is None and state.get(RANGE_KEY) is not None


def network_spacing(
    spacing_zyx: Sequence[float], state: dict, keep_voxel_size: bool = False
) -> tuple[float, float, float] | None:
    """The voxel size (Z, Y, X mm, in the network's orientation) at which the checkpoint's network sees an
    input of `spacing_zyx` voxels: its --spacing; else, when the input is outside the recorded training
    range by more than SPACING_TOLERANCE on an axis (and not keep_voxel_size), the input's own voxel size
    with each such axis moved to the range's nearest end; None: the input's own grid."""
    if state.get("spacing") is not None:
        z, y, x = (float(s) for s in state["spacing"])
        return z, y, x
    if keep_voxel_size or not resamples_into_range(state) or not _times_outside(spacing_zyx, state):
        return None
    low, high = state[RANGE_KEY]
    z, y, x = (
        float(most) if s > most * SPACING_TOLERANCE else float(least) if s < least / SPACING_TOLERANCE else s
        for s, least, most in zip(spacing_zyx, low, high, strict=True)
    )
    return z, y, x


def spacing_message(spacing_zyx: Sequence[float], state: dict, keep_voxel_size: bool = False) -> str | None:
    """What predict says on stderr of an input of `spacing_zyx` voxels: under keep_voxel_size the warning
    (spacing_warning), else the note when network_spacing moves it into the training range
    (spacing_note); None when neither applies (inside the range, a --spacing checkpoint, no range)."""
    if keep_voxel_size:
        return spacing_warning(spacing_zyx, state)
    target = network_spacing(spacing_zyx, state)
    return spacing_note(spacing_zyx, target, state) if target and resamples_into_range(state) else None


def spacing_note(spacing_zyx: Sequence[float], target_zyx: Sequence[float], state: dict) -> str:
    """What predict says on stderr when network_spacing moved an input's voxels into the training range."""
    return (
        f"voxels of {_mm(spacing_zyx)} mm (Z Y X) are outside the {_range_text(state[RANGE_KEY])} mm the "
        f"network was trained on (without --spacing): predicted resampled to {_mm(target_zyx)} mm, the "
        "probabilities resampled back onto the input's grid (--keep-voxel-size: predict on its own grid)"
    )


def spacing_warning(spacing_zyx: Sequence[float], state: dict) -> str | None:
    """Under --keep-voxel-size, a warning when a network trained without --spacing gets voxels of
    `spacing_zyx` (Z, Y, X mm, in the network's orientation) outside its recorded range widened by
    SPACING_TOLERANCE; None otherwise, and for checkpoints that record no range or a --spacing."""
    if not resamples_into_range(state):
        return None
    off = _times_outside(spacing_zyx, state)
    if not off:
        return None
    return (
        f"warning: voxels of {_mm(spacing_zyx)} mm (Z Y X), where the network was trained on "
        f"{_range_text(state[RANGE_KEY])} mm and predicts on each input's own grid (--keep-voxel-size): it "
        f"sees the anatomy at up to {max(off):.2g}x another scale, and its masks can be far off (README, "
        "Orientation and voxel size)"
    )


def _times_outside(spacing_zyx: Sequence[float], state: dict) -> list[float]:
    """For each axis outside the recorded range widened by SPACING_TOLERANCE, how many times outside the
    range (not the widened one) its voxel size is."""
    low, high = state[RANGE_KEY]
    return [
        (s / most if s > most else least / s)
        for s, least, most in zip(spacing_zyx, low, high, strict=True)
        if s > most * SPACING_TOLERANCE or s < least / SPACING_TOLERANCE
    ]


def _range_text(seen: Sequence[Sequence[float]]) -> str:
    """A range [[min Z, Y, X], [max Z, Y, X]] as text: 3x3x3, or 2.2-4x0.27-0.75x0.27-0.75."""
    return "x".join(
        f"{least:.3g}" if least == most else f"{least:.3g}-{most:.3g}"
        for least, most in zip(*seen, strict=True)
    )


def _mm(spacing_zyx: Sequence[float]) -> str:
    return "x".join(f"{s:.3g}" for s in spacing_zyx)


__all__ = [
    "RANGE_KEY",
    "SPACING_TOLERANCE",
    "network_spacing",
    "resamples_into_range",
    "spacing_note",
    "spacing_message",
    "spacing_range",
    "spacing_warning",
    "spread_note",
]
