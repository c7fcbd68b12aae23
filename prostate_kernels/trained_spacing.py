"""The voxel sizes a network was trained on, recorded in its checkpoint, and predict's warning when an
input's voxels are far from them.

A network learns anatomy in voxels. Trained without `--spacing`, it sees each input on the input's own
grid: a U-Net 3D trained on 3 mm voxels scored a mean Dice of 0.856 on 10 held-out real scans at 3 mm,
0.847 at 2.5 mm, 0.806 at 2.25 mm, 0.775 at 4 mm and 0.062 at 1.5 mm (the same scans resampled; README,
"Orientation and voxel size"), without a word. So `train` records the range of voxel sizes its network
saw (per axis Z, Y, X in the network's orientation: `--spacing` itself, or the smallest and largest of
the training cases' own), and `predict` warns when an input's voxel size is outside that range widened by
SPACING_TOLERANCE on an axis, unless it resamples the input (a checkpoint trained with `--spacing`).
"""

from __future__ import annotations

from collections.abc import Sequence

SPACING_TOLERANCE = 1.25  # warn beyond: 1.2x from the training voxels cost 0.009 Dice, 1.33x 0.05-0.08
RANGE_KEY = "trained_spacing_range"  # in a checkpoint: [[min Z, min Y, min X], [max Z, max Y, max X]] mm


def spacing_range(spacings: Sequence[Sequence[float] | None]) -> list[list[float]] | None:
    """[[min], [max]] per axis of the training cases' (Z, Y, X) voxel sizes; None when a case's is
    unknown (cases handed over as arrays) or there are none."""
    if not spacings or any(s is None for s in spacings):
        return None
    return [[float(min(axis)) for axis in zip(*spacings, strict=True)],
            [float(max(axis)) for axis in zip(*spacings, strict=True)]]  # fmt: skip


def spacing_warning(spacing_zyx: Sequence[float], state: dict) -> str | None:
    """A warning when a network that sees inputs on their own grid (no recorded "spacing") gets voxels of
    `spacing_zyx` (Z, Y, X mm, in the network's orientation) outside its recorded range widened by
    SPACING_TOLERANCE; None otherwise, and for checkpoints that record no range."""
    recorded = state.get(RANGE_KEY)
    if state.get("spacing") is not None or recorded is None:
        return None
    low, high = recorded
    off = [
        (s / most if s > most else least / s)
        for s, least, most in zip(spacing_zyx, low, high, strict=True)
        if s > most * SPACING_TOLERANCE or s < least / SPACING_TOLERANCE
    ]
    if not off:
        return None
    trained = "x".join(
        f"{least:.3g}" if least == most else f"{least:.3g}-{most:.3g}"
        for least, most in zip(low, high, strict=True)
    )
    return (
        f"warning: voxels of {'x'.join(f'{s:.3g}' for s in spacing_zyx)} mm (Z Y X), where the network was "
        f"trained on {trained} mm and predicts on each input's own grid (trained without --spacing): it "
        f"sees the anatomy at up to {max(off):.2g}x another scale, and its masks can be far off (README, "
        "Orientation and voxel size); train with --spacing to have predict resample each input"
    )


__all__ = ["RANGE_KEY", "SPACING_TOLERANCE", "spacing_range", "spacing_warning"]
