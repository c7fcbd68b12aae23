"""MetaImage headers (.mhd with their voxel file, .mha with the voxels after the header) checked before
ITK reads them: ITK's MetaIO (SimpleITK 2.5.7) ended the process on some header values, and read voxels
that disagree with the header into an image without a word (measured):
- a voxel file longer than DimSize x ElementNumberOfChannels x ElementType needs (the header of another
  image, an edited DimSize or ElementType): its first bytes read as the image, the rest ignored;
- CompressedData = True over voxels that are not a zlib or gzip stream: values such as 1e+14 and 7e-45;
- a compressed stream cut short, or of fewer voxels than the header's: the missing voxels came back as
  zeros, or as whatever the memory ITK reused held (the voxels of the image read before it).
A voxel file shorter than the header's uncompressed voxels ITK refuses itself.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

from prostate_kernels.data.errors import DataError
from prostate_kernels.data.integrity import header_lines, inflated_size

_METAIMAGE_SUFFIXES = (".mhd", ".mha")
MAX_METAIMAGE_DIMENSIONS = 5  # ITK's image IO reads at most 5 dimensions ("maximum supported IO dimension")
# bytes per value of MetaIO's element types (metaTypes.h); MET_LONG and MET_ULONG are left unchecked
ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                 "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}  # fmt: skip


def check_metaimage_header(path: Path) -> None:
    """DataError, before ITK reads the MetaImage header `path` (.mhd, .mha), for
    - an NDims that is not a whole number from 1 to MAX_METAIMAGE_DIMENSIONS: ITK's MetaIO (SimpleITK
      2.5.7) ended the whole process on such headers, a segmentation fault for NDims = -1 or 1e9, a
      heap-corruption abort for 100, with no error to catch;
    - a voxel file (ElementDataFile) that is a directory, a pipe, a socket or a device (reading a pipe
      waits for a writer forever);
    - voxels that disagree with the header (the module's docstring)."""
    if not path.name.lower().endswith(_METAIMAGE_SUFFIXES):
        return
    fields, local_offset = _metaimage_fields(path)
    stated = fields.get("NDims")
    if stated is not None and not (stated.isdigit() and 1 <= int(stated) <= MAX_METAIMAGE_DIMENSIONS):
        raise DataError(path, f"corrupt MetaImage header: NDims = {stated!r} is not a whole number from 1 to "
                              f"{MAX_METAIMAGE_DIMENSIONS}")  # fmt: skip
    _check_geometry_fields(path, fields)
    value = fields.get("ElementDataFile", "")
    data = path if value == "LOCAL" else _metaimage_data_file(path, value)
    if data is not None and data.exists() and not data.is_file():
        if data.is_dir():
            raise DataError(path, f"its voxel file {data} (ElementDataFile) is a directory")
        raise DataError(path, f"its voxel file {data} is not a regular file (a pipe, socket or device): "
                              "reading it could wait forever")  # fmt: skip
    if data is not None and data.is_file():
        _check_voxel_bytes(path, fields, data, local_offset if data == path else _header_size(fields))


# the fields of one value per axis, and of NDims x NDims (MetaIO reads each under any of its names)
_PER_AXIS = ("DimSize", "ElementSpacing", "ElementSize", "Offset", "Origin", "Position")
_MATRICES = ("TransformMatrix", "Rotation", "Orientation")


def _check_geometry_fields(path: Path, fields: dict[str, str]) -> None:
    """DataError for a size, spacing, origin or direction field that is not NDims finite numbers
    (NDims x NDims for a direction; whole and >= 1 for DimSize, > 0 for a spacing): MetaIO read the first
    NDims values of a longer field, filled a shorter one, and took a negative spacing's absolute value
    (ElementSpacing = 6 -5 4 read as 6 5 4), each without a word."""
    ndims = int(fields.get("NDims", "3"))
    for key in (*_PER_AXIS, *_MATRICES):
        if key not in fields:
            continue
        count = ndims * ndims if key in _MATRICES else ndims
        words = fields[key].split()
        try:
            values = [float(w) for w in words]
        except ValueError:
            values = []
        bad = len(values) != count or not all(math.isfinite(v) for v in values)
        if key == "DimSize":
            bad = bad or not all(v >= 1 and v == int(v) for v in values)
        if key in ("ElementSpacing", "ElementSize"):
            bad = bad or not all(v > 0 for v in values)
        if bad:
            kind = {
                "DimSize": "whole numbers >= 1",
                "ElementSpacing": "sizes > 0",
                "ElementSize": "sizes > 0",
            }
            raise DataError(path, f"corrupt MetaImage header: {key} = {fields[key]!r} is not {count} "
                                  f"{kind.get(key, 'finite numbers')} (NDims = {ndims})")  # fmt: skip


def _metaimage_data_file(header: Path, value: str) -> Path | None:
    """The one voxel file a header's ElementDataFile `value` names, or None for LOCAL data (an .mha), a
    LIST or a numbered pattern of files, or none."""
    if not value or value in ("LOCAL", "LIST") or value.startswith("LIST") or " " in value:
        return None
    return header.parent / value


def _metaimage_fields(header: Path) -> tuple[dict[str, str], int]:
    """A MetaImage header's "Key = value" fields (the first of each key), up to ElementDataFile, the last;
    and the byte offset just after that line (where an .mha's voxels start; 0 without one)."""
    fields: dict[str, str] = {}
    for line, after in header_lines(header):
        key, _, value = line.partition("=")
        fields.setdefault(key.strip(), value.strip())
        if key.strip() == "ElementDataFile":
            return fields, after
    return fields, 0


def _header_size(fields: dict[str, str]) -> int | None:
    """Bytes before the voxels in a voxel file (HeaderSize, default 0); None for -1 (the voxels are the
    file's last bytes, after a header of any size) or a value that is not a whole number."""
    stated = fields.get("HeaderSize", "0")
    return int(stated) if stated.isdigit() else None


def _voxel_bytes(fields: dict[str, str]) -> tuple[int, str] | None:
    """(bytes of the voxels the header describes, that description), or None where it cannot be told
    (an element type or field this check does not know; ITK's own checks then stand)."""
    try:
        sizes = [int(v) for v in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        element = ELEMENT_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):
        return None
    ndims = fields.get("NDims", "")
    if not ndims.isdigit() or len(sizes) != int(ndims) or min(sizes) < 1 or channels < 1:
        return None
    described = f"DimSize {' x '.join(map(str, sizes))}, {fields['ElementType']}, {channels} channel(s)"
    return math.prod(sizes) * channels * element, described


def _check_voxel_bytes(header: Path, fields: dict[str, str], data: Path, offset: int | None) -> None:
    """DataError when the voxels in `data` from byte `offset` (None: unknown) are not the bytes the header
    describes: more of them uncompressed, or a compressed stream that is corrupt, cut short, or of
    another size once inflated (read in chunks, stopped as soon as it is too long)."""
    described = _voxel_bytes(fields)
    binary = fields.get("BinaryData", "True")[:1] in ("T", "t", "1")  # False: voxels as text numbers
    if described is None or offset is None or not binary:
        return
    needed, what = described
    compressed = fields.get("CompressedData", "False")[:1] in ("T", "t", "1")  # as MetaIO parses it
    voxels = "its voxels" if data == header else f"the voxels of {data.name}"
    if not compressed:
        held = data.stat().st_size - offset
        if held > needed:
            raise DataError(header, f"{voxels} take {held} bytes, its header describes {needed} ({what}): "
                                    "the header and the voxels disagree")  # fmt: skip
        return
    try:
        inflated, ended = inflated_size(data, offset, needed + 1)  # a zlib or a gzip stream, as MetaIO takes
    except zlib.error as exc:
        raise DataError(header, f"{voxels} are not the compressed data its header says (CompressedData = "
                                f"{fields['CompressedData']}): {exc}") from None  # fmt: skip
    if inflated != needed:
        cut = ", the compressed stream is cut short" if not ended and inflated < needed else ""
        size = "more than" if inflated > needed else f"{inflated} bytes, not"
        raise DataError(header, f"{voxels} inflate to {size} the {needed} its header describes ({what})"
                                f"{cut}")  # fmt: skip
