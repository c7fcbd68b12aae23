"""Host cost of the fused dense layer (BNReLUConv3d), a dense block or the depthwise conv per forward +
backward, on the CPU: what our Python, the torch ops around the kernels, autograd and Triton's own launch
path cost.

The H100 profiles (issue 12) showed the layer host-bound below the largest shapes (run2, 4x16x16: kernels
0.24 ms of a 2.7 ms step). This is the CPU proxy for that host side: tensors are tiny, so the torch ops'
own arithmetic is negligible next to their dispatch. Triton runs behind a fake CUDA driver: each launch
goes through Triton's real launch path (our autotuner wrapper, the binder that specialises every
argument, the compiled-kernel cache keyed as on an sm_90 GPU, the grid) and stops where the CUDA driver
would be called; the kernels are compiled for sm_90 on the first step (ptxas, no GPU), never run.
`--stub-launches` replaces each launch by a counted no-op instead (our side only).

Prints microseconds per step (best of rounds), the torch ops called from Python and the Triton launches per
step, and how many of those ops would launch a GPU kernel (not views, metadata or allocations). Not a
GPU number: on a GPU those ops also launch their CUDA kernels, and Triton's launcher packs the arguments
for the driver.

    env -u TRITON_INTERPRET python bench/host_cost.py [--layers 0 | --depthwise | --model NAME [--plain]]
        [--c-in 32] [--autocast]

--autocast runs each step under bfloat16 autocast (on the CPU device), as `train` runs on a GPU: the
kernels compute in bfloat16 from the float32 parameters, so the casts are part of what is counted.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the package is imported after the fake driver is in place (below)
    from prostate_kernels.backend import Backend


def _allow_triton_on_cpu() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter runs the kernels instead")
    from prostate_kernels import backend

    backend.triton_interpreting = lambda: True  # the backend then accepts "triton" on CPU tensors


def stub_triton_launches() -> collections.Counter:
    """Every JIT launch becomes a no-op that counts itself; autotuners take their first config (no
    benchmarking). Returns the launch counter."""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit

    _allow_triton_on_cpu()
    launches: collections.Counter = collections.Counter()

    def run(self, *args, grid, warmup, **kwargs):
        launches[self.fn.__name__] += 1

    def autotune(self, *args, **kwargs):
        self.best_config = self.configs[0]
        return self.fn.run(*args, **kwargs)

    jit.JITFunction.run = run
    autotuner.Autotuner.run = autotune
    return launches


def fake_cuda_driver() -> collections.Counter:
    """Triton's active driver becomes a CUDA sm_90 stand-in whose launcher only counts (after reading each
    tensor argument's data_ptr, as the real launcher does); autotuners take their first config (no
    benchmarking). Returns the launch counter."""
    import triton.runtime.autotuner as autotuner
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    _allow_triton_on_cpu()
    launches: collections.Counter = collections.Counter()

    class Launcher:
        def __init__(self, src, metadata):
            self.name = src.fn.__name__

        def __call__(
            self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit, *args
        ):
            launches[self.name] += 1
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    arg.data_ptr()

    class Utils:
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536}

        @staticmethod
        def load_binary(name, kernel, shared, device):
            return "module", "function", 128, 0, 1024  # module, function, registers, spills, max threads

    class FakeCuda:
        utils = Utils()
        launcher_cls = Launcher

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("host_cost: no benchmarking behind the fake driver")

    driver.set_active(FakeCuda())
    # the weight gradients split their reductions and the halo kernels size their persistent grids to
    # fill an H100's 132 SMs, as on the GPU (a CPU tensor would get 1 or 4 programs: fewer splits, and
    # for one split no reduction over splits)
    from prostate_kernels.ops import bn_relu_conv3d_triton

    bn_relu_conv3d_triton.wgrad_programs_wanted = lambda device: 4 * 132
    bn_relu_conv3d_triton.halo_programs_wanted = lambda device: 4 * 132

    def autotune(self, *args, **kwargs):
        self.best_config = self.configs[0]
        return self.fn.run(*args, **kwargs, **self.best_config.all_kwargs())

    autotuner.Autotuner.run = autotune
    return launches


def _case(args) -> tuple[str, torch.nn.Module, torch.Tensor]:
    """(label, module, input) of what the arguments ask for."""
    from prostate_kernels.nn import BNReLUConv3d, DenseBlock3d, DepthwiseConv3d

    torch.manual_seed(0)
    if args.model:
        from prostate_kernels.models import build_model

        x = torch.randn((1, 1, 8, 16, 16))  # the smallest input the networks take (4 poolings of 2 in H, W)
        if args.plain:  # the benchmarks' eager baseline: naive dense blocks, every layer in PyTorch
            overrides = {"memory_efficient": False} if args.model.startswith("tiramisu") else {}
            return (
                f"{args.model} (plain PyTorch) training step on 1x1x8x16x16",
                build_model(args.model, **overrides),
                x,
            )
        return f"{args.model} training step on 1x1x8x16x16", build_model(args.model), x
    x = torch.randn((2, args.c_in, args.size, args.size, args.size)).to(memory_format=torch.channels_last_3d)
    shape = f"2x{args.c_in}x{args.size}^3"
    if args.depthwise:
        return (
            f"DepthwiseConv3d({args.c_in}, 3, dilation=2) on {shape}",
            DepthwiseConv3d(args.c_in, 3, padding=2, dilation=2),
            x,
        )
    if args.layers == 0:
        return f"BNReLUConv3d({args.c_in}, 16) on {shape}", BNReLUConv3d(args.c_in, 16), x
    return (
        f"DenseBlock3d({args.c_in}, 16, {args.layers}) on {shape}",
        DenseBlock3d(args.c_in, 16, args.layers, dropout=0.2),
        x,
    )


# Allocations: on a GPU they launch no kernel (the caching allocator hands out memory).
_ALLOCATIONS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                "aten::new_empty_strided"}  # fmt: skip


@functools.cache
def _is_view(name: str) -> bool:
    """Whether the aten op `name` returns views of its inputs: each of its overloads that returns tensors
    returns them aliased, never written (narrow, unflatten, reshape, contiguous, to, ...). Read from the
    op schemas, so no list of names goes stale. An op that copies when it must (reshape of a permuted
    tensor, contiguous, to) does the copy in a child op, which `_device_work` counts."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None:
        return False
    tensor_returns = []
    for overload in packet.overloads():
        returns = getattr(packet, overload)._schema.returns
        tensor_returns += [r for r in returns if "Tensor" in str(r.type)]
    return bool(tensor_returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in tensor_returns
    )


