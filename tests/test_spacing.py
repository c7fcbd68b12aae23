"""Training and predicting at a target spacing: cases are resampled to it (images linearly, masks by
nearest neighbour), the checkpoint keeps it, and predict resamples each input to it and the result back,
so the output keeps the input's own grid (issue 15, section 2)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, make_phantoms, run_cli, train_args

from prostate_kernels.checkpoint import load_checkpoint
from prostate_kernels.cli import main
from prostate_kernels.data import DataError, Volume, read_volume, write_volume
from prostate_kernels.data.resample import resample_case, resample_image, resample_onto, resample_to_spacing

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


@pytest.mark.parametrize("origin", [1e6, 1e12, 1e16])
def test_resampling_gives_the_same_voxels_wherever_the_grid_lies(origin):
    """ITK maps voxels through physical points (origin + direction x index x spacing): with the origin far
    from 0 that sum loses the voxel steps (float64 steps are 2 mm at 1e16 mm). Before, these unit-normal
    values came out off by up to 3.4 at 1e16 (99.9% of the voxels), 4e-4 at 1e12, 6e-8 at 1e6."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(7, 23, 19)).astype(np.float32)
    near = Volume(values, (0.61, 0.57, 3.2), (-14.4, -13.6, -24.2), DIRECTION)
    far = replace(near, origin=(origin, -origin, origin))
    coarse_near, coarse_far = (
        resample_to_spacing(near, (1.1, 1.3, 0.9)),
        resample_to_spacing(far, (1.1, 1.3, 0.9)),
    )
    assert coarse_far.origin == far.origin
    np.testing.assert_array_equal(coarse_far.array, coarse_near.array)
    np.testing.assert_array_equal(resample_onto(coarse_far, far), resample_onto(coarse_near, near))


@pytest.fixture(scope="module")
def trained_at_1_5_mm(tmp_path_factory) -> tuple[Path, Path]:
    """(phantom dataset, run directory of a model trained on it at 1.5 mm)."""
    root = tmp_path_factory.mktemp("spacing")
    data = make_phantoms(root / "data")
    run = root / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--model", "tiramisu3d_tiny",
            "--patch", "8", "8", "8", "--batch", "2", "--iters", "2", "--val-every", "2", "--val-cases", "1",
            "--no-progress", "--spacing", "1.5", "1.5", "1.5"]  # fmt: skip
    assert main(args) == 0
    return data, run


def test_a_model_trained_at_1_5_mm_predicts_on_the_inputs_own_grid(tmp_path, trained_at_1_5_mm):
    data, run = trained_at_1_5_mm
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
    from prostate_kernels.trained_model import _check_recorded_settings

    with pytest.raises(DataError, match="malformed checkpoint: spacing"):
        _check_recorded_settings({"patch": [8, 8, 8], "slices": 0, "spacing": spacing}, tmp_path / "c.pt")


def test_a_spacing_too_fine_to_allocate_names_the_size_instead_of_itks_error(tmp_path):
    """train --spacing 0.001 0.001 0.001 ended in SimpleITK's RuntimeError (a 10^14-voxel grid)."""
    grid = Volume(np.zeros((4, 6, 8), np.float32), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    path = write_volume(grid, tmp_path / "case.nii.gz")
    volume = read_volume(path)
    with pytest.raises(DataError) as info:
        resample_to_spacing(volume, (1e-4, 1e-4, 1e-4))
    message = str(info.value)
    assert message.startswith(f"{path}: resampled from spacing (2, 1, 1) mm to (0.0001, 0.0001, 0.0001) mm")
    assert "(80000, 60000, 80000) voxels" in message and "choose a coarser --spacing" in message


def test_a_size_past_simpleitks_uint32_sizes_is_refused_like_an_allocation(tmp_path):
    """A file whose slices are 10^10 mm thick, resampled to 3 mm: 3x10^9 slices per input slice, past
    the uint32 sizes SimpleITK takes (its TypeError ended predict in a traceback)."""
    grid = Volume(
        np.zeros((4, 6, 8), np.float32), (3.0, 3.0, 1e10), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())
    )
    volume = read_volume(write_volume(grid, tmp_path / "case.nii.gz"))
    with pytest.raises(DataError) as info:
        resample_image(volume, (3.0, 3.0, 3.0), hint="is the file's voxel size right?")
    message = str(info.value)
    assert "(13333333333, 6, 8) voxels" in message and message.endswith("is the file's voxel size right?")


def _ramp(shape, spacing_xyz=(1.0, 1.0, 1.0)) -> Volume:
    values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return Volume(values, spacing_xyz, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), path=Path("ramp.nii.gz"))


