"""BatchNorm statistics synchronised over a process group (nn.SyncBatchNorm) in the fused layers.

Two Gloo processes under torchrun run each case on their shares of one batch (2 samples and 1); one
process here runs the whole batch in float64 with plain BatchNorm. nn.SyncBatchNorm's definition is that
the two agree: each process's output and input gradient are its rows of the whole batch's, the parameter
gradients of the processes add up to the whole batch's (DDP averages them), and every process's running
statistics are the whole batch's. Before, a converted layer normalised each process by its own batch.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prostate_kernels import functional, use_backend
from prostate_kernels import nn as pk_nn
from prostate_kernels.ops.sync_batch_norm import (
    add_input_grad_through_stats_,
    input_grad_through_stats,
    sync_group,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sync_batch_norm_probe as probe  # noqa: E402
from cli_helpers import run_torchrun  # noqa: E402

TOLERANCE = {torch.float64: {"rtol": 1e-9, "atol": 1e-10}, torch.float32: {"rtol": 2e-4, "atol": 2e-4}}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sync_bn")
    # no cached Inductor graph: a stale one keeps the strides of an older fake kernel
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TRITON_INTERPRET": "1",
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
    }
    result = run_torchrun(2, str(Path(probe.__file__)), str(out), env=env, cwd=out, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def reference(name: str) -> dict:
    """What the processes' results must add up to: the whole batch in one process, float64, plain BN."""
    built, x = probe.make_case(name)
    x = x.clone().requires_grad_(True)
    with use_backend("torch"):
        if isinstance(built, dict):
            params = {k: v.clone().requires_grad_() for k, v in built.items() if not k.startswith("running")}
            buffers = {k: v.clone() for k, v in built.items() if k.startswith("running")}
            z = F.batch_norm(x, buffers["running_mean"], buffers["running_var"], params["bn_weight"],
                             params["bn_bias"], True, 0.3, 1e-4)  # fmt: skip
            y = F.conv3d(torch.relu(z), params["weight"], params["bias"], padding=1)
        else:
            y = built(x)
            params, buffers = dict(built.named_parameters()), dict(built.named_buffers())
        torch.manual_seed(1)
        gy = torch.randn(y.shape, dtype=torch.float64)
        (y * gy).sum().backward()
    return {"y": y.detach(), "grad_x": x.grad, "grads": {k: p.grad for k, p in params.items()},
            "buffers": buffers}  # fmt: skip


@pytest.mark.parametrize("name", list(probe.CASES))
def test_each_process_computes_its_share_of_the_whole_batch(ranks, name):
    dtype = probe.CASES[name][2]
    want = reference(name)

    def close(got, expected, what):
        torch.testing.assert_close(
            got.double(), expected.double(), **TOLERANCE[dtype], msg=lambda m: f"{what}: {m}"
        )

    for rank, share in enumerate(probe.shares(name)):
        got = ranks[rank][name]
        close(got["y"], want["y"][share], f"rank {rank} output")
        close(got["grad_x"], want["grad_x"][share], f"rank {rank} input gradient")
        assert got["buffers"].keys() == want["buffers"].keys()
        for key, value in want["buffers"].items():  # running statistics: the whole batch's, on every process
            close(got["buffers"][key], value, f"rank {rank} {key}")
    assert ranks[0][name]["grads"].keys() == want["grads"].keys()
    for key, value in want["grads"].items():  # local parameter gradients: they add up to the whole batch's
        close(ranks[0][name]["grads"][key] + ranks[1][name]["grads"][key], value, f"gradient of {key}")


def test_only_a_block_of_mixed_norms_warns_that_it_runs_layer_by_layer(ranks):
    """The memory-efficient block synchronises over its units' one group (no warning, its own buffer);
    one whose units do not all share a group warns and runs layer by layer."""
    for name in ("block_triton_float32", "bottleneck_block_torch_float64", "layer_triton_float32"):
        assert [ranks[r][name]["warned"] for r in range(2)] == [False, False], name
    assert [ranks[r][probe.MIXED]["warned"] for r in range(2)] == [True, True]


