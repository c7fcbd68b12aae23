"""Each autotune tile of the fused dense layer's three conv kernels, pinned and timed alone, against
cuDNN's kernel for the same product: which tile is fastest at Tiramisu 3D p3a's shapes and how far from
cuDNN each kernel is (the H100 runs left the weight gradient at 1.7 ms and the forward at 1.1 ms for
C_in=416 16x64x64, where cuDNN's whole layer took 2.0 ms under torch.compile).

Per shape (batch 2, growth 16, bf16, channels-last), per kernel:
- forward: ours = conv(relu(x * s + t)) in one kernel, the halo kernel (stride 1's default) and the
  direct one; cuDNN = conv3d of the activation a, already computed (the BN and ReLU pass not counted:
  cuDNN's best case);
- input gradient: ours = the training-mode input-gradient kernel, halo (stride 1's default) and direct,
  plus its BatchNorm finalize; cuDNN = the conv's input gradient alone (aten.convolution_backward);
- weight gradient: ours = the weight-gradient kernel, halo (stride 1's default) and direct (partial sums
  over the voxel splits, and their sum); cuDNN = the conv's weight gradient of a.
Every tile x (num_warps, num_stages) of the launchers' lists is pinned (BucketedAutotuner.pin), the
spilling ones included, and each tile also at EXPLORE_WARPS_STAGES (not an autotune candidate);
`autotuned` marks the one the autotuner picks by itself.

    python3 bench/bench_tiles.py        # on a CUDA machine; prints the table
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchResult  # noqa: E402

BATCH, GROWTH = 2, 16
SHAPES = ((48, (16, 64, 64)), (416, (16, 64, 64)))  # p3a's down1.0 and up3.0 layers
# (num_warps, num_stages) timed beside the autotuners' candidates, not among them: with num_stages 1
# the tile loads are plain ld.global (cached in L1) instead of pipelined cp.async.cg (L2 only), which
# decides whether the 27 taps of a channel block re-read L1 or L2 (the PTX shows both; which is faster
# only a GPU says)
EXPLORE_WARPS_STAGES = [(4, 1)]


def _operands(c_in: int, size: tuple[int, int, int], device: str, dtype: torch.dtype):
    """x (channels-last), its BN fold (scale, shift, mean, rstd), the activation a, weight, gy."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((BATCH, c_in, *size), device=device, generator=g).to(dtype)
    x = x.to(memory_format=torch.channels_last_3d)
    mean = x.float().mean((0, 2, 3, 4))
    rstd = (x.float().var((0, 2, 3, 4), unbiased=False) + 1e-5).rsqrt()
    gamma = torch.rand(c_in, device=device, generator=g) + 0.5
    beta = torch.randn(c_in, device=device, generator=g) * 0.5
    scale, shift = gamma * rstd, beta - mean * gamma * rstd
    a = torch.relu(x.float() * scale.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1)).to(dtype)
    weight = (torch.randn((GROWTH, c_in, 3, 3, 3), device=device, generator=g) / (27 * c_in) ** 0.5).to(dtype)
    gy = torch.randn((BATCH, GROWTH, *size), device=device, generator=g).to(dtype)
    gy = gy.to(memory_format=torch.channels_last_3d)
    return x, (scale, shift, mean, rstd), a, weight, gy


def _kernels(x, fold, a, weight, gy, dtype):
    """(name, launcher autotuner, tiles, our call, cuDNN's call) per kernel."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers
    from prostate_kernels.ops.conv_geometry import ConvGeometry

    geometry = ConvGeometry((3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1))
    scale, shift, mean, rstd = fold
    conv = ([1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1)  # stride ... groups of convolution_backward

    def cudnn_grad(mask):
        return lambda: torch.ops.aten.convolution_backward(gy, a, weight, None, *conv, mask)

    def forward():
        return launchers.conv_forward(x, weight, None, scale, shift, geometry, dtype)

    def weight_grad():
        return launchers.conv_weight_grad(x, gy, scale, shift, geometry, dtype, False)

    def input_grad():
        return launchers.conv_input_grad(x, gy, weight, scale, shift, mean, rstd, geometry, dtype, True)

    def through(kind, call):  # the call through one kind of kernel, whatever set_halo_kernels() chose
        def run():
            with kind():
                return call()

        return run

    def direct(call):
        return through(launchers.direct_kernels, call)

    def halo(call):
        return through(launchers.halo_kernels, call)

    plain, halo_ws = launchers.WARPS_STAGES, launchers.HALO_WARPS_STAGES
    forward_cudnn = lambda: torch.nn.functional.conv3d(a, weight, padding=1)  # noqa: E731
    return [
        ("forward (halo)", launchers._fwd_halo, launchers.HALO_TILES, halo_ws, halo(forward), forward_cudnn),
        ("forward (direct)", launchers._fwd, launchers.FWD_TILES, plain, direct(forward), forward_cudnn),
        ("input grad (halo)", launchers._dgrad_halo, [launchers.HALO_DGRAD_TILE], halo_ws, halo(input_grad),
         cudnn_grad([True, False, False])),
        ("input grad (direct)", launchers._dgrad, launchers.DGRAD_TILES, plain, direct(input_grad),
         cudnn_grad([True, False, False])),
        ("weight grad (halo)", launchers._wgrad_halo, [launchers.HALO_WGRAD_TILE], halo_ws, halo(weight_grad),
         cudnn_grad([False, True, False])),
        ("weight grad (direct)", launchers._wgrad, launchers.WGRAD_TILES, plain, direct(weight_grad),
         cudnn_grad([False, True, False])),
    ]  # fmt: skip


def _tile_label(tile: dict, warps: int, stages: int) -> str:
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in tile.items())
    return f"{blocks} w{warps} s{stages}"


class _FirstLaunch:
    """Stands in for a kernel and records the keyword arguments of its first launch (then launches)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.kwargs: dict | None = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kwargs = kwargs if self.kwargs is None else self.kwargs
            return self.kernel[grid](*args, **kwargs)

        return launch


