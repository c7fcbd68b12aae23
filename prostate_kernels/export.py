"""A trained checkpoint's network as a torch.export program (.pt2) that runs without prostate_kernels.

    prostate-kernels export --checkpoint runs/p3a/best.pt --out p3a.pt2

The network is traced in eval mode under the plain PyTorch backend (use_backend("torch"): the same math
as the fused kernels, in PyTorch's own operators), its dense blocks as torch.cat blocks (the shared-buffer
block is this library's operator even then), so `torch.export.load(path).module()` runs it where PyTorch
runs, with no Triton, no C++ extension and no prostate_kernels installed; a program that would still call
one of the library's operators is refused. Its input is a batch
of windows of the checkpoint's patch (N, C, *patch) float32, N free from 1 to MAX_BATCH; its output the
logits (N, 1, *patch) (foreground probability: their sigmoid). A 2-D network's windows are slice stacks
(N, C * k, h, w), channel-major as PatchSampler stacks them.

What a caller needs to make those windows is stored in the file itself, as the extra file METADATA_FILE
(JSON): the image channels, the spacing the network was trained at, the z-score (each channel over its
whole volume), the patch and slices. Before writing, the program is run on a batch of two windows and
on one, and must give the network's logits (checked, and the difference reported).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from prostate_kernels.backend import use_backend
from prostate_kernels.data.errors import DataError
from prostate_kernels.data.io import as_channels
from prostate_kernels.nn import DenseBlock3d
from prostate_kernels.safe_files import atomic_write, refuse_existing

METADATA_FILE = "prostate_kernels.json"  # the extra file of the .pt2 that says how to feed the program
MAX_BATCH = 1024  # the largest batch of windows the program takes (its batch dimension is symbolic)
EXAMPLE_BATCH = 2  # torch.export specialises a dimension of size 1: the example batch must be larger
TOLERANCE = 1e-4  # largest difference from the network's logits, relative to their largest magnitude


@dataclass
class Exported:
    path: Path
    metadata: dict
    max_difference: float  # largest |program - network| over the checked logits


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Exported:
    """Writes the checkpoint's network to `out` as a torch.export program with its METADATA_FILE.

    DataError: `out` exists (never replaced), the checkpoint cannot be loaded, torch.export cannot trace
    the network, the program calls one of this library's operators, or its logits differ from the
    network's by more than TOLERANCE (nothing is written then)."""
    from prostate_kernels import __version__
    from prostate_kernels.pipeline import load_trained_model, window_shape

    checkpoint, out = Path(checkpoint), Path(out)
    refuse_existing([out], "export never replaces a file: choose another --out")
    if out.parent.exists() and not out.parent.is_dir():
        raise DataError(out.parent, "is a file, not a directory to write --out into")
    model, state = load_trained_model(checkpoint, torch.device("cpu"))
    for module in model.modules():
        if isinstance(module, DenseBlock3d):
            module.memory_efficient = False  # the torch.cat block, the same state_dict and math
    window = window_shape(state)[1:]
    x = torch.randn((EXAMPLE_BATCH, *window), generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with use_backend("torch"), torch.no_grad():
        expected = model(x)
        try:
            with warnings.catch_warnings():
                # DeepLabv3+'s blocks keep their output as an attribute for the decoder (`skip`), read in
                # the same forward: torch.export warns that it is not a buffer; the check below runs it
                warnings.filterwarnings(
                    "ignore", message="The tensor attributes .* were assigned during export"
                )
                program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        except Exception as exc:  # torch.export raises many kinds (UserError, Unsupported, ...)
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            raise DataError(checkpoint, f"torch.export cannot trace its network ({type(exc).__name__}: "
                                        f"{reason})") from None  # fmt: skip
        ours = _library_operators(program)
        if ours:
            raise DataError(checkpoint, f"its exported program would call this library's operators "
                                        f"({', '.join(ours)}): not written")  # fmt: skip
        traced = program.module()
        difference = max(
            (traced(x) - expected).abs().max().item(), (traced(x[:1]) - expected[:1]).abs().max().item()
        )
    scale = max(expected.abs().max().item(), 1.0)
    if not difference <= TOLERANCE * scale:  # NaN included
        raise DataError(checkpoint, f"the exported program's logits differ from the network's by up to "
                                    f"{difference:.3g} (largest logit {scale:.3g}): not written")  # fmt: skip
    metadata = _metadata(state, checkpoint, window, __version__)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:  # a killed export leaves no half-written program
        torch.export.save(program, f, extra_files={METADATA_FILE: json.dumps(metadata, indent=1)})
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


def _metadata(state: dict, checkpoint: Path, window: tuple[int, ...], version: str) -> dict:
    """What a caller needs to make the program's input windows and read its output (METADATA_FILE)."""
    channels = as_channels(state.get("channel"))
    spacing = state.get("spacing")
    return {
        "model": state["model"],
        "input_shape": ["N", *window],  # N from 1 to max_batch
        "max_batch": MAX_BATCH,
        "input_dtype": "float32",
        "image_channels": list(channels) if channels is not None else None,  # None: single-channel images
        "normalisation": "each image channel z-scored over its whole volume: (v - mean) / std",
        "spacing_zyx_mm": list(spacing) if spacing is not None else None,  # None: the images' own
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
