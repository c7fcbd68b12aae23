"""Is a medical image file whole, and what did ITK say when it was not?

SimpleITK reads a truncated .nii or .nii.gz without complaint (the missing voxels come back as zeros,
measured with SimpleITK 2.5.7), so `check_complete` reads the whole gzip stream and compares the data
size with what the NIfTI header promises. ITK's own errors are multi-line (a C++ source location, then
"ITK ERROR: Class(0x...): what", then "Reason: ...") and some readers print to stderr besides raising:
`itk_reason` turns both into one readable line.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from prostate_kernels.data.errors import DataError

_CHUNK = 1 << 20
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_SOURCE_LOCATION = re.compile(r"^\S+\.(cxx|cpp|h|hxx):\d+:?$")
_ITK_PREFIX = re.compile(r"^(ITK ERROR|sitk::ERROR|ERROR):\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?", re.IGNORECASE)


def itk_path(path: Path) -> str:
    """`path` as the string handed to SimpleITK; DataError when it is not UTF-8 (a name in another
    encoding, Latin-1 say, which Python keeps as surrogates): SimpleITK's string conversion fails there
    and its C++ aborts the whole process ("basic_string::_S_construct null not valid", status 134)."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(path, "its name is not UTF-8 text, which SimpleITK cannot open (it ends the "
                              "process): rename it") from None  # fmt: skip
    return text


def check_regular(path: Path) -> None:
    """DataError unless `path` is a regular file: reading a named pipe (a FIFO called Case05.mhd, say)
    waits for a writer forever, and `train` hung on one. metaimage.check_metaimage_header does so for the
    voxel file a MetaImage header names."""
    if not path.is_file():
        raise DataError(path, "not a regular file (a pipe, socket or device): reading it could wait forever")


