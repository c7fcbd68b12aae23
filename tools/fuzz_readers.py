"""Damaged files against the readers: every variant is read in a forked process of its own, so that a
crash (a signal, which ends the process with nothing to catch) is counted, not suffered.

What a reader must do with any file: read it, or raise a DataError naming it. A variant that ends in
another exception (a traceback for the user) or a signal is a bug; the tool saves it under --keep and
exits 1. A read is also compared with the undamaged file's (voxels, dtype, spacing, origin, direction):
"read as another image" is not a bug by itself (a header may say another spacing or byte order), but
it is where silent misreads hide; --keep-another saves those variants to look at. How each kind of file
is damaged:
- nifti: 1 to 4 random bytes of a 4x5x6 float32 .nii's 352-byte header;
- metaimage: 1 or 2 fields of a .mhd header set to values from a hostile list (negative, huge, empty,
  wrong type, other files);
- nrrd: the same for the fields of a .nrrd header;
- checkpoint: 1 to 6 random bytes of a tiny Tiramisu's checkpoint, mostly in the zip structures at either
  end, loaded as predict loads one (trained_model.load_trained_model);
- dicom: one slice of a 4-slice MR series (GDCM's files, as scanners export them): 1 to 6 random bytes,
  mostly in its first 2 KiB (the tags before the pixels), or the file cut short; the directory read.

    python tools/fuzz_readers.py --kind metaimage --n 1500 --seed 2 [--keep DIR]

The runs of 2026-12-05 found with it: NIfTI headers SimpleITK read into another image (a dimension of 0
or less read as 1, a bad size field, a datatype read past the file's end), a nibabel OverflowError,
MetaImage NDims values that crashed the process (SIGSEGV, SIGABRT) and a checkpoint that ended predict in
a BadZipFile traceback; all fixed, and reruns of every kind found none. The tool sees tracebacks and
crashes only: a DICOM series read one slice short (GDCM passing over a damaged first or last slice) was
found by comparing its reads with the undamaged series' by hand, and is refused since.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import functools
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

HOSTILE_VALUES = (
    ["0", "-1", "-3", "1", "2", "3", "4", "5", "100", "1e9", "2147483648", "nan", "inf"]  # numbers
    + [
        "",
        "abc",
        "MET_DOUBLE",
        "MET_UCHAR",
        "double",
        "uchar",
        "LOCAL",
        "/dev/null",
        "nothere.raw",
        "gzip",
        "big",
    ]
    + ["4 5", "6 5 4 3", "6 5 0", "6 -5 4", "6 50 4", "0 0 0", "-1 -1 -1", "99999 99999 99999"]  # sizes
    + ["(0,0,0) (0,0,0) (0,0,0)", "(nan,0,0) (0,1,0) (0,0,2)", "1 0 0 0 1 0 0 0 0"]  # directions
)
OUTCOMES = {
    0: "read",
    3: "refused (DataError)",
    4: "other exception (bug)",
    5: "MemoryError",
    6: "read as another image",
}
# the undamaged file each kind's variants are made from (what a read of a variant is compared with)
GOOD = {"nifti": "good.nii", "metaimage": "good.mhd", "nrrd": "good.nrrd", "dicom": "good-series"}


def _volume(path: Path) -> Path:
    from prostate_kernels.data import Volume, write_volume

    voxels = (np.random.default_rng(0).random((4, 5, 6)) * 100).astype(np.float32)
    return write_volume(Volume(voxels, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), path)


def write_dicom_series(image_path: Path, directory: Path, uid: str) -> Path:
    """The 3-D image at image_path as a DICOM series in `directory` (int16 MR slices named IM0000...,
    without a suffix, as scanners export them), its geometry in each slice's position and orientation."""
    import SimpleITK as sitk

    from prostate_kernels.data.dicom import kept_locale

    image = sitk.Cast(sitk.ReadImage(str(image_path)), sitk.sitkInt16)
    d = image.GetDirection()
    orientation = "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))
    directory.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in (("0020|000e", uid), ("0008|0060", "MR"), ("0020|0037", orientation),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0013", str(k))):  # fmt: skip
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(directory / f"IM{k:04d}"))
        with kept_locale():  # GDCM's writer sets the process's locale to "C"
            writer.Execute(slice_)
    return directory


