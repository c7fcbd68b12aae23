"""The progress bars of training, sliding-window inference and prediction: one tqdm setup."""

from __future__ import annotations


def progress_bar(total: int, desc: str, unit: str, initial: int = 0):
    """A tqdm bar on stderr (tqdm.auto: a widget in a notebook) of `total` steps, `initial` of them done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
