"""Host cost of the fused dense layer (BNReLUConv3d) per forward + backward, on the CPU, with every Triton
launch replaced by a no-op: what our Python, the torch ops around the kernels and autograd cost.

The H100 profile (issue 12, run2) showed the layer host-bound below the largest shapes (4x16x16: kernels
0.24 ms of a 2.7 ms step). This is the CPU proxy for that host side: tensors are tiny, so the torch ops'
own arithmetic is negligible next to their dispatch, and each launch is counted instead of run. Prints
microseconds per step (best of rounds), the torch ops called from Python and the Triton launches per step.

    env -u TRITON_INTERPRET python bench/host_cost.py [--c-in 32] [--size 4] [--rounds 7]
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import torch


def stub_triton_launches() -> collections.Counter:
    """Every JIT launch becomes a no-op that counts itself; autotuners take their first config (no
    benchmarking); the backend accepts "triton" on CPU tensors. Returns the launch counter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter runs the kernels instead")
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit

    from prostate_kernels import backend

    launches: collections.Counter = collections.Counter()

    def run(self, *args, grid, warmup, **kwargs):
        launches[self.fn.__name__] += 1

    def autotune(self, *args, **kwargs):
        self.best_config = self.configs[0]
        return self.fn.run(*args, **kwargs)

    jit.JITFunction.run = run
    autotuner.Autotuner.run = autotune
    backend.triton_interpreting = lambda: True
    return launches


def measure(c_in: int, size: int, rounds: int) -> dict[str, float]:
    launches = stub_triton_launches()
    from torch.profiler import ProfilerActivity, profile

    from prostate_kernels import use_backend
    from prostate_kernels.nn import BNReLUConv3d

    torch.set_num_threads(1)
    layer = BNReLUConv3d(c_in, 16)
    x = torch.randn((2, c_in, size, size, size)).to(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    gy = torch.randn((2, 16, size, size, size))

    def step():
        x.grad = None
        layer(x).backward(gy)

    with use_backend("triton"):
        for _ in range(20):
            step()
        best = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(100):
                step()
            best.append((time.perf_counter() - start) / 100)
        launches.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    # torch ops called from Python (an aten op inside another aten op is that op's business)
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    top_level = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {
        "us_per_step": min(best) * 1e6,
        "torch_ops": len(top_level),
        "triton_launches": sum(launches.values()),
        "ops_by_name": collections.Counter(e.name for e in top_level),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--c-in", type=int, default=32)
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    result = measure(args.c_in, args.size, args.rounds)
    print(
        f"BNReLUConv3d({args.c_in}, 16) on 2x{args.c_in}x{args.size}^3, launches stubbed: "
        f"{result['us_per_step']:.0f} us per forward + backward (best of {args.rounds} x 100), "
        f"{result['torch_ops']} torch ops and {result['triton_launches']} Triton launches per step"
    )
    print("  " + ", ".join(f"{name[6:]} {n}" for name, n in result["ops_by_name"].most_common()))
    return result


if __name__ == "__main__":
    main()
