"""Dense layer BN -> ReLU -> Conv3d(3x3x3, 16): fused Triton vs eager Sequential vs torch.compile.

Shapes: Tiramisu 3D p3a's dense layers (bench/shapes.py), batch 2, channels-last input. Per shape and
provider: median time of forward, backward (of a retained graph) and forward+backward, TFLOP/s, memory
kept after forward (output + what autograd saved), and the fraction of the floor: max(FLOPs over the
measured bf16 matmul rate, bytes over the measured copy bandwidth), measured in the same run.

    python bench/bench_bn_relu_conv3d.py                  # GPU: bf16, all 12 shapes
    python bench/bench_bn_relu_conv3d.py --device cpu     # CPU: float32, eager and compile only
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchResult, environment, interleaved_medians, markdown_table  # noqa: E402
from floors import DeviceRates, Work, measure_rates  # noqa: E402
from shapes import GROWTH, DenseLayerShape, benchmark_dense_layers  # noqa: E402

from prostate_kernels.nn import BNReLUConv3d  # noqa: E402

BATCH = 2
TARGET_VS_EAGER = 1.5  # forward+backward, full-resolution shapes, GPU bf16
TARGET_VS_COMPILE = 1.2


def sequential(c_in: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            norm=nn.BatchNorm3d(c_in),
            relu=nn.ReLU(inplace=True),
            conv=nn.Conv3d(c_in, GROWTH, 3, padding=1, bias=False),
        )
    )


def make_providers(
    shape: DenseLayerShape, device: str, dtype: torch.dtype, with_compile: bool
) -> dict[str, Callable[..., torch.Tensor]]:
    torch.manual_seed(0)
    eager = sequential(shape.c_in).to(device=device, dtype=dtype)
    modules: dict[str, Callable[..., torch.Tensor]] = {"eager": eager}
    if device == "cuda":
        modules["fused triton"] = BNReLUConv3d.from_sequential(eager)
    if with_compile:
        twin = sequential(shape.c_in).to(device=device, dtype=dtype)
        twin.load_state_dict(eager.state_dict())
        modules["torch.compile"] = torch.compile(twin, dynamic=False)
    return modules


def layer_work(shape: DenseLayerShape, itemsize: int) -> tuple[Work, Work]:
    """(forward, backward) FLOPs and bytes of the ideal fused layer.

    Forward: read x twice (batch statistics, then the conv), write y. Backward: read x, gy; write gx
    (and read it once more for the batch-statistics term); weight and bias traffic is negligible.
    """
    voxels = BATCH * shape.size[0] * shape.size[1] * shape.size[2]
    fwd_flops = 2.0 * voxels * GROWTH * 27 * shape.c_in
    x_bytes, y_bytes = voxels * shape.c_in * itemsize, voxels * GROWTH * itemsize
    return Work(fwd_flops, 2 * x_bytes + y_bytes), Work(2 * fwd_flops, 3 * x_bytes + y_bytes + x_bytes)


def time_cases(cases: dict, device: str, rounds: int) -> dict[str, float]:
    """Median seconds of each case."""
    if device == "cuda":
        from triton.testing import do_bench

        return {
            name: do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e-3 for name, fn in cases.items()
        }
    return {name: t["median"] for name, t in interleaved_medians(cases, rounds, warmup=1).items()}


def bench_shape(
    shape: DenseLayerShape,
    device: str,
    dtype: torch.dtype,
    with_compile: bool,
    rounds: int,
    rates: DeviceRates,
):
    modules = make_providers(shape, device, dtype, with_compile)
    x = torch.randn((BATCH, shape.c_in, *shape.size), device=device, dtype=dtype)
    x = x.to(memory_format=torch.channels_last_3d).requires_grad_(True)
    gy = torch.randn((BATCH, GROWTH, *shape.size), device=device, dtype=dtype)
    forward, backward = layer_work(shape, x.element_size())
    reference = modules["eager"](x)
    rows = []
    for name, module in modules.items():
        out = module(x)  # warm-up / compile, and the output check
        err = ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            kept = module(x)
            kept_mb = (torch.cuda.memory_allocated() - before) / 2**20
            del kept
        else:
            kept_mb = float("nan")
        retained = module(x)

        def backward_only(retained=retained):
            x.grad = None
            retained.backward(gy, retain_graph=True)

        def both(module=module):
            x.grad = None
            module(x).backward(gy)

        t = time_cases(
            {"fwd": lambda module=module: module(x), "bwd": backward_only, "both": both}, device, rounds
        )
        rows.append(
            {
                "shape": shape.label,
                "provider": name,
                "fwd_ms": f"{t['fwd'] * 1e3:.3f}",
                "bwd_ms": f"{t['bwd'] * 1e3:.3f}",
                "fwd_bwd_ms": f"{t['both'] * 1e3:.3f}",
                "fwd_bwd_tflops": f"{(forward + backward).flops / t['both'] / 1e12:.2f}",
                **(forward + backward).columns(rates, dtype, t["both"], "fwd_bwd"),
                **forward.columns(rates, dtype, t["fwd"], "fwd"),
                "kept_after_fwd_MB": f"{kept_mb:.1f}",
                "max_rel_err_vs_eager": f"{err:.1e}",
            }
        )
        del retained
    base = {r["provider"]: float(r["fwd_bwd_ms"]) for r in rows}
    for row in rows:
        row["speedup_vs_eager"] = f"{base['eager'] / float(row['fwd_bwd_ms']):.2f}"
        if "torch.compile" in base:
            row["speedup_vs_compile"] = f"{base['torch.compile'] / float(row['fwd_bwd_ms']):.2f}"
    return rows


def run(
    device: str,
    compile_mode: str = "all",
    all_shapes: bool = False,
    rounds: int = 5,
    dtype: torch.dtype | None = None,
    full_res_only: bool = False,
) -> BenchResult:
    """compile_mode: "all" shapes, "full-res" (the 16x64x64 ones: compile time) or "none".
    dtype: bfloat16 on CUDA, float32 on the CPU by default; float32 on CUDA follows cuDNN's TF32 flag."""
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    shapes = benchmark_dense_layers()
    if device != "cuda" and not all_shapes:
        shapes = [s for s in shapes if s.size == (4, 16, 16)][:2]
    if full_res_only:
        shapes = [s for s in shapes if s.size == (16, 64, 64)]
    name = (
        "bn_relu_conv3d" if device != "cuda" or dtype == torch.bfloat16 else f"bn_relu_conv3d_{_short(dtype)}"
    )
    rates = measure_rates(device)
    rows = []
    for shape in shapes:
        with_compile = compile_mode == "all" or (compile_mode == "full-res" and shape.size == (16, 64, 64))
        shape_rows = bench_shape(shape, device, dtype, with_compile, rounds, rates)
        rows += shape_rows
        print(markdown_table(list(shape_rows[0]), shape_rows), flush=True)
    notes = [
        f"batch {BATCH}, growth {GROWTH}, 3x3x3 conv, padding 1, training mode, channels-last input, "
        f"{_short(dtype)}",
        "bwd = backward of a retained graph; fwd_bwd = a fresh forward + backward",
        "kept_after_fwd_MB: CUDA memory still allocated after a forward (output + saved for backward)",
        "floor = max(FLOPs / matmul rate, bytes / copy bandwidth), both measured in this run on this device; "
        f"of_floor = floor / measured time; {rates.describe()}",
    ]
    if device != "cuda":
        notes.append(
            "the fused Triton provider needs a CUDA GPU: on this machine only eager and torch.compile ran"
        )
        return BenchResult(name, rows, notes, "fused Triton path not measured (needs a GPU)")
    full = [r for r in rows if r["provider"] == "fused triton" and "16x64x64" in r["shape"]]
    met_eager = all(float(r["speedup_vs_eager"]) >= TARGET_VS_EAGER for r in full)
    met_compile = all(float(r.get("speedup_vs_compile", "nan")) >= TARGET_VS_COMPILE for r in full)
    notes.append(
        f"targets on the full-resolution shapes (fwd+bwd): >= {TARGET_VS_EAGER}x eager: "
        f"{'met' if met_eager else 'MISSED'}; >= {TARGET_VS_COMPILE}x torch.compile: "
        f"{'met' if met_compile else 'MISSED'}"
    )
    speedups = ", ".join(f"{r['speedup_vs_eager']}x/{r.get('speedup_vs_compile', '-')}x" for r in full)
    return BenchResult(name, rows, notes, f"full-res fwd+bwd vs eager/compile: {speedups}")


def _short(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def main(argv: list[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", default="all", choices=("all", "full-res", "none"),
                        help="shapes that get the torch.compile provider (compiling takes time)")  # fmt: skip
    parser.add_argument("--all-shapes", action="store_true", help="on the CPU too (slow; default: 4x16x16)")
    parser.add_argument("--rounds", type=int, default=5, help="CPU: interleaved rounds per median")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.device, args.compile, args.all_shapes, args.rounds)
    md, csv_path = result.write(environment(), args.device, args.out_dir)
    print(f"\nwritten: {md}\n         {csv_path}")
    return result


if __name__ == "__main__":
    main()
