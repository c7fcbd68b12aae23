"""A trained checkpoint's network as a torch.export program (.pt2) that runs without prostate_kernels.

    prostate-kernels export --checkpoint runs/p3a/best.pt --out p3a.pt2
    prostate-kernels export --checkpoint runs/p3a/best.pt --out p3a_any.pt2 --any-size

The network is traced in eval mode under the plain PyTorch backend (use_backend("torch"): the same math
as the fused kernels, in PyTorch's own operators), its dense blocks as torch.cat blocks (the shared-buffer
block is this library's operator even then), so `torch.export.load(path).module()` runs it where PyTorch
runs, with no Triton, no C++ extension and no prostate_kernels installed; a program that would still call
one of the library's operators is refused. Its input is a batch
of windows of the checkpoint's patch (N, C, *patch) float32, N free from 1 to MAX_BATCH; its output the
logits (N, 1, *patch) (foreground probability: their sigmoid). A 2-D network's windows are slice stacks
(N, C * k, h, w), channel-major as PatchSampler stacks them. With any_size (--any-size) each spatial
side is free too: any multiple of the network's downsampling up to MAX_SIZE voxels (a whole volume,
padded to such a multiple, in one call where memory allows).

What a caller needs to make those windows is stored in the file itself, as the extra file METADATA_FILE
(JSON): the image channels, the orientation and the spacing the network was trained at, the z-score
(each channel over its whole volume), the patch and slices. Before writing, the program is run on a batch
of two windows and on one (any_size: also at the patch and at a third size), and must give the network's
logits (checked, and the difference reported).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from prostate_kernels.backend import use_backend
from prostate_kernels.data.errors import DataError, first_line
from prostate_kernels.data.io import as_channels
from prostate_kernels.models import downsampling
from prostate_kernels.nn import DenseBlock3d
from prostate_kernels.safe_files import atomic_write, refuse_existing
from prostate_kernels.trained_spacing import RANGE_KEY

METADATA_FILE = "prostate_kernels.json"  # the extra file of the .pt2 that says how to feed the program
MAX_BATCH = 1024  # the largest batch of windows the program takes (its batch dimension is symbolic)
EXAMPLE_BATCH = 2  # torch.export specialises a dimension of size 1: the example batch must be larger
TOLERANCE = 1e-4  # largest difference from the network's logits, relative to their largest magnitude
MAX_SIZE = 1024  # any_size: the largest window side, in voxels, the program takes
MIN_MULTIPLES = 2  # any_size: the smallest window side, in multiples of the network's downsampling


@dataclass
class Exported:
    path: Path
    metadata: dict
    max_difference: float  # largest |program - network| over the checked logits


def export_checkpoint(checkpoint: str | Path, out: str | Path, any_size: bool = False) -> Exported:
    """Writes the checkpoint's network to `out` as a torch.export program with its METADATA_FILE; with
    `any_size`, a program whose window sides are free multiples of the network's downsampling.

    DataError: `out` exists (never replaced), the checkpoint cannot be loaded, torch.export cannot trace
    the network (any_size: with free sizes), the program calls one of this library's operators, or its
    logits differ from the network's by more than TOLERANCE (nothing is written then)."""
    from prostate_kernels import __version__
    from prostate_kernels.trained_model import load_trained_model, window_shape

    checkpoint, out = Path(checkpoint), Path(out)
    refuse_existing([out], "export never replaces a file: choose another --out")
    if out.parent.exists() and not out.parent.is_dir():
        raise DataError(out.parent, "is a file, not a directory to write --out into")
    model, state = load_trained_model(checkpoint, torch.device("cpu"))
    for module in model.modules():
        if isinstance(module, DenseBlock3d):
            module.memory_efficient = False  # the torch.cat block, the same state_dict and math
    window = window_shape(state)[1:]  # (C, *spatial)
    multiple = _window_multiple(model, state) if any_size else None
    dynamic, traced, others = _dynamic_shapes(window, multiple)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((EXAMPLE_BATCH, *traced), generator=generator)
    checked = [x, x[:1], *(torch.randn((1, *other), generator=generator) for other in others)]
    with use_backend("torch"), torch.no_grad():
        expected = [model(t) for t in checked]
        try:
            with warnings.catch_warnings():
                # DeepLabv3+'s blocks keep their output as an attribute for the decoder (`skip`), read in
                # the same forward: torch.export warns that it is not a buffer; the check below runs it
                warnings.filterwarnings(
                    "ignore", message="The tensor attributes .* were assigned during export"
                )
                program = torch.export.export(model, (x,), dynamic_shapes=(dynamic,))
        except Exception as exc:  # torch.export raises many kinds (UserError, Unsupported, ...)
            sizes = " with free window sizes (export it without --any-size)" if any_size else ""
            reason = f"{type(exc).__name__}: {first_line(exc, 200)}"
            raise DataError(checkpoint, f"torch.export cannot trace its network{sizes} ({reason})") from None
        ours = _library_operators(program)
        if ours:
            raise DataError(checkpoint, f"its exported program would call this library's operators "
                                        f"({', '.join(ours)}): not written")  # fmt: skip
        run = program.module()
        try:
            difference = max((run(t) - e).abs().max().item() for t, e in zip(checked, expected, strict=True))
        except Exception as exc:  # e.g. a size guard of the program refusing a window it should take
            raise DataError(checkpoint, f"its exported program fails on windows it should take "
                                        f"({type(exc).__name__}: {first_line(exc, 200)}): not written"
                            ) from None  # fmt: skip
    scale = max(max(e.abs().max().item() for e in expected), 1.0)
    if not difference <= TOLERANCE * scale:  # NaN included
        raise DataError(checkpoint, f"the exported program's logits differ from the network's by up to "
                                    f"{difference:.3g} (largest logit {scale:.3g}): not written")  # fmt: skip
    metadata = _metadata(state, checkpoint, window, multiple, __version__)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The program is packed in memory, then written: torch's pt2 writer, when a write under it failed (a
    # full disk), threw from a C++ destructor later and the process aborted (status 134, a C++ trace).
    packed = io.BytesIO()
    torch.export.save(program, packed, extra_files={METADATA_FILE: json.dumps(metadata, indent=1)})
    # a killed or failed export leaves no half-written program; a file that appeared at `out` meanwhile
    # (refuse_existing looked before the export) is left as it is. The view of `packed` is released by its
    # `with`: left to the garbage collector in a failed write's traceback cycle, CPython 3.12.1 crashed
    # collecting it (a segfault at exit after the error line; CPython gh-111049).
    with atomic_write(out, "wb", replace=False) as f, packed.getbuffer() as view:
        f.write(view)
    return Exported(out, metadata, difference)


