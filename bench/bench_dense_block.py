"""Dense blocks: shared-storage (ours) vs naive torch.cat vs torch.utils.checkpoint (efficient_densenet).

Tiramisu 3D p3a's seven blocks at the paper's patch (batch 2, 16x64x64 input), plus the 12-layer block
(48 in, growth 16) of the memory target. GPU: forward+backward time (median) and peak memory
(max_memory_allocated above the block's inputs and parameters). CPU: the bytes kept for backward
(unique storages seen by saved_tensors_hooks, plus the output), which is what decides the peak.
Also writes a plot of kept memory against the number of layers (ours linear, naive quadratic).

    python bench/bench_dense_block.py [--device cuda|cpu] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import cast

import torch
import torch.utils.checkpoint as cp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, BenchResult, environment, markdown_table, saved_bytes  # noqa: E402
from floors import Work, measure_rates  # noqa: E402
from shapes import FIRST_CONV, GROWTH, PATCH, TIRAMISU_P3A_LAYERS, halved  # noqa: E402

from prostate_kernels import reference  # noqa: E402
from prostate_kernels.nn import BNReLUConv3d, DenseBlock3d  # noqa: E402

BATCH = 2
TARGET_TIME_VS_NAIVE = 1.0
TARGET_MEMORY_VS_NAIVE = 1 / 5


def p3a_blocks() -> list[tuple[str, int, int, tuple[int, int, int], bool]]:
    """(name, in_channels, layers, size, return_input) of each dense block of Tiramisu 3D p3a."""
    layers, n_pool = TIRAMISU_P3A_LAYERS, len(TIRAMISU_P3A_LAYERS) // 2
    blocks, skips, channels, size = [], [], FIRST_CONV, PATCH
    for i in range(n_pool):
        blocks.append((f"down{i + 1}", channels, layers[i], size, True))
        channels += layers[i] * GROWTH
        skips.append((channels, size))
        size = halved(size)
    blocks.append(("bottleneck", channels, layers[n_pool], size, False))
    new = layers[n_pool] * GROWTH
    for i in range(n_pool):
        skip, size = skips[n_pool - 1 - i]
        last = i == n_pool - 1
        blocks.append((f"up{i + 1}", skip + new, layers[n_pool + 1 + i], size, last))
        new = layers[n_pool + 1 + i] * GROWTH
    return blocks


class CheckpointedBlock(torch.nn.Module):
    """The efficient_densenet recipe: each layer's cat -> BN -> ReLU -> conv runs under
    torch.utils.checkpoint and is recomputed in backward (its BN running statistics update twice)."""

    def __init__(self, block: DenseBlock3d) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        features = [x]
        for module in self.block.layers:
            layer = cast(BNReLUConv3d, module)  # a plain block's layers (bn_size 0)
            step = layer.batch_norm_step()

            def bottleneck(*inputs, layer=layer, step=step):
                return reference.bn_relu_conv3d(
                    torch.cat(inputs, 1), layer.conv.weight, None, layer.norm.weight, layer.norm.bias,
                    step.running_mean, step.running_var, step.batch_stats, step.momentum, layer.norm.eps,
                    (1, 1, 1), (1, 1, 1), (1, 1, 1),
                )  # fmt: skip

            y = cp.checkpoint(bottleneck, *features, use_reentrant=False)
            features.append(torch.nn.functional.dropout(y, self.block.dropout, self.training))
        return torch.cat(features if self.block.return_input else features[1:], 1)


def variants(c_in: int, layers: int, return_input: bool, device, dtype) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    ours = DenseBlock3d(c_in, GROWTH, layers, dropout=0.2, return_input=return_input).to(device, dtype)
    naive = copy.deepcopy(ours)
    naive.memory_efficient = False
    return {"ours": ours, "naive": naive, "checkpoint": CheckpointedBlock(copy.deepcopy(naive))}


def block_work(c_in: int, layers: int, size: tuple[int, int, int], itemsize: int) -> Work:
    """FLOPs and bytes of one forward + backward of the block at the floor. Layer l (C_l = c_in + l * 16
    channels in): forward reads C_l channels and writes 16; backward reads C_l and the 16 of its output
    gradient, and adds into C_l gradient channels (read + write); the conv FLOPs are 3x the forward's."""
    voxels = BATCH * size[0] * size[1] * size[2]
    flops = nbytes = 0.0
    for layer in range(layers):
        c_l = c_in + layer * GROWTH
        flops += 3 * 2.0 * voxels * GROWTH * 27 * c_l
        nbytes += voxels * itemsize * ((c_l + GROWTH) + (c_l + GROWTH + 2 * c_l))
    return Work(flops, nbytes)


