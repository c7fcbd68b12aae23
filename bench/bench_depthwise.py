"""3D depthwise atrous conv: ours (Triton) vs PyTorch conv3d(groups=C), contiguous and channels-last,
and the fused separable inference block (depthwise + BN + ReLU + pointwise + BN) vs its unfused twin.

Grid: C in {128, 256, 728}, spatial (16, 64, 64), (8, 32, 32), (4, 16, 16), dilation in {1, 2, 6, 12}
(padding = dilation), 3x3x3, batch 2. Medians of forward and forward+backward; the forward's fraction of
the memory floor (bytes read + written over the copy bandwidth measured in the same run).

    python bench/bench_depthwise.py [--device cuda|cpu] [--quick] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchResult, environment, interleaved_medians, markdown_table  # noqa: E402
from floors import DeviceRates, Work, measure_rates  # noqa: E402

from prostate_kernels import functional, use_backend  # noqa: E402
from prostate_kernels.nn import SeparableConv3d  # noqa: E402
from prostate_kernels.ops import depthwise_conv3d_triton  # noqa: E402
from prostate_kernels.ops.bn_relu_conv3d_triton import direct_kernels  # noqa: E402
from prostate_kernels.ops.conv_geometry import ConvGeometry  # noqa: E402
from prostate_kernels.ops.depthwise_conv3d import TRITON_FROM_ELEMENTS  # noqa: E402

BATCH = 2
CHANNELS = (128, 256, 728)
SIZES = ((16, 64, 64), (8, 32, 32), (4, 16, 16))
DILATIONS = (1, 2, 6, 12)
TARGET_VS_PYTORCH = 5.0  # forward + backward
TARGET_FLOOR_FRACTION = 0.7  # forward
OURS = "ours (channels-last)"
# the same op under direct_kernels(), where stride 1 takes the halo kernels by default (bf16 channels-last,
# dilation up to 2): what the halo kernels change, side by side
OURS_DIRECT = "ours, direct kernels (channels-last)"
# the op under backend "auto", where it differs from OURS (below TRITON_FROM_ELEMENTS: PyTorch's conv3d
# NCDHW, with the layout copies of the channels-last x and of the gradients)
OURS_AUTO = "ours, auto (channels-last)"


def depthwise_work(x: torch.Tensor, taps: int = 27) -> tuple[Work, Work]:
    """(forward, forward + backward) FLOPs and bytes at stride 1 (output size = input size).

    Forward: read x, write y. Backward: read gy and w for the input gradient and write gx; read x and gy
    again for the weight gradient. Weights are negligible.
    """
    flops, nbytes = 2.0 * x.numel() * taps, x.numel() * x.element_size()
    return Work(flops, 2 * nbytes), Work(3 * flops, 2 * nbytes + 3 * nbytes + 2 * nbytes)


def median_seconds(cases: dict, device: str, rounds: int) -> dict[str, float]:
    if device == "cuda":
        from triton.testing import do_bench

        return {k: do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3 for k, fn in cases.items()}
    return {k: v["median"] for k, v in interleaved_medians(cases, rounds, warmup=1).items()}


def bench_depthwise(
    c: int, size, dilation: int, device: str, dtype, rounds: int, rates: DeviceRates
) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((BATCH, c, *size), generator=g).to(device=device, dtype=dtype)
    w = (torch.randn((c, 1, 3, 3, 3), generator=g) / 5).to(device=device, dtype=dtype).requires_grad_(True)
    channels_last = x.to(memory_format=torch.channels_last_3d)
    inputs = {  # name: (backend, or None for PyTorch's conv3d itself; input; the kernels' setting)
        OURS: ("triton", channels_last, contextlib.nullcontext),
        OURS_DIRECT: ("triton", channels_last, direct_kernels),
        OURS_AUTO: ("auto", channels_last, contextlib.nullcontext),
        "conv3d groups=C contiguous": (None, x.contiguous(), contextlib.nullcontext),
        "conv3d groups=C channels-last": (None, channels_last, contextlib.nullcontext),
    }
    geometry = ConvGeometry((3, 3, 3), (1, 1, 1), (dilation,) * 3, (dilation,) * 3)
    if device != "cuda":
        del inputs[OURS], inputs[OURS_DIRECT], inputs[OURS_AUTO]
    else:
        if not depthwise_conv3d_triton._takes_halo(channels_last, geometry):
            del inputs[OURS_DIRECT]  # the default takes the direct kernels already
        if x.numel() >= TRITON_FROM_ELEMENTS:
            del inputs[OURS_AUTO]  # auto takes the kernels: OURS
    reference = F.conv3d(x.float(), w.float(), None, 1, dilation, dilation, groups=c)
    rows = []
    for name, (backend, xi, kernels) in inputs.items():
        xi = xi.detach().requires_grad_(True)

        def fwd(xi=xi, backend=backend, kernels=kernels):
            if backend is None:
                return F.conv3d(xi, w, None, 1, dilation, dilation, groups=c)
            with use_backend(backend), kernels():
                return functional.depthwise_conv3d(xi, w, None, 1, dilation, dilation)

        y = fwd()
        err = ((y.float() - reference).abs().max() / reference.abs().max()).item()
        gy = torch.randn_like(y)

        def both(fwd=fwd, gy=gy, kernels=kernels):
            y = fwd()
            with kernels():  # the backward's kernels too
                y.backward(gy)

        t = median_seconds({"fwd": fwd, "both": both}, device, rounds)
        forward, forward_backward = depthwise_work(x)
        rows.append(
            {
                "C": c,
                "size": "x".join(map(str, size)),
                "dilation": dilation,
                "provider": name,
                "fwd_ms": f"{t['fwd'] * 1e3:.3f}",
                "fwd_bwd_ms": f"{t['both'] * 1e3:.3f}",
                **forward.columns(rates, dtype, t["fwd"], "fwd"),
                **forward_backward.columns(rates, dtype, t["both"], "fwd_bwd"),
                "max_rel_err": f"{err:.1e}",
            }
        )
    base = min(float(r["fwd_bwd_ms"]) for r in rows if r["provider"].startswith("conv3d"))
    for r in rows:
        r["fwd_bwd_speedup_vs_best_pytorch"] = f"{base / float(r['fwd_bwd_ms']):.2f}"
    return rows


def bench_separable(c: int, size, dilation: int, device: str, dtype, rounds: int) -> dict:
    torch.manual_seed(0)
    module = (
        SeparableConv3d(c, c, dilation=dilation, depth_activation=True).to(device=device, dtype=dtype).eval()
    )
    x = torch.randn((BATCH, c, *size), device=device, dtype=dtype).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        cases = {"unfused twin": lambda: module.reference_inference(x)}
        if device == "cuda":
            cases["fused kernel"] = lambda: module(x)
            err = ((module(x).float() - cases["unfused twin"]().float()).abs().max()).item()
        t = median_seconds(cases, device, rounds)
    row = {"C": c, "size": "x".join(map(str, size)), "dilation": dilation}
    row.update({f"{k}_ms": f"{v * 1e3:.3f}" for k, v in t.items()})
    if device == "cuda":
        row["speedup"] = f"{t['unfused twin'] / t['fused kernel']:.2f}"
        row["max_abs_err"] = f"{err:.1e}"
    return row


def run(device: str, quick: bool = False, rounds: int = 5) -> BenchResult:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    channels: tuple[int, ...] = CHANNELS
    sizes: tuple[tuple[int, int, int], ...] = SIZES
    dilations: tuple[int, ...] = DILATIONS
    if quick:
        channels, dilations = (128, 728), (1, 12)
    if device != "cuda":  # PyTorch's CPU depthwise conv3d is slow: the smallest grid only
        channels, sizes, dilations = (128,), ((4, 16, 16),), (1, 6)
    rates = measure_rates(device)
    rows = []
    for c in channels:
        for size in sizes:
            for dilation in dilations:
                new = bench_depthwise(c, size, dilation, device, dtype, rounds, rates)
                rows += new
                print(markdown_table(list(new[0]), new), flush=True)
    separable = [bench_separable(c, SIZES[1], 6, device, dtype, rounds) for c in channels]
    notes = [
        f"batch {BATCH}, 3x3x3, padding = dilation, {dtype}; fwd_bwd = forward + backward (input and weight)",
        f"{OURS_DIRECT}: the same op under direct_kernels(), where the default takes the halo kernels",
        f"{OURS_AUTO}: the op under backend 'auto', below {TRITON_FROM_ELEMENTS:,} elements only (PyTorch's "
        "conv3d NCDHW there, with the layout copies; from there on auto is the kernels' row)",
        "conv3d groups=C: PyTorch's F.conv3d itself, in the layout named",
        "floor = max(FLOPs / matmul rate, bytes / copy bandwidth), both measured in this run on this device; "
        f"of_floor = floor / measured time; {rates.describe()}",
    ]
    if device == "cuda":
        ours = [r for r in rows if r["provider"] == OURS]
        speed = min(float(r["fwd_bwd_speedup_vs_best_pytorch"]) for r in ours)
        floor = min(float(r["of_floor_fwd"]) for r in ours)
        notes.append(
            f"targets: fwd+bwd >= {TARGET_VS_PYTORCH}x PyTorch: worst {speed:.2f}x "
            f"({'met' if speed >= TARGET_VS_PYTORCH else 'MISSED'}); fwd >= {TARGET_FLOOR_FRACTION:.0%} of "
            f"the floor: worst {floor:.2f} ({'met' if floor >= TARGET_FLOOR_FRACTION else 'MISSED'})"
        )
    else:
        notes.append("ours needs a CUDA GPU: on this machine only PyTorch's conv3d(groups=C) ran")
    notes.append("fused separable block (eval, no grad), C -> C, 8x32x32, dilation 6:\n\n"
                 + markdown_table(list(separable[0]), separable))  # fmt: skip
    if device != "cuda":
        return BenchResult("depthwise", rows, notes, "ours not measured (needs a GPU)")
    return BenchResult("depthwise", rows, notes, ours_summary([r for r in rows if r["provider"] == OURS]))


def ours_summary(ours: list[dict]) -> str:
    """The best and the worst of our rows, each named by its case: fwd+bwd against PyTorch and the
    forward's fraction of the floor (a worst alone hid that the large cases reach 3x)."""

    def case(row: dict) -> str:
        return f"C={row['C']} {row['size']} d{row['dilation']}"

    def extremes(column: str, unit: str) -> str:
        ranked = sorted(ours, key=lambda r: float(r[column]))
        return (f"best {float(ranked[-1][column]):.2f}{unit} ({case(ranked[-1])}), "
                f"worst {float(ranked[0][column]):.2f}{unit} ({case(ranked[0])})")  # fmt: skip

    return (f"fwd+bwd vs PyTorch: {extremes('fwd_bwd_speedup_vs_best_pytorch', 'x')}; "
            f"fwd floor fraction: {extremes('of_floor_fwd', '')}")  # fmt: skip


def main(argv: list[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="C in {128, 728}, dilation in {1, 12}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.device, args.quick, args.rounds)
    md, csv_path = result.write(environment(), args.device, args.out_dir)
    print(f"\nwritten: {md}\n         {csv_path}")
    return result


if __name__ == "__main__":
    main()