def _library_operators(program: torch.export.ExportedProgram) -> list[str]:
    """The prostate_kernels torch.library operators that the program calls, in its graph or in the graphs
    nested in it (an autocast region is a graph of its own)."""
    found = set()
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            found |= {
                str(n.target)
                for n in graph.nodes
                if getattr(n.target, "namespace", None) == "prostate_kernels"
            }
    return sorted(found)


def _window_multiple(model: torch.nn.Module, state: dict) -> tuple[int, ...]:
    """Per spatial axis of the program's input, the network's total downsampling (every network declares
    it, as train's and predict's window checks read it): a free window side must be a multiple of it (a
    2-D network's stacks: (h, w) only)."""
    factors = downsampling(model)
    return factors[1:] if state.get("slices", 0) else factors


_AXES = {3: ("D", "H", "W"), 2: ("H", "W")}


def _dynamic_shapes(
    window: tuple[int, ...], multiple: tuple[int, ...] | None
) -> tuple[dict, tuple[int, ...], list[tuple[int, ...]]]:
    """(torch.export's dynamic shapes of the input, the (C, *spatial) window to trace at, the other
    windows to check at). The batch is always free. A free side is MIN_MULTIPLES multiples or more: at
    one multiple the network's deepest feature map has a side of 1, which torch.export treats as a
    special size (the program would refuse it at run time). Traced at the patch's sides (raised to that
    least), checked there, at one multiple more on each side, and at the patch when it is allowed."""
    dynamic = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    if multiple is None:
        return dynamic, window, []
    channels, spatial = window[0], window[1:]
    for axis, (name, m) in enumerate(zip(_AXES[len(spatial)], multiple, strict=True)):
        dynamic[2 + axis] = m * torch.export.Dim(name, min=MIN_MULTIPLES, max=MAX_SIZE // m)
    traced = (channels, *(max(s, MIN_MULTIPLES * m) for s, m in zip(spatial, multiple, strict=True)))
    other = (channels, *(t + m for t, m in zip(traced[1:], multiple, strict=True)))
    return dynamic, traced, [w for w in (window, other) if w != traced and _allowed(w[1:], multiple)]


def _allowed(spatial: tuple[int, ...], multiple: tuple[int, ...]) -> bool:
    """Whether a free-size program takes windows of these sides."""
    return all(
        s % m == 0 and MIN_MULTIPLES * m <= s <= MAX_SIZE for s, m in zip(spatial, multiple, strict=True)
    )


def _metadata(
    state: dict, checkpoint: Path, window: tuple[int, ...], multiple: tuple[int, ...] | None, version: str
) -> dict:
    """What a caller needs to make the program's input windows and read its output (METADATA_FILE)."""
    channels = as_channels(state.get("channel"))
    spacing = state.get("spacing")
    spatial = list(window[1:]) if multiple is None else list(_AXES[len(multiple)])
    return {
        "model": state["model"],
        "input_shape": ["N", window[0], *spatial],  # N from 1 to max_batch; named sides: window_multiple
        "max_batch": MAX_BATCH,
        # None: the window is the patch; else each named side is a multiple of these, from min_window
        # to max_window
        "window_multiple": list(multiple) if multiple is not None else None,
        "min_window": [MIN_MULTIPLES * m for m in multiple] if multiple is not None else None,
        "max_window": MAX_SIZE if multiple is not None else None,
        "input_dtype": "float32",
        "image_channels": list(channels) if channels is not None else None,  # None: single-channel images
        "normalisation": "each image channel z-scored over its whole volume: (v - mean) / std",
        # the images' voxel axes permuted and flipped to this SimpleITK orientation code first
        # (SimpleITK.DICOMOrient(image, code)); None: as each file stores them
        "orientation": state.get("orientation"),
        "spacing_zyx_mm": list(spacing) if spacing is not None else None,  # None: the images' own
        # the voxel sizes the network saw: [[min Z, Y, X], [max Z, Y, X]] mm (None: not recorded)
        RANGE_KEY: state.get(RANGE_KEY),
        "patch": list(state["patch"]),
        "slices": state.get("slices", 0),  # > 0: a 2-D network on stacks of this many slices per channel
        "output": "logits (N, 1, *spatial); foreground probability = sigmoid(logits)",
        "label": state.get("label"),
        "iteration": state.get("iteration"),
        "best_val_dice": state.get("best_val_dice"),
        "checkpoint": str(checkpoint),
        "prostate_kernels": version,
        "torch": torch.__version__,
    }


def read_metadata(path: str | Path) -> dict:
    """The METADATA_FILE of an exported program (torch.export.load reads the program with it)."""
    extra = {METADATA_FILE: ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[METADATA_FILE])
