"""The voxel sizes a network was trained on (trained_spacing.py): train records their range in the
checkpoint; predict resamples an input whose voxels are far outside it into the range and the result back
(a network trained without --spacing), or under --keep-voxel-size predicts on the input's own grid and
warns, as a U-Net 3D trained on 3 mm voxels scored 0.062 on the same scans at 1.5 mm without a word."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import make_phantoms, train_args

from prostate_kernels import pipeline
from prostate_kernels.checkpoint import load_checkpoint
from prostate_kernels.cli import main
from prostate_kernels.data import DataError, read_volume, write_volume
from prostate_kernels.prediction_record import PredictionSettings
from prostate_kernels.trained_model import _check_recorded_settings
from prostate_kernels.trained_spacing import (
    RANGE_KEY,
    SPACING_TOLERANCE,
    network_spacing,
    spacing_note,
    spacing_range,
    spacing_warning,
    spread_note,
)


def test_the_range_is_per_axis_and_unknown_when_a_case_is():
    assert spacing_range([(3.0, 0.5, 0.6), (3.6, 0.7, 0.5)]) == [[3.0, 0.5, 0.5], [3.6, 0.7, 0.6]]
    assert spacing_range([(3.0, 0.5, 0.6), None]) is None and spacing_range([]) is None


def test_the_warning_names_the_voxels_the_range_and_the_scale():
    state = {"spacing": None, RANGE_KEY: [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]}
    said = spacing_warning((1.5, 1.5, 1.5), state)
    assert said is not None and "voxels of 1.5x1.5x1.5 mm (Z Y X)" in said and "trained on 3x3x3 mm" in said
    assert "up to 2x another scale" in said and "--keep-voxel-size" in said
    edge = 3.0 * SPACING_TOLERANCE
    assert spacing_warning((3.0, 3.0, edge * 0.999), state) is None  # within the tolerance
    assert spacing_warning((3.0, 3.0, edge * 1.001), state) is not None
    assert spacing_warning((3.0, 3.0 / SPACING_TOLERANCE * 0.999, 3.0), state) is not None
    ranged = {RANGE_KEY: [[2.2, 0.27, 0.27], [4.0, 0.75, 0.75]]}
    assert spacing_warning((3.0, 0.5, 0.5), ranged) is None  # inside the training cases' own spread
    assert "trained on 2.2-4x0.27-0.75x0.27-0.75 mm" in spacing_warning((3.0, 1.5, 1.5), ranged)
    assert spacing_warning((1.5, 1.5, 1.5), {**state, "spacing": [3.0, 3.0, 3.0]}) is None  # resampled
    assert spacing_warning((1.5, 1.5, 1.5), {"spacing": None}) is None  # checkpoints before the record


def test_train_notes_voxel_sizes_that_span_more_than_the_tolerance_and_names_their_median():
    promise12_like = [(3.0, 0.27, 0.27), (3.6, 0.6, 0.6), (2.2, 0.75, 0.75)]
    said = spread_note(promise12_like)
    assert said is not None and "span 2.2-3.6x0.27-0.75x0.27-0.75 mm (Z Y X; 2.8x on an axis)" in said
    assert "--spacing 3 0.6 0.6 (their median)" in said
    assert spread_note([(3.0, 0.5, 0.5), (3.0 * SPACING_TOLERANCE * 0.999, 0.5, 0.55)]) is None  # one scale
    assert spread_note([(3.0, 0.5, 0.5), None]) is None and spread_note([]) is None  # unknown: nothing


def test_only_the_axes_far_outside_the_range_move_to_its_nearest_end():
    ranged = {"spacing": None, RANGE_KEY: [[2.2, 0.27, 0.27], [4.0, 0.75, 0.75]]}
    assert network_spacing((3.0, 0.5, 0.5), ranged) is None  # inside: the input's own grid
    edge = (4.0 * SPACING_TOLERANCE * 0.999, 0.27 / SPACING_TOLERANCE * 1.001, 0.75)
    assert network_spacing(edge, ranged) is None  # outside the range, but within the tolerance
    assert network_spacing((6.0, 0.5, 0.1), ranged) == (4.0, 0.5, 0.27)  # too thick, fine: Y kept
    assert network_spacing((1.5, 1.5, 0.5), ranged) == (2.2, 0.75, 0.5)
    assert network_spacing((1.5, 1.5, 0.5), ranged, keep_voxel_size=True) is None
    assert network_spacing((1.5, 1.5, 0.5), {"spacing": None}) is None  # checkpoints before the record
    spaced = {"spacing": [3.0, 3.0, 3.0], RANGE_KEY: [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]}
    for keep in (False, True):  # --spacing: every input resampled to it, whatever its voxels
        assert network_spacing((3.0, 3.0, 3.0), spaced, keep) == (3.0, 3.0, 3.0)
        assert network_spacing((1.5, 1.5, 1.5), spaced, keep) == (3.0, 3.0, 3.0)
    said = spacing_note((1.5, 1.5, 0.5), (2.2, 0.75, 0.5), ranged)
    assert "voxels of 1.5x1.5x0.5 mm (Z Y X) are outside the 2.2-4x0.27-0.75x0.27-0.75 mm" in said
    assert "resampled to 2.2x0.75x0.5 mm" in said and "--keep-voxel-size" in said


def test_the_setting_is_recorded_only_where_it_resamples_so_earlier_records_keep_their_digest():
    """82f4f8de7dc92dcc: these settings' digest as the library computed it before the voxel-size setting
    (prediction_record.py at b7490ff): a record an earlier version wrote still continues."""
    settings = PredictionSettings(("ab" * 32,), "patch", 0.5, "gaussian", True, False, ("single",))
    assert settings.digest == "82f4f8de7dc92dcc" and "voxel size" not in settings.as_dict()
    resampling = replace(settings, voxel_size="resampled")
    assert resampling.as_dict()["voxel size"] == "resampled" and resampling.digest != settings.digest


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


def _predict(checkpoint: Path | list[Path], image: Path, out: Path, *extra: str) -> None:
    checkpoints = [str(c) for c in (checkpoint if isinstance(checkpoint, list) else [checkpoint])]
    args = ["predict", "--checkpoint", *checkpoints, "--input", str(image), "--output", str(out),
            "--no-tta", "--no-progress", *extra]  # fmt: skip
    assert main(args) == 0


@pytest.fixture
def network_grids(monkeypatch) -> list[tuple[int, ...]]:
    """The (D, H, W) of every volume predict hands a network (the grid it sees), in call order."""
    seen, real = [], pipeline.predict_probabilities

    def recording(model, channels, *args, **kwargs):
        seen.append(tuple(channels.shape[1:]))
        return real(model, channels, *args, **kwargs)

    monkeypatch.setattr(pipeline, "predict_probabilities", recording)
    return seen


def test_predict_resamples_voxels_far_outside_the_training_range_into_it(
    tmp_path, trained, capsys, network_grids
):
    data, checkpoint = trained
    state = load_checkpoint(checkpoint)
    training = [read_volume(data / f"Case0{i}.mhd").spacing_zyx for i in (0, 1)]  # the last is held out
    assert np.allclose(state[RANGE_KEY], [np.min(training, axis=0), np.max(training, axis=0)])
    scan = read_volume(data / "Case02.mhd")
    capsys.readouterr()
    _predict(checkpoint, data / "Case02.mhd", tmp_path / "same")
    assert capsys.readouterr().err == "" and network_grids == [scan.array.shape]  # inside: its own grid
    half = tuple(s / 2 for s in scan.spacing_zyx)  # (Z, Y, X): far below the range on every axis
    finer = write_volume(replace(scan, spacing=half[::-1]), tmp_path / "f" / "c.mhd")
    lowest = state[RANGE_KEY][0]  # each axis to the range's finest end (resample_to_spacing's sizes)
    expected = tuple(round(n * s / t) for n, s, t in zip(scan.array.shape, half, lowest, strict=True))
    assert all(s < t / SPACING_TOLERANCE for s, t in zip(half, lowest, strict=True))
    assert expected != scan.array.shape
    _predict([checkpoint, checkpoint], finer, tmp_path / "finer")  # an ensemble of two: said once
    err = capsys.readouterr().err
    assert err.count("c.mhd: voxels of") == 1 and "resampled to" in err and "warning" not in err
    assert network_grids[1:] == [expected, expected]
    written = read_volume(tmp_path / "finer" / "c_segmentation.mhd")  # on the input's own grid
    assert written.array.shape == scan.array.shape and np.allclose(written.spacing_zyx, half)

    network_grids.clear()
    _predict(checkpoint, finer, tmp_path / "own", "--keep-voxel-size")
    err = capsys.readouterr().err
    assert "c.mhd: warning: voxels of" in err and "--keep-voxel-size" in err
    assert network_grids == [scan.array.shape]  # the input's own grid, as before the resampling
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(finer), "--output",
            str(tmp_path / "own"), "--no-tta", "--no-progress", "--continue"]  # fmt: skip
    assert main(args) != 0  # predicted on its own grid: the default's setting differs, not mixed
    assert (
        "voxel size (none) -> inputs far outside the training voxel sizes resampled into them (not under "
        "--keep-voxel-size)" in capsys.readouterr().err
    )
