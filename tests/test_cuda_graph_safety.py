"""A training step of every layer and network can be captured in a CUDA graph: on the GPU launch paths
(meta tensors, Triton launches recorded), no op reads a device value on the host and none touches host
memory (tests/graph_safety_probe.py says what it watches and why). The dense blocks' dropout was the
exception until its seeds and masks moved to the device: seeds drawn on the CPU are frozen into a graph
at capture, and each layer seeded a torch.Generator of its own from a host int."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if not (Path(__file__).resolve().parents[1] / "tools").is_dir():
    pytest.skip("tools/ is not beside the tests", allow_module_level=True)

from cli_helpers import run_probe  # noqa: E402

WORKLOADS = [
    "BNReLUConv3d",
    "DenseBlock3d dropout 0.2",
    "DenseBlock3d bn_size 4 dropout 0.2",
    "DepthwiseConv3d",
    "SeparableConv3d",
    "ASPP3d",
    "tiramisu3d_tiny",
    "unet3d",
    "deeplabv3plus_3d",
]


@pytest.fixture(scope="module")
def report() -> dict:
    return run_probe("graph_safety_probe.py")


def test_every_workload_ran(report):
    assert sorted(report) == sorted(WORKLOADS)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_a_training_step_holds_nothing_a_capture_forbids(report, workload):
    result = report[workload]
    assert result["error"] is None, result["error"]
    assert result["ops"] == {}, result["where"]


def test_the_probe_sees_a_host_draw_and_a_host_read():
    """The watch itself: a CPU draw copied to the device and an .item() are both reported (on meta tensors
    .item() raises too; the op is listed before it does)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from graph_safety_probe import CaptureHazards

    hazards = CaptureHazards()
    x = torch.empty(3, device="meta")
    own = torch.Generator().manual_seed(0)  # not the global RNG
    with hazards:
        x + torch.randint(0, 9, (3,), generator=own).to("meta")
        with pytest.raises(RuntimeError):
            x.sum().item()
    assert hazards.ops["randint on a CPU tensor"] == 1
    assert hazards.ops["_to_copy on a CPU tensor"] == 1
    assert hazards.ops["_local_scalar_dense (reads device values on the host)"] == 1
