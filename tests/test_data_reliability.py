"""Data and evaluation under careless input: truncated files, multi-label masks, all-ones predictions,
missing predictions, huge intensities, ITK's own messages (items 5, 8-10, 12, 14, 15 of the reliability
issue)."""

from __future__ import annotations

import csv
import gzip
import math
import os
import re
import struct
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cli_helpers import (
    assert_one_line_error,
    copy_dataset,
    make_phantoms,
    run_cli,
    run_script,
    run_without_waiting_on,
    train_args,
)

from prostate_kernels.data import DataError, Volume, read_channels, read_mask, read_volume, write_volume
from prostate_kernels.data.integrity import itk_reason
from prostate_kernels.data.io import check_binary
from prostate_kernels.data.sampling import zscore

GEOMETRY = dict(
    spacing=(0.6, 0.55, 3.6), origin=(-12.5, 30.25, 7.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
)


def volume(array) -> Volume:
    return Volume(np.asarray(array), **GEOMETRY)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("data"))


# ------------------------------------------------------------------------------ truncated files (8)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_a_truncated_nifti_is_reported_not_read_as_zeros(tmp_path, ext):
    path = write_volume(
        volume(np.random.default_rng(0).random((20, 30, 40), dtype=np.float32)), tmp_path / f"a{ext}"
    )
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="truncated") as caught:
        read_volume(path)
    assert str(path) in str(caught.value)


def test_a_nifti_cut_inside_its_gzip_stream_but_closed_properly_is_reported(tmp_path):
    """A whole gzip stream of too few bytes: only the header's size says the data is short."""
    path = write_volume(volume(np.ones((20, 30, 40), np.float32)), tmp_path / "a.nii.gz")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 1000]))
    with pytest.raises(DataError, match=r"truncated file: \d+ bytes of NIfTI data, its header needs \d+"):
        read_volume(path)


@pytest.mark.parametrize(
    "edit, said",
    [
        ((44, "<h", 0), "corrupt NIfTI header: dim[2] is 0, not a size >= 1"),  # read as 4x1x6
        ((44, "<h", -3), "corrupt NIfTI header: dim[2] is -3, not a size >= 1"),  # read as 4x1x6
        ((0, "<i", 349), "corrupt NIfTI header: its size field is 349, not 348 (NIfTI-1) or 540"),
        ((70, "<h", 64), "truncated file: 832 bytes of NIfTI data, its header needs 1312"),  # float64 voxels
        # voxels read from the header's own bytes (each shifted, the first ones garbage)
        ((108, "<f", 146.0), "corrupt NIfTI header: vox_offset is 146, inside its 352-byte header"),
        ((108, "<f", 348.0), "corrupt NIfTI header: vox_offset is 348, inside its 352-byte header"),
        ((108, "<f", math.nan), "corrupt NIfTI header: vox_offset is nan, not a byte offset"),  # a ValueError
        ((108, "<f", -math.inf), "corrupt NIfTI header: vox_offset is -inf, not a byte offset"),
    ],
)
@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_a_nifti_header_itk_reads_into_another_image_is_refused(tmp_path, edit, said, ext):
    """Headers found by flipping header bytes of a 4x5x6 float32 file, which SimpleITK read without a word:
    a dimension of 0 or -3 as 1 (a 4x1x6 image), a bad size field with its dimensions as they stood, and a
    float64 datatype (bitpix still 32) past the file's end, where the size check counted bitpix."""
    path = write_volume(volume(np.ones((4, 5, 6), np.float32)), tmp_path / "a.nii")
    raw = bytearray(path.read_bytes())
    offset, layout, value = edit
    raw[offset : offset + struct.calcsize(layout)] = struct.pack(layout, value)
    target = tmp_path / f"b{ext}"
    target.write_bytes(gzip.compress(bytes(raw)) if ext == ".nii.gz" else bytes(raw))
    with pytest.raises(DataError, match=re.escape(f"{target}: {said}")):
        read_volume(target)