def test_an_image_left_constant_by_a_coarse_spacing_is_refused_by_name():
    """train --spacing 1e9 1e9 1e9 resampled every image to one voxel: its z-score divided by a zero
    standard deviation (NaN patches), and predict at such a checkpoint's spacing wrote empty masks."""
    image = _ramp((4, 6, 8))
    assert resample_image(image, (1.0, 1.0, 1.0)).array.shape == (4, 6, 8)  # a fine spacing passes
    with pytest.raises(DataError) as info:
        resample_image(image, (1e9, 1e9, 1e9))
    message = str(info.value)
    assert message.startswith("ramp.nii.gz: resampled to spacing (1e+09, 1e+09, 1e+09) mm (Z Y X)")
    assert "its 1x1x1 voxels all hold" in message and "the image spans (4, 6, 8) mm" in message


def test_a_mask_lost_between_a_coarse_grids_voxel_centres_is_refused_by_name():
    """A one-voxel gland off the 3 mm grid's centres left an empty mask: the patch sampler's draw of a
    prostate voxel ended in numpy's "high <= 0"."""
    image = _ramp((10, 10, 10))
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[1, 1, 1] = 1  # the 3 mm grid's centres lie on voxels 0, 3, 6
    mask_volume = replace(image.like(mask), path=Path("ramp_segmentation.nii.gz"))
    kept_image, kept_mask = resample_case(image, mask_volume, (1.0, 1.0, 1.0))
    assert kept_mask.array.sum() == 1 and kept_image.array.shape == (10, 10, 10)
    with pytest.raises(DataError) as info:
        resample_case(image, mask_volume, (3.0, 3.0, 3.0))
    assert str(info.value) == (
        "ramp_segmentation.nii.gz: resampled to spacing (3, 3, 3) mm (Z Y X) no mask voxel is left of its 1 "
        "(grid of 3x3x3 voxels): choose a finer --spacing"
    )


def test_train_at_a_spacing_coarser_than_every_case_ends_in_one_error(tmp_path):
    data = make_phantoms(tmp_path / "data")
    result = run_cli(*train_args(data, tmp_path / "run", 2, "--spacing", "1e9", "1e9", "1e9"))
    assert_one_line_error(result, "0 usable cases")
    assert result.stdout.count("nothing to segment at that spacing") == 3, result.stdout


def test_predict_reports_an_image_left_constant_at_the_checkpoints_spacing(tmp_path, trained_at_1_5_mm):
    _, run = trained_at_1_5_mm
    two_voxels = Volume(np.array([[[0.25, 1.5]]], np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                        tuple(np.eye(3).ravel()))  # fmt: skip
    image_path = write_volume(two_voxels, tmp_path / "input" / "Case09.nii.gz")  # 1x1x1 voxel at 1.5 mm
    result = run_cli("predict", "--checkpoint", run / "checkpoint.pt", "--input", image_path,
                     "--output", tmp_path / "pred", "--device", "cpu")  # fmt: skip
    assert_one_line_error(result, str(image_path), "its 1x1x1 voxels all hold", "nothing to segment")
    assert not (tmp_path / "pred" / "Case09_segmentation.nii.gz").exists()


def test_every_channel_of_a_case_is_resampled_onto_the_masks_grid(tmp_path):
    """train --channel 0 1 --spacing: both channels (the second the first's negative) on the mask's coarse
    grid, each z-scored on its own."""
    import SimpleITK as sitk

    from prostate_kernels.data.io import to_sitk
    from prostate_kernels.train import TrainConfig, load_cases

    phantoms = make_phantoms(tmp_path / "phantoms", 2)
    data = tmp_path / "decathlon"
    (data / "imagesTr").mkdir(parents=True)
    for i in range(2):
        base = to_sitk(read_volume(phantoms / f"Case0{i}.mhd"), np.float32)
        sitk.WriteImage(sitk.JoinSeries([base, base * -1.0]), str(data / "imagesTr" / f"case{i}.nii.gz"))
        write_volume(
            read_volume(phantoms / f"Case0{i}_segmentation.mhd"), data / "labelsTr" / f"case{i}.nii.gz"
        )
    config = TrainConfig(data=data, out=tmp_path / "run", model="tiramisu3d_tiny", channel=(0, 1),
                         spacing=(6.0, 1.5, 1.5), val_cases=1)  # fmt: skip
    (train_case,), (held,) = load_cases(config, log=print)
    for image, mask in ((train_case.image, train_case.mask), (held.image, held.mask)):
        assert (
            image.shape == (2, *mask.shape) and mask.shape != read_volume(phantoms / "Case00.mhd").array.shape
        )
        np.testing.assert_allclose(image[1], -image[0], atol=1e-5)
        assert abs(image[1].mean()) < 1e-4 and abs(image[1].std() - 1) < 1e-3
