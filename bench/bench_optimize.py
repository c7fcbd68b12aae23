"""A MONAI network's training step before and after prostate_kernels.optimize.

One model, deep-copied, optimized in the copy; both take the same training step (batch 2, in 1, out 2),
side by side in one process:
  CPU:  bytes autograd keeps for backward (unique storages + output) and the step's time (float32);
  CUDA: the step's median time and its peak memory above the inputs (bf16 autocast).
Models (--model):
  densenet121  DenseNet121(spatial_dims=3) at 96^3: 4 dense blocks -> the memory-efficient DenseNet-BC
               block, 3 transitions -> fused BN-ReLU-conv. Targets (issue 16): kept for backward <= 0.3x
               MONAI's own; on a GPU time <= 1.0x, peak <= 0.5x.
  highresnet   HighResNet(spatial_dims=3) at 64^3: its 9 residual blocks' 18 BN-ReLU-(dilated) conv units
               (BatchNorm and ReLU in an ADN, the conv in a Convolution) -> the fused layer; no target.
               On the CPU the fused layer is the PyTorch twin, which keeps what eager keeps: the memory
               it saves is the CUDA kernels' (they keep x alone, not the normalised activation).

    python bench/bench_optimize.py [--device cpu|cuda] [--model densenet121|highresnet] [--size N]
                                   [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, BenchResult, environment, interleaved_medians, saved_bytes  # noqa: E402

BATCH = 2
SIZES = {"densenet121": 96, "highresnet": 64}  # the default edge of the cubic input, per model
TARGET_KEPT, TARGET_TIME, TARGET_PEAK = 0.3, 1.0, 0.5  # DenseNet121's (issue 16)
TITLES = {"densenet121": "DenseNet121 3D", "highresnet": "HighResNet 3D"}
WHAT_IS_SWAPPED = {
    "densenet121": "4 dense blocks -> memory-efficient DenseNet-BC block (bottleneck output recomputed in "
    "backward), 3 transitions -> fused BN-ReLU-conv",
    "highresnet": "18 BN-ReLU-conv units of its 9 residual blocks (dilations 1, 2, 4) -> fused BN-ReLU-conv "
    "(the CUDA kernels keep x, not the normalised activation; on the CPU the PyTorch twin keeps both)",
}


def models(device: str, model: str = "densenet121") -> dict[str, torch.nn.Module] | None:
    """{"monai": the MONAI network, "optimized": the same weights after optimize}, or None without MONAI.
    Outputs (batch, 2) logits (DenseNet121) or (batch, 2, *size) per-voxel logits (HighResNet)."""
    try:
        from monai.networks.nets import DenseNet121, HighResNet
    except ImportError:
        return None
    import prostate_kernels

    torch.manual_seed(0)
    build = {"densenet121": DenseNet121, "highresnet": HighResNet}[model]
    monai = build(spatial_dims=3, in_channels=1, out_channels=2).to(device)
    optimized, report = prostate_kernels.optimize(copy.deepcopy(monai))
    print(report, flush=True)
    return {"monai": monai, "optimized": optimized}


def _step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: bool):
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()

    return step


def _cuda_peak_mib(step) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(device: str, size: int | None = None, rounds: int = 3, model: str = "densenet121") -> BenchResult:
    name = "optimize" if model == "densenet121" else f"optimize_{model}"
    size = size or SIZES[model]
    nets = models(device, model)
    if nets is None:
        return BenchResult(name, [], ["MONAI is not installed: nothing measured"], "not run (no MONAI)")
    cuda = device == "cuda"
    x = torch.randn((BATCH, 1, size, size, size), device=device)
    if model == "densenet121":
        target = torch.tensor([0, 1], device=device)  # a label per image
    else:  # a label per voxel
        labels = torch.randint(0, 2, (BATCH, size, size, size), generator=torch.Generator().manual_seed(0))
        target = labels.to(device)
    steps = {variant: _step(net.train(), x, target, cuda) for variant, net in nets.items()}
    times = interleaved_medians(steps, rounds=rounds, warmup=2)
    rows = []
    for variant, net in nets.items():
        row = {"model": f"{TITLES[model]} ({variant})", "input": f"{BATCH}x1x{size}^3",
               "step_ms": f"{times[variant]['median'] * 1e3:.1f}"}  # fmt: skip
        if cuda:
            row["peak_MiB"] = f"{_cuda_peak_mib(steps[variant]):.0f}"
        else:
            row["kept_for_backward_MiB"] = f"{saved_bytes(net, x) / 2**20:.1f}"
        rows.append(row)
    base, ours = rows
    ours["time_vs_monai"] = f"{float(ours['step_ms']) / float(base['step_ms']):.2f}"
    memory_key = "peak_MiB" if cuda else "kept_for_backward_MiB"
    ours["memory_vs_monai"] = f"{float(ours[memory_key]) / float(base[memory_key]):.3f}"
    memory_target = TARGET_PEAK if cuda else TARGET_KEPT
    verdict = [
        f"{memory_key} {ours['memory_vs_monai']}x MONAI's (target <= {memory_target}: "
        f"{'met' if float(ours['memory_vs_monai']) <= memory_target else 'MISSED'})"
    ]
    if model != "densenet121":  # no target: the ratios as measured
        verdict = [f"{memory_key} {ours['memory_vs_monai']}x MONAI's, time {ours['time_vs_monai']}x"]
    elif cuda:
        met = float(ours["time_vs_monai"]) <= TARGET_TIME
        verdict.append(
            f"time {ours['time_vs_monai']}x (target <= {TARGET_TIME}: {'met' if met else 'MISSED'})"
        )
    notes = [
        f"the same MONAI {TITLES[model]} weights (spatial_dims=3, in_channels=1, out_channels=2); "
        f"optimized = prostate_kernels.optimize on a deep copy: {WHAT_IS_SWAPPED[model]}",
        f"training step: cross-entropy on 2 labels, batch {BATCH}, {size}^3, median of {rounds} interleaved "
        "rounds after 2 warm-up steps; "
        + (
            "bf16 autocast; peak = max_memory_allocated during one step above the inputs and weights"
            if cuda
            else "float32; kept_for_backward = saved tensors' unique storages + output"
        ),  # fmt: skip
        "; ".join(verdict),
    ]
    return BenchResult(name, rows, notes, "; ".join(verdict))


def main(argv: list[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(SIZES), default="densenet121")
    parser.add_argument("--size", type=int, default=None, help="edge of the cubic input (default per model)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    result = run(args.device, args.size, model=args.model)
    md, csv_path = result.write(environment(), args.device, args.out_dir)
    print(f"\n{result.summary}\nwritten: {md}\n         {csv_path}")
    return result


if __name__ == "__main__":
    main()
