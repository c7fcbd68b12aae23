"""`make gpu-compile`: compile every Triton kernel of the library for H100/H200 (sm_90a) and A100 (sm_80)
on this CPU machine, and report registers, spills and shared memory per variant.

    python tools/gpu_compile.py --out bench/results   # the full sweep (every autotune config)
    python tools/gpu_compile.py --quick                # CI: each kernel x dot path (and one int64 variant),
                                                       # default config, sm_90a

What is compiled: every launch the library makes (captured by tools/compile_capture.py, on meta
tensors) while it runs Tiramisu 3D p3a (training step, dropout on), DeepLabv3+ 3D (training step and
inference) and a DenseNet-BC block (DenseNet-121's first) at 16x64x64, batch 2, channels-last and
NCDHW, the dense layer, dense block (dropout on) and separable layer on tensors past 2**31 elements (the
int64-offset launches), and sliding-window inference; once per dot path: float32 with TF32, float32
IEEE, bfloat16 and float16 autocast; each launch with every autotune config its autotuner can choose.
Triton's own compiler and its bundled ptxas do the work: no GPU.

Exit status: 1 if any variant fails to compile or holds float atomics outside ATOMIC_KERNELS (and, with
--strict, if any spills registers or needs more shared memory than its target has), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compile_capture import ARCHES, RECORDER, Variant, capturing, dot_path  # noqa: E402
from ptxas_log import parse_ptxas_log  # noqa: E402

SHARED_MEMORY_LIMIT = {90: 232_448, 80: 166_912}  # bytes per block (opt-in maximum), H100 and A100
DOT_PATHS = ("fp32-tf32", "fp32-ieee", "bf16", "fp16")
# The only kernels allowed atomics: sliding-window stitching adds overlapping windows with float atomics, in
# an order that changes from run to run (under torch.use_deterministic_algorithms the window ops run the
# PyTorch twin instead). Every other kernel computes the same bits on every run: a reduction over programs
# goes through per-program partial sums added in a fixed order.
ATOMIC_KERNELS = frozenset({"_window_accumulate_kernel"})
_ATOMIC_INSTRUCTION = re.compile(r"\b(?:atom|red)\.(?:global|shared)")
PATCH = (16, 64, 64)


@dataclass
class Result:
    variant: Variant
    ok: bool
    registers: int = 0
    spill_bytes: int = 0
    shared: int = 0
    seconds: float = 0.0
    error: str = ""
    mma: str = ""  # the dot's instructions in the PTX (mma_kind); "" for a kernel without a dot
    atomics: int = 0  # atomic instructions (atom., red.) in the PTX

    @property
    def nondeterministic(self) -> bool:
        return self.ok and self.atomics > 0 and self.variant.kernel not in ATOMIC_KERNELS

    @property
    def over_shared(self) -> bool:
        return self.ok and self.shared > SHARED_MEMORY_LIMIT[self.variant.arch]

    @property
    def verdict(self) -> str:
        if not self.ok:
            return "FAILED"
        if self.nondeterministic:
            return "ATOMICS"
        if self.spill_bytes:
            return "SPILLS"
        return "OVER SMEM" if self.over_shared else "ok"


# ------------------------------------------------------------------------------------- workloads


def _half_dtype(path: str):
    """The torch dtype of a half dot path ("bf16", "fp16"), None for the float32 ones."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(path)


@contextlib.contextmanager
def _dot_settings(path: str):
    """The process state under which the library picks a dot path: cuDNN's TF32 flag, and for the half
    paths autocast. The capture's tensors are on the meta device, which has no autocast of its own
    (torch.autocast("cpu") never reached them: until 2026-11-27 the sweep's bf16 and fp16 variants were
    the float32 ones again), so within the block backend.autocast_dtype answers the path's dtype for meta
    tensors, and torch's own convolutions cast their operands to it (_meta_autocast), as autocast would."""
    import torch

    from prostate_kernels import backend

    previous_tf32, previous_autocast = torch.backends.cudnn.allow_tf32, backend.autocast_dtype
    torch.backends.cudnn.allow_tf32 = path == "fp32-tf32"
    half = _half_dtype(path)

    def autocast_dtype(device):
        return half if device.type == "meta" else previous_autocast(device)

    try:
        with dot_path(path), contextlib.ExitStack() as stack:
            if half is not None:
                backend.autocast_dtype = autocast_dtype
                stack.enter_context(_meta_autocast(half))
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous_tf32
        backend.autocast_dtype = previous_autocast


