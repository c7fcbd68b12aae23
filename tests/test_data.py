"""Data layer: SimpleITK I/O with geometry, clear errors, dataset discovery, phantoms, patch sampling."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_without_waiting_on

from prostate_kernels.data import (
    DataError,
    Volume,
    check_image,
    discover_cases,
    read_mask,
    read_volume,
    write_volume,
)
from prostate_kernels.data.io import to_sitk
from prostate_kernels.data.phantoms import make_phantom, write_phantoms
from prostate_kernels.data.sampling import PatchSampler, training_case, zscore

GEOMETRY = dict(spacing=(0.6, 0.55, 3.6), origin=(-12.5, 30.25, 7.0), direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))


def volume(array) -> Volume:
    return Volume(
        np.asarray(array), GEOMETRY["spacing"], GEOMETRY["origin"], tuple(map(float, GEOMETRY["direction"]))
    )


@pytest.mark.parametrize("ext", [".mhd", ".nii.gz", ".nrrd"])
def test_write_then_read_keeps_array_and_geometry(tmp_path, ext):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = write_volume(volume(array), tmp_path / f"case{ext}")
    back = read_volume(path)
    assert np.array_equal(back.array, array) and back.array.shape == (4, 5, 6)
    assert np.allclose(back.spacing, GEOMETRY["spacing"]) and np.allclose(back.origin, GEOMETRY["origin"])
    assert np.allclose(back.direction, GEOMETRY["direction"])
    assert back.spacing_zyx == pytest.approx((3.6, 0.55, 0.6))


def test_read_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"missing\.mhd: file not found"):
        read_volume(tmp_path / "missing.mhd")
    with pytest.raises(DataError, match="is a directory"):
        read_volume(tmp_path)
    corrupt = tmp_path / "corrupt.mhd"
    corrupt.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_NOPE\n")
    with pytest.raises(DataError, match=r"corrupt\.mhd: cannot read image"):  # ITK's own error, one line
        read_volume(corrupt)
    corrupt.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4\nElementType = MET_UCHAR\n")
    with pytest.raises(DataError, match=r"corrupt\.mhd: corrupt MetaImage header: DimSize = '4 4' is not 3 "):
        read_volume(corrupt)
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(5, 5, sitk.sitkUInt8), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(DataError, match=r"flat\.nii\.gz: expected a 3-D image, got a 2-D one"):
        read_volume(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.Image([3, 3, 3, 2], sitk.sitkUInt8), str(tmp_path / "series.nii.gz"))
    with pytest.raises(DataError, match=r"series\.nii\.gz: holds 2 channels \(a 4-D image of size \(3, 3, "
                       r"3, 2\)\): pass --channel \(0 to 1\)"):  # fmt: skip
        read_volume(tmp_path / "series.nii.gz")
    sitk.WriteImage(sitk.Image([3, 3, 3, 2, 2], sitk.sitkUInt8), str(tmp_path / "five.nrrd"))
    with pytest.raises(DataError, match=r"five\.nrrd: expected a 3-D image, got a 5-D one"):
        read_volume(tmp_path / "five.nrrd")
    sitk.WriteImage(sitk.Image([3, 3, 3], sitk.sitkComplexFloat32), str(tmp_path / "complex.nrrd"))
    with pytest.raises(DataError, match=r"complex\.nrrd: complex voxel values \(complex of 32-bit float\)"):
        read_volume(tmp_path / "complex.nrrd")  # was read with its imaginary part dropped (numpy warning)


def _multichannel(tmp_path, geometry_of: Volume):
    """A 4-D (x, y, z, 3) image and a vector image of 3 components, channel k = k * 10 + the 3-D array."""
    import SimpleITK as sitk

    base = to_sitk(geometry_of)
    channels = [sitk.Cast(base, sitk.sitkFloat32) + 10.0 * k for k in range(3)]
    four_d, vector = tmp_path / "t2_adc.nii.gz", tmp_path / "vector.nrrd"
    sitk.WriteImage(sitk.JoinSeries(channels), str(four_d))
    sitk.WriteImage(sitk.Compose(channels), str(vector))
    return four_d, vector


def test_a_multichannel_image_gives_the_channel_asked_for_with_its_3d_geometry(tmp_path):
    """The Decathlon's prostate images are 4-D (T2, ADC): one was refused as 'a 4-D one' with no way on."""
    rng = np.random.default_rng(0)
    base = Volume(rng.normal(size=(4, 5, 6)).astype(np.float32), (0.6, 0.55, 3.6), (1.0, -2.0, 3.0),
                  (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # fmt: skip
    for path in _multichannel(tmp_path, base):
        for k in range(3):
            got = read_volume(path, channel=k)
            assert got.array.shape == (4, 5, 6)
            assert np.allclose(got.array, base.array + 10 * k)
            assert got.spacing == pytest.approx(base.spacing) and got.origin == pytest.approx(base.origin)
            assert got.direction == pytest.approx(base.direction)
        with pytest.raises(DataError, match=rf"{path.name}: holds 3 channels .*: pass --channel \(0 to 2\)"):
            read_volume(path)
        with pytest.raises(
            DataError, match=r"--channel 3 is not one of its channels: it holds channels 0 to 2"
        ):
            read_volume(path, channel=3)
        with pytest.raises(DataError, match=r"holds 3 channels: a mask must be one 3-D label map"):
            read_mask(path)
    plain = write_volume(base, tmp_path / "plain.nii.gz")
    assert np.array_equal(read_volume(plain, channel=0).array, base.array)
    with pytest.raises(DataError, match=r"--channel 1 is not one of its channels: it holds one channel, 0"):
        read_volume(plain, channel=1)


def test_a_directory_of_one_dicom_series_reads_as_its_volume(tmp_path):
    from cli_helpers import write_dicom_series

    rng = np.random.default_rng(0)
    base = Volume(rng.integers(0, 900, size=(5, 6, 7)).astype(np.int16), (0.6, 0.55, 3.6), (1.0, -2.0, 3.0),
                  (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # fmt: skip
    source = write_volume(base, tmp_path / "t2.nii.gz")
    series = write_dicom_series(source, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.1.1")
    got = read_volume(series)
    assert np.array_equal(got.array, base.array)
    assert got.spacing == pytest.approx(base.spacing) and got.origin == pytest.approx(base.origin)
    assert got.direction == pytest.approx(base.direction)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for k, uid in ((0, "1.2.3.1"), (1, "1.2.3.2")):
        write_dicom_series(source, tmp_path / f"s{k}", uid)
        for f in (tmp_path / f"s{k}").iterdir():
            f.rename(mixed / f"{k}-{f.name}")
    with pytest.raises(DataError, match=r"mixed: holds 2 DICOM series \(1\.2\.3\.1, 1\.2\.3\.2\): give a "
                       "directory of one series"):  # fmt: skip
        read_volume(mixed)
    echoes = tmp_path / "echoes"  # two images per position in one series, as a multi-echo export
    write_dicom_series(source, echoes, "1.2.3.3")
    write_dicom_series(source, tmp_path / "echo2", "1.2.3.3")
    for f in (tmp_path / "echo2").iterdir():
        f.rename(echoes / f"E2{f.name}")
    with pytest.raises(
        DataError, match=r"echoes: holds 10 slices at 5 positions: several images per position"
    ):
        read_volume(echoes)
    (series / "IM0002").unlink()
    with pytest.raises(DataError, match=r"series: its slices are unevenly spaced \(3\.6 to 7\.2 mm apart\)"):
        read_volume(series)
    from prostate_kernels.data.dicom import _check_slice_positions

    for positions in (["1\\2", "1\\3"], ["1\\2\\x", "1\\2\\3"], ["1\\2\\3", "1\\2"]):
        with pytest.raises(DataError, match=r"a slice's position 0020\|0032 is not 3 numbers"):
            _check_slice_positions(positions, series)
    os.mkfifo(series / "pipe")
    with pytest.raises(DataError, match=r"pipe: not a regular file \(a pipe, socket or device\)"):
        run_without_waiting_on(series / "pipe", lambda: read_volume(series))


def test_a_series_whose_first_or_last_slice_is_damaged_is_refused_not_read_a_slice_short(
    tmp_path, monkeypatch
):
    """GDCM passes over a slice it cannot parse: a series with its last slice cut short (an interrupted
    copy) read as a volume one slice short, without a word (a missing middle slice is refused for the
    uneven spacing it leaves). Files that are not DICOM beside the slices are still left alone."""
    from cli_helpers import write_dicom_series

    base = Volume(np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7), (0.6, 0.6, 3.6), (0.0, 0.0, 0.0),
                  (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # fmt: skip
    series = write_dicom_series(write_volume(base, tmp_path / "t2.nii.gz"), tmp_path / "series", "1.2.3.9")
    (series / "README.txt").write_text("exported by the scanner")
    (series / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # an index, not a slice
    assert read_volume(series).array.shape == (5, 6, 7)
    for damaged in ("IM0004", "IM0000"):
        good = (series / damaged).read_bytes()
        (series / damaged).write_bytes(good[: len(good) // 2])
        said = r": is marked as a DICOM file but GDCM could not read it into the series of the 4 slice\(s\) "
        with pytest.raises(DataError, match=damaged + said + r"beside it \(cut short or damaged\?\)"):
            read_volume(series)
        (series / damaged).write_bytes(good)
    from prostate_kernels.data import dicom

    def unreadable_readme(path, *args):  # (as root, a file's mode does not stop a read)
        if Path(path).name == "README.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args)

    monkeypatch.setattr(dicom, "open", unreadable_readme, raising=False)
    with pytest.raises(
        DataError, match=r"README.txt: cannot be read \(Permission denied\), so the series beside"
    ):
        read_volume(series)


def test_a_dicom_file_meta_element_declaring_more_bytes_than_the_file_is_refused_before_gdcm(tmp_path):
    """One byte of a slice's (0002,0001) length changed (2 -> 0xE2000002) made GDCM allocate the declared
    3.8 GB while scanning the directory: a 4-slice series read took 7.7 GB and 22 s before the slice was
    refused, and a machine with less memory would kill the process. It is now refused from its bytes."""
    from cli_helpers import write_dicom_series

    base = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), (0.6, 0.6, 3.6), (0.0, 0.0, 0.0),
                  (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # fmt: skip
    series = write_dicom_series(write_volume(base, tmp_path / "t2.nii.gz"), tmp_path / "series", "1.2.3.7")
    slice_ = series / "IM0002"
    good = slice_.read_bytes()
    version = good.index(b"\x02\x00\x01\x00OB\x00\x00")  # (0002,0001) OB, reserved, 4-byte length
    assert good[128:132] == b"DICM" and good[version + 8 : version + 12] == b"\x02\x00\x00\x00"
    damaged = bytearray(good)
    damaged[version + 11] = 0xE2
    slice_.write_bytes(bytes(damaged))
    said = (f"IM0002: damaged DICOM file: its File Meta element (0002,0001) OB declares a value of "
            f"3791650818 bytes, past the end of the {len(good)}-byte file")  # fmt: skip
    for path in (series, slice_):  # the series' directory, and the slice read as an image file
        with pytest.raises(DataError, match=re.escape(said)):
            read_volume(path)
    slice_.write_bytes(good[: version + 30])  # cut in the group (an interrupted copy): refused alike
    with pytest.raises(
        DataError, match=r"IM0002: damaged DICOM file: its File Meta element \(0002,0002\) UI"
    ):
        read_volume(series)
    # cut inside the 4-byte length (the walk raised a struct.error there): left to GDCM, which refuses it
    slice_.write_bytes(good[: version + 10])
    with pytest.raises(DataError, match=r"IM0002: is marked as a DICOM file but GDCM could not read it"):
        read_volume(series)
    slice_.write_bytes(good)
    assert np.array_equal(read_volume(series).array, base.array)


def test_a_mask_of_several_labels_joins_the_labels_asked_for(tmp_path):
    zones = np.zeros((3, 4, 5), np.uint8)
    zones[1, 1:3, 1:3], zones[2, 1:3, 1:3] = 1, 2  # the Decathlon's peripheral and transition zones
    path = write_volume(volume(zones), tmp_path / "zones.nii.gz")
    assert read_mask(path, label=(1, 2)).array.sum() == 8
    assert read_mask(path, label=2).array.sum() == 4 and read_mask(path, label=[1]).array.sum() == 4
    with pytest.raises(DataError, match=r"holds 2 labels \(1, 2\): pass --label to choose the one to use, "
                       "or several to join"):  # fmt: skip
        read_mask(path)
    with pytest.raises(DataError, match=r"mask has no label 3, 4 voxels"):
        read_mask(path, label=(3, 4))


def test_images_that_cannot_be_normalised_are_rejected(tmp_path):
    nan = np.ones((3, 4, 5), np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        check_image(read_volume(write_volume(volume(nan), tmp_path / "nan.mhd")))  # (NIfTI stores NaN as 0)
    with pytest.raises(DataError, match="constant intensity 7"):
        check_image(read_volume(write_volume(volume(np.full((3, 4, 5), 7, np.int16)), tmp_path / "c.nii.gz")))


def test_a_label_mask_passed_as_an_image_is_refused_and_real_images_are_not(tmp_path):
    """predict segmented a mask file given as --input (a mask of nothing, status 0); training on a
    dataset whose image was a mask learnt to copy it."""
    mask = np.zeros((6, 40, 50), np.uint8)
    mask[2:4, 10:20, 10:30] = 1
    with pytest.raises(DataError, match=r"m\.nii\.gz: holds only 2 different values \(0, 1\): a label mask"):
        check_image(read_volume(write_volume(volume(mask), tmp_path / "m.nii.gz")))
    labels = (np.arange(6 * 40 * 50).reshape(6, 40, 50) % 16).astype(np.float32)  # 16 labels, as floats
    with pytest.raises(DataError, match="holds only 16 different values"):
        check_image(volume(labels))
    rng = np.random.default_rng(0)
    check_image(volume((np.arange(6 * 40 * 50).reshape(6, 40, 50) % 17).astype(np.uint8)))  # 17 values
    check_image(volume(rng.integers(0, 256, (6, 40, 50)).astype(np.uint8)))  # an 8-bit image
    check_image(volume(np.where(mask == 1, 0.75, 0.25).astype(np.float32)))  # two values, not whole
    sample = np.zeros(6 * 40 * 50, np.int16)  # few values in the strided sample, many in the image
    sample[1::2] = np.arange(1, sample.size // 2 + 1)
    check_image(volume(sample.reshape(6, 40, 50)))


def test_masks_are_checked_against_their_image(tmp_path):
    image = read_volume(
        write_volume(volume(np.random.default_rng(0).random((4, 5, 6))), tmp_path / "img.nii.gz")
    )
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 2:4, 2:5] = 5
    labels[0, 0, 0] = 1
    mask = read_mask(write_volume(volume(labels), tmp_path / "lab.nii.gz"), image, label=5)
    assert mask.array.sum() == 12 and set(np.unique(mask.array)) == {0, 1}
    with pytest.raises(
        DataError, match=r"lab\.nii\.gz: mask has no label 3 voxels \(values present: 0, 1, 5\)"
    ):
        read_mask(tmp_path / "lab.nii.gz", image, label=3)
    small = write_volume(volume(labels[:, :4]), tmp_path / "small.nii.gz")
    with pytest.raises(DataError, match=r"small\.nii\.gz: size \(6, 4, 4\) differs from image"):
        read_mask(small, image)
    moved = volume(labels)
    moved.origin = (0.0, 0.0, 0.0)
    with pytest.raises(DataError, match="origin"):
        read_mask(write_volume(moved, tmp_path / "moved.nii.gz"), image)
    with pytest.raises(DataError, match="no foreground voxels"):
        read_mask(write_volume(volume(np.zeros((4, 5, 6), np.uint8)), tmp_path / "empty.nii.gz"), image)


def test_discovery_of_promise12_and_decathlon_layouts(tmp_path):
    write_phantoms(tmp_path / "p12", n=3, shape=(6, 24, 24))
    (tmp_path / "p12" / "notes.txt").write_text("ignored")
    cases = discover_cases(tmp_path / "p12", require_labels=True)
    assert [c.name for c in cases] == ["Case00", "Case01", "Case02"]
    assert cases[1].label.name == "Case01_segmentation.mhd"
    dec = tmp_path / "Task05_Prostate"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (dec / folder).mkdir(parents=True)
    ph = make_phantom(0, (6, 16, 16))
    write_volume(ph.image, dec / "imagesTr" / "prostate_00.nii.gz")
    write_volume(ph.mask, dec / "labelsTr" / "prostate_00.nii.gz")
    write_volume(ph.image, dec / "imagesTs" / "prostate_99.nii.gz")
    cases = discover_cases(dec)
    assert [(c.name, c.label is not None) for c in cases] == [("prostate_00", True), ("prostate_99", False)]
    with pytest.raises(DataError, match="no reference segmentation for prostate_99"):
        discover_cases(dec, require_labels=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no cases found"):
        discover_cases(tmp_path / "empty")


def test_phantoms_are_deterministic_anisotropic_and_exactly_masked(tmp_path):
    a, b = make_phantom(3), make_phantom(3)
    assert np.array_equal(a.image.array, b.image.array) and np.array_equal(a.mask.array, b.mask.array)
    assert not np.array_equal(make_phantom(4).mask.array, a.mask.array)
    x, y, z = a.image.spacing
    assert 0.5 < x < 0.7 and 0.5 < y < 0.7 and 3.0 < z < 4.1
    assert 1000 < a.mask.array.sum() < 0.2 * a.mask.array.size
    assert a.image.array[a.mask.array > 0].mean() > a.image.array[a.mask.array == 0].mean()
    paths = write_phantoms(tmp_path, n=2, shape=(6, 16, 16))
    assert [p.name for p in paths] == ["Case00.mhd", "Case01.mhd"]
    assert (tmp_path / "Case01_segmentation.mhd").exists() and (tmp_path / "Case01.raw").exists()


def test_phantoms_too_small_to_hold_background_are_refused_leaving_no_file(tmp_path):
    """--shape 1 1 1 wrote a phantom of one intensity and a mask of one gland voxel, and 6 16 16 (seed 0)
    a third case all gland, without a word: train then skipped them, or learnt from a mask of all ones."""
    with pytest.raises(DataError, match=r"--shape 1x1x1 is too small for a phantom \(Case00 would have one "):
        write_phantoms(tmp_path / "one", n=2, shape=(1, 1, 1))
    with pytest.raises(DataError, match=r"--shape 6x16x16 is too small .*Case02 would have gland in every"):
        write_phantoms(tmp_path / "small", n=3, shape=(6, 16, 16))
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # Case00 and Case01 of "small" removed again


def test_phantoms_never_replace_a_file(tmp_path, monkeypatch):
    """write_phantoms(dir) into a directory of the user's own CaseNN files replaced them (the CLI refuses
    a non-empty --out; the library call did not); and its clean-up after a refusal would have removed a
    file that another run wrote meanwhile."""
    from prostate_kernels.data import phantoms

    own = tmp_path / "own"
    own.mkdir()
    (own / "Case01_segmentation.raw").write_bytes(b"the user's mask")
    with pytest.raises(DataError, match=r"Case01_segmentation.raw: exists already: phantoms never replace"):
        write_phantoms(own, n=3, shape=(6, 24, 24))
    assert [p.name for p in own.iterdir()] == ["Case01_segmentation.raw"]  # nothing written
    assert (own / "Case01_segmentation.raw").read_bytes() == b"the user's mask"

    make = phantoms.make_phantom

    def another_run_writes_case01_meanwhile(seed, shape):
        if seed == 1:
            (tmp_path / "race" / "Case01.mhd").write_text("another run's header")
        return make(seed, shape)

    monkeypatch.setattr(phantoms, "make_phantom", another_run_writes_case01_meanwhile)
    with pytest.raises(DataError, match=r"Case01.mhd: exists already: another run wrote it meanwhile"):
        write_phantoms(tmp_path / "race", n=3, shape=(6, 24, 24))
    assert [p.name for p in (tmp_path / "race").iterdir()] == ["Case01.mhd"]  # Case00's removed, not it
    assert (tmp_path / "race" / "Case01.mhd").read_text() == "another run's header"


def _sampler(**kwargs) -> PatchSampler:
    ph = make_phantom(1, (12, 40, 40))
    case = training_case(ph.image.array, ph.mask.array, "c")
    return PatchSampler([case], kwargs.pop("patch", (4, 8, 8)), 6, **kwargs)


def test_sampling_is_balanced_and_a_function_of_the_iteration():
    sampler = _sampler(flips=False)
    x, y = sampler.draw(7)
    assert x.shape == (6, 1, 4, 8, 8) and y.shape == (6, 1, 4, 8, 8) and x.dtype == y.dtype
    centres = y[:, 0, 2, 4, 4]
    assert centres[0::2].eq(1).all() and centres[1::2].eq(0).all()  # half on the gland, half off
    x2, y2 = sampler.draw(7)
    assert x.equal(x2) and y.equal(y2)
    assert not x.equal(sampler.draw(8)[0])
    assert not x.equal(_sampler(flips=False, rank=1).draw(7)[0])


def test_slice_stacks_for_2d_networks():
    x, y = _sampler(patch=(5, 8, 8), slices=5).draw(0)
    assert x.shape == (6, 5, 8, 8) and y.shape == (6, 1, 8, 8)


def test_sampler_stacks_image_channels_as_input_channels_with_the_same_crop_and_flips():
    """A case of two channels (the phantom and its negative): each batch has both, cropped, flipped and
    (2-D networks) slice-stacked alike; channel 0 is the single-channel sampler's batch, draw for draw."""
    ph = make_phantom(1, (12, 40, 40))
    two = training_case(np.stack([ph.image.array, -ph.image.array]), ph.mask.array, "c")
    one = training_case(ph.image.array, ph.mask.array, "c")
    assert two.image.shape == (2, 12, 40, 40) and one.image.shape == (1, 12, 40, 40)
    x, y = PatchSampler([two], (4, 8, 8), 6).draw(3)
    x1, y1 = PatchSampler([one], (4, 8, 8), 6).draw(3)
    assert x.shape == (6, 2, 4, 8, 8) and y.shape == (6, 1, 4, 8, 8)
    assert torch.equal(x[:, :1], x1) and torch.equal(y, y1) and torch.equal(x[:, 1], -x[:, 0])
    x, y = PatchSampler([two], (5, 8, 8), 6, slices=5).draw(3)  # channel c's slice j: channel c * 5 + j
    x1, _ = PatchSampler([one], (5, 8, 8), 6, slices=5).draw(3)
    assert x.shape == (6, 10, 8, 8) and y.shape == (6, 1, 8, 8)
    assert torch.equal(x[:, :5], x1) and torch.equal(x[:, 5:], -x[:, :5])
    x, _ = PatchSampler([two], (4, 8, 8), 6, augment=True).draw(3)
    x1, _ = PatchSampler([one], (4, 8, 8), 6, augment=True).draw(3)
    assert torch.allclose(x[:, :1], x1, atol=1e-6)  # the same rotation, scaling and intensity change


def test_zscore():
    z = zscore(np.array([1.0, 2.0, 3.0, 4.0]))
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6


def test_shared_real_case_reads_with_its_geometry():
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "hipmri-case018-week7"
    if not path.is_dir():
        pytest.skip(f"real case not present at {path}")
    image = read_volume(path / "Case_018_Week7_LFOV.nii.gz")
    assert image.array.shape == (128, 256, 256)
    assert image.spacing == pytest.approx((1.6797, 1.6797, 1.56), abs=1e-3)
    mask = read_mask(path / "Case_018_Week7_SEMANTIC_LFOV.nii.gz", image, label=5)
    assert mask.array.sum() == 8804


def test_augmentation_moves_image_and_mask_together_and_keeps_the_mask_binary():
    """augmented(): the same rotation and scaling for image and mask (an image equal to its mask still
    thresholds to the augmented mask), intensities scaled and shifted within their ranges."""
    from prostate_kernels.data.sampling import augmented

    mask = np.zeros((12, 24, 40), np.uint8)
    mask[3:9, 5:15, 8:30] = 1
    image = mask.astype(np.float32)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        image_out, mask_out = augmented(image[None], mask, rng)  # image (C, D, H, W), mask (D, H, W)
        image_out = image_out[0]
        assert image_out.shape == mask.shape and mask_out.dtype == np.uint8
        assert set(np.unique(mask_out)) <= {0, 1}
        assert 0.6 < mask_out.sum() / mask.sum() < 1.4  # scaling 0.9-1.1 per axis, rotation keeps volume
        agree = ((image_out > 0.5) == (mask_out == 1)).mean()
        assert agree > 0.97, agree
        assert not np.array_equal(mask_out, mask)  # something moved


def test_sampler_with_augmentation_is_reproducible():
    a, b = _sampler(augment=True).draw(7), _sampler(augment=True).draw(7)
    plain = _sampler().draw(7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], plain[0])
