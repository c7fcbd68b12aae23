"""The process group of a training under torchrun: each process's device, joining and leaving the group,
and the work that rank 0 alone does (the run directory, validation, metrics.csv, checkpoints), whose
failure every rank must hear of.

With one process (world 1) every function here is a no-op or returns at once: no group exists.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from prostate_kernels.data import ConfigError, DataError
from prostate_kernels.data.errors import first_line
from prostate_kernels.torchrun_env import ProcessLayout

GLOO_SETTLE_S = 0.2  # a pause without the GIL before the group is torn down (joined_process_group)

# a Gloo transport error names its source file first: "[.../gloo/transport/tcp/pair.cc:553] Connection
# closed by peer [127.0.0.1]:15788. This is typically caused by a remote worker crashing. ..."
_GLOO_TRANSPORT_ERROR = re.compile(r"^\[[^\]]*gloo/transport/[^\]]*\]\s*(?P<what>.+?)(?:\.\s|\.?$)")


def process_device(layout: ProcessLayout) -> torch.device:
    """This process's device: under torchrun (world > 1) with CUDA its LOCAL_RANK's GPU, made current
    (before the group is joined, as NCCL wants), else the one GPU or the CPU. ConfigError when the
    machine has no GPU for this process (more processes per node than GPUs: NCCL takes one per process)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if layout.world == 1:
        return torch.device("cuda")
    local, gpus = layout.local_rank, torch.cuda.device_count()
    if local >= gpus:
        raise ConfigError(
            f"torchrun started this process as LOCAL_RANK {local}, and this machine has {gpus} CUDA "
            f"device(s) it can see: start at most {gpus} process(es) per node (--nproc-per-node), one per GPU"
        )
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def joined_process_group(world: int, device: torch.device) -> Iterator[int]:
    """This process's rank for the `with` block: under torchrun (world > 1) it joins the process group
    (NCCL on CUDA, gloo on the CPU) and leaves it when the block ends, an error included.
    - A group left alive is torn down at interpreter exit (if at all), where a Gloo worker thread that
      needs the GIL aborts the process (pytorch/pytorch#179291; the likely cause of one CI run's rank
      ending in "terminate called without an active exception").
    - init_process_group can return on one process while another still connects to it: one that then
      failed at once and left the group ended the other's init in "Connection closed by peer" (a Gloo
      traceback beside the one-line error). A barrier after joining: every process has joined before
      any can leave.
    - Gloo's worker threads release a collective's tensors after its wait() has returned, and need the
      GIL for it (the tensors' Python objects); the group's destructor joins those threads while holding
      the GIL, from whatever dropped the group last (destroy_process_group, or DDP's Reducer kept alive by
      an exception's traceback). A worker still releasing then deadlocks the process: seen in 10 of 36
      runs of a rank-0 failure after a broadcast (gdb: the main thread in ~ProcessGroupGloo's join, a
      pt_gloo_runloop thread in ~AsyncBroadcastWork waiting for the GIL; torch 2.13 and 2.11). A pause
      without the GIL before leaving lets them finish (GLOO_SETTLE_S: once per run).
    - A process that stops alone (its forward or backward out of memory, a bug, a kill) leaves the others
      at their next collective, where Gloo raises "Connection closed by peer": that becomes a DataError
      saying so in one line (lost_process_line), beside the stopped process's own line, where it was a
      traceback of this process's that hid the cause. (NCCL notices nothing: torchrun stops the others.)"""
    if world == 1:
        yield 0
        return
    # DDP's first use imports this module, whose defaults (group=group.WORLD) are bound at import: after
    # init_process_group they would hold the group for good and destroy_process_group would free nothing
    importlib.import_module("torch.distributed.nn.functional")

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        dist.barrier()
        yield dist.get_rank()
    except RuntimeError as exc:
        lost = lost_process_line(exc)
        if lost is None:
            raise
        raise DataError(None, lost) from exc
    finally:
        if backend == "gloo":
            time.sleep(GLOO_SETTLE_S)
        dist.destroy_process_group()


def lost_process_line(exc: BaseException) -> str | None:
    """The one line for a collective that failed because the group lost a process (a Gloo transport error:
    the peer's connection closed or reset; torch's DistNetworkError), else None (any other error)."""
    if isinstance(exc, dist.DistNetworkError):
        what = first_line(exc)
    else:
        match = (
            _GLOO_TRANSPORT_ERROR.match(first_line(exc, limit=1000))
            if isinstance(exc, RuntimeError)
            else None
        )
        if match is None:
            return None
        what = f"Gloo: {match['what']}"
    return (
        f"another process of this training left the process group ({what}), so this one stops too: "
        "the line of the process that stopped first says why"
    )


@contextlib.contextmanager
def rank_zero_work(world: int) -> Iterator[None]:
    """A block that does rank 0's work (the other ranks enter it too and do nothing there), after which
    every rank knows whether it succeeded. A failure in it raises on every rank: rank 0 its own error,
    the others a DataError with its line. Without this, rank 0 left the group and the others met its
    exit at their next collective (DDP's all_reduce, a barrier): a Gloo "Connection closed by peer"
    traceback beside rank 0's one-line error. A collective: every rank enters it at the same point of
    the run (with world 1 it only runs the block)."""
    failure = None
    try:
        yield
    except Exception as exc:
        failure = exc
    verdict = _rank_zero_verdict(failure, world)
    if failure is not None:
        raise failure
    if verdict is not None:
        raise DataError(None, verdict)


def _rank_zero_verdict(failure: Exception | None, world: int) -> str | None:
    """Rank 0's failure as one line, sent to every rank; None when it succeeded. A collective under
    torchrun: every rank calls it (only rank 0's `failure` is sent)."""
    if world == 1:
        return None  # rank 0 alone raises its own failure
    line = None
    if isinstance(failure, DataError):
        line = str(failure)  # the one line that rank 0 prints
    elif failure is not None:
        line = f"rank 0 stopped ({type(failure).__name__}: {first_line(failure)})"
    shared = [line]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