def test_a_nifti_pair_whose_img_is_not_the_size_its_hdr_describes_is_refused(tmp_path):
    """ITK read a NIfTI pair's short .img with its missing voxels as zeros, a vox_offset past the .img's
    end as all zeros, and an edited datatype (uint8 over float32 voxels) as the .img's first bytes."""
    voxels = np.arange(120, dtype=np.float32).reshape(4, 5, 6)
    header = write_volume(volume(voxels), tmp_path / "p.hdr")
    img = tmp_path / "p.img"
    good_header, good_img = header.read_bytes(), img.read_bytes()
    assert np.array_equal(read_volume(header).array, voxels)
    assert np.array_equal(read_volume(img).array, voxels)  # ITK reads a pair by either name
    img.write_bytes(good_img[:-80])
    with pytest.raises(DataError, match=r"p.hdr: truncated pair: its voxel file p.img holds 400 bytes, its "
                       r"header needs 480"):  # fmt: skip
        read_volume(header)
    img.write_bytes(good_img)
    for offset, layout, value, said in (
        (108, "<f", (80.0,), "truncated pair: its voxel file p.img holds 480 bytes, its header needs 560"),
        (70, "<2h", (2, 8), "its voxel file p.img holds 480 bytes, its header describes 120: the header and "
                            "the voxels disagree"),
    ):  # fmt: skip
        edited = bytearray(good_header)
        edited[offset : offset + struct.calcsize(layout)] = struct.pack(layout, *value)
        header.write_bytes(bytes(edited))
        with pytest.raises(DataError, match=re.escape(f"p.hdr: {said}")):
            read_volume(header)


def _metaimage(tmp_path: Path, name: str, compress: bool) -> tuple[Path, Path, np.ndarray]:
    """A 4x5x6 float32 MetaImage written by SimpleITK: (header, voxel file, voxels)."""
    voxels = np.arange(120, dtype=np.float32).reshape(4, 5, 6)
    header = tmp_path / f"{name}.mhd"
    image = Volume(voxels, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_volume(image, header) if not compress else None
    if compress:
        import SimpleITK as sitk

        itk = sitk.GetImageFromArray(voxels)
        itk.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(itk, str(header), useCompression=True)
    data = header.with_suffix(".zraw" if compress else ".raw")
    return header, data, voxels


@pytest.mark.parametrize(
    "field, edited, said",
    [
        ("", "",  # 80 bytes more voxels
         "the voxels of a.raw take 560 bytes, its header describes 480 (DimSize 6 x 5 x 4, MET_FLOAT, 1 "
         "channel(s)): the header and the voxels disagree"),
        ("ElementType = MET_FLOAT", "ElementType = MET_UCHAR",
         "the voxels of a.raw take 480 bytes, its header describes 120 (DimSize 6 x 5 x 4, MET_UCHAR"),
        ("DimSize = 6 5 4", "DimSize = 3 5 4",
         "the voxels of a.raw take 480 bytes, its header describes 240 (DimSize 3 x 5 x 4"),
        ("CompressedData = False", "CompressedData = True",
         "the voxels of a.raw are not the compressed data its header says (CompressedData = True): Error -3"),
        ("ElementSpacing = 1 1 2", "ElementSpacing = 1 -1 2",
         "corrupt MetaImage header: ElementSpacing = '1 -1 2' is not 3 sizes > 0 (NDims = 3)"),
        ("Offset = 0 0 0", "Offset = 1 0 0 0 1 0 0 0 0",
         "corrupt MetaImage header: Offset = '1 0 0 0 1 0 0 0 0' is not 3 finite numbers (NDims = 3)"),
    ],
)  # fmt: skip
def test_a_metaimage_whose_voxels_disagree_with_its_header_is_refused(tmp_path, field, edited, said):
    """SimpleITK 2.5.7 read these without a word: the first bytes of a longer voxel file as the image (the
    header of another image, an edited ElementType or DimSize), raw voxels said to be compressed as values
    such as 1e+14 and 7e-45, a negative spacing as its absolute value, the first 3 of 9 origin values."""
    header, data, _ = _metaimage(tmp_path, "a", compress=False)
    if field:
        assert field in header.read_text()
        header.write_text(header.read_text().replace(field, edited))
    else:
        data.write_bytes(data.read_bytes() + b"\0" * 80)
    with pytest.raises(DataError, match=re.escape(f"{header}: {said}")):
        read_volume(header)


def test_a_compressed_metaimage_cut_short_or_of_other_voxels_is_refused(tmp_path):
    """A compressed stream cut short read with its missing voxels as zeros, or as whatever memory ITK
    reused held (the voxels of the image read before it); a stream of fewer voxels the same. (Where the
    header has a CompressedDataSize, as SimpleITK writes, ITK refuses a stream of another length itself;
    without one, which MetaIO reads as "to the end of the file", it did not.)"""
    import zlib

    header, data, voxels = _metaimage(tmp_path, "z", compress=True)
    header.write_text(re.sub(r"CompressedDataSize = \d+\n", "", header.read_text()))
    assert np.array_equal(read_volume(header).array, voxels)  # as written: read, and right
    whole = data.read_bytes()
    data.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"z.mhd: the voxels of z.zraw inflate to \d+ bytes, not the 480 its "
                       r"header describes \(DimSize 6 x 5 x 4, MET_FLOAT, 1 channel\(s\)\), the compressed "
                       "stream is cut short"):  # fmt: skip
        read_volume(header)
    data.write_bytes(zlib.compress(voxels.tobytes()[:240]))
    with pytest.raises(DataError, match=r"inflate to 240 bytes, not the 480 its header describes"):
        read_volume(header)
    data.write_bytes(zlib.compress(voxels.tobytes() * 2))
    with pytest.raises(DataError, match=r"inflate to more than the 480 its header describes"):
        read_volume(header)
    data.write_bytes(gzip.compress(voxels.tobytes()))  # a gzip stream, which MetaIO reads too
    assert np.array_equal(read_volume(header).array, voxels)