def _dicom_slices(work: Path) -> dict[str, bytes]:
    """The files of a 4-slice int16 MR series of the 4x5x6 volume, by name."""
    series = write_dicom_series(_volume(work / "good.nii"), work / "good-series", "1.2.3.4")
    return {f.name: f.read_bytes() for f in sorted(series.iterdir())}


def _flip_bytes(good: bytes, rng: random.Random, positions: Callable[[], int], most: int) -> bytes:
    damaged = bytearray(good)
    for _ in range(rng.randint(1, most)):
        damaged[positions()] = rng.randrange(256)
    return bytes(damaged)


def _set_fields(lines: list[str], rng: random.Random, separator: str) -> list[str]:
    """1 or 2 "key<separator>value" lines given a hostile value (a key not there yet is added)."""
    keys = [line.split(separator)[0].strip() for line in lines if separator in line]
    lines = list(lines)
    for _ in range(rng.randint(1, 2)):
        key = rng.choice(keys)
        new = f"{key}{separator} {rng.choice(HOSTILE_VALUES)}"
        at = [i for i, line in enumerate(lines) if line.split(separator)[0].strip() == key]
        lines[at[0]] = new
    return lines


def variants(kind: str, work: Path, rng: random.Random):
    """(name, content) of damaged files of `kind`, endlessly: a file's bytes, or a directory's files by
    name (a DICOM series)."""
    if kind == "nifti":
        good = _volume(work / "good.nii").read_bytes()
        while True:
            yield "v.nii", _flip_bytes(good, rng, lambda: rng.randrange(352), 4)
    if kind in ("metaimage", "nrrd"):
        header = _volume(work / ("good.mhd" if kind == "metaimage" else "good.nrrd")).read_bytes()
        if kind == "metaimage":  # the voxels stay in good.raw, named by ElementDataFile
            lines = header.decode().splitlines()
            while True:
                yield "v.mhd", ("\n".join(_set_fields(lines, rng, "=")) + "\n").encode()
        head, _, voxels = header.partition(b"\n\n")
        lines = head.decode().splitlines()
        while True:
            yield "v.nrrd", ("\n".join(_set_fields(lines, rng, ":"))).encode() + b"\n\n" + voxels
    if kind == "checkpoint":
        good = _checkpoint(work).read_bytes()

        def position() -> int:  # the zip structures are at the two ends
            region = rng.random()
            if region < 0.4:
                return rng.randrange(min(4096, len(good)))
            if region < 0.8:
                return len(good) - 1 - rng.randrange(min(4096, len(good)))
            return rng.randrange(len(good))

        while True:
            yield "v.pt", _flip_bytes(good, rng, position, 6)
    if kind == "dicom":
        slices = _dicom_slices(work)
        while True:
            name = rng.choice(sorted(slices))
            good = slices[name]
            if rng.random() < 0.15:  # cut short (a copy that was interrupted)
                damaged = good[: rng.randrange(len(good))]
            else:  # mostly the tags
                span = min(2048, len(good)) if rng.random() < 0.8 else len(good)
                damaged = _flip_bytes(good, rng, functools.partial(rng.randrange, span), 6)
            yield "v-series", {**slices, name: damaged}
    raise ValueError(f"unknown kind {kind!r}")


def _checkpoint(work: Path) -> Path:
    """A checkpoint of tiramisu3d_tiny after one training iteration on two phantoms."""
    from prostate_kernels.data.phantoms import make_phantom
    from prostate_kernels.train import TrainConfig, train

    cases = [make_phantom(i, (16, 32, 32)) for i in range(2)]
    arrays = [(f"Case{i:02d}", c.image.array.astype(np.float32), c.mask.array.astype(np.uint8))
              for i, c in enumerate(cases)]  # fmt: skip
    config = TrainConfig(data=work, out=work / "run", model="tiramisu3d_tiny", patch=(16, 32, 32), batch=2,
                         iters=1, val_cases=0, progress=False)  # fmt: skip
    return train(config, log=lambda *_: None, arrays=arrays)


