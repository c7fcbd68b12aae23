"""NRRD files (.nrrd, the voxels after the header) checked before ITK reads them: ITK's NRRD reader (teem,
SimpleITK 2.5.7) read a file whose voxels are more than its header describes as their first bytes,
without a word (measured: `type: uchar` over float32 voxels came back as 120 bytes of them). Fewer voxels
than described it refuses itself, raw or gzip. Only what can be told without reading the format's every
option is checked: voxels in the file itself (no `data file`), raw or gzip, no line or byte skip.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

from prostate_kernels.data.errors import DataError
from prostate_kernels.data.integrity import header_lines, inflated_size

# bytes per value of NRRD's types, under each of their names (teem's nrrdTypeStr and its synonyms)
_TYPE_NAMES = {
    1: "signed char, int8, int8_t, uchar, unsigned char, uint8, uint8_t",
    2: "short, short int, signed short, signed short int, int16, int16_t, ushort, unsigned short, "
    "unsigned short int, uint16, uint16_t",
    4: "int, signed int, int32, int32_t, uint, unsigned int, uint32, uint32_t, float",
    8: "longlong, long long, long long int, signed long long, signed long long int, int64, int64_t, "
    "ulonglong, unsigned long long, unsigned long long int, uint64, uint64_t, double",
}
_TYPE_BYTES = {name.strip(): size for size, names in _TYPE_NAMES.items() for name in names.split(",")}


def check_nrrd_voxels(path: Path) -> None:
    """DataError when the voxels of the .nrrd file `path` are more bytes than its header's sizes x type
    (raw), or inflate to more (gzip): the header of another image, or an edited type or sizes."""
    if not path.name.lower().endswith(".nrrd"):
        return
    fields, offset = _nrrd_fields(path)
    if fields is None or any(key in fields for key in ("data file", "datafile", "line skip", "byte skip")):
        return
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        element = _TYPE_BYTES[fields["type"]]
    except (KeyError, ValueError):
        return  # teem's own checks stand
    needed, encoding = math.prod(sizes) * element, fields.get("encoding", "")
    what = f"sizes {' x '.join(map(str, sizes))}, type {fields['type']}"
    if encoding == "raw":
        held = path.stat().st_size - offset
        if held > needed:
            raise DataError(path, f"its voxels take {held} bytes, its header describes {needed} ({what}): "
                                  "the header and the voxels disagree")  # fmt: skip
    elif encoding in ("gzip", "gz"):
        try:
            inflated, _ = inflated_size(path, offset, needed + 1)
        except zlib.error:  # not a gzip stream: teem refuses it, or reads it as raw bytes (zlib's gzread)
            return
        if inflated > needed:
            raise DataError(path, f"its voxels inflate to more than the {needed} bytes its header describes "
                                  f"({what}): the header and the voxels disagree")  # fmt: skip


def _nrrd_fields(path: Path) -> tuple[dict[str, str] | None, int]:
    """(the "key: value" fields of the header, the byte offset of the voxels after its blank line), or
    (None, 0) when no blank line ends a header in the first 64 KiB (teem then says what is wrong)."""
    fields: dict[str, str] = {}
    for line, offset in header_lines(path):
        if not line.strip():
            return fields, offset
        key, colon, value = line.partition(":")
        if colon and not value.startswith("="):  # "key:=value" pairs are the user's, not the format's
            fields.setdefault(key.strip(), value.strip())
    return None, 0