def _autotuned_pick(tuned, call) -> dict:
    """The launch kwargs the autotuner gives `call`'s (first) launch: a first call autotunes the bucket,
    a second one launches its winner directly, which is recorded."""
    call()
    recorder = _FirstLaunch(tuned.tuner.fn)
    tuned.tuner.fn = recorder
    try:
        call()
    finally:
        tuned.tuner.fn = recorder.kernel
    return recorder.kwargs or {}


def _timer(device: str):
    """Median milliseconds of a call: triton.testing.do_bench on CUDA; on the CPU (a dry run through the
    interpreter, whose times mean nothing) one call."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=5, rep=25, return_mode="median")
    from common import interleaved_medians

    return lambda fn: interleaved_medians({"fn": fn}, rounds=1, warmup=0)["fn"]["median"] * 1e3


def run(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, shapes=SHAPES) -> BenchResult:

    ms = _timer(device)
    rows = []
    for c_in, size in shapes:
        shape = f"C_in={c_in} {'x'.join(map(str, size))}"
        x, fold, a, weight, gy = _operands(c_in, size, device, dtype)
        for name, tuned, tiles, warps_stages, ours, cudnn in _kernels(x, fold, a, weight, gy, dtype):
            cudnn_ms = ms(cudnn)
            picked = _autotuned_pick(tuned, ours)
            explore = [ws for ws in EXPLORE_WARPS_STAGES if ws not in warps_stages]
            for tile in tiles:
                for warps, stages in warps_stages + explore:
                    with tuned.pin(**tile, num_warps=warps, num_stages=stages):
                        t = ms(ours)
                    config = {**tile, "num_warps": warps, "num_stages": stages}
                    rows.append({
                        "shape": shape, "kernel": name, "tile": _tile_label(tile, warps, stages),
                        "ms": f"{t:.3f}", "cudnn_ms": f"{cudnn_ms:.3f}", "vs_cudnn": f"{cudnn_ms / t:.2f}",
                        "autotuned": "yes" if picked and picked.items() >= config.items() else "",
                        "candidate": "yes" if (warps, stages) in warps_stages else "no: explored",
                    })  # fmt: skip
    best: dict[tuple[str, str], dict] = {}  # (shape, kernel) -> its fastest row
    for r in rows:
        key = (r["shape"], r["kernel"])
        if key not in best or float(r["ms"]) < float(best[key]["ms"]):
            best[key] = r
    summary = "; ".join(
        f"{s} {k}: best {r['tile']} {r['ms']} ms ({r['vs_cudnn']}x cuDNN)" for (s, k), r in best.items()
    )
    notes = [
        f"batch {BATCH}, growth {GROWTH}, 3x3x3, {str(dtype).removeprefix('torch.')}, channels-last; "
        "medians of triton.testing.do_bench (5 ms warm-up, 25 ms measured), each kernel alone",
        "forward vs cuDNN's conv3d of the ready activation (its BN-ReLU pass not counted); input grad: ours "
        "includes the BatchNorm finalize kernel; weight grad: ours includes the sum over voxel splits",
        "vs_cudnn = cuDNN ms / ours (above 1: ours faster); autotuned: the tile the autotuner picks itself; "
        "candidate no: a (num_warps, num_stages) timed to explore, not among the autotuner's candidates",
    ]
    return BenchResult("tiles", rows, notes, summary)


if __name__ == "__main__":
    from common import markdown_table

    result = run()
    print(markdown_table(list(result.rows[0]), result.rows))
    print(result.summary)
