"""Instructions per step of each conv kernel's inner loop, read from the sm_90a SASS: a GPU-free measure of
the issue work per step.

The H100 runs (issue 12) put the fused layer's kernels near their instruction-issue bound: at Tiramisu
p3a's widest layer the forward kernel's loop body times its trip counts, at 4 warp-instructions per cycle
on 132 SMs, accounts for most of its measured 1.13 ms. So fewer instructions per step is a speed-up the
compiler output shows before any GPU run does. This captures a BNReLUConv3d and a DepthwiseConv3d
training step (bf16, channels-last, meta tensors: nothing runs), compiles each kernel's default autotune
variant for sm_90a (the fused layer's training step twice: with the halo kernels, stride 1's default, and
with the direct ones) with Triton's compiler, disassembles it (cuobjdump, bundled with Triton) and lists
every loop (a backward branch) with its instruction count and most frequent opcodes.

    env -u TRITON_INTERPRET python tools/sass_loops.py [--c-in 416] [--depthwise-c 728] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def loops(sass: str) -> list[dict]:
    """Every loop of a disassembled kernel: a branch back to an earlier address closes one. Each as
    {start, end, instructions, innermost, top opcodes}; nested loops are listed apart (an outer loop's
    count includes its inner loops' bodies once)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in map(INSTRUCTION.match, sass.splitlines()) if m]
    index = {address: i for i, (address, _) in enumerate(code)}
    found = []
    for i, (address, text) in enumerate(code):
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address and int(branch.group(1), 16) in index:
            found.append((index[int(branch.group(1), 16)], i))
    rows = []
    for start, end in found:
        body = [text for _, text in code[start : end + 1]]
        opcodes = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
        rows.append({
            "start": f"{code[start][0]:#x}", "end": f"{code[end][0]:#x}", "instructions": len(body),
            "innermost": not any(s > start and e < end for s, e in found if (s, e) != (start, end)),
            "top": ", ".join(f"{op} {n}" for op, n in opcodes.most_common(8)),
        })  # fmt: skip
    return rows


def capture(c_in: int, depthwise_c: int) -> dict:
    """The captured variants of a fused layer and a depthwise conv training step (bf16, channels-last)."""
    import torch
    from compile_capture import RECORDER, capturing

    from prostate_kernels.nn import BNReLUConv3d, DepthwiseConv3d
    from prostate_kernels.ops.bn_relu_conv3d_triton import direct_kernels

    with capturing():
        depthwise = DepthwiseConv3d(depthwise_c, 3, padding=2, dilation=2)
        for module, channels in ((BNReLUConv3d(c_in, 16), c_in), (depthwise, depthwise_c)):
            with torch.device("meta"):
                module = module.to(device="meta", dtype=torch.bfloat16)
                x = torch.empty(2, channels, 16, 64, 64, dtype=torch.bfloat16).to(
                    memory_format=torch.channels_last_3d
                )
            y = module(x.requires_grad_(True))
            y.backward(torch.empty_like(y))
            if isinstance(module, BNReLUConv3d):
                with direct_kernels():  # the kernels of other strides, at the same layer
                    y = module(x)
                    y.backward(torch.empty_like(y))
    return RECORDER.variants


def sass_of(fn, signature, constexprs, attrs, options) -> str:
    """The sm_90a SASS (cuobjdump -sass) of one captured variant: compile_capture's record of it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(options.__dict__))  # fmt: skip
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        return subprocess.run(
            [str(cuobjdump), "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--c-in", type=int, default=416, help="the fused layer's input channels (p3a up3.0)")
    parser.add_argument("--depthwise-c", type=int, default=728, help="the depthwise conv's channels")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1 (the capture needs the GPU launch paths)")
    lines = [
        f"SASS loops (sm_90a) of each kernel's default variant: BNReLUConv3d({args.c_in}, 16) and "
        f"DepthwiseConv3d({args.depthwise_c}, dilation 2), bf16 channels-last, input 2x16x64x64",
        "",
        "| kernel | config | loop | instructions | innermost | most frequent opcodes |",
        "|---|---|---|---|---|---|",
    ]
    done = set()
    for variant, compile_args in capture(args.c_in, args.depthwise_c).items():
        if variant.arch != 90 or not variant.default_config or variant.kernel in done:
            continue
        done.add(variant.kernel)
        for loop in loops(sass_of(*compile_args)):
            innermost = "yes" if loop["innermost"] else "no"
            lines.append(f"| {variant.kernel} | {variant.config} | {loop['start']}..{loop['end']} | "
                         f"{loop['instructions']} | {innermost} | {loop['top']} |")  # fmt: skip
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
