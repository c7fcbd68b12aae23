"""What a sliding-window predictor may return, as MONAI's `sliding_window_inference` takes it.

A predictor maps B windows (B, C, *roi) to one tensor (B, K, *S), or to a list/tuple or a dict of such
tensors (several heads: a segmentation and an auxiliary output, deep-supervision levels). Each output
may have its own channel count K and its own spatial size S: an S other than the window's roi is that
output at another resolution (zoom S / roi per axis), as in MONAI. The stitching flattens the outputs
into a tuple, stitches each on its own, and packs the results back into the predictor's form:
- a tensor -> a tensor;
- a list or tuple -> a tuple (one element -> that tensor, as MONAI's `_pack_struct`);
- a dict -> a dict with its keys sorted (MONAI sorts them too).
Every call must return the same form, the same keys and the same (K, *S) per output; only B changes.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

# What a predictor returns (and what sliding_window_inference returns in the same form).
Outputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[Hashable, torch.Tensor]


@dataclass(frozen=True)
class OutputForm:
    """The predictor's output structure: a bare tensor, a sequence of `count` tensors, or a dict."""

    kind: str  # "tensor", "sequence" or "dict"
    count: int  # number of outputs (1 for a tensor)
    keys: tuple[Hashable, ...] | None = None  # a dict's keys, sorted

    def name(self, index: int) -> str:
        """How error messages name output `index`: "predictor" alone for a bare tensor."""
        if self.kind == "tensor":
            return "predictor"
        if self.kind == "dict":
            assert self.keys is not None
            return f"predictor output {self.keys[index]!r}"
        return f"predictor output {index}"

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> Outputs:
        """tensors (in flattened order) in exactly this form (a one-element sequence stays a tuple)."""
        if self.kind == "dict":
            assert self.keys is not None
            return dict(zip(self.keys, tensors, strict=True))
        return tensors[0] if self.kind == "tensor" else tuple(tensors)

    def pack(self, tensors: Sequence[torch.Tensor]) -> Outputs:
        """The stitched outputs in the form sliding_window_inference returns (MONAI's `_pack_struct`):
        as rebuild, except that a one-element sequence gives its tensor."""
        if self.kind == "sequence" and len(tensors) == 1:
            return tensors[0]
        return self.rebuild(tensors)


@dataclass(frozen=True)
class OutputLayout:
    """What one predictor call returned, but the window count: its form and (K, *S) per output."""

    form: OutputForm
    shapes: tuple[tuple[int, ...], ...]


def flatten(prediction: object) -> tuple[OutputForm, tuple[object, ...]]:
    """(its form, its outputs in order) of what a predictor returned; TypeError/ValueError naming it."""
    if isinstance(prediction, torch.Tensor):
        return OutputForm("tensor", 1), (prediction,)
    if isinstance(prediction, Mapping):
        try:
            keys = tuple(sorted(prediction))
        except TypeError as error:
            raise TypeError(
                f"predictor returned a dict whose keys cannot be sorted ({list(prediction)}): {error}"
            ) from None
        if not keys:
            raise ValueError("predictor returned an empty dict: no output to stitch")
        return OutputForm("dict", len(keys), keys), tuple(prediction[k] for k in keys)
    if isinstance(prediction, (list, tuple)):
        if not prediction:
            raise ValueError(f"predictor returned an empty {type(prediction).__name__}: no output to stitch")
        return OutputForm("sequence", len(prediction)), tuple(prediction)
    raise TypeError(
        "predictor must return a torch.Tensor, or a list, tuple or dict of them, "
        f"got {type(prediction).__name__}"
    )


def checked_outputs(
    prediction: object,
    windows: int,
    roi: tuple[int, ...],
    expected: OutputLayout | None = None,
    context: str = "",
) -> tuple[OutputLayout, list[torch.Tensor]]:
    """(its layout, its outputs) of what a predictor returned for `windows` windows of size roi, each
    output checked to be a floating (windows, K, *S) tensor with every S >= 1.

    expected: the layout of an earlier call, which this one must repeat (ValueError naming the output
    and both shapes otherwise); context: appended to that message (which call the earlier one was)."""
    form, outputs = flatten(prediction)
    if expected is not None and form != expected.form:
        raise ValueError(
            f"predictor returned {_described(form)}; earlier windows gave "
            f"{_described(expected.form)}{context}"
        )
    checked = []
    for index, output in enumerate(outputs):
        name = form.name(index)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(output).__name__}")
        shape = tuple(output.shape)
        if output.dim() != 2 + len(roi) or shape[0] != windows or min(shape[2:], default=0) < 1:
            raise ValueError(
                f"{name} returned shape {shape} for {windows} windows; expected ({windows}, K, "
                f"{', '.join(map(str, roi))}) or, for an output at another resolution, ({windows}, K, "
                f"{', '.join('S' + str(i) for i in range(len(roi)))}) with every S >= 1"
            )
        if not output.is_floating_point():
            label = "its output" if form.kind == "tensor" else name
            raise TypeError(f"predictor must return floating-point tensors; {label} is {output.dtype}")
        if expected is not None and shape[1:] != expected.shapes[index]:
            raise ValueError(
                f"{name} returned shape {shape} for {windows} windows; earlier windows gave "
                f"{(windows, *expected.shapes[index])}{context}: every call must return the same "
                "channels and spatial size"
            )
        checked.append(output)
    return OutputLayout(form, tuple(tuple(o.shape[1:]) for o in checked)), checked


def _described(form: OutputForm) -> str:
    if form.kind == "tensor":
        return "a tensor"
    if form.kind == "dict":
        return f"a dict with keys {list(form.keys or ())}"
    return f"a sequence of {form.count} outputs"
