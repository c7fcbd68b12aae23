"""The progress bars of training, sliding-window inference and prediction: one tqdm setup."""

from __future__ import annotations


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True):
    """A tqdm bar on stderr (tqdm.auto: a widget in a notebook) of `total` steps, `initial` of them done;
    not enabled: one that shows nothing. A context manager: closed however its block ends."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)
