"""The GPU compile gate (tools/gpu_compile.py): its ptxas log parser, and a kernel that cannot compile is
reported as failed (the gate can fail). The gate itself is a command (`make gpu-compile`), not a test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
if not TOOLS.is_dir():
    pytest.skip(f"tools/ is not beside the tests ({TOOLS})", allow_module_level=True)
sys.path.insert(0, str(TOOLS))

from cli_helpers import run_probe  # noqa: E402
from ptxas_log import parse_ptxas_log  # noqa: E402

LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'bn_relu_conv3d_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for bn_relu_conv3d_fwd_kernel
    2888 bytes stack frame, 6512 bytes spill stores, 7164 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2888 bytes cumulative stack size
ptxas info    : Compile time = 492.282 ms
"""


def test_the_parser_reads_registers_and_spills():
    report = parse_ptxas_log(LOG)
    assert (report.registers, report.spill_stores, report.spill_loads, report.stack_frame) == (
        255,
        6512,
        7164,
        2888,
    )
    assert report.spills
    clean = parse_ptxas_log(
        "ptxas info    : Used 96 registers, used 1 barriers\n    0 bytes spill stores, 0 bytes spill loads"
    )
    assert clean.registers == 96 and not clean.spills
    with pytest.raises(ValueError, match="no 'Used N registers'"):
        parse_ptxas_log("ptxas fatal   : something else")


def test_a_kernel_compiles_and_a_broken_or_atomic_one_fails_the_gate():
    """Triton's real compiler and ptxas, in a fresh process without the interpreter. A kernel with float
    atomics (outside the window-stitching ones) fails too: its sums would change from run to run."""
    report = run_probe("compile_gate_probe.py")
    good, broken, atomic = report["results"]
    assert good["ok"] and good["verdict"] == "ok", good["error"]
    assert 0 < good["registers"] <= 255 and good["spill_bytes"] == 0 and good["atomics"] == 0
    assert not broken["ok"] and broken["verdict"] == "FAILED" and broken["error"]
    assert atomic["ok"] and atomic["atomics"] >= 1 and atomic["verdict"] == "ATOMICS"
    assert "3 variants: 1 failed to compile" in report["summary"]
    assert "1 use atomics outside ['_window_accumulate_kernel']" in report["summary"]


def test_each_dot_path_captures_the_dots_a_gpu_runs_on_it():
    """The sweep's bf16 and fp16 paths capture half dots (on meta tensors, where torch.autocast does not
    reach, they once recaptured the float32 variants), and the gate's check catches a variant whose dot
    is not its path's."""
    report = run_probe("dot_path_probe.py")
    assert report["dots"] == {
        "fp32-tf32": ["fp32-tf32"], "fp32-ieee": ["fp32-ieee"], "bf16": ["bf16"], "fp16": ["fp16"]
    }  # fmt: skip
    assert report["mismatches"] == 0
    assert report["mismatches_relabelled"] == 1


def test_depthwise_kernels_access_728_channels_last_channels_in_16_byte_vectors():
    """At 728 channels-last channels the strides are multiples of 8, not 16, which Triton cannot tell on
    its own: its loads and stores along the channels were 2-byte scalar ones (18 loads and 16 stores per
    tap in the forward's SASS, 96 loads in the weight gradient's). The kernels now declare their voxel
    offsets and channel bounds multiples of 8 (launch.voxel_alignment), and the SASS holds 16-byte ones
    (the halo weight gradient's fill too: it was the last kernel with 2-byte loads there)."""
    counts = run_probe("vector_access_probe.py")
    fwd, dgrad, wgrad = (counts[f"depthwise_conv3d_{k}_kernel"] for k in ("fwd", "dgrad", "wgrad"))
    for name, sass in (("fwd", fwd), ("dgrad", dgrad), ("wgrad", wgrad)):
        assert sass.get("LDG.E.128", 0) >= 1, (name, sass)
    for name, sass in (("fwd", fwd), ("dgrad", dgrad)):
        assert sass.get("STG.E.128", 0) >= 1 and "STG.E.U16" not in sass, (name, sass)
    assert "LDG.E.U16" not in wgrad, wgrad  # x and gy only: every load a vector
    # the halo weight gradient loads gy, its halo fill x (through _fill_halo's ALIGN) and its windows
    halo = counts["depthwise_conv3d_wgrad_halo_kernel"]
    assert halo.get("LDG.E.128", 0) >= 1 and "LDG.E.U16" not in halo, halo


def test_the_depthwise_halo_probe_compiles_without_spills_and_counts_its_tap_loop():
    """tools/depthwise_halo_probe.py, behind bench/results/2026-11-28-depthwise-halo-probe.md: its
    forward and its weight gradient (BLOCK_C 64, the recorded configuration) compile for sm_90a and sm_80
    without spilling and report their tap loops, the forward fewer per 1000 element-taps with a float32
    scratch than with a bf16 one, whose windows each need converting."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = Path(__file__).resolve().parents[1] / "tools" / "depthwise_halo_probe.py"
    counts = {}
    for scratch, kernel, block_c in (("fp32", "forward", "32"), ("bf16", "forward", "32"),
                                     ("bf16", "weight-gradient", "64")):  # fmt: skip
        done = subprocess.run([sys.executable, str(probe), "--scratch", scratch, "--kernel", kernel,
                               "--block-c", block_c], capture_output=True, text=True, env=env,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.splitlines()
        assert [line.split(":")[0] for line in lines if line.startswith("sm_")] == ["sm_90", "sm_80"]
        assert all(line.endswith("spills 0/0 B") for line in lines if line.startswith("sm_")), lines
        counts[scratch, kernel] = int(next(line for line in lines if line.startswith("tap loop:")).split()[2])
    assert 0 < counts["fp32", "forward"] < counts["bf16", "forward"], counts
    assert counts["bf16", "weight-gradient"] > 0, counts


def test_the_capture_runs_where_torch_refuses_a_second_meta_kernel():
    """torch 2.11 refuses register_kernel("meta") on an op with a fake registered; the capture swaps the
    fake functions instead, records the fused layer's forward and backward launches, and swaps them back."""
    report = run_probe("capture_meta_probe.py")
    assert report["ops"] >= 2 and report["fakes_restored"], report
    assert report["recorded"] > 0 and report["recorded_after"] == 0, report
    assert any("fwd" in k for k in report["kernels"]) and any("grad" in k for k in report["kernels"]), report