def _meta_autocast(dtype):
    """A TorchFunctionMode that casts the floating operands of torch's convolutions and linear layers to
    dtype (autocast's rule for them): the library's ops under autocast return half tensors, which the
    networks' plain torch layers then meet."""
    import torch
    from torch.overrides import TorchFunctionMode

    cast_ops = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
                torch.conv_transpose3d, torch.nn.functional.linear, torch.matmul}  # fmt: skip

    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        return value

    class MetaAutocast(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in cast_ops:
                args = tuple(cast(a) for a in args)
                kwargs = {k: cast(v) for k, v in kwargs.items()}
            return func(*args, **kwargs)

    return MetaAutocast()


def _train_and_infer(model, x) -> None:
    """One training step's forward and backward, then an inference forward (every launch of both)."""
    import torch

    model.train()
    model(x).float().sum().backward()
    model.eval()
    with torch.no_grad():
        model(x)
    model.zero_grad(set_to_none=True)


def _direct_kernels():
    from prostate_kernels.ops.bn_relu_conv3d_triton import direct_kernels

    return direct_kernels()


# every workload runs once per forward kernel of the fused layer: stride 1's default (the halo kernel) and
# the direct one (other strides, and every stride under direct_kernels())
FORWARD_KERNELS = (contextlib.nullcontext, _direct_kernels)


def run_workloads(paths=DOT_PATHS, log=print) -> None:
    """Drives the library through every launch it makes (recorded, not run; meta tensors) per dot path.
    A half path runs each network twice: in float32 under (the library's view of) autocast, as a mixed
    precision training step does, and converted to the half dtype itself (half inputs and parameters)."""
    import torch
    from prostate_kernels.models import build_model

    from prostate_kernels import sliding_window_inference
    from prostate_kernels.nn import DenseBlock3d

    with torch.device("meta"):  # dropout on, as trained: the conv epilogue's mask and the mask kernel
        networks = {"tiramisu3d_p3a": build_model("tiramisu3d_p3a"),
                    "deeplabv3plus_3d": build_model("deeplabv3plus_3d"),
                    # DenseNet-121's first block shape (what optimize runs MONAI's DenseNets on)
                    "densenet_bc_block": torch.nn.Sequential(
                        torch.nn.Conv3d(1, 64, 3, padding=1),
                        DenseBlock3d(64, growth_rate=32, num_layers=2, dropout=0.2, bn_size=4))}  # fmt: skip
    for path in paths:
        start = time.time()
        half = _half_dtype(path)
        dtypes = [torch.float32] + ([half] if half is not None else [])
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            for model in networks.values():
                for dtype in dtypes:
                    # Module.to takes memory_format (documented); torch's stubs leave it out
                    model = model.to(dtype=dtype, memory_format=layout)  # type: ignore[call-overload]
                    x = torch.empty(2, 1, *PATCH, device="meta", dtype=dtype).to(memory_format=layout)
                    with _dot_settings(path):
                        for forward_kernel in FORWARD_KERNELS:
                            with forward_kernel():
                                _train_and_infer(model, x)
                model.float()
            with _dot_settings(path):
                run_layer_workloads(layout)
                run_int64_workloads(layout)
        log(f"  captured {path} in {time.time() - start:.1f} s ({len(RECORDER.variants)} variants so far)")
    with dot_path("fp32"):
        sliding_window_inference(torch.randn(1, 2, 20, 70, 70), (16, 64, 64), 4, lambda w: w, mode="gaussian")


def dot_path_mismatches(variants) -> list:
    """Captured variants whose dot operands are not the dot path they were captured under (a kernel
    with a dot, captured under bf16, that multiplies float32): the sweep would not compile what a GPU
    runs on that path."""
    return [v for v in variants if v.dot and v.path in DOT_PATHS and v.dot != v.path]


def run_layer_workloads(layout) -> None:
    """Depthwise layers on activations in `layout` itself. The networks' meta-tensor activations do not
    stay channels-last (a meta conv3d returns NCDHW), and on a GPU they do: this is how the depthwise halo
    kernels (channels-last x, or gy) are reached."""
    import torch

    from prostate_kernels.nn import DepthwiseConv3d, SeparableConv3d

    with torch.device("meta"):
        layers = [
            (DepthwiseConv3d(128, 3, padding=1), (2, 128, 16, 64, 64)),
            # DeepLabv3+'s middle flow: 728 channels (voxel offsets multiples of 8: ALIGN 8), dilation 2
            (DepthwiseConv3d(728, 3, padding=2, dilation=2), (2, 728, 8, 16, 16)),
            (SeparableConv3d(64, 64, 3, dilation=(1, 2, 2)), (2, 64, 8, 32, 32)),
        ]
    _train_and_infer_layers(layers, layout)


def run_int64_workloads(layout) -> None:
    """The layers on tensors past 2**31 elements (meta: nothing allocated), for the int64 launches."""
    import torch

    from prostate_kernels.nn import BNReLUConv3d, DenseBlock3d, SeparableConv3d

    with torch.device("meta"):
        layers = [
            (BNReLUConv3d(64, 16), (1, 64, 64, 1024, 512)),  # 2.1e9 elements
            (DenseBlock3d(48, 16, 2, dropout=0.2), (2, 48, 64, 512, 512)),  # buffer 2.7e9
            (SeparableConv3d(128, 128, 3, dilation=(1, 2, 2)), (1, 128, 64, 512, 512)),  # 2.1e9
        ]
    _train_and_infer_layers(layers, layout)


def _train_and_infer_layers(layers, layout) -> None:
    """Each (layer, input shape) of `layers`, its weights and input in `layout`: a training step and an
    inference forward under each forward kernel of the fused layer, as run_workloads runs the networks."""
    import torch

    for layer, shape in layers:
        layer = layer.to(memory_format=layout)
        x = torch.empty(shape, device="meta", requires_grad=True).to(memory_format=layout)
        for forward_kernel in FORWARD_KERNELS:
            with forward_kernel():
                _train_and_infer(layer, x)


# ----------------------------------------------------------------------------------- compilation


_VARIANTS: list = []  # (Variant, (fn, signature, constexprs, attrs, options)); inherited by forked workers
WARM_CACHE = [False]  # --warm-cache: compile into Triton's cache (no ptxas log, cached variants skipped)


def compile_variant(index: int) -> Result:
    """Compiles one variant with Triton for its target; ptxas's log gives registers and spills."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    variant, (fn, signature, constexprs, attrs, options) = _VARIANTS[index]
    if not WARM_CACHE[0]:
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its log
    printed = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(printed):
            source = ASTSource(fn, signature, constexprs, attrs)
            target = GPUTarget("cuda", variant.arch, 32)
            kernel = triton.compile(source, target=target, options=dict(options.__dict__))
        if WARM_CACHE[0]:  # compiled into Triton's cache, as kernel[grid](...) would; no ptxas log
            return Result(variant, ok=True, shared=int(kernel.metadata.shared),
                          seconds=time.perf_counter() - start)  # fmt: skip
        report = parse_ptxas_log(printed.getvalue())
        mma = mma_kind(kernel.asm["ptx"]) if variant.dot else ""
        atomics = count_atomics(kernel.asm["ptx"])
    except Exception as exc:  # noqa: BLE001 - every failure is reported as the variant's result
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return Result(
            variant,
            ok=False,
            seconds=time.perf_counter() - start,
            error=f"{type(exc).__name__}: {first[:200]}",
        )
    spilled = max(report.spill_stores, report.spill_loads)
    return Result(variant, ok=True, registers=report.registers, spill_bytes=spilled, mma=mma,
                  atomics=atomics, shared=int(kernel.metadata.shared),
                  seconds=time.perf_counter() - start)  # fmt: skip


def count_atomics(ptx: str) -> int:
    """Atomic read-modify-write instructions (atom.global/shared, red.global/shared) in a kernel's PTX."""
    return len(_ATOMIC_INSTRUCTION.findall(ptx))


def mma_kind(ptx: str) -> str:
    """What a kernel's tl.dot became: "wgmma" (Hopper's warpgroup tensor-core instructions), "mma.sync"
    (the Ampere ones, which an sm_90a kernel falls back to when a tile's dot is under 64 rows per
    warpgroup), "fma" (no tensor cores: float32 IEEE dots)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma"


def compile_all(variants: list, jobs: int, log=print) -> list[Result]:
    _VARIANTS[:] = variants
    results = []
    start = time.time()
    context = multiprocessing.get_context("fork")
    with context.Pool(jobs) as pool:
        for i, result in enumerate(pool.imap(compile_variant, range(len(variants)), chunksize=1)):
            results.append(result)
            if result.verdict != "ok" or (i + 1) % 25 == 0 or i + 1 == len(variants):
                note = f"  {result.verdict}: {describe(result)}" if result.verdict != "ok" else ""
                log(f"[{i + 1}/{len(variants)}] {time.time() - start:.0f} s{note}")
    return results


def describe(result: Result) -> str:
    v = result.variant
    what = f"{v.kernel} [{v.config}] {v.path} {ARCHES[v.arch]}{' int64' if v.int64 else ''}"
    if not result.ok:
        return f"{what}: {result.error}"
    atomics = f", {result.atomics} atomic instructions" if result.atomics else ""
    return (
        f"{what}: {result.registers} registers, {result.spill_bytes} B spilled, {result.shared} B shared"
        f"{atomics}"
    )


def select(variants: dict, quick: bool, arches: tuple[int, ...]) -> list:
    chosen, seen = [], set()
    for variant, payload in variants.items():
        if variant.arch not in arches:
            continue
        if quick:  # each kernel's default config per dot path, and one of its int64-offset variants
            key = (variant.kernel, "int64" if variant.int64 else variant.path)
            if not variant.default_config or key in seen:
                continue
            seen.add(key)
        chosen.append((variant, payload))
    chosen.sort(key=lambda vp: (vp[0].kernel, vp[0].arch, vp[0].path, vp[0].config, vp[0].int64))
    return chosen


# ---------------------------------------------------------------------------------------- report


COLUMNS = ("kernel", "config", "dtype", "mma", "arch", "int64", "registers", "spill_bytes",
           "shared_bytes", "shared_limit", "atomics", "compile_s", "verdict", "error")  # fmt: skip


def rows(results: list[Result]) -> list[dict]:
    return [
        {
            "kernel": r.variant.kernel,
            "config": r.variant.config,
            "dtype": r.variant.path,
            "mma": r.mma or "-",
            "arch": ARCHES[r.variant.arch],
            "int64": "yes" if r.variant.int64 else "no",
            "registers": r.registers,
            "spill_bytes": r.spill_bytes,
            "shared_bytes": r.shared,
            "shared_limit": SHARED_MEMORY_LIMIT[r.variant.arch],
            "atomics": r.atomics,
            "compile_s": f"{r.seconds:.1f}",
            "verdict": r.verdict,
            "error": r.error,
        }  # fmt: skip
        for r in results
    ]


def summary(results: list[Result]) -> str:
    kernels = sorted({r.variant.kernel for r in results})
    failed = [r for r in results if not r.ok]
    spilling = [r for r in results if r.ok and r.spill_bytes]
    over = [r for r in results if r.over_shared]
    atomic = [r for r in results if r.nondeterministic]
    counts = f"{len(failed)} failed to compile, {len(spilling)} spill registers"
    return (
        f"{len(kernels)} kernels, {len(results)} variants: {counts}, {len(over)} exceed their shared memory, "
        f"{len(atomic)} use atomics outside {sorted(ATOMIC_KERNELS)}"
    )


def _tensor_core_dots(results: list[Result]) -> str:
    """How many of a kernel's sm_90a variants with tensor-core dots (bf16, fp16, TF32) became wgmma and
    how many mma.sync; "-" for a kernel without such dots."""
    hopper = [r for r in results if r.variant.arch == 90 and r.variant.dot in ("bf16", "fp16", "fp32-tf32")]
    if not hopper:
        return "-"
    return f"{sum(r.mma == 'wgmma' for r in hopper)} / {sum(r.mma == 'mma.sync' for r in hopper)}"


def write_report(results: list[Result], out: Path, quick: bool, seconds: float) -> Path:
    import torch
    import triton

    out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    stem = out / f"{date}-compile-report{'-quick' if quick else ''}"
    table = rows(results)
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    repo = Path(__file__).resolve().parents[1]
    git = ["git", "rev-parse", "--short", "HEAD"]
    sha = subprocess.run(git, capture_output=True, text=True, cwd=repo).stdout.strip()
    lines = [
        f"# Triton compile report ({'quick: default configs, sm_90a' if quick else 'full sweep'})",
        "",
        f"`python tools/gpu_compile.py{' --quick' if quick else ''}` on {platform.node()} (no GPU: Triton's "
        f"compiler and bundled ptxas), {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"torch {torch.__version__}, triton {triton.__version__}, git {sha or 'unknown'}; {seconds:.0f} s.",
        "",
        f"**Summary: {summary(results)}.**",
        "",
        "Per kernel (worst variant):",
        "",
        "| kernel | variants | max registers | max spill B | max shared B | failed | spilling | over smem "
        "| with atomics | sm_90a tensor-core dots: wgmma / mma.sync |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kernel in sorted({r.variant.kernel for r in results}):
        mine = [r for r in results if r.variant.kernel == kernel]
        ok = [r for r in mine if r.ok]
        lines.append(
            f"| {kernel} | {len(mine)} | {max((r.registers for r in ok), default=0)} | "
            f"{max((r.spill_bytes for r in ok), default=0)} | {max((r.shared for r in ok), default=0)} | "
            f"{sum(not r.ok for r in mine)} | {sum(r.ok and r.spill_bytes > 0 for r in mine)} | "
            f"{sum(r.over_shared for r in mine)} | {sum(r.atomics > 0 for r in ok)} | "
            f"{_tensor_core_dots(ok)} |"
        )
    lines += [
        "",
        "Every variant:",
        "",
        "| " + " | ".join(COLUMNS[:-1]) + " |",
        "|" + "---|" * (len(COLUMNS) - 1),
    ]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS[:-1]) + " |" for row in table]
    errors = [r for r in results if not r.ok]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {describe(r)}" for r in errors]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    return Path(f"{stem}.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="each kernel x dot path, and one int64-offset variant per kernel, at its default config, sm_90a",
    )
    parser.add_argument(
        "--strict", action="store_true", help="also fail on spills and shared memory overruns"
    )
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHES), default=None)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--out", type=Path, default=None, help="write <date>-compile-report[-quick].md/.csv here"
    )
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="on a GPU machine: compile every variant into Triton's cache, keyed as the kernels' own "
        "launches are, so that autotuning finds them compiled (bench/gpu_suite.py runs it in the background)",
    )
    args = parser.parse_args(argv)
    WARM_CACHE[0] = args.warm_cache
    arches = tuple(args.arch or ((90,) if args.quick else (90, 80)))
    start = time.time()
    print("capturing the library's launches (no kernel runs)")
    with capturing():
        run_workloads()
    mismatched = dot_path_mismatches(RECORDER.variants)
    for v in mismatched[:10]:
        print(f"DOT PATH MISMATCH: {v.kernel} [{v.config}] captured under {v.path} multiplies {v.dot}",
              file=sys.stderr)  # fmt: skip
    if mismatched:
        return 1
    variants = select(RECORDER.variants, args.quick, arches)
    print(f"{RECORDER.launches} launches -> {len(variants)} variants to compile on {args.jobs} process(es)")
    results = compile_all(variants, max(1, args.jobs))
    if args.warm_cache:
        failed = sum(not r.ok for r in results)
        print(f"{len(results)} variants compiled into Triton's cache, {failed} failed (registers not read)")
    else:
        print(summary(results))
    if args.out is not None:
        print(f"report: {write_report(results, args.out, args.quick, time.time() - start)}")
    bad = [r for r in results if not r.ok or r.nondeterministic or (args.strict and r.verdict != "ok")]
    for r in bad[:20]:
        print(f"{r.verdict}: {describe(r)}", file=sys.stderr)
    missing = sorted(library_kernels() - {v.kernel for v in RECORDER.variants})
    if missing:  # a gate that compiles only some kernels must not pass as if it had compiled them all
        print(
            f"NOT CAPTURED (no launch of these kernels was recorded): {', '.join(missing)}", file=sys.stderr
        )
    return 1 if bad or missing else 0


def library_kernels() -> set[str]:
    """The names of every @triton.jit kernel in prostate_kernels/ops (helpers called from kernels, such as
    triton_index.voxel, excluded: their names end in no "_kernel")."""
    import importlib
    import pkgutil

    import triton

    import prostate_kernels.ops as ops

    names = set()
    for module in pkgutil.iter_modules(ops.__path__):
        namespace = vars(importlib.import_module(f"prostate_kernels.ops.{module.name}"))
        names |= {
            n for n, v in namespace.items() if isinstance(v, triton.JITFunction) and n.endswith("_kernel")
        }
    return names


if __name__ == "__main__":
    sys.exit(main())