def check_complete(path: Path) -> None:
    """DataError if `path` is a gzip file that ends early or is corrupt, a NIfTI file (plain or
    gzipped) holding fewer bytes than its header's voxel data needs, or a NIfTI pair whose .img is not
    the size its .hdr describes."""
    name = path.name.lower()
    if name.endswith((".hdr", ".img")):
        _check_nifti_pair(path.with_suffix(".hdr"), path.with_suffix(".img"))
        return
    if not name.endswith(".gz") and not name.endswith(_NIFTI_SUFFIXES):
        return
    opener = gzip.open if name.endswith(".gz") else open
    head, size = b"", 0
    try:
        with opener(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                if len(head) < 540:
                    head += chunk[: 540 - len(head)]
                size += len(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(path, f"truncated or corrupt gzip stream ({exc})") from None
    if name.endswith(_NIFTI_SUFFIXES):
        needed = _nifti_bytes(head, path)
        if needed is not None and size < needed:
            raise DataError(path, f"truncated file: {size} bytes of NIfTI data, its header needs {needed}")


def _check_nifti_pair(header: Path, voxels: Path) -> None:
    """DataError when the .img of a NIfTI-1 pair (magic "ni1") holds fewer or more bytes than its .hdr's
    vox_offset + voxels x bytes per voxel: ITK read a short .img's missing voxels, or all of them for a
    vox_offset past its end, as zeros, and a longer one (an edited datatype) as its first bytes, each
    without a word. Analyze 7.5 headers (no magic) and missing files are left to ITK."""
    if not (header.is_file() and voxels.is_file()):
        return
    with open(header, "rb") as f:
        head = f.read(348)
    if len(head) < 348 or head[344:348] != b"ni1\0":
        return
    needed = _nifti_bytes(head, header, header_floor=0)
    held = voxels.stat().st_size
    if needed is not None and held < needed:
        raise DataError(header, f"truncated pair: its voxel file {voxels.name} holds {held} bytes, its "
                                f"header needs {needed}")  # fmt: skip
    if needed is not None and held > needed:
        raise DataError(header, f"its voxel file {voxels.name} holds {held} bytes, its header describes "
                                f"{needed}: the header and the voxels disagree")  # fmt: skip


def header_lines(path: Path) -> Iterator[tuple[str, int]]:
    """The lines of a text header at the start of `path` (its first 64 KiB, one byte per character), each
    with the byte offset just after it: where the voxels start, after the header's last line."""
    with open(path, "rb") as f:
        text = f.read(1 << 16).decode("latin-1")
    offset = 0
    for line in text.splitlines(keepends=True):
        offset += len(line)
        yield line, offset


def inflated_size(path: Path, offset: int, most: int) -> tuple[int, bool]:
    """(bytes the zlib or gzip stream in `path` from byte `offset` inflates to, counted up to `most` in
    chunks, so that a stream of more costs no more; whether the stream ended). zlib.error for bytes that
    are not such a stream."""
    inflate, inflated = zlib.decompressobj(wbits=47), 0  # 47: a zlib or a gzip header, told apart
    with open(path, "rb") as stream:
        stream.seek(offset)
        while not inflate.eof and inflated < most and (chunk := stream.read(_CHUNK)):
            inflated += len(inflate.decompress(chunk, most - inflated))
    return inflated, inflate.eof


# bytes per voxel of each NIfTI datatype code (nifti1.h): what ITK reads a voxel as, whatever bitpix says
_DATATYPE_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                   1536: 16, 1792: 16, 2048: 32, 2304: 4}  # fmt: skip


def _nifti_bytes(head: bytes, path: Path, header_floor: int = 348) -> int | None:
    """max(vox_offset, header_floor) + voxels * bytes per voxel from a NIfTI-1 or NIfTI-2 header (the
    bytes of a one-file NIfTI, or of a pair's .img with header_floor 0); None when the file is too short
    to hold one (ITK says so). DataError for a header no NIfTI writer makes, which ITK read anyway
    into another image: a size field other than 348 or 540 (with its sizes read as they stood: 4x49x6
    voxels from a file of 4x5x6, past its end), or a dimension of 0 or less (read as 1: a 4x5x6 image came
    back 4x1x6)."""
    if len(head) < 348:
        return None
    for order in "<>":
        (sizeof_hdr,) = struct.unpack(order + "i", head[:4])
        # NIfTI-1: dim int16[8] at 40, datatype and bitpix int16 at 70 and 72, vox_offset float32 at 108
        if sizeof_hdr == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            (offset,) = struct.unpack(order + "f", head[108:112])
            _check_voxel_offset(offset, head[344:348] == b"n+1\0", 352, path)
            return _needed(dims, datatype, bitpix, max(int(offset), header_floor), path)
        # NIfTI-2: datatype and bitpix int16 at 12 and 14, dim int64[8] at 16, vox_offset int64 at 168
        if sizeof_hdr == 540:
            if len(head) < 540:
                return None
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            (offset,) = struct.unpack(order + "q", head[168:176])
            _check_voxel_offset(offset, head[4:8] == b"n+2\0", 544, path)
            return _needed(dims, datatype, bitpix, max(offset, header_floor), path)
    (stated,) = struct.unpack("<i", head[:4])
    raise DataError(
        path, f"corrupt NIfTI header: its size field is {stated}, not 348 (NIfTI-1) or 540 (NIfTI-2)"
    )


def _check_voxel_offset(offset: float, single_file: bool, header_bytes: int, path: Path) -> None:
    """DataError for a vox_offset that is not a finite number >= 0, or that starts a one-file NIfTI's
    voxels inside its header (352 bytes for NIfTI-1, 544 for NIfTI-2, extension flags included): ITK read
    the header's own bytes as the first voxels (146, 0 or 348: each voxel shifted, the first ones
    garbage), and a NaN or infinite one ended the size check in a ValueError traceback."""
    if not math.isfinite(offset) or offset < 0:
        raise DataError(path, f"corrupt NIfTI header: vox_offset is {offset}, not a byte offset")
    if single_file and offset < header_bytes:
        raise DataError(path, f"corrupt NIfTI header: vox_offset is {offset:g}, inside its {header_bytes}-"
                              "byte header (a one-file NIfTI's voxels start after it)")  # fmt: skip


def _needed(dims: tuple[int, ...], datatype: int, bitpix: int, offset: int, path: Path) -> int | None:
    rank = dims[0]
    if not 1 <= rank <= 7:
        return None  # ITK refuses it with its own message ("bad dim[0]")
    for axis, size in enumerate(dims[1 : rank + 1], start=1):
        if size < 1:
            raise DataError(path, f"corrupt NIfTI header: dim[{axis}] is {size}, not a size >= 1")
    voxel_bytes = _DATATYPE_BYTES.get(datatype, bitpix // 8 if bitpix > 0 else 0)
    if voxel_bytes <= 0:
        return None  # a datatype ITK refuses with its own message
    return offset + math.prod(dims[1 : rank + 1]) * voxel_bytes


def itk_reason(message: str, printed: str = "") -> str:
    """One line from an ITK exception text and what ITK printed to stderr meanwhile: the meaningful
    lines whole (no source locations, no object addresses), joined by "; "."""
    lines = []
    for raw in (printed + "\n" + message).splitlines():
        line = raw.strip()
        if not line or line.startswith("Exception thrown in") or _SOURCE_LOCATION.match(line):
            continue
        if printed.strip() and line.startswith("Reason:"):
            continue  # errno left over from an earlier call; what ITK printed says more
        line = _ITK_PREFIX.sub("", line)
        line = re.sub(r"^(Reason|Description):\s*", "", line).rstrip(".")
        line = re.sub(r"\s+", " ", line)
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines) or "no reason given"


@contextlib.contextmanager
def captured_stderr() -> Iterator[Callable[[], str]]:
    """Redirects file descriptor 2 (where ITK's C++ code prints) into a temporary file for the block;
    yields a function that returns what was printed."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        text = ""
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
