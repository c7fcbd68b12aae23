"""NaN and infinite voxels of NIfTI files, which SimpleITK before ITK 6 reads as 0.

ITK 5's NIfTI reader (its vendored niftilib's `nifti_read_buffer`) overwrites every NaN and +-inf
float voxel with 0 and says so only at a debug level ITK turns off (ITK pull request 6683 keeps them
from ITK 6 on). NaN is common in NIfTI files, outside a registration's field of view for one: read
through SimpleITK 2.5 (ITK 5.4) such an image trained and predicted as zeros, and such a mask scored its
NaN voxels as background, without a word, while the same voxels in a .mhd or .nrrd file are refused
(data/io.py's `_check_finite`). `check_nifti_finite` reads the voxels as stored with nibabel, the
well-kept NIfTI library, and refuses the file the same way.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from prostate_kernels.data.errors import DataError

_warned_without_nibabel = False


def check_nifti_finite(image, path: Path) -> None:
    """DataError naming `path` if it is a NIfTI (or Analyze) file whose float voxels hold NaN or infinite
    values that `image`, SimpleITK's reading of it, holds as 0. Reads the file again, only for float
    voxels read by ITK before 6; without nibabel it warns once per process and checks nothing."""
    if not _zeroes_nonfinite(image, path):
        return
    try:
        import nibabel
        from nibabel.filebasedimages import ImageFileError
        from nibabel.imageglobals import logger
        from nibabel.spatialimages import HeaderDataError
    except ImportError:
        _warn_without_nibabel()
        return
    try:
        with _silenced(logger):  # its notes on odd headers ("vox offset ... not divisible by 16")
            stored = nibabel.load(path, mmap=False)  # NIfTI-1/2 or Analyze, one file or a pair: AnalyzeImage
            if (
                not isinstance(stored, nibabel.analyze.AnalyzeImage)
                or stored.get_data_dtype().kind not in "fc"
            ):
                return  # integer voxels (scaled to float or not) are always finite
            proxy = stored.dataobj  # the file's voxels, read when asked
            if not isinstance(proxy, nibabel.arrayproxy.ArrayProxy):
                return
            voxels = np.asanyarray(proxy.get_unscaled())  # (x, y, z, ...) as stored, no scaling
    except (ImageFileError, HeaderDataError, OSError, ValueError, EOFError):
        return  # a file ITK reads but nibabel refuses (an infinite scl_inter, say): nothing to compare with
    bad = int(voxels.size - np.count_nonzero(np.isfinite(voxels)))
    if bad:
        raise DataError(path, f"contains NaN or infinite values ({bad} of {voxels.size} voxels; "
                              "SimpleITK before ITK 6 would read them as 0)")  # fmt: skip


def _zeroes_nonfinite(image, path: Path) -> bool:
    """Whether SimpleITK read `image` from `path` with an ITK NIfTI reader that zeroes non-finite floats."""
    import SimpleITK as sitk

    floats = (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)
    return (
        sitk.Version.ITKMajorVersion() < 6
        and image.GetPixelID() in floats
        and sitk.ImageFileReader.GetImageIOFromFileName(str(path)) == "NiftiImageIO"
    )


@contextlib.contextmanager
def _silenced(logger: logging.Logger) -> Iterator[None]:
    """`logger` says nothing in the block (nibabel's own LoggingOutputSuppressor removes the handlers, and
    Python's last-resort handler then prints its warnings to stderr anyway)."""
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _warn_without_nibabel() -> None:
    global _warned_without_nibabel
    if not _warned_without_nibabel:
        _warned_without_nibabel = True
        warnings.warn(
            "nibabel is not installed: NaN and infinite voxels of float NIfTI files are read as 0 by "
            "SimpleITK before ITK 6 and go unnoticed (pip install nibabel, or prostate_kernels[io])",
            stacklevel=3,
        )