def test_metaimages_of_every_element_type_with_header_sizes_still_read(tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float64):
        voxels = (rng.random((3, 4, 5)) * 100).astype(dtype)
        for name, compress in (("a.mhd", False), ("b.mhd", True), ("c.mha", False), ("d.mha", True)):
            path = tmp_path / f"{np.dtype(dtype).name}-{name}"
            sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path), useCompression=compress)
            assert np.array_equal(read_volume(path).array, voxels), path
    header, data, voxels = _metaimage(tmp_path, "h", compress=False)
    data.write_bytes(b"h" * 80 + data.read_bytes())  # 80 bytes of another header before the voxels
    text = header.read_text()
    header.write_text(text.replace("ElementSpacing", "HeaderSize = 80\nElementSpacing"))
    assert np.array_equal(read_volume(header).array, voxels)
    header.write_text(text.replace("ElementSpacing", "HeaderSize = -1\nElementSpacing"))  # the last bytes
    assert np.array_equal(read_volume(header).array, voxels)
    text = text.replace("BinaryData = True", "BinaryData = False")  # voxels as text: not counted in bytes
    header.write_text(text.replace("MET_FLOAT", "MET_SHORT"))
    data.write_text(" ".join(str(v) for v in range(120)) + "\n")
    assert np.array_equal(read_volume(header).array, np.arange(120).reshape(4, 5, 6))


def test_an_nrrd_file_with_more_voxels_than_its_header_describes_is_refused(tmp_path):
    """ITK's NRRD reader read the first bytes of the voxels as the image: `type: uchar` over float32
    voxels came back as a uint8 image of 120 of their 480 bytes, raw or gzip, without a word."""
    import SimpleITK as sitk

    voxels = np.arange(120, dtype=np.float32).reshape(4, 5, 6)
    for compress, said in ((False, "its voxels take 480 bytes, its header describes 120 (sizes 6 x 5 x 4, "
                                   "type uchar): the header and the voxels disagree"),
                           (True, "its voxels inflate to more than the 120 bytes its header describes (sizes "
                                  "6 x 5 x 4, type uchar)")):  # fmt: skip
        path = tmp_path / f"{compress}.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path), useCompression=compress)
        assert np.array_equal(read_volume(path).array, voxels)
        path.write_bytes(path.read_bytes().replace(b"type: float", b"type: uchar", 1))
        with pytest.raises(DataError, match=re.escape(f"{path}: {said}")):
            read_volume(path)
    rng = np.random.default_rng(0)  # every type SimpleITK writes, raw and gzip, still reads
    for dtype in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float64):
        voxels = (rng.random((3, 4, 5)) * 100).astype(dtype)
        for compress in (False, True):
            path = tmp_path / f"{np.dtype(dtype).name}-{compress}.nrrd"
            sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path), useCompression=compress)
            assert np.array_equal(read_volume(path).array, voxels), path


