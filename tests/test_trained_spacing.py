"""The voxel sizes a network was trained on (trained_spacing.py): train records their range in the
checkpoint, predict warns when a network that predicts on each input's own grid (trained without
--spacing) gets voxels outside it, as a U-Net 3D trained on 3 mm voxels scored 0.062 on the same scans
at 1.5 mm without a word."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import make_phantoms, train_args

from prostate_kernels.checkpoint import load_checkpoint
from prostate_kernels.cli import main
from prostate_kernels.data import DataError, read_volume, write_volume
from prostate_kernels.trained_model import _check_recorded_settings
from prostate_kernels.trained_spacing import RANGE_KEY, SPACING_TOLERANCE, spacing_range, spacing_warning


def test_the_range_is_per_axis_and_unknown_when_a_case_is():
    assert spacing_range([(3.0, 0.5, 0.6), (3.6, 0.7, 0.5)]) == [[3.0, 0.5, 0.5], [3.6, 0.7, 0.6]]
    assert spacing_range([(3.0, 0.5, 0.6), None]) is None and spacing_range([]) is None


def test_the_warning_names_the_voxels_the_range_and_the_scale():
    state = {"spacing": None, RANGE_KEY: [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]}
    said = spacing_warning((1.5, 1.5, 1.5), state)
    assert said is not None and "voxels of 1.5x1.5x1.5 mm (Z Y X)" in said and "trained on 3x3x3 mm" in said
    assert "up to 2x another scale" in said and "--spacing" in said
    edge = 3.0 * SPACING_TOLERANCE
    assert spacing_warning((3.0, 3.0, edge * 0.999), state) is None  # within the tolerance
    assert spacing_warning((3.0, 3.0, edge * 1.001), state) is not None
    assert spacing_warning((3.0, 3.0 / SPACING_TOLERANCE * 0.999, 3.0), state) is not None
    ranged = {RANGE_KEY: [[2.2, 0.27, 0.27], [4.0, 0.75, 0.75]]}
    assert spacing_warning((3.0, 0.5, 0.5), ranged) is None  # inside the training cases' own spread
    assert "trained on 2.2-4x0.27-0.75x0.27-0.75 mm" in spacing_warning((3.0, 1.5, 1.5), ranged)
    assert spacing_warning((1.5, 1.5, 1.5), {**state, "spacing": [3.0, 3.0, 3.0]}) is None  # resampled
    assert spacing_warning((1.5, 1.5, 1.5), {"spacing": None}) is None  # checkpoints before the record


@pytest.mark.parametrize(
    "value", [[[3.0, 3.0], [3.0, 3.0]], [[3.0, 3.0, 3.0]], [[3.0, 0.0, 3.0], [3.0, 3.0, 3.0]],
              [[3.0, 3.0, 3.0], [2.0, 3.0, 3.0]], [["3", 3.0, 3.0], [3.0, 3.0, 3.0]], "3 mm",
              [[3.0, 3.0, float("nan")], [3.0, 3.0, 3.0]]],
)  # fmt: skip
def test_a_checkpoint_with_a_malformed_range_is_refused(tmp_path, value):
    with pytest.raises(DataError, match=f"malformed checkpoint: {RANGE_KEY}"):
        _check_recorded_settings({"patch": [8, 8, 8], "slices": 0, RANGE_KEY: value}, tmp_path / "c.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(phantom dataset, checkpoint of a network trained on its own voxels, no --spacing)."""
    root = tmp_path_factory.mktemp("trained-spacing")
    data = make_phantoms(root / "data")
    assert main(train_args(data, root / "run", 2)) == 0
    return data, root / "run" / "checkpoint.pt"


def _predict(checkpoint: Path, image: Path, out: Path) -> None:
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(image), "--output", str(out),
            "--no-tta", "--no-progress"]  # fmt: skip
    assert main(args) == 0


def test_predict_warns_on_voxels_far_from_the_training_ones(tmp_path, trained, capsys):
    data, checkpoint = trained
    state = load_checkpoint(checkpoint)
    training = [read_volume(data / f"Case0{i}.mhd").spacing_zyx for i in (0, 1)]  # the last is held out
    assert np.allclose(state[RANGE_KEY], [np.min(training, axis=0), np.max(training, axis=0)])
    capsys.readouterr()
    _predict(checkpoint, data / "Case02.mhd", tmp_path / "same")
    assert "warning" not in capsys.readouterr().err  # phantom voxels: inside the range, or near it
    scan = read_volume(data / "Case02.mhd")
    finer = write_volume(replace(scan, spacing=tuple(s / 2 for s in scan.spacing)), tmp_path / "f" / "c.mhd")
    _predict(checkpoint, finer, tmp_path / "finer")
    err = capsys.readouterr().err
    assert "c.mhd: warning: voxels of" in err and "trained without --spacing" in err
