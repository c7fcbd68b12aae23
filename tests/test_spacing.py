"""Training and predicting at a target spacing: cases are resampled to it (images linearly, masks by
nearest neighbour), the checkpoint keeps it, and predict resamples each input to it and the result back,
so the output keeps the input's own grid (issue 15, section 2)."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import make_phantoms

from prostate_kernels.checkpoint import load_checkpoint
from prostate_kernels.cli import main
from prostate_kernels.data import DataError, Volume, read_volume, write_volume
from prostate_kernels.data.resample import resample_onto, resample_to_spacing

DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def test_resampling_keeps_extent_origin_direction_and_labels():
    z, y, x = np.meshgrid(np.arange(10), np.arange(40), np.arange(30), indexing="ij")
    ramp = Volume(
        (2.0 * z + 0.5 * y - 0.25 * x).astype(np.float32), (0.5, 0.5, 3.0), (10.0, -4.0, 2.5), DIRECTION
    )
    coarse = resample_to_spacing(ramp, (1.5, 1.5, 1.5))
    assert coarse.array.shape == (20, 13, 10) and coarse.spacing == (1.5, 1.5, 1.5)
    assert coarse.origin == ramp.origin and coarse.direction == ramp.direction
    back = resample_onto(coarse, ramp)
    assert back.shape == ramp.array.shape and back.dtype == np.float32
    inner = (slice(0, 9), slice(0, 37), slice(0, 27))  # the last voxels lie past the coarse grid's centres
    assert np.abs(back[inner] - ramp.array[inner]).max() < 1e-3  # linear in, linear out: exact up to rounding
    mask = Volume((ramp.array > 10).astype(np.uint8), ramp.spacing, ramp.origin, ramp.direction)
    coarse_mask = resample_to_spacing(mask, (1.5, 1.5, 1.5), nearest=True)
    assert coarse_mask.array.dtype == np.uint8 and set(np.unique(coarse_mask.array)) == {0, 1}


def test_a_model_trained_at_1_5_mm_predicts_on_the_inputs_own_grid(tmp_path):
    data = make_phantoms(tmp_path / "data")
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--model", "tiramisu3d_tiny",
            "--patch", "8", "8", "8", "--batch", "2", "--iters", "2", "--val-every", "2", "--val-cases", "1",
            "--no-progress", "--spacing", "1.5", "1.5", "1.5"]  # fmt: skip
    assert main(args) == 0
    assert load_checkpoint(run / "checkpoint.pt")["spacing"] == [1.5, 1.5, 1.5]
    phantom = read_volume(data / "Case00.mhd")
    stored = Volume(phantom.array, (0.5, 0.5, 3.0), (-20.0, 15.0, 7.5), DIRECTION)  # x, y, z mm
    image_path = write_volume(stored, tmp_path / "input" / "Case09.nii.gz")
    out = tmp_path / "pred"
    args = ["predict", "--checkpoint", str(run / "checkpoint.pt"), "--input", str(image_path),
            "--output", str(out), "--save-probabilities"]  # fmt: skip
    assert main(args) == 0
    image = read_volume(image_path)
    for name in ("Case09_segmentation.nii.gz", "Case09_probabilities.nii.gz"):
        written = read_volume(out / name)
        assert written.array.shape == image.array.shape
        for field in ("spacing", "origin", "direction"):
            assert np.allclose(getattr(written, field), getattr(image, field), atol=1e-6), (name, field)
    prob = read_volume(out / "Case09_probabilities.nii.gz").array
    assert 0 <= prob.min() and prob.max() <= 1 and np.isfinite(prob).all()


@pytest.mark.parametrize("spacing", [[1.5, 1.5], [1.5, -1.0, 1.5], "1.5"])
def test_a_checkpoint_with_a_malformed_spacing_is_refused(tmp_path, spacing):
    from prostate_kernels.data import DataError
    from prostate_kernels.pipeline import _check_patch_and_slices

    with pytest.raises(DataError, match="malformed checkpoint: spacing"):
        _check_patch_and_slices({"patch": [8, 8, 8], "slices": 0, "spacing": spacing}, tmp_path / "c.pt")


def test_a_spacing_too_fine_to_allocate_names_the_size_instead_of_itks_error(tmp_path):
    """train --spacing 0.001 0.001 0.001 ended in SimpleITK's RuntimeError (a 10^14-voxel grid)."""
    grid = Volume(np.zeros((4, 6, 8), np.float32), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    path = write_volume(grid, tmp_path / "case.nii.gz")
    volume = read_volume(path)
    with pytest.raises(DataError) as info:
        resample_to_spacing(volume, (1e-4, 1e-4, 1e-4))
    message = str(info.value)
    assert message.startswith(f"{path}: resampled from spacing (2.0, 1.0, 1.0) mm it would have")
    assert "(80000, 60000, 80000) voxels" in message and "choose a coarser --spacing" in message
