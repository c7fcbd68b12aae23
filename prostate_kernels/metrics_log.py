"""metrics.csv of a training run: one row per logged iteration, appended whole or not at all, and cut
back on `--resume` to the rows of the iterations the checkpoint holds."""

from __future__ import annotations

import contextlib
import csv
import io
import os
from pathlib import Path

from prostate_kernels.data import DataError
from prostate_kernels.safe_files import atomic_write


class MetricsLog:
    """metrics.csv; on resume, rows after the checkpoint's iteration are dropped (they will be redone)."""

    COLUMNS = ("iteration", "loss", "lr", "val_dice", "seconds")

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        rows = self._rows_up_to(path, start) if start and path.exists() else []
        with atomic_write(path, "w", newline="") as f:  # a kill here keeps the earlier history whole
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    @classmethod
    def _rows_up_to(cls, path: Path, start: int) -> list[dict[str, str]]:
        """The rows of an earlier metrics.csv up to iteration `start`. DataError, and the file left as it
        is, when it is not one this class wrote (edited, damaged): rewriting it would drop what could
        not be read, and reading it ended in a ValueError or UnicodeDecodeError traceback."""
        fix = "move it away to resume (the run then starts a new one)"
        if not path.is_file():  # reading a named pipe would wait forever
            raise DataError(path, f"not a regular file: {fix}")
        try:
            with path.open(newline="", encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise DataError(path, f"not UTF-8 text (byte {exc.start}): {fix}") from None
        # a last line without its newline is an append cut short (a kill, a full disk): not an error
        cut_short_line = text.count("\n") + 1 if text and not text.endswith("\n") else None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if tuple(reader.fieldnames or ()) != cls.COLUMNS:
            raise DataError(path, f"header {reader.fieldnames} is not {list(cls.COLUMNS)}: {fix}")
        rows = []
        for row in reader:
            # DictReader files extra values under the key None and fills missing ones with None
            if None in row or None in row.values() or not row["iteration"].isdigit():
                if reader.line_num == cut_short_line:
                    break  # a row is written before its iteration's checkpoint: this one is redone
                what = f"{len(cls.COLUMNS)} values starting with an iteration number"
                raise DataError(path, f"line {reader.line_num} is not a row of {what}: {fix}")
            rows.append(row)
        return [r for r in rows if int(r["iteration"]) <= start]

    def write(self, it: int, loss: float, lr: float, val_dice: float | None, seconds: float) -> None:
        """Appends one row, whole or not at all: an append that fails (a full disk) is cut back to the rows
        before it and raised as an OSError naming the file (a part of a row would stop --resume)."""
        row = io.StringIO(newline="")
        val = "" if val_dice is None else f"{val_dice:.4f}"
        csv.writer(row).writerow([it, f"{loss:.6f}", f"{lr:.3e}", val, f"{seconds:.1f}"])
        size = self.path.stat().st_size
        try:
            with self.path.open("a", newline="") as f:
                f.write(row.getvalue())
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None


__all__ = ["MetricsLog"]
