"""CUDA graphs: the same training steps launched one op at a time (eager) and replayed from a graph.

On the H100 (2026-11-27, bench/results/*-run2.md) the fused dense layer was host-bound below the largest
shapes: at C_in=288 4x16x16 its kernels took 0.24 ms of a 3.4 ms step, and a Tiramisu 3D p3a training
step took 258 ms for 150 ms of kernels. A graph replays the kernels without the Python and launch work
between them, so it measures what the kernels alone would give. Every step here runs in eager and as a
graph replay (common.capture: warm-up on a side stream, then one capture), timed side by side:
  - the dense layer, forward + backward (bf16, batch 2): ours (the fused layer) and PyTorch's
    BatchNorm3d -> ReLU -> Conv3d (cuDNN), at a host-bound shape and at a full-resolution one;
  - a Tiramisu 3D p3a training step (bf16 autocast without its cast cache, BCE loss, Adam with
    capturable=True, dropout 0.2: the dense blocks draw their masks on the GPU), ours and the plain
    network (memory_efficient=False).
Both variants of a pair run the same step function, so the only difference is the graph.

    python bench/bench_graphs.py        # a CUDA GPU only (graphs are a CUDA feature)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bn_relu_conv3d import sequential, time_cases  # noqa: E402
from common import BenchResult, capture, environment, markdown_table  # noqa: E402

from prostate_kernels import use_backend  # noqa: E402
from prostate_kernels.backend import Backend  # noqa: E402
from prostate_kernels.nn import BNReLUConv3d  # noqa: E402

BATCH = 2
LAYERS = ((288, (4, 16, 16)), (48, (16, 64, 64)))  # (C_in, D x H x W): p3a's down3.0 and down1.0 layers
MODEL = ("tiramisu3d_p3a", (16, 64, 64))


def layer_step(module: torch.nn.Module, backend: Backend, x: torch.Tensor, gy: torch.Tensor):
    """Forward + backward of the layer on the static input x (gradients of x and the parameters)."""

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        with use_backend(backend):
            module(x).backward(gy)

    return step


def train_step(
    model: torch.nn.Module, backend: Backend, x: torch.Tensor, y: torch.Tensor, device: str, lr: float = 1e-4
) -> tuple:
    """(step, its Adam): one training step on the static batch (x, y), capturable as a whole
    (torch.cuda.graph's whole-network recipe: set_to_none gradients, which is no kernel, so the captured
    backward writes fresh ones; Adam capturable; bf16 autocast on CUDA without its cast cache)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, capturable=device == "cuda")
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with (
            use_backend(backend),
            torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda", cache_enabled=False),
        ):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        optimizer.step()

    return step, optimizer


def partly_graphed_step(
    model: torch.nn.Module, backend: Backend, x: torch.Tensor, y: torch.Tensor, device: str
):
    """`train --cuda-graphs`' step: the network's forward and backward replayed from the graphs that
    cuda_graph_training.capture_training_step captures (on CUDA; off it the eager step), the BCE loss
    and Adam (default, not capturable) eager around them."""
    from prostate_kernels.cuda_graph_training import capture_training_step

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    if device == "cuda":
        with use_backend(backend):
            capture_training_step(model, x, torch.bfloat16)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with use_backend(backend), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        optimizer.step()

    return step


def pair_rows(case: str, steps: dict, device: str, rounds: int, as_is: dict | None = None) -> list[dict]:
    """Rows of `case`: each step (name -> step function) eager and as a graph replay, and each step of
    `as_is` (name -> step function) only as it is (its graph_ms column empty), all timed side by side."""
    cases = {}
    for name, step in steps.items():
        cases[f"{name} eager"] = step
        cases[f"{name} graph"] = capture(step, device)
    for name, step in (as_is or {}).items():
        cases[f"{name} as is"] = step
    seconds = time_cases(cases, device, rounds)
    rows = []
    for name in steps:
        eager, graph = seconds[f"{name} eager"], seconds[f"{name} graph"]
        rows.append({"case": case, "variant": name, "eager_ms": f"{eager * 1e3:.3f}",
                     "graph_ms": f"{graph * 1e3:.3f}", "graph_speedup": f"{eager / graph:.2f}"})  # fmt: skip
    ours_graph = seconds[f"{next(iter(steps))} graph"]
    for row in rows:
        row["ours_graph_vs_this_graph"] = f"{seconds[row['variant'] + ' graph'] / ours_graph:.2f}"
    for name in as_is or {}:
        rows.append({"case": case, "variant": name, "eager_ms": f"{seconds[name + ' as is'] * 1e3:.3f}",
                     "graph_ms": "", "graph_speedup": "",
                     "ours_graph_vs_this_graph": f"{seconds[name + ' as is'] / ours_graph:.2f}"})  # fmt: skip
    return rows


