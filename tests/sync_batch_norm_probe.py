"""Run by test_sync_batch_norm.py under torchrun (2 processes, Gloo, CPU): each process runs the fused
layers on its share of one batch with BatchNorm statistics synchronised over the group, and saves what
it computed (outputs, every gradient, running statistics) as OUT/rank<r>.pt. The test compares them with
one process running the whole batch in float64 (make_case builds the same inputs for both).

Usage: torchrun --nproc-per-node 2 sync_batch_norm_probe.py OUT
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported (no GPU here)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SHARES = (slice(0, 2), slice(2, 3))  # uneven: rank 0 holds 2 samples, rank 1 one
EMPTY_SHARES = (slice(0, 3), slice(3, 3))  # rank 1 holds none (its collectives still meet rank 0's)
BATCH = 3
CASES = {  # name: (what runs, engine, dtype of the processes)
    "op_torch_float64": ("op", "torch", torch.float64),
    "op_triton_float32": ("op", "triton", torch.float32),
    "layer_triton_float32": ("layer", "triton", torch.float32),
    # "_compiled": torch.compile(fullgraph=True, aot_eager), the custom ops taking the group by name (a
    # graph break fails the probe); "_inductor": the same with Inductor, torch.compile's default
    "layer_triton_float32_compiled": ("layer", "triton", torch.float32),
    "layer_triton_float32_empty": ("layer", "triton", torch.float32),  # rank 1: the twin, as torch does
    # the memory-efficient dense block (its shared buffer), plain and bottleneck (DenseNet-BC) layers
    "block_torch_float64": ("block", "torch", torch.float64),
    "block_triton_float32": ("block", "triton", torch.float32),
    "bottleneck_block_torch_float64": ("bottleneck_block", "torch", torch.float64),
    "bottleneck_block_triton_float32": ("bottleneck_block", "triton", torch.float32),
    "block_triton_float32_compiled": ("block", "triton", torch.float32),
    "bottleneck_block_triton_float32_empty": ("bottleneck_block", "triton", torch.float32),
    "bottleneck_block_torch_float64_compiled_empty": ("bottleneck_block", "torch", torch.float64),
    "bottleneck_block_torch_float64_inductor": ("bottleneck_block", "torch", torch.float64),
    "naive_block_torch_float64": ("naive_block", "torch", torch.float64),  # memory_efficient=False
    "tiramisu_torch_float64": ("model", "torch", torch.float64),  # tiny Tiramisu 3D: 12 BatchNorms
    "tiramisu_torch_float64_compiled": ("model", "torch", torch.float64),
}
# a block whose first unit keeps a plain BatchNorm3d: it warns and runs layer by layer (its output is not
# the whole batch's, since that unit normalises each process by its own batch, as the user asked)
MIXED = "mixed_block_triton_float32"


def shares(name: str) -> tuple[slice, slice]:
    """The samples of the whole batch that each rank holds in case `name`."""
    return EMPTY_SHARES if name.endswith("empty") else SHARES


def compile_backend(name: str) -> str | None:
    """The torch.compile backend case `name` runs through, or None (eager)."""
    return "aot_eager" if "_compiled" in name else "inductor" if "_inductor" in name else None


def make_case(name: str) -> tuple[torch.nn.Module | dict, torch.Tensor]:
    """(the float64 module, or the op's tensors, and the whole batch x (BATCH, C, D, H, W)), the same in
    every process for a name."""
    from prostate_kernels.models import build_model

    from prostate_kernels import nn as pk_nn

    torch.manual_seed(sum(map(ord, name)))
    kind = CASES[name][0]
    if kind == "op":
        x = torch.randn(BATCH, 4, 5, 4, 6, dtype=torch.float64) * 2 + 0.5
        tensors = {
            "weight": torch.randn(3, 4, 3, 3, 3, dtype=torch.float64) * 0.2,
            "bias": torch.randn(3, dtype=torch.float64),
            "bn_weight": torch.rand(4, dtype=torch.float64) + 0.5,
            "bn_bias": torch.randn(4, dtype=torch.float64) * 0.3,
            "running_mean": torch.randn(4, dtype=torch.float64),
            "running_var": torch.rand(4, dtype=torch.float64) + 0.5,
        }
        return tensors, x
    if kind == "layer":
        module: torch.nn.Module = pk_nn.BNReLUConv3d(3, 4, stride=(1, 2, 1))
        x = torch.randn(BATCH, 3, 5, 6, 4, dtype=torch.float64) - 0.3
    elif kind == "model":  # no dropout: its masks would differ between one process and two
        module = build_model("tiramisu3d_tiny", dropout=0.0)
        x = torch.randn(BATCH, 1, 16, 16, 16, dtype=torch.float64)
    else:
        bn_size = 2 if kind == "bottleneck_block" else 0
        module = pk_nn.DenseBlock3d(3, growth_rate=2, num_layers=3, dropout=0.0, bn_size=bn_size,
                                    memory_efficient=kind != "naive_block")  # fmt: skip
        x = torch.randn(BATCH, 3, 4, 5, 3, dtype=torch.float64) + 0.2
    for p in module.parameters():  # BatchNorm's 1 and 0 would hide a mix-up of gamma and beta
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    return module.double(), x


def run_op(tensors: dict, x: torch.Tensor, dtype: torch.dtype, group) -> tuple:
    """(y, x, parameters, buffers, warned) of the functional op on x with the case's tensors in dtype."""
    from prostate_kernels import functional

    params = {k: v.to(dtype).requires_grad_() for k, v in tensors.items() if not k.startswith("running")}
    buffers = {k: v.to(dtype) for k, v in tensors.items() if k.startswith("running")}
    x = x.to(dtype).requires_grad_(True)
    y = functional.bn_relu_conv3d(
        x, params["weight"], params["bias"], params["bn_weight"], params["bn_bias"], buffers["running_mean"],
        buffers["running_var"], training=True, momentum=0.3, eps=1e-4, process_group=group,
    )  # fmt: skip
    return y, x, params, buffers, False


def run_module(module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, backend: str | None) -> tuple:
    """(y, x, parameters, buffers, warned, shared-buffer blocks run) of the module, its BatchNorms
    converted to nn.SyncBatchNorm (backend: through torch.compile with it in one graph, fullgraph=True;
    aot_eager runs the graphs as traced, Inductor generates code around the custom ops)."""
    from prostate_kernels.nn import dense

    module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module.to(dtype))
    x = x.to(dtype).requires_grad_(True)
    run = torch.compile(module, backend=backend, fullgraph=True) if backend else module
    calls = []
    shared_buffer_block = dense.dense_block

    def counted(*args, **kwargs):  # a DenseBlock3d's memory-efficient engine (ops/dense_block.py)
        # the group's name, not the group: under torch.compile this list's appends are replayed after the
        # graph, and torch 2.11's Dynamo cannot rebuild a ProcessGroup there ("Reconstruction failure")
        group = kwargs.get("process_group")
        calls.append(None if group is None else group.group_name)
        return shared_buffer_block(*args, **kwargs)

    dense.dense_block = counted
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = run(x)
    finally:
        dense.dense_block = shared_buffer_block
    warned = any("runs layer by layer" in str(w.message) for w in caught)
    synced_blocks = sum(name == dist.group.WORLD.group_name for name in calls)
    return y, x, dict(module.named_parameters()), dict(module.named_buffers()), warned, synced_blocks


COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather", "broadcast")


@contextlib.contextmanager
def counted_collectives():
    """Counts the torch.distributed collectives called inside the block, by name, into the dict it yields
    (each wrapped in the module torch.distributed, where the library's ops look them up at call time)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def mixed_block_warns() -> bool:
    """Whether a converted block whose first unit's norm is a plain BatchNorm3d again warns (and runs)."""
    from prostate_kernels import nn as pk_nn
    from prostate_kernels import use_backend

    block = torch.nn.SyncBatchNorm.convert_sync_batchnorm(pk_nn.DenseBlock3d(3, growth_rate=2, num_layers=2))
    block.layers[0].norm = torch.nn.BatchNorm3d(3)
    with use_backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block(torch.randn(2, 3, 4, 4, 4)).sum().backward()
    return any("runs layer by layer" in str(w.message) for w in caught)


def saved_for_backward() -> dict[str, int]:
    """Bytes autograd keeps for backward of a 4-layer memory-efficient block (bench/common.saved_bytes),
    converted to nn.SyncBatchNorm and not: the synchronised walk keeps no more than the local one."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bench"))
    from common import saved_bytes

    from prostate_kernels import nn as pk_nn
    from prostate_kernels import use_backend

    torch.manual_seed(0)
    block = pk_nn.DenseBlock3d(6, growth_rate=4, num_layers=4, dropout=0.0)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(pk_nn.DenseBlock3d(6, 4, 4, dropout=0.0))
    x = torch.randn(1, 6, 4, 8, 8, requires_grad=True)
    with use_backend("torch"):
        return {"plain": saved_bytes(block, x), "synced": saved_bytes(synced, x)}


def opchecks(group) -> dict[str, str]:
    """torch.library.opcheck of the synchronised statistics' custom ops (what a compiled fused layer
    calls) on x in NCDHW and as a channel slice of a channels-last buffer: case -> "passed" or the error.
    Every process runs the same checks (each runs the ops' collectives)."""
    g = torch.Generator().manual_seed(11)
    buffer = torch.randn((2, 7, 3, 4, 5), generator=g).contiguous(memory_format=torch.channels_last_3d)
    inputs = {"ncdhw": torch.randn((2, 4, 3, 4, 5), generator=g), "channels_last_slice": buffer[:, :4]}
    results = {}
    for layout, x in inputs.items():
        vectors = [torch.randn(4, generator=g) for _ in range(3)]  # mean, g_mean, g_var
        count = torch.tensor(float(2 * x[0, 0].numel()), dtype=torch.float64)
        cases = {
            "synced_batch_stats": (x.detach().requires_grad_(True), group.group_name),
            "synced_batch_stats_backward": (x, *vectors, count, group.group_name),
        }
        for op, args in cases.items():
            try:
                torch.library.opcheck(getattr(torch.ops.prostate_kernels, op).default, args)
                results[f"{op} {layout}"] = "passed"
            except Exception as error:  # reported by the test, with the case's name
                results[f"{op} {layout}"] = f"{type(error).__name__}: {error}"[:2000]
    return results


def main() -> None:
    from prostate_kernels import use_backend

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    saved = {}
    for name, (kind, engine, dtype) in CASES.items():
        share = shares(name)[rank]
        built, x = make_case(name)
        with use_backend(engine):
            if kind == "op":
                y, x_in, params, buffers, warned = run_op(built, x[share], dtype, dist.group.WORLD)
                synced_blocks = 0
            else:
                y, x_in, params, buffers, warned, synced_blocks = run_module(
                    built, x[share], dtype, compile_backend(name)
                )
            torch.manual_seed(1)  # the same output gradient everywhere, each process its share of it
            gy = torch.randn((BATCH, *y.shape[1:]), dtype=torch.float64)[share].to(dtype)
            with counted_collectives() as backward_collectives:
                (y * gy).sum().backward()
        saved[name] = {
            "y": y.detach(),
            "grad_x": x_in.grad,
            "grads": {k: p.grad for k, p in params.items()},
            "buffers": {k: b.clone() for k, b in buffers.items()},
            "warned": warned,
            "synced_blocks": synced_blocks,
            "backward_collectives": backward_collectives,
        }
    saved[MIXED] = {"warned": mixed_block_warns()}
    saved["saved_for_backward"] = saved_for_backward()
    saved["opcheck"] = opchecks(dist.group.WORLD)
    torch.save(saved, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
