"""process_group.lost_process_line: which collective failures mean that the group lost a process (the
torchrun runs behind it are in test_pipeline: test_a_failure_of_another_rank_stops_rank_0_in_one_line)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from prostate_kernels.process_group import lost_process_line

# what Gloo raised on a rank whose peer had exited (torch 2.13 and 2.11, seen in this repository's runs)
CLOSED = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:15788. This is typically caused by a remote worker crashing. Check the logs of the remote "
    "worker before reporting an error. GLHF!"
)


@pytest.mark.parametrize(
    ("error", "quoted"),
    [
        (RuntimeError(CLOSED), "(Gloo: Connection closed by peer [127.0.0.1]:15788)"),
        (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer"),
         "(Gloo: Connection reset by peer)"),
        (dist.DistNetworkError("failed to recv, got 0 bytes"), "(failed to recv, got 0 bytes)"),
    ],
)  # fmt: skip
def test_a_lost_peer_is_said_in_one_line(error, quoted):
    line = lost_process_line(error)
    assert line is not None and quoted in line and "\n" not in line, line
    assert line.startswith("another process of this training left the process group")


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("Expected all tensors to be on the same device"),
        ValueError(CLOSED),  # not a collective's error type
        RuntimeError(f"while loading: {CLOSED}"),  # Gloo's source file must come first
        dist.DistBackendError("NCCL error: unhandled cuda error"),  # a local fault: its traceback stays
    ],
)
def test_other_errors_are_left_as_they_are(error):
    assert lost_process_line(error) is None