def test_memory_efficient_blocks_run_their_shared_buffer_engine_over_the_group(ranks):
    """Every memory-efficient block ran ops/dense_block.py with the group, on both processes (the one
    with no samples too); the naive block did not (tiny Tiramisu 3D: its 5 dense blocks)."""
    expected = {"block": 1, "bottleneck_block": 1, "naive_block": 0, "model": 5}
    for name, (kind, _, _) in probe.CASES.items():
        if kind in expected:
            assert [ranks[r][name]["synced_blocks"] for r in range(2)] == [expected[kind]] * 2, name


def test_a_compiled_case_makes_the_collectives_of_its_eager_twin_in_backward(ranks):
    """The backward of a block takes the group's count from its forward: one all_reduce per unit with
    batch statistics (its gradient through them) and nothing more, compiled or not. The compiled block's
    backward op once made the count's all_reduce again (one more per block)."""
    twins = {name: name.replace("_compiled", "").replace("_inductor", "") for name in probe.CASES}
    twins = {name: eager for name, eager in twins.items() if eager != name and eager in probe.CASES}
    assert len(twins) == 4, twins  # a layer, a block, a bottleneck block (Inductor), the tiny Tiramisu
    for rank in range(2):
        for name, eager in twins.items():
            got, want = (ranks[rank][case]["backward_collectives"] for case in (name, eager))
            assert got == want, (rank, name, got, want)
        # 3 layers: 3 units, with bottlenecks 6, each normalised by the batch's statistics
        for name, units in (("block_triton_float32", 3), ("bottleneck_block_torch_float64", 6)):
            got = ranks[rank][name]["backward_collectives"]
            assert got == {**dict.fromkeys(probe.COLLECTIVES, 0), "all_reduce": units}, (rank, name, got)


def test_the_synchronised_statistics_ops_pass_opcheck(ranks):
    """The custom ops a compiled synchronised layer calls: schema, fake kernels (strides and offsets of
    NCDHW and channel-slice inputs), autograd registration, on both processes."""
    for rank in range(2):
        results = ranks[rank]["opcheck"]
        assert len(results) == 4, results
        assert all(result == "passed" for result in results.values()), (rank, results)


def test_without_a_process_group_a_sync_batchnorm_layer_is_a_batchnorm_layer():
    """Outside torch.distributed (or in eval mode) nn.SyncBatchNorm is plain BatchNorm, as torch's is."""
    torch.manual_seed(0)
    layer = pk_nn.BNReLUConv3d(3, 2).double()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(pk_nn.BNReLUConv3d(3, 2).double())
    synced.load_state_dict(layer.state_dict())
    assert isinstance(synced.norm, torch.nn.SyncBatchNorm) and sync_group(synced.norm) is None
    x = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(synced(x), layer(x))
    torch.testing.assert_close(synced.norm.running_var, layer.norm.running_var)


def test_a_process_group_of_another_type_is_refused():
    x = torch.randn(2, 3, 4, 4, 4)
    weight = torch.randn(2, 3, 3, 3, 3)
    with pytest.raises(
        TypeError, match="process_group must be a torch.distributed ProcessGroup or None, got str"
    ):
        functional.bn_relu_conv3d(x, weight, None, None, None, None, None, True, process_group="world")


def test_a_synchronised_memory_efficient_block_keeps_what_an_unsynchronised_one_keeps(ranks):
    """Bytes autograd keeps for backward (a 4-layer block): the same with nn.SyncBatchNorm as without, on
    both processes; the layer-by-layer walk the block used to fall back to kept several times more."""
    for r in range(2):
        kept = ranks[r]["saved_for_backward"]
        assert kept["synced"] == kept["plain"] > 0, kept


def test_the_gradient_through_the_statistics_is_added_the_same_a_slice_of_channels_at_a_time():
    """The dense block adds it into its shared gradient buffer in slices of channels (temporaries near
    chunk_bytes): 2 channels a slice here, the last slice 1 channel, a channels-last buffer."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 4, 5, dtype=torch.float64)
    mean, g_mean, g_var = torch.randn(3, 7, dtype=torch.float64)
    start = torch.randn_like(x).contiguous(memory_format=torch.channels_last_3d)
    whole = start + input_grad_through_stats(x, mean, g_mean, g_var, 99)
    sliced = start.clone()
    add_input_grad_through_stats_(sliced, x, mean, g_mean, g_var, 99, chunk_bytes=2 * 2 * 60 * 8)
    assert torch.equal(sliced, whole)
    assert not torch.equal(start, whole)
