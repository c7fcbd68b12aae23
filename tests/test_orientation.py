"""One voxel-axis orientation for the network (data/orientation.py): train reorients every case to the
checkpoint's orientation (default LPS), predict reorients each input to it and the result back, so a
scan stored with its axes in another order (a sagittal or coronal series, nibabel's RAS NIfTI) is
segmented as the same scan stored axially."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, make_phantoms, run_cli, train_args

from prostate_kernels.checkpoint import load_checkpoint, save_checkpoint
from prostate_kernels.cli import main
from prostate_kernels.cli_args import orientation_code
from prostate_kernels.data import ConfigError, DataError, Volume, read_volume, write_volume
from prostate_kernels.data.io import to_sitk
from prostate_kernels.data.orientation import (
    ORIENTATION_CODES,
    back_onto,
    check_orientation,
    orientation_of,
    reoriented,
)
from prostate_kernels.train import load_cases
from prostate_kernels.train_config import TrainConfig
from prostate_kernels.train_state import resume_differences
from prostate_kernels.trained_model import _check_recorded_settings

COS45 = float(np.cos(np.pi / 4))
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _oblique_directions() -> list[tuple[float, ...]]:
    """Rotations that are no code's: three drawn at random, 45 degrees about z (midway between two
    codes) and 45 degrees about z then about x."""
    rng = np.random.default_rng(7)
    drawn = []
    for _ in range(3):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        drawn.append(tuple((q * np.sign(np.diag(r))).ravel()))
    about_z = np.array([[COS45, -COS45, 0], [COS45, COS45, 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, COS45, -COS45], [0, COS45, COS45]])
    return [*drawn, tuple(about_z.ravel()), tuple((about_z @ about_x).ravel())]


@pytest.mark.parametrize("direction", [IDENTITY, (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
                                       *_oblique_directions()])  # fmt: skip
def test_every_code_reorients_and_comes_back_to_the_same_voxels(direction):
    array = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)  # (z, y, x): every side differs
    volume = Volume(array, (0.5, 0.7, 3.0), (10.0, -20.0, 5.0), direction)
    for code in sorted(ORIENTATION_CODES):
        oriented = reoriented(volume, code)
        assert sorted(oriented.array.shape) == [5, 6, 7] and sorted(oriented.spacing) == [0.5, 0.7, 3.0]
        back = back_onto(oriented.like(oriented.array * 2), volume)
        assert np.array_equal(back, array * 2), (code, direction)


def test_reoriented_keeps_each_voxel_at_its_physical_point():
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    volume = Volume(array, (0.5, 0.7, 3.0), (10.0, -20.0, 5.0), _oblique_directions()[0])
    stored, oriented = to_sitk(volume), to_sitk(reoriented(volume, "PIL"))
    assert orientation_of(reoriented(volume, "PIL")) == "PIL" != orientation_of(volume)
    for index in [(0, 0, 0), (6, 5, 4), (3, 1, 2), (6, 0, 4)]:  # (x, y, z)
        point = stored.TransformIndexToPhysicalPoint(index)
        assert oriented[oriented.TransformPhysicalPointToIndex(point)] == stored[index]


def test_orientation_codes_and_what_is_refused():
    assert len(ORIENTATION_CODES) == 48 and {"LPS", "RAS", "PIL", "LIP"} <= ORIENTATION_CODES
    assert check_orientation("RAS") == "RAS" and check_orientation(None) is None
    # TrainConfig takes the codes themselves (a lower-case one was recorded so and refused by predict)
    for bad in ("LPX", "LLS", "LP", "LPSI", "", 3, "ras", "stored"):
        with pytest.raises(ConfigError, match=rf"--orientation {bad!r} is not an orientation: three letters"):
            check_orientation(bad)
    assert orientation_code("ras") == "RAS" and orientation_code("stored") is None  # the command line's


def test_train_refuses_an_orientation_that_is_not_a_code(tmp_path):
    result = run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--orientation", "LPX")
    assert_one_line_error(
        result, "argument --orientation", "'LPX' is not an orientation", "one of R/L", "stored"
    )


def _rewrite(data: Path, out: Path, code: str) -> Path:
    """The phantom dataset with every image and mask stored with its axes in orientation `code`: the same
    voxels at the same physical points."""
    out.mkdir()
    for path in sorted(data.glob("*.mhd")):
        volume = read_volume(path)
        write_volume(reoriented(volume, code), out / path.name)
    return out


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("orientation") / "data")


def test_training_reads_the_same_arrays_whatever_axes_the_cases_are_stored_in(tmp_path, phantoms):
    sagittal = _rewrite(phantoms, tmp_path / "sagittal", "PIL")
    assert (
        read_volume(sagittal / "Case00.mhd").array.shape != read_volume(phantoms / "Case00.mhd").array.shape
    )

    def arrays(data: Path, orientation: str | None):
        config = TrainConfig(data=data, out=tmp_path / "run", model="tiramisu3d_tiny", val_cases=1,
                             orientation=orientation)  # fmt: skip
        train, held = load_cases(config, lambda *_: None)
        return [(c.image, c.mask) for c in train] + [(h.image, h.mask) for h in held]

    for (image, mask), (image_s, mask_s) in zip(
        arrays(phantoms, "LPS"), arrays(sagittal, "LPS"), strict=True
    ):
        assert np.array_equal(image, image_s) and np.array_equal(mask, mask_s)
    as_stored = arrays(sagittal, None)  # `--orientation stored`: the files' own axes, as before
    assert as_stored[0][1].shape != arrays(phantoms, None)[0][1].shape


def test_a_mask_takes_its_images_axes_when_their_directions_straddle_two_orientations(tmp_path, phantoms):
    """An image at 45 degrees minus 1e-5 about z is nearest LPS, its mask at 45 plus 1e-5 nearest PRS
    (the same grid within GEOMETRY_TOLERANCE): reoriented each by its own direction, the mask's in-plane
    axes were swapped against the image's (the phantoms' 32x32 slices: a mask turned by 90 degrees)."""

    def about_z(angle: float) -> tuple[float, ...]:
        c, s = float(np.cos(angle)), float(np.sin(angle))
        return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)

    data = tmp_path / "data"
    for name, angle in (("Case00.mhd", np.pi / 4 - 1e-5), ("Case00_segmentation.mhd", np.pi / 4 + 1e-5)):
        write_volume(replace(read_volume(phantoms / name), direction=about_z(angle)), data / name)
    assert orientation_of(read_volume(data / "Case00.mhd")) == "LPS"
    assert orientation_of(read_volume(data / "Case00_segmentation.mhd")) == "PRS"
    config = TrainConfig(data=data, out=tmp_path / "run", model="tiramisu3d_tiny", val_cases=0)
    (case,), _ = load_cases(config, lambda *_: None)
    assert np.array_equal(case.mask, read_volume(phantoms / "Case00_segmentation.mhd").array)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantoms) -> Path:
    run = tmp_path_factory.mktemp("orientation-run") / "run"
    assert main(train_args(phantoms, run, 2)) == 0
    return run / "checkpoint.pt"


def _predict(checkpoint: Path, image: Path, out: Path) -> tuple[Volume, Volume]:
    """(segmentation, probabilities) that predict writes for `image`."""
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(image), "--output", str(out),
            "--save-probabilities", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    name = image.name.removesuffix(".nii.gz")
    return read_volume(out / f"{name}_segmentation.nii.gz"), read_volume(out / f"{name}_probabilities.nii.gz")


def test_predict_segments_a_scan_the_same_whatever_axes_it_is_stored_in(tmp_path, phantoms, trained):
    assert load_checkpoint(trained)["orientation"] == "LPS"
    scan = read_volume(phantoms / "Case02.mhd")
    axial = write_volume(scan, tmp_path / "axial" / "scan.nii.gz")
    _, expected = _predict(trained, axial, tmp_path / "pred-axial")
    for code in ("RAS", "PIL", "LIP"):  # nibabel's NIfTI convention, a sagittal and a coronal series
        stored = reoriented(scan, code)
        path = write_volume(stored, tmp_path / code / "scan.nii.gz")
        segmentation, probabilities = _predict(trained, path, tmp_path / f"pred-{code}")
        for written in (segmentation, probabilities):  # on the input's own grid, as stored
            assert written.array.shape == stored.array.shape
            for field in ("spacing", "origin", "direction"):
                assert np.allclose(getattr(written, field), getattr(stored, field), atol=1e-6), (code, field)
        back = back_onto(probabilities, expected)
        assert np.allclose(back, expected.array, atol=1e-6), code
    # a checkpoint that records no orientation (written before it was recorded) keeps the files' axes:
    # the network then sees the sagittal series' arrays, and its probabilities differ
    state = load_checkpoint(trained)
    del state["orientation"]
    old = save_checkpoint(state, tmp_path / "old.pt")
    _, as_stored = _predict(old, tmp_path / "PIL" / "scan.nii.gz", tmp_path / "pred-old")
    assert not np.allclose(back_onto(as_stored, expected), expected.array, atol=1e-3)


def test_resuming_a_run_that_recorded_no_orientation_names_the_change():
    now = TrainConfig(data=Path("d"), out=Path("o"), model="tiramisu3d_tiny")
    settings = now.settings()
    saved = {"patch": list(settings.patch), "config": {"spacing": None}}  # a run before orientations

    def differences():
        return resume_differences(saved, now, settings.patch, settings.batch, settings.lr, 1)

    assert differences() == ["--orientation LPS (was stored)"]
    now = replace(now, orientation=None)
    assert differences() == []
    saved["config"]["orientation"] = "PIL"
    assert differences() == ["--orientation stored (was PIL)"]


@pytest.mark.parametrize("orientation", ["LPX", 3, ["L", "P", "S"], "lps"])
def test_a_checkpoint_with_a_malformed_orientation_is_refused(tmp_path, orientation):
    state = {"patch": [8, 8, 8], "slices": 0, "orientation": orientation}
    with pytest.raises(DataError, match="malformed checkpoint: orientation"):
        _check_recorded_settings(state, tmp_path / "c.pt")


def test_overlays_show_the_same_axial_slice_whatever_axes_the_files_store(tmp_path, phantoms):
    """evaluate's overlay of one case stored as LPS, RAS and as a sagittal series: the same picture (an
    axial slice, front at the top); before, the RAS file's slice was drawn upside down and mirrored and
    the sagittal one's sagittally."""
    import matplotlib.image

    pictures = {}
    for code in ("LPS", "RAS", "PIL"):
        ref, pred = tmp_path / code / "ref", tmp_path / code / "pred"
        for name in ("Case02.mhd", "Case02_segmentation.mhd"):
            write_volume(reoriented(read_volume(phantoms / name), code), ref / name)
        write_volume(read_volume(ref / "Case02_segmentation.mhd"), pred / "Case02_segmentation.mhd")
        assert (
            main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / code / "o")])
            == 0
        )
        pictures[code] = matplotlib.image.imread(tmp_path / code / "o" / "Case02_overlay.png")
    assert np.array_equal(pictures["RAS"], pictures["LPS"]) and np.array_equal(
        pictures["PIL"], pictures["LPS"]
    )


PELVIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "hipmri-case018-week7"


@pytest.mark.parametrize("stored", ["LPS", "RAS", "PIL"])
def test_lps_arrays_put_the_head_up_the_back_down_and_the_left_right_on_a_real_pelvis(stored):
    """The convention orientation.py states, on a real scan whose header matches its anatomy (labels 3
    bladder, 4 rectum, 5 prostate), whatever axes it is stored in: in LPS arrays (z, y, x) the bladder
    lies at a larger z than the prostate (toward the head), the rectum at a larger y (toward the back:
    drawn below it), both near the prostate's x (the midline)."""
    if not PELVIS.is_dir():
        pytest.skip(f"real data not found at {PELVIS} (../shared/data, see its README)")
    labels = read_volume(PELVIS / "Case_018_Week7_SEMANTIC_LFOV.nii.gz")
    lps = reoriented(reoriented(labels, stored), "LPS").array
    centre = {label: np.argwhere(lps == label).mean(axis=0) for label in (3, 4, 5)}  # (z, y, x)
    bladder, rectum, prostate = centre[3], centre[4], centre[5]
    assert bladder[0] > prostate[0] + 5 and rectum[1] > prostate[1] + 5
    assert abs(rectum[2] - prostate[2]) < 10 and abs(bladder[2] - prostate[2]) < 10
