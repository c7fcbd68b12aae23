"""User-facing errors: one line naming the file (or the setting) and the problem (the CLI prints it, exit
status 2)."""

from __future__ import annotations

from pathlib import Path


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of the exception's message (its type's name when it has none), at most `limit`
    characters: what a one-line error quotes of a library's exception."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class DataError(ValueError):
    """Bad input data: missing or unreadable files, wrong dimensionality, mismatched geometry, ..."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path, self.problem = (str(path) if path is not None else None), problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class ConfigError(DataError):
    """A bad setting (a command-line option, a TrainConfig field, a device): the message names it. A
    DataError, so that the CLI reports it the same way (one line, exit status 2)."""

    def __init__(self, problem: str) -> None:
        super().__init__(None, problem)


class TrainingStopped(DataError):
    """Training stopped on a non-finite loss or non-finite weights; the message says where the last good
    checkpoint is."""

    def __init__(self, problem: str) -> None:
        super().__init__(None, problem)
