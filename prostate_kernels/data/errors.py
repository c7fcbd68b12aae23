"""User-facing data errors: one line naming the file and the problem (the CLI prints it, exit status 2)."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: missing or unreadable files, wrong dimensionality, mismatched geometry, ..."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path, self.problem = (str(path) if path is not None else None), problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)
