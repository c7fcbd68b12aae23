"""Which settings predicted each case of an output directory, so that `predict --continue` never mixes.

`predict` records, for every case it writes, a digest of what decides its segmentation: the checkpoints'
contents (SHA-256), the window, overlap, blending mode, mirroring, largest-component filter, channels,
and whether inputs far from a network's training voxel size are resampled into its range (recorded only
where a checkpoint of the run can do so: a run of an earlier version, or with --keep-voxel-size, has the
same digest as before the setting existed).
The record is one JSON file in the output directory (RECORD_NAME), rewritten atomically after each case:

    {"format": 1, "settings": {digest: {setting: value, ...}}, "cases": {segmentation file name: digest}}

`predict --continue` skips a finished case only when its digest is this run's; a finished case that
another run's settings predicted is refused before anything is written (the directory would otherwise
hold two models' predictions under one name), and a finished case without an entry (an earlier version
of the library, or a kill between its files and the record) is predicted again. `evaluate` warns when the
record says that the predictions it scores were written with different settings (its means mix them).
Device, layout and determinism change a prediction only by rounding and are not part of the digest.
Several runs may write into one directory at once (two GPUs predicting halves of a test set): each adds
its case to the record as it is on disk then, under an exclusive lock on the directory (flock, POSIX; on
a file system that refuses locks, or on Windows, unlocked: a lost entry means --continue predicts that
case again, never that it takes it for another run's).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prostate_kernels.data.errors import DataError
from prostate_kernels.safe_files import atomic_write, locked_directory

RECORD_NAME = ".prostate-kernels-prediction.json"
FORMAT = 1
RESAMPLED_INTO_RANGE = (
    "inputs far outside the training voxel sizes resampled into them (not under --keep-voxel-size)"
)
_CHUNK = 2**22  # bytes read at a time while hashing a checkpoint


@dataclass(frozen=True)
class PredictionSettings:
    """What decides a case's segmentation, as recorded: JSON values only."""

    checkpoints: tuple[str, ...]  # SHA-256 of each checkpoint file, ensemble order
    window: str  # "patch" (each network's training patch), "whole", or "DxHxW"
    overlap: float
    mode: str
    mirroring: bool
    largest_component: bool
    channels: tuple[str, ...]  # per network: the channels read, e.g. "0,2", or "single" (a 1-channel image)
    voxel_size: str | None = None  # RESAMPLED_INTO_RANGE, or None: every input on its own grid

    def as_dict(self) -> dict:
        return {
            "checkpoints (sha256)": list(self.checkpoints),
            "window": self.window,
            "overlap": self.overlap,
            "mode": self.mode,
            "mirroring": self.mirroring,
            "largest component": self.largest_component,
            "channels": list(self.channels),
        } | ({"voxel size": self.voxel_size} if self.voxel_size is not None else {})

    @functools.cached_property
    def digest(self) -> str:
        """16 hex digits of the SHA-256 of as_dict() (computed once: compared for every case)."""
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def prediction_settings(
    checkpoints: Sequence[Path],
    window: tuple[int, int, int] | str | None,
    overlap: float,
    mode: str,
    mirroring: bool,
    largest_component: bool,
    channels: Sequence[tuple[int, ...] | None],
    into_range: bool = False,
) -> PredictionSettings:
    """The settings of one predict run (channels: what each network reads, None: a single channel;
    into_range: inputs far from a network's training voxel size are resampled into its range)."""
    if window is None:
        window_text = "patch"
    elif isinstance(window, str):
        window_text = window
    else:
        window_text = "x".join(str(int(w)) for w in window)
    return PredictionSettings(
        checkpoints=tuple(file_sha256(path) for path in checkpoints),
        window=window_text,
        overlap=float(overlap),
        mode=mode,
        mirroring=bool(mirroring),
        largest_component=bool(largest_component),
        channels=tuple("single" if c is None else ",".join(map(str, c)) for c in channels),
        voxel_size=RESAMPLED_INTO_RANGE if into_range else None,
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class PredictionRecord:
    """The record of one output directory: read when constructed (empty when there is none yet)."""

    def __init__(self, output: Path) -> None:
        self.path = Path(output) / RECORD_NAME
        self.settings: dict[str, dict] = {}
        self.cases: dict[str, str] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        problem = f"is not a prediction record of prostate_kernels {FORMAT} (move it away to predict here)"
        try:
            data = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(self.path, f"{problem}: {type(exc).__name__}") from None
        valid = (
            isinstance(data, dict)
            and data.get("format") == FORMAT
            and isinstance(data.get("settings"), dict)
            and isinstance(data.get("cases"), dict)
            and all(isinstance(v, str) and v in data["settings"] for v in data["cases"].values())
        )
        if not valid:
            raise DataError(self.path, problem)
        self.settings, self.cases = data["settings"], data["cases"]

    def digest_of(self, case: str) -> str | None:
        """The digest of the settings that predicted `case` (its segmentation file's name), or None."""
        return self.cases.get(case)

    def differences(self, case: str, other: PredictionSettings | str) -> list[str]:
        """'setting recorded -> other' for each setting in which `case`'s recorded ones differ from
        `other`: a run's settings, or the name of another recorded case."""
        recorded = self.settings[self.cases[case]]
        now = other.as_dict() if isinstance(other, PredictionSettings) else self.settings[self.cases[other]]
        keys = [*now, *(key for key in recorded if key not in now)]  # a setting only one of them records
        return [
            f"{key} {recorded.get(key, '(none)')} -> {now.get(key, '(none)')}"
            for key in keys
            if recorded.get(key) != now.get(key)
        ]

    def add(self, case: str, settings: PredictionSettings) -> None:
        """Records that `settings` predicted `case`, replacing an earlier entry: the record is read again
        and rewritten whole (atomic_write) under the directory's lock, so that the entries other runs
        added meanwhile are kept; settings no case uses any more are dropped."""
        digest = settings.digest
        with locked_directory(self.path.parent):
            if self.path.exists():
                self._read()
            self.settings[digest] = settings.as_dict()
            self.cases[case] = digest
            used = set(self.cases.values())
            self.settings = {key: value for key, value in self.settings.items() if key in used}
            with atomic_write(self.path) as f:
                json.dump({"format": FORMAT, "settings": self.settings, "cases": self.cases}, f, indent=1)


__all__ = ["RECORD_NAME", "PredictionRecord", "PredictionSettings", "file_sha256", "prediction_settings"]