def run(device: str = "cuda", layers=LAYERS, model=MODEL, rounds: int = 5) -> BenchResult:
    """On a CUDA GPU; on the CPU (the dry run of the tests) nothing is captured and the 'graph' column
    times the eager step again."""
    from bench_models import variant

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for c_in, size in layers:
        torch.manual_seed(0)
        eager = sequential(c_in).to(device=device, dtype=dtype)
        fused = BNReLUConv3d.from_sequential(eager)
        x = torch.randn((BATCH, c_in, *size), device=device, dtype=dtype)
        x = x.to(memory_format=torch.channels_last_3d).requires_grad_(True)
        gy = torch.randn((BATCH, 16, *size), device=device, dtype=dtype)
        steps = {"ours": layer_step(fused, "auto", x, gy), "PyTorch": layer_step(eager, "torch", x, gy)}
        rows += pair_rows(
            f"dense layer C_in={c_in} {'x'.join(map(str, size))} fwd+bwd", steps, device, rounds
        )
        print(markdown_table(list(rows[-1]), rows[-2:]), flush=True)
    name, patch = model
    x = torch.randn((BATCH, 1, *patch), device=device)
    y = (torch.rand((BATCH, 1, *patch), device=device) > 0.5).float()
    steps = {}
    for kind, label in (("ours", "ours"), ("eager", "plain PyTorch")):
        network, backend = variant(name, kind, device)
        steps[label], _ = train_step(network, backend, x, y, device)
    network, backend = variant(name, "ours", device)
    as_is = {"ours, train --cuda-graphs": partly_graphed_step(network, backend, x, y, device)}
    rows += pair_rows(f"{name} {'x'.join(map(str, patch))} training step", steps, device, rounds, as_is)
    print(markdown_table(list(rows[-1]), rows[-3:]), flush=True)
    step_rows = [r for r in rows if "training step" in r["case"]]
    summary = (
        f"{name} step: ours {step_rows[0]['eager_ms']} ms eager, {step_rows[0]['graph_ms']} ms graph, "
        f"{step_rows[2]['eager_ms']} ms as train --cuda-graphs runs it; "
        f"plain {step_rows[1]['eager_ms']} / {step_rows[1]['graph_ms']} ms"
    )
    notes = [
        f"batch {BATCH}, {dtype} (layers) / bf16 autocast (training step); median of do_bench on CUDA",
        "graph: common.capture (3 warm-up runs on a side stream, then one capture); graph_speedup = "
        "eager_ms / graph_ms of the same step; ours_graph_vs_this_graph = this variant's graph time over "
        "ours (above 1: ours is faster in a graph)",
        "training step: Adam(capturable=True) in both modes (the models section uses the default Adam), "
        "autocast(cache_enabled=False), dropout 0.2 (p3a's)",
        "ours, train --cuda-graphs: the network's forward and backward replayed from the graphs that "
        "train --cuda-graphs captures (torch.cuda.make_graphed_callables), loss and default Adam eager; "
        "timed as it is, beside the others",
    ]
    if device != "cuda":
        notes.append("dry run on the CPU: nothing captured, the graph column times the eager step again")
    return BenchResult("cuda_graphs", rows, notes, summary)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("bench_graphs: CUDA graphs need a CUDA GPU")
    result = run("cuda")
    print(result.write(environment(), "cuda"))