def read(kind: str, path: Path) -> bool:
    """Reads `path` as predict would; whether it read as the undamaged file does (always, for a
    checkpoint: its weights are not compared)."""
    if kind == "checkpoint":
        import torch

        from prostate_kernels.trained_model import load_trained_model

        load_trained_model(path, torch.device("cpu"))
        return True
    from prostate_kernels.data import read_volume

    got, good = read_volume(path), read_volume(path.parent / GOOD[kind])
    return (
        got.array.dtype == good.array.dtype
        and np.array_equal(got.array, good.array)
        and all(np.allclose(a, b) for a, b in ((got.spacing, good.spacing), (got.origin, good.origin),
                                                (got.direction, good.direction)))
    )  # fmt: skip


def outcome_of_a_read(kind: str, path: Path) -> str:
    """Reads `path` in a forked child: its output silenced, its memory capped at 4 GiB, one torch thread
    (an OpenMP pool the parent started does not survive a fork), killed by SIGALRM after 60 s (a hang)."""
    import resource
    import signal

    import torch

    from prostate_kernels.data import DataError

    pid = os.fork()
    if pid == 0:  # the child: exits with OUTCOMES' code
        faulthandler.disable()  # pytest's would print the crash's Python stack to the run's own stderr
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        torch.set_num_threads(1)
        signal.alarm(60)
        code = 0
        try:
            code = 0 if read(kind, path) else 6
        except DataError:
            code = 3
        except MemoryError:
            code = 5
        except BaseException:  # noqa: BLE001 - any other exception is what this tool looks for
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)} (bug)"
    return OUTCOMES.get(os.WEXITSTATUS(status), f"exit status {os.WEXITSTATUS(status)} (bug)")


def _written(path: Path, content: bytes | dict[str, bytes]) -> Path:
    """`path` holding `content`: the bytes of a file, or a new directory of these files."""
    if isinstance(content, bytes):
        path.write_bytes(content)
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    for name, data in content.items():
        (path / name).write_bytes(data)
    return path


def fuzz(
    kind: str, n: int, seed: int, keep: Path | None, keep_another: Path | None = None
) -> collections.Counter:
    """The outcome counts of n damaged variants of `kind` (random.Random(seed)); bugs copied into keep,
    variants read as another image than the undamaged file's into keep_another."""
    rng = random.Random(seed)
    counts: collections.Counter = collections.Counter()
    with contextlib.suppress(ImportError):  # imported once here, not in every child
        import nibabel  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        made = variants(kind, work, rng)
        for i in range(n):
            name, content = next(made)
            path = _written(work / name, content)
            outcome = outcome_of_a_read(kind, path)
            counts[outcome] += 1
            into = keep if outcome.endswith("(bug)") else keep_another if outcome == OUTCOMES[6] else None
            if into is not None:
                into.mkdir(parents=True, exist_ok=True)
                copy = shutil.copytree if path.is_dir() else shutil.copy
                copy(path, into / f"{kind}-{seed}-{i}-{name}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kind", choices=("nifti", "metaimage", "nrrd", "checkpoint", "dicom"), required=True
    )
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="directory for the variants that found a bug")
    parser.add_argument("--keep-another", type=Path, help="directory for the variants read as another image")
    args = parser.parse_args(argv)
    counts = fuzz(args.kind, args.n, args.seed, args.keep, args.keep_another)
    print(
        f"{args.kind}, {args.n} variants, seed {args.seed}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    return 1 if any(outcome.endswith("(bug)") for outcome in counts) else 0


if __name__ == "__main__":
    sys.exit(main())