def cuda_time_and_peak(module: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    from triton.testing import do_bench

    # the output gradient is made once, outside the measured step: a loss such as y.float().square() would
    # add float32 copies of the block's output (several times its bf16 size) to every variant's peak
    with torch.no_grad():
        gy = torch.randn_like(module(x))

    def step():
        module.zero_grad(set_to_none=True)
        module(x).backward(gy)

    step()
    ms = do_bench(step, warmup=5, rep=50, return_mode="median")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def bench(device: str) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cases = [*p3a_blocks(), ("12-layer block (target)", 48, 12, PATCH, True)]
    rates = measure_rates(device) if device == "cuda" else None
    rows = []
    for name, c_in, layers, size, return_input in cases:
        x = torch.randn((BATCH, c_in, *size), device=device, dtype=dtype).to(
            memory_format=torch.channels_last_3d
        )
        x.requires_grad_(True)
        result = {}
        for variant, module in variants(c_in, layers, return_input, device, dtype).items():
            if device == "cuda":
                ms, peak = cuda_time_and_peak(module, x)
                result[variant] = {"time_ms": ms, "memory_MiB": peak}
            else:
                result[variant] = {"memory_MiB": saved_bytes(module, x) / 2**20}
        for variant, r in result.items():
            row = {
                "block": name,
                "in": c_in,
                "layers": layers,
                "size": "x".join(map(str, size)),
                "variant": variant,
            }
            if "time_ms" in r:
                row["fwd_bwd_ms"] = f"{r['time_ms']:.2f}"
                row["time_vs_naive"] = f"{r['time_ms'] / result['naive']['time_ms']:.2f}"
            work = block_work(c_in, layers, size, x.element_size())
            row.update(work.columns(rates, dtype, r.get("time_ms", float("nan")) * 1e-3, "fwd_bwd"))
            row["memory_MiB" if device == "cuda" else "kept_for_backward_MiB"] = f"{r['memory_MiB']:.1f}"
            row["memory_vs_naive"] = f"{r['memory_MiB'] / result['naive']['memory_MiB']:.3f}"
            rows.append(row)
        print(markdown_table(list(rows[-1]), rows[-3:]), flush=True)
    return rows


def memory_curve(path: Path) -> Path:
    """Kept-for-backward MiB against the number of layers (48 in, growth 16, batch 2, 8x32x32), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [1, 2, 4, 6, 8, 10, 12]
    curves: dict[str, list[float]] = {"ours": [], "naive": []}
    for layers in counts:
        mods = variants(48, layers, True, "cpu", torch.float32)
        x = torch.randn((BATCH, 48, 8, 32, 32), requires_grad=True)
        for variant in curves:
            curves[variant].append(saved_bytes(mods[variant], x) / 2**20)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for variant, values in curves.items():
        ax.plot(counts, values, marker="o", label=variant)
    ax.set_xlabel("layers in the dense block (48 in, growth 16)")
    ax.set_ylabel("MiB kept for backward (batch 2, 8x32x32)")
    ax.set_title("Dense block memory: shared buffer vs torch.cat")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(device: str) -> BenchResult:
    rows = bench(device)
    notes = [
        "ours: shared buffer, statistics once, nothing per layer saved; naive: torch.cat per layer "
        "(MONAI-style); checkpoint: torch.utils.checkpoint around cat -> BN -> ReLU -> conv (recomputed)",
        f"batch {BATCH}, growth {GROWTH}, dropout 0.2, training mode, "
        + (
            "bf16, peak = max_memory_allocated during one forward+backward above the inputs"
            if device == "cuda"
            else "float32; kept_for_backward = saved tensors' unique storages + output"
        ),  # fmt: skip
        "gflop / mb_moved: FLOPs and bytes of one forward + backward at the floor (block_work); on a GPU "
        "floor_ms = max(FLOPs / bf16 matmul rate, bytes / copy bandwidth) measured in the same run, "
        "of_floor = floor / measured time",
    ]
    if device == "cuda":
        target = [r for r in rows if r["block"].startswith("12-layer") and r["variant"] == "ours"][0]
        time_ok = float(target["time_vs_naive"]) <= TARGET_TIME_VS_NAIVE
        memory_ok = float(target["memory_vs_naive"]) <= TARGET_MEMORY_VS_NAIVE
        notes.append(
            f"targets (12-layer block): time <= {TARGET_TIME_VS_NAIVE}x naive: {target['time_vs_naive']} "
            f"({'met' if time_ok else 'MISSED'}); memory <= 1/5 naive: {target['memory_vs_naive']} "
            f"({'met' if memory_ok else 'MISSED'})"
        )
    target = [r for r in rows if r["block"].startswith("12-layer") and r["variant"] == "ours"][0]
    summary = f"12-layer block: memory {target['memory_vs_naive']}x naive"
    if "time_vs_naive" in target:
        summary += f", time {target['time_vs_naive']}x naive"
    return BenchResult("dense_block", rows, notes, summary)


def main(argv: list[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    result = run(args.device)
    md, csv_path = result.write(environment(), args.device, args.out_dir)
    plot = memory_curve(Path(args.out_dir) / "dense_block_memory_vs_layers.png")
    print(f"\nwritten: {md}\n         {csv_path}\n         {plot}")
    return result


if __name__ == "__main__":
    main()
