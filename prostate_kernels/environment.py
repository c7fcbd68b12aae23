"""`prostate-kernels info`: what this install is made of and what each op runs on each device.

The lines a bug report needs (as `python -m torch.utils.collect_env` or `python -m xformers.info` give):
the package and its dependencies' versions, whether the C++ extension loaded (and why not), the backend
setting, and per device what the "auto" backend dispatches each op to. Nothing is compiled or run here
(`info --check` does that: self_check.py); CUDA is queried only through torch.cuda.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

import torch

from prostate_kernels import _ext, backend
from prostate_kernels.cpu_bf16 import bf16_training_verdict
from prostate_kernels.devices import available_cores, memory_bytes, native_bf16
from prostate_kernels.ops.depthwise_conv3d import TRITON_FROM_ELEMENTS

# distributions reported (the import name differs from some of them; metadata needs no import)
DEPENDENCIES = ("torch", "triton", "numpy", "SimpleITK", "nibabel", "tqdm", "matplotlib", "monai")
_NAMES = {"triton": "Triton kernels", "torch": "PyTorch twin", "cpp": "C++ extension"}


def devices_here() -> list[torch.device]:
    """The CPU and every CUDA device torch sees."""
    cuda = (
        [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return [torch.device("cpu"), *cuda]


def report_lines(devices: list[torch.device]) -> list[str]:
    """The report, a line each: package, Python, dependencies, extension, backend, then the devices."""
    from prostate_kernels import __version__

    lines = [
        f"prostate_kernels {__version__} ({Path(__file__).resolve().parent})",
        f"python {sys.version.split()[0]} ({sys.executable})",
        "packages: " + ", ".join(f"{name} {_version(name)}" for name in DEPENDENCIES),
        "C++ extension prostate_kernels._C: "
        + ("loaded" if _ext.HAS_EXT else f"not loaded ({_ext.LOAD_ERROR}); stitching runs the PyTorch twin"),
        f"backend: {backend.get_backend()}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}",
        _cuda_line(),
    ]
    for device in devices:
        lines.append(f"{device}: {_device_description(device)}")
        lines += [f"  {op}: {choice}" for op, choice in _dispatch(device)]
    return lines


def _version(distribution: str) -> str:
    """The distribution's version; torch's as the imported build states it (torch.__version__: the wheels
    on PyPI record "2.11.0" in their metadata where the build says "2.11.0+cu130", and the local label
    tells a CUDA build from a CPU one)."""
    if distribution == "torch":
        return torch.__version__
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _cuda_line() -> str:
    """torch's CUDA (or ROCm) build and how many devices it sees, or why it sees none."""
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else None
    if getattr(torch.version, "hip", None):
        build = f"ROCm/HIP {torch.version.hip}"
    if build is None:
        return f"CUDA: none (torch {torch.__version__} is a CPU build)"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        return f"CUDA: torch built with {build}, but no device is available (no GPU or driver{hint})"
    return f"CUDA: torch built with {build}, {torch.cuda.device_count()} device(s)"


def _device_description(device: torch.device) -> str:
    total = memory_bytes(device)
    memory = f", {total / 2**30:.1f} GiB" if total else ""
    if device.type == "cpu":
        return f"{available_cores()} core(s) for this process{memory}, {bf16_training_verdict()}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        bf16 = "bf16 in hardware" if native_bf16(device) else "no bf16 in hardware"
        return f"{props.name}, compute capability {props.major}.{props.minor}{memory}, {bf16}"
    return device.type


def _dispatch(device: torch.device) -> list[tuple[str, str]]:
    """(op, what the current backend setting runs it on for tensors on `device`), or the refusal."""
    try:
        layers = backend.resolve(device)
        stitching = backend.resolve(device, has_cpu_extension=_ext.HAS_EXT)
    except RuntimeError as exc:  # "triton" forced on the CPU without the interpreter
        return [("every op", f"refused: {exc}")]
    depthwise = _NAMES[layers]
    if layers == "triton" and backend.get_backend() == "auto":
        depthwise += f" from {TRITON_FROM_ELEMENTS:,} input elements; PyTorch's conv3d below"
    return [
        ("BNReLUConv3d, DenseBlock3d", _NAMES[layers]),
        ("DepthwiseConv3d (and SeparableConv3d's in training)", depthwise),
        ("SeparableConv3d in eval (depthwise, BN, pointwise fused)", _NAMES[layers]),
        ("sliding-window stitching", _NAMES[stitching]),
    ]
