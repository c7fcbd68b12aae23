"""`prostate-kernels info --check`: does this install compute the right numbers on this machine?

Each of the library's layers runs, as this machine would run it, on a small odd-sized input, and is
compared with a float64 copy of itself on the CPU under the plain PyTorch backend (the reference twins):
the output, and in training mode the gradients of the input and of every parameter and the running
statistics after the step. On a CUDA device the Triton kernels are forced (backend "triton": the "auto"
choice takes PyTorch's own conv for a small depthwise input, and the point is to run the kernels), with
TF32 off so that the float32 dots are IEEE; on the CPU the "auto" choice runs (the PyTorch twins and, for
the sliding-window stitching, the C++ extension when it loaded), and also the Triton kernels when the
Triton interpreter is on (TRITON_INTERPRET=1). The first call on a GPU compiles each kernel (seconds).

Where the Triton kernels run, the layers are also checked under bf16 autocast (the CUDA training default:
other compiled kernels): there the error against float64 must be at most twice eager PyTorch's under the
same autocast (DESIGN's rule for reduced precision), or below BF16_FLOOR, since on these small shapes
a ratio of two rounding errors is noise; a wrong kernel is off by far more.

Not a test suite (tests/ is): a minute's evidence that the kernels compile and agree with the reference
here, for a new GPU, driver, Triton or torch. A check that raises is a failed row with the error's first
line, never a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from prostate_kernels import backend
from prostate_kernels._ext import HAS_EXT
from prostate_kernels.data.errors import first_line
from prostate_kernels.devices import native_bf16
from prostate_kernels.inference import sliding_window_inference
from prostate_kernels.nn import BNReLUConv3d, DenseBlock3d, DepthwiseConv3d, SeparableConv3d

TOLERANCE = 1e-4  # float32: largest |ours - float64| relative to the reference tensor's largest magnitude
BF16_FLOOR = 1e-2  # bf16 autocast: an error below this passes whatever eager's is (bf16 keeps 8 bits)


@dataclass(frozen=True)
class CheckResult:
    device: str
    implementation: str  # what the op ran: "triton", "torch" (the PyTorch twin) or "cpp"
    check: str  # e.g. "BNReLUConv3d train fwd+bwd"
    # relative difference from float64 per compared tensor (the output; training: the input's gradient,
    # each parameter's, each buffer after the step); None when it raised
    errors: tuple[float, ...] | None
    seconds: float
    failure: str = ""  # the exception's first line, when it raised
    precision: str = "float32"  # or "bf16 autocast"
    eager_errors: tuple[float, ...] | None = None  # bf16 autocast: eager PyTorch's, tensor for tensor

    @property
    def error(self) -> float | None:
        return max(self.errors) if self.errors is not None else None

    @property
    def eager_error(self) -> float | None:
        return max(self.eager_errors) if self.eager_errors is not None else None

    @property
    def passed(self) -> bool:
        if self.errors is None:
            return False
        if self.precision == "float32":
            return max(self.errors) <= TOLERANCE
        return self.eager_errors is not None and all(
            ours <= max(2 * eager, BF16_FLOOR)
            for ours, eager in zip(self.errors, self.eager_errors, strict=True)
        )


@dataclass(frozen=True)
class _Case:
    name: str
    make: Callable[[], torch.nn.Module]  # built on the CPU in float32, seeded
    input_shape: tuple[int, ...]  # (N, C, D, H, W): odd sizes, so no tile divides them
    train: bool  # True: forward + backward with batch statistics; False: eval forward
    uses_extension: bool = False  # whether the CPU's "auto" choice can be the C++ extension
    bf16: bool = True  # also checked under bf16 autocast where the Triton kernels run


class _Stitched(torch.nn.Module):
    """sliding_window_inference with a 1x1x1 conv as the network: gaussian blending of overlapping
    windows, with the volume not a whole number of windows (the gather, accumulate and normalize ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Conv3d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(x, (4, 6, 5), 3, self.net, overlap=0.5, mode="gaussian")


CASES: tuple[_Case, ...] = (
    _Case("BNReLUConv3d train fwd+bwd", lambda: BNReLUConv3d(5, 3), (2, 5, 5, 6, 7), True),
    _Case("BNReLUConv3d eval", lambda: BNReLUConv3d(5, 3), (2, 5, 5, 6, 7), False),
    _Case("DenseBlock3d (shared buffer) train fwd+bwd",
          lambda: DenseBlock3d(4, growth_rate=3, num_layers=3, dropout=0.0), (2, 4, 5, 6, 7), True),
    _Case("DenseBlock3d DenseNet-BC train fwd+bwd",
          lambda: DenseBlock3d(4, growth_rate=3, num_layers=2, dropout=0.0, bn_size=2), (2, 4, 5, 6, 7),
          True),
    _Case("DepthwiseConv3d dilation 2 fwd+bwd",
          lambda: DepthwiseConv3d(6, padding=2, dilation=2), (2, 6, 7, 9, 8), True),
    _Case("SeparableConv3d eval (fused)", lambda: SeparableConv3d(6, 4, dilation=2), (2, 6, 7, 9, 8), False),
    _Case("sliding-window stitching", _Stitched, (2, 2, 9, 13, 11), False, uses_extension=True, bf16=False),
)  # fmt: skip


def backends_to_check(device: torch.device) -> tuple[backend.Backend, ...]:
    """The backends run on `device`: the Triton kernels on CUDA; "auto" on the CPU, plus the kernels when
    the Triton interpreter is on."""
    if device.type == "cuda":
        return ("triton",)
    return ("auto", "triton") if backend.triton_interpreting() else ("auto",)


def run_checks(
    devices: list[torch.device], report: Callable[[CheckResult], None] | None = None
) -> list[CheckResult]:
    """Every case under every backend of backends_to_check, on each device (and under bf16 autocast
    where the Triton kernels run); `report` is called with each result as it comes (a first kernel
    compilation takes seconds). The CPU's random state is left as it was (no draw is made elsewhere)."""
    results = []
    with torch.random.fork_rng(devices=[]):
        for device in devices:
            for name in backends_to_check(device):
                runs: list[tuple[_Case, torch.dtype | None]] = [(case, None) for case in CASES]
                if name == "triton" and _has_bf16(device):
                    runs += [(case, torch.bfloat16) for case in CASES if case.bf16]
                for case, autocast in runs:
                    result = _run_case(case, device, name, autocast)
                    results.append(result)
                    if report is not None:
                        report(result)
    return results


def _has_bf16(device: torch.device) -> bool:
    """bf16 checks run on a GPU with bf16 in hardware, and on the CPU (the interpreter emulates it)."""
    return device.type != "cuda" or native_bf16(device)


def _run_case(
    case: _Case, device: torch.device, backend_name: backend.Backend, autocast: torch.dtype | None
) -> CheckResult:
    start = time.perf_counter()
    implementation = "?"
    precision = "float32" if autocast is None else "bf16 autocast"
    try:
        with backend.use_backend(backend_name), _ieee_float32(device):
            implementation = backend.resolve(device, has_cpu_extension=case.uses_extension and HAS_EXT)
            errors = _differences(case, device, backend_name, autocast)
            eager = _differences(case, device, "torch", autocast) if autocast is not None else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return CheckResult(str(device), implementation, case.name, errors, time.perf_counter() - start,
                           precision=precision, eager_errors=eager)  # fmt: skip
    except Exception as exc:  # a failed compilation or launch is this check's result, not a crash
        return CheckResult(str(device), implementation, case.name, None, time.perf_counter() - start,
                           f"{type(exc).__name__}: {first_line(exc)}", precision)  # fmt: skip


def _differences(
    case: _Case, device: torch.device, backend_name: backend.Backend, autocast: torch.dtype | None = None
) -> tuple[float, ...]:
    """Runs the case's module in float32 (under autocast to `autocast` when given) on `device` under
    `backend_name` and its float64 copy on the CPU under "torch"; the relative difference of the output
    (and, training, of the gradients of the input and of each parameter, and of the buffers after the
    step), in that order."""
    torch.random.default_generator.manual_seed(0)  # the CPU's only: everything random is drawn there
    module = case.make().train(case.train)
    x = torch.randn(case.input_shape)
    reference = copy.deepcopy(module).double()
    ours = module.to(device)
    x_ours = x.to(device, copy=True).requires_grad_(case.train)  # two leaves, each with its own .grad
    x_ref = x.double().requires_grad_(case.train)
    reduced = torch.autocast(device.type, autocast) if autocast is not None else contextlib.nullcontext()
    with torch.set_grad_enabled(case.train):
        with backend.use_backend(backend_name), reduced:
            y_ours = ours(x_ours)
        with backend.use_backend("torch"):
            y_ref = reference(x_ref)
    pairs = [(y_ours, y_ref)]
    if case.train:
        grad = torch.randn(y_ref.shape, dtype=torch.float64)
        with backend.use_backend(backend_name):
            y_ours.backward(grad.to(device, y_ours.dtype))
        with backend.use_backend("torch"):
            y_ref.backward(grad)
        pairs.append((x_ours.grad, x_ref.grad))
        pairs += [(a.grad, b.grad) for a, b in zip(ours.parameters(), reference.parameters(), strict=True)]
        pairs += list(zip(ours.buffers(), reference.buffers(), strict=True))
    return tuple(_relative(a, b) for a, b in pairs)


def _relative(ours: torch.Tensor | None, reference: torch.Tensor | None) -> float:
    """max |ours - reference| / max(max |reference|, 1e-12); inf when ours is missing or not finite."""
    if ours is None or reference is None:
        return float("inf") if ours is not reference else 0.0
    ours = ours.detach().to("cpu", torch.float64)
    reference = reference.detach().to(torch.float64)
    if ours.shape != reference.shape or not torch.isfinite(ours).all():
        return float("inf")
    if reference.numel() == 0:
        return 0.0
    scale = max(reference.abs().max().item(), 1e-12)
    return (ours - reference).abs().max().item() / scale


@contextmanager
def _ieee_float32(device: torch.device) -> Iterator[None]:
    """TF32 off for the check on CUDA (the kernels' float32 dots follow cuDNN's flag), restored after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