def test_a_metaimage_header_that_crashes_itk_is_refused(tmp_path):
    """SimpleITK 2.5.7 ended the process on these NDims (a segmentation fault for -1 and 1e9, a heap
    corruption abort for 100: nothing to catch, a training lost). Read in a process of its own, so that a
    crash fails this test instead of ending the test run."""
    result = run_script(
        tmp_path,
        """
            import sys
            from pathlib import Path
            import numpy as np
            from prostate_kernels.data import DataError, Volume, read_volume, write_volume

            for ext in (".mhd", ".mha"):
                good = write_volume(Volume(np.ones((4, 5, 6), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                                           (1, 0, 0, 0, 1, 0, 0, 0, 1)), Path(sys.argv[1]) / f"good{ext}")
                for ndims in ("-1", "100", "1e9"):
                    bad = good.with_name(f"bad{ext}")
                    bad.write_bytes(good.read_bytes().replace(b"NDims = 3", b"NDims = " + ndims.encode(), 1))
                    try:
                        read_volume(bad)
                    except DataError as exc:
                        print(exc, flush=True)
            """,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    assert len(lines) == 6, result.stdout
    for line, ndims in zip(lines, ["-1", "100", "1e9"] * 2, strict=True):
        assert f"corrupt MetaImage header: NDims = '{ndims}' is not a whole number from 1 to 5" in line


def test_file_names_that_are_not_utf8_are_refused_not_a_crash(tmp_path):
    """SimpleITK aborted the process (std::logic_error "basic_string::_S_construct null not valid", status
    134) on a path that is not UTF-8: a Latin-1 name, which Python keeps as surrogates. Read in a process
    of its own, so that a crash fails this test instead of ending the test run."""
    latin1 = os.fsdecode(b"Patient-M\xfcller.mhd")  # 'ü' in Latin-1: not UTF-8
    try:
        (tmp_path / latin1).write_bytes(b"")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    (tmp_path / latin1).unlink()
    result = run_script(
        tmp_path,
        """
            import os, shutil, sys
            from pathlib import Path
            import numpy as np
            from prostate_kernels.data import DataError, Volume, read_volume, write_volume

            root = Path(sys.argv[1])
            name = os.fsdecode(b"Patient-M\\xfcller")
            volume = Volume(np.ones((4, 5, 6), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                            (1, 0, 0, 0, 1, 0, 0, 0, 1))
            good = write_volume(volume, root / "good.mhd")
            shutil.copy(good, root / f"{name}.mhd")  # its voxel file is good.raw
            series = root / f"{name}-series"
            series.mkdir()
            shutil.copy(good, series / "slice.mhd")
            for call in (lambda: read_volume(root / f"{name}.mhd"), lambda: read_volume(series),
                         lambda: write_volume(volume, root / f"{name}-out.nii.gz")):
                try:
                    call()
                except DataError as exc:
                    print(str(exc).encode("utf-8", "backslashreplace").decode(), flush=True)
            """,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    assert all("its name is not UTF-8 text, which SimpleITK cannot open" in line for line in lines)


def test_a_truncated_training_image_is_skipped_with_its_name(data, tmp_path):
    copy = copy_dataset(data, tmp_path / "data")
    image = read_volume(copy / "Case01.mhd")
    write_volume(image, copy / "Case01.nii.gz")
    (copy / "Case01.mhd").unlink()
    (copy / "Case01.raw").unlink()
    write_volume(read_volume(copy / "Case01_segmentation.mhd"), copy / "Case01_segmentation.nii.gz")
    whole = (copy / "Case01.nii.gz").read_bytes()
    (copy / "Case01.nii.gz").write_bytes(whole[: len(whole) // 2])
    result = run_cli(*train_args(copy, tmp_path / "run", 1))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped: " in result.stdout and "Case01.nii.gz: truncated" in result.stdout


# ------------------------------------------------------------------------------ ITK messages (14)


def test_itk_errors_are_one_whole_line_with_our_file_name_and_itk_prints_nothing(tmp_path, capfd):
    path = write_volume(
        volume(np.ones((4, 5, 6), np.float32)), tmp_path / ("a-long-directory-name" * 8) / "x.mhd"
    )
    raw = path.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:10])
    with pytest.raises(DataError) as caught:
        read_volume(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot read image (") and "data not read completely" in message
    assert "\n" not in message and "0x" not in message and ".cxx" not in message
    out, err = capfd.readouterr()
    assert "data not read completely" not in err + out  # ITK's own print went into our message


def test_itk_reason_keeps_the_meaningful_lines():
    text = ("Exception thrown in SimpleITK ImageFileReader_Execute: /tmp/SimpleITK-build/ITK/Modules/IO/Meta/"
            "src/itkMetaImageIO.cxx:490:\nITK ERROR: MetaImageIO(0x5589a57fc650): File cannot be read: "
            "/data/x.mhd for reading.\nReason: No such file or directory")  # fmt: skip
    assert itk_reason(text) == "File cannot be read: /data/x.mhd for reading; No such file or directory"
    assert itk_reason('sitk::ERROR: Unable to determine ImageIO reader for "/a.nii"') == (
        'Unable to determine ImageIO reader for "/a.nii"'
    )


# --------------------------------------------------------------------------- geometry messages (15)


def test_geometry_messages_print_plain_numbers_and_name_the_reference(tmp_path):
    image = read_volume(
        write_volume(volume(np.random.default_rng(0).random((4, 5, 6))), tmp_path / "img.nii.gz")
    )
    moved = Volume(np.ones((4, 5, 6), np.uint8), GEOMETRY["spacing"], (0.0, 0.0, 1.5), GEOMETRY["direction"])
    path = write_volume(moved, tmp_path / "mask.nii.gz")
    with pytest.raises(DataError) as caught:
        read_mask(path, image)
    message = str(caught.value)
    assert "np.float" not in message and "None" not in message
    assert f"origin (0, 0, 1.5) differs from image {image.path} origin (-12.5, 30.25, 7)" in message


# ------------------------------------------------------------------------- multi-label masks (9)


def test_a_multi_label_mask_without_label_is_refused_with_its_labels(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:3, 1:3], labels[0, 0, 0] = 2, 1
    path = write_volume(volume(labels), tmp_path / "ref.nii.gz")
    with pytest.raises(DataError, match=r"mask holds 2 labels \(1, 2\): pass --label"):
        read_mask(path)
    assert read_mask(path, label=2).array.sum() == 8


def test_a_mask_of_nan_or_fractions_is_refused_as_such_not_as_labels(tmp_path):
    """NaN was listed as a label ("mask holds 2 labels (1, nan): pass --label"), and so was each value of a
    mask resampled with linear interpolation."""
    mask = np.zeros((4, 5, 6), np.float32)
    mask[1:3, 1:4, 1:5] = 1.0
    whole = write_volume(volume(mask), tmp_path / "whole.nii.gz")
    assert read_mask(whole).array.sum() == 24  # float labels that are whole numbers are labels
    mask[1, 1, 1:3] = 0.25, 0.75  # a border blurred by interpolation
    blurred = write_volume(volume(mask), tmp_path / "blurred.nii.gz")
    with pytest.raises(
        DataError, match=re.escape("holds values that are not whole numbers (0.25, 0.75): a label")
    ):
        read_mask(blurred)
    mask[0, 0, 0] = np.nan
    broken = write_volume(volume(mask), tmp_path / "nan.mhd")  # NIfTI: the tests below
    with pytest.raises(DataError, match="mask contains NaN or infinite values"):
        read_mask(broken)
    with pytest.raises(DataError, match="prediction contains NaN or infinite values"):
        check_binary(read_volume(broken))


@pytest.mark.parametrize("name", ["image.nii.gz", "image.nii", "image.hdr"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_of_a_nifti_file_are_refused_not_read_as_zeros(tmp_path, name, bad):
    """SimpleITK 2.5 (ITK 5) reads a NIfTI file's NaN and infinite voxels as 0, without a word: an image
    with NaN outside its field of view trained as zeros, a mask with NaN scored them as background."""
    array = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    array[1, 2, 3] = bad
    path = write_volume(volume(array), tmp_path / name)
    message = f"{path}: contains NaN or infinite values (1 of 120 voxels"
    with pytest.raises(DataError, match=re.escape(message)):
        read_volume(path)
    with pytest.raises(DataError, match=re.escape(message)):
        read_mask(path)
    array[1, 2, 3] = 0.5
    assert np.array_equal(read_volume(write_volume(volume(array), tmp_path / name)).array, array)


def test_a_vector_nifti_with_nan_in_one_channel_is_refused(tmp_path):
    import SimpleITK as sitk

    t2, adc = np.ones((4, 5, 6), np.float32), np.ones((4, 5, 6), np.float32)
    adc[0, 0, 0] = np.nan
    path = tmp_path / "t2-adc.nii.gz"
    sitk.WriteImage(sitk.Compose(sitk.GetImageFromArray(t2), sitk.GetImageFromArray(adc)), str(path))
    with pytest.raises(DataError, match=re.escape("contains NaN or infinite values (1 of 240 voxels")):
        read_channels(path, [0])


def test_a_nifti_header_that_nibabel_refuses_is_read_as_itk_reads_it(tmp_path):
    """nibabel raises HeaderDataError ("Valid slope but invalid intercept inf") where ITK reads the file (as
    float, the intercept taken as 0): that ended read_volume in a traceback."""
    path = write_volume(volume(np.arange(120, dtype=np.int16).reshape(4, 5, 6)), tmp_path / "a.nii")
    header = bytearray(path.read_bytes())
    header[112:120] = np.array([2.0, np.inf], "<f4").tobytes()  # NIfTI-1 scl_slope, scl_inter
    path.write_bytes(bytes(header))
    assert read_volume(path).array.max() == 238.0


def test_the_nifti_nan_check_prints_nothing_of_its_own(tmp_path, capfd):
    """nibabel logs its notes on odd headers to stderr ("vox offset (=352.5) not divisible by 16, ...");
    its LoggingOutputSuppressor removes the handlers and Python's last-resort handler prints them anyway."""
    path = write_volume(volume(np.ones((4, 5, 6), np.float32)), tmp_path / "a.nii")
    raw = bytearray(path.read_bytes())
    raw[108:112] = struct.pack("<f", 352.5)  # vox_offset
    path.write_bytes(bytes(raw))
    read_volume(path)
    out, err = capfd.readouterr()
    assert out + err == ""


def test_integer_niftis_are_not_read_twice(tmp_path, monkeypatch):
    """Only float voxels can hold NaN: an int16 image (most MRI) is read by ITK alone."""
    import nibabel

    path = write_volume(volume(np.arange(120, dtype=np.int16).reshape(4, 5, 6)), tmp_path / "a.nii.gz")
    monkeypatch.setattr(nibabel, "load", lambda *_: pytest.fail("an integer image was read again"))
    assert read_volume(path).array.dtype == np.int16


def test_without_nibabel_a_warning_says_the_nifti_nan_check_is_off(tmp_path, monkeypatch):
    from prostate_kernels.data import nifti_nonfinite

    array = np.ones((4, 5, 6), np.float32)
    array[0, 0, 0] = np.nan
    path = write_volume(volume(array), tmp_path / "a.nii.gz")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # `import nibabel` raises ImportError
    monkeypatch.setattr(nifti_nonfinite, "_warned_without_nibabel", False)
    with pytest.warns(UserWarning, match="nibabel is not installed: NaN and infinite voxels"):
        assert read_volume(path).array[0, 0, 0] == 0  # what ITK 5 reads
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_volume(path)  # once per process


def test_evaluate_names_a_reference_mask_with_nan_in_nifti(data, tmp_path):
    """The CLI: a reference mask of NaN outside the gland (a resampled mask) is a failed case, named."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    mask = read_volume(data / "Case00_segmentation.mhd")
    values = mask.array.astype(np.float32)
    values[0] = np.nan
    write_volume(mask.like(values), ref / "Case00_segmentation.nii.gz")
    write_volume(mask, pred / "Case00.nii.gz")
    result = run_cli("evaluate", "--pred", pred, "--ref", ref, "--out", tmp_path / "eval")
    assert_one_line_error(result, "Case00_segmentation.nii.gz: contains NaN or infinite values (1024 of")


def test_evaluate_against_a_multi_label_reference_needs_label(tmp_path):
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[1:4, 2:6, 2:6], labels[4, 2:6, 2:6] = 1, 2
    ref = write_volume(volume(labels), tmp_path / "ref" / "Case00_segmentation.nii.gz")
    pred = write_volume(
        volume((labels == 1).astype(np.uint8)), tmp_path / "pred" / "Case00_segmentation.nii.gz"
    )
    assert_one_line_error(run_cli("evaluate", "--pred", pred, "--ref", ref), "2 labels (1, 2)", "--label")
    result = run_cli("evaluate", "--pred", pred, "--ref", ref, "--label", "1", "--out", tmp_path / "ev")
    assert result.returncode == 0, result.stderr
    assert float(next(csv.DictReader((tmp_path / "ev" / "evaluation.csv").open()))["dice"]) == 1.0


# ----------------------------------------------------------- all-ones and missing predictions (5, 10)


def test_an_all_ones_prediction_and_a_probability_map_are_scored(data, tmp_path):
    """All ones (an untrained network's output) is a mask and scores finite measures. An image or a
    probability map given as the prediction is not: its non-zero voxels would score a meaningless Dice
    (an image scored 0.84 here before), so each is reported by name and scored as a failure."""
    pred = tmp_path / "pred"
    reference = read_volume(data / "Case00_segmentation.mhd")
    write_volume(reference.like(np.ones_like(reference.array)), pred / "Case00_segmentation.mhd")
    image = read_volume(data / "Case01.mhd")  # an image passed as a mask: every voxel non-zero
    write_volume(image.like(image.array.astype(np.float32) + 1), pred / "Case01_segmentation.mhd")
    reference = read_volume(data / "Case02_segmentation.mhd")
    probabilities = np.random.default_rng(0).random(reference.array.shape).astype(np.float32)
    write_volume(reference.like(probabilities), pred / "Case02_segmentation.mhd")
    result = run_cli("evaluate", "--pred", pred, "--ref", data, "--out", tmp_path / "ev")
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "Traceback" not in result.stderr
    for line, case in zip(errors, ("Case01", "Case02"), strict=True):
        assert f"{case}_segmentation.mhd: holds" in line and "must be a binary mask" in line
    rows = list(csv.DictReader((tmp_path / "ev" / "evaluation.csv").open()))
    assert [(r["case"], r["status"]) for r in rows] == [("Case00", "ok"), ("Case01", "unusable"),
                                                        ("Case02", "unusable")]  # fmt: skip
    assert 0 < float(rows[0]["dice"]) < 1 and float(rows[1]["dice"]) == float(rows[2]["dice"]) == 0
    for row in rows:
        assert all(math.isfinite(float(row[k])) for k in row if k not in ("case", "status"))


def test_a_multi_label_prediction_is_refused_with_its_non_zero_values():
    """The message counts and lists the non-zero values only (it listed the background's 0 among them)."""
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 1:3, 1:3], labels[2, 2:4, 2:5], labels[3, 0, 0] = 1, 2, 3
    with pytest.raises(DataError, match=re.escape("holds 3 different non-zero values (1, 2, 3): ")):
        check_binary(volume(labels))
    check_binary(volume((labels > 1).astype(np.uint8) * 7))  # one value other than 1: a binary mask


@pytest.mark.parametrize("value", [0.7, 1.5, -0.25])
def test_a_prediction_whose_one_non_zero_value_is_a_fraction_is_refused(value):
    """A mask of 0 and 0.7 (probabilities cut at a threshold but not set to 1, a mask rescaled) was
    scored as a binary mask: a fraction is no label. Whole float values stay labels, as in read_mask."""
    mask = np.zeros((4, 5, 6), np.float32)
    mask[1:3, 1:4, 1:5] = value
    with pytest.raises(DataError, match=re.escape(f"its non-zero value {value:g} is not a whole number: ")):
        check_binary(volume(mask))
    mask[1:3, 1:4, 1:5] = 1.0
    check_binary(volume(mask))
    check_binary(volume(np.zeros((4, 5, 6), np.float32)))  # all zeros: an empty mask, scored as such


def test_a_binary_prediction_with_another_label_value_is_scored(data, tmp_path):
    pred = tmp_path / "pred"
    for case in ("Case00", "Case01", "Case02"):
        reference = read_volume(data / f"{case}_segmentation.mhd")
        write_volume(reference.like(reference.array * 255), pred / f"{case}_segmentation.mhd")
    result = run_cli("evaluate", "--pred", pred, "--ref", data, "--out", tmp_path / "ev")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "ev" / "evaluation.csv").open()))
    assert [(r["status"], float(r["dice"])) for r in rows] == [("ok", 1.0)] * 3


def test_missing_predictions_are_failures_in_the_summary_and_the_exit_status(data, tmp_path):
    pred = tmp_path / "pred"
    reference = read_volume(data / "Case00_segmentation.mhd")
    write_volume(reference, pred / "Case00_segmentation.mhd")  # perfect; Case01 and Case02 are missing
    result = run_cli("evaluate", "--pred", pred, "--ref", data, "--out", tmp_path / "ev")
    assert_one_line_error(result, "2 reference(s) without a prediction", "Case01, Case02", "--allow-missing")
    rows = list(csv.DictReader((tmp_path / "ev" / "evaluation.csv").open()))
    assert [(r["case"], r["status"], float(r["dice"])) for r in rows] == [
        ("Case00", "ok", 1.0), ("Case01", "missing", 0.0), ("Case02", "missing", 0.0)
    ]  # fmt: skip
    mean_line = next(line for line in result.stdout.splitlines() if line.startswith("mean"))
    assert float(mean_line.split()[1]) == pytest.approx(1 / 3, abs=1e-3)  # not 1.0: nothing dropped
    assert "3 cases, 2 failed (Case01, Case02)" in result.stdout
    allowed = run_cli("evaluate", "--pred", pred, "--ref", data, "--out", tmp_path / "ev2", "--allow-missing")
    assert allowed.returncode == 0 and "2 failed" in allowed.stdout


def test_evaluate_images_of_another_size_are_reported_and_the_case_still_scored(data, tmp_path):
    pred = tmp_path / "pred"
    write_volume(read_volume(data / "Case00_segmentation.mhd"), pred / "Case00_segmentation.mhd")
    image = read_volume(data / "Case00.mhd")
    write_volume(Volume(image.array[:, :16], image.spacing, image.origin, image.direction),
                 tmp_path / "images" / "Case00.mhd")  # fmt: skip
    result = run_cli("evaluate", "--pred", pred, "--ref", data, "--images", tmp_path / "images",
                     "--out", tmp_path / "ev", "--allow-missing")  # fmt: skip
    line = assert_one_line_error(result, "Case00.mhd: size", "no overlay for Case00")
    assert "Traceback" not in line and (tmp_path / "ev" / "evaluation.csv").exists()


# ----------------------------------------------------------------- training data checks (12)


def test_zscore_of_huge_intensities_is_finite():
    array = np.array([[[1e37, 3e37], [2e37, -1e37]]], dtype=np.float32)
    z = zscore(array)
    assert np.isfinite(z).all() and z.dtype == np.float32
    assert z.mean() == pytest.approx(0, abs=1e-6) and z.std() == pytest.approx(1, rel=1e-5)


def test_an_all_foreground_training_mask_is_skipped_with_a_message(data, tmp_path):
    copy = copy_dataset(data, tmp_path / "data")
    mask = read_volume(copy / "Case00_segmentation.mhd")
    write_volume(mask.like(np.ones_like(mask.array)), copy / "Case00_segmentation.mhd")
    result = run_cli(*train_args(copy, tmp_path / "run", 1))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Case00_segmentation.mhd: mask covers every voxel" in result.stdout


@pytest.mark.parametrize("name", ["Case00_segmentation.mhd", "Case00_segmentation.nii.gz"])
def test_a_volume_write_that_fails_half_way_leaves_the_earlier_file_whole(tmp_path, monkeypatch, name):
    """SimpleITK wrote straight into the target: an interrupted predict left a truncated segmentation,
    which the rerun then refused to replace."""
    import SimpleITK as sitk

    grid = (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())
    first = Volume(np.ones((4, 5, 6), np.uint8), *grid)
    target = write_volume(first, tmp_path / name)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_write = sitk.WriteImage

    def killed_half_way(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        for written in Path(path).parent.iterdir():  # cut every file it wrote, then fail
            written.write_bytes(written.read_bytes()[: written.stat().st_size // 2])
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", killed_half_way)
    with pytest.raises(DataError, match="cannot write image"):
        write_volume(Volume(np.zeros((4, 5, 6), np.uint8), *grid), target)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no staging directory left
    monkeypatch.setattr(sitk, "WriteImage", real_write)
    assert read_volume(target).array.min() == 1
    write_volume(Volume(np.zeros((4, 5, 6), np.uint8), *grid), target)  # a whole write replaces it
    assert read_volume(target).array.max() == 0 and {p.name for p in tmp_path.iterdir()} == set(before)


def test_an_image_write_onto_a_full_disk_says_so_and_names_the_file_asked_for(tmp_path, monkeypatch):
    """On a full tmpfs ITK said only "M_WriteElementsData: file stream is fail after write; File cannot be
    written: DIR/.NAME.tmp-PID@HOST/NAME": the likely cause leads now, and ITK's text names NAME."""
    import shutil

    import SimpleITK as sitk

    def full_disk(image, path, *args, **kwargs):
        raise RuntimeError(f"MetaImage: M_WriteElementsData: file stream is fail after write\n"
                           f"File cannot be written: {path}")  # fmt: skip

    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 100, free=100)
    )
    target = tmp_path / "Case00_segmentation.mhd"
    with pytest.raises(DataError) as raised:
        write_volume(volume(np.zeros((4, 5, 6), np.uint8)), target)
    assert str(raised.value) == (
        f"{target}: no space left on its file system (100 bytes free, 120 to write): cannot write image "
        f"(MetaImage: M_WriteElementsData: file stream is fail after write; File cannot be written: {target})"
    )
    assert list(tmp_path.iterdir()) == []  # no staging directory left


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX thing")
def test_a_named_pipe_in_place_of_an_image_or_its_voxel_file_is_refused_not_waited_on(tmp_path):
    """train hung for good on a FIFO called Case05.mhd (reading a pipe waits for a writer)."""
    image = tmp_path / "Case05.mhd"
    os.mkfifo(image)
    with pytest.raises(DataError, match="Case05.mhd: not a regular file .* reading it could wait forever"):
        run_without_waiting_on(image, lambda: read_volume(image))
    grid = (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())
    header = write_volume(Volume(np.ones((4, 5, 6), np.int16), *grid), tmp_path / "Case06.mhd")
    (tmp_path / "Case06.raw").unlink()
    os.mkfifo(tmp_path / "Case06.raw")
    said = f"{header}: its voxel file {tmp_path / 'Case06.raw'} is not a regular file"
    with pytest.raises(DataError, match=re.escape(said)):
        run_without_waiting_on(tmp_path / "Case06.raw", lambda: read_volume(header))
    result = run_cli(
        "predict", "--checkpoint", tmp_path / "c.pt", "--input", image, "--output", tmp_path / "o"
    )
    assert_one_line_error(result, f"{image}: not a regular file or a directory")


def test_a_directory_named_as_the_voxel_file_is_called_a_directory(tmp_path):
    """It was called "not a regular file (a pipe, socket or device)", by its last name only."""
    grid = (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())
    header = write_volume(Volume(np.ones((4, 5, 6), np.int16), *grid), tmp_path / "Case07.mhd")
    (tmp_path / "Case07.raw").unlink()
    (tmp_path / "Case07.raw").mkdir()
    said = f"{header}: its voxel file {tmp_path / 'Case07.raw'} (ElementDataFile) is a directory"
    with pytest.raises(DataError, match=re.escape(said)):
        read_volume(header)