def _device_work(event) -> bool:
    """Whether this op (or an op inside it) would launch a kernel on a GPU: anything but views and
    allocations."""
    if not _is_view(event.name) and event.name not in _ALLOCATIONS:
        return True
    return any(_device_work(child) for child in event.cpu_children if child.name.startswith("aten::"))


def measure(
    module: torch.nn.Module,
    x: torch.Tensor,
    rounds: int,
    steps: int,
    stub: bool,
    backend: Backend = "triton",
    autocast: bool = False,
) -> dict:
    """Best time per forward + backward (a random output gradient, into x and the parameters) over
    `rounds` of `steps` steps, and the torch ops and Triton launches of one step; autocast: the forward
    under bfloat16 autocast."""
    launches = stub_triton_launches() if stub else fake_cuda_driver()
    from torch.profiler import ProfilerActivity, profile

    from prostate_kernels import use_backend

    torch.set_num_threads(1)
    x.requires_grad_(True)
    cast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=autocast)
    with cast():
        gy = torch.randn_like(module(x))

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        with cast():
            y = module(x)
        y.backward(gy)

    with use_backend(backend):
        for _ in range(20):  # the first compiles every kernel for sm_90 (behind the fake driver)
            step()
        best = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best.append((time.perf_counter() - start) / steps)
        launches.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    # torch ops called from Python (an aten op inside another aten op is that op's business)
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    top_level = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    work = [e for e in top_level if _device_work(e)]
    return {
        "us_per_step": min(best) * 1e6,
        "torch_ops": len(top_level),
        "device_work_ops": len(work),
        "work_by_name": collections.Counter(e.name for e in work),
        "triton_launches": sum(launches.values()),
        "ops_by_name": collections.Counter(e.name for e in top_level),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=0, help="0: one fused layer, else a DenseBlock3d")
    parser.add_argument("--c-in", type=int, default=32)
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--depthwise", action="store_true", help="a DepthwiseConv3d (3x3x3, dilation 2)")
    parser.add_argument("--model", help="a whole network's training step (models.build_model name)")
    parser.add_argument(
        "--plain", action="store_true", help="with --model: the plain PyTorch network (the eager baseline)"
    )
    parser.add_argument("--stub-launches", action="store_true", help="no Triton launch path at all")
    parser.add_argument("--autocast", action="store_true", help="each step under bfloat16 autocast")
    args = parser.parse_args(argv)
    if args.plain and not args.model:
        parser.error("--plain measures a network: give --model NAME")
    what, module, x = _case(args)
    steps = 5 if args.model else 100
    backend: Backend = "torch" if args.plain else "triton"
    result = measure(module, x, args.rounds, steps, args.stub_launches, backend, args.autocast)
    how = "launches stubbed" if args.stub_launches else "Triton's launch path up to the driver"
    how += ", bfloat16 autocast" if args.autocast else ""
    print(
        f"{what}, {how}: {result['us_per_step']:.0f} us per forward + "
        f"backward (best of {args.rounds} x {steps}), {result['torch_ops']} torch ops and "
        f"{result['triton_launches']} Triton launches per step; {result['device_work_ops']} of the torch ops "
        "would launch a GPU kernel (the rest are views, metadata and allocations)"
    )
    print("  all ops: " + ", ".join(f"{name[6:]} {n}" for name, n in result["ops_by_name"].most_common()))
    print("  kernel ops: " + ", ".join(f"{name[6:]} {n}" for name, n in result["work_by_name"].most_common()))
    return result


if __name__ == "__main__":
    main()
