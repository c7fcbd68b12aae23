"""BucketedAutotuner: one autotuning per size bucket, the bucket's winner launched directly afterwards."""

from __future__ import annotations

import pytest
import torch
import triton

from prostate_kernels.determinism import deterministic_mode
from prostate_kernels.ops.launch import BucketedAutotuner


class FakeKernel:
    def __init__(self, launches: list) -> None:
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(("direct", args, kwargs))


class FakeTuner:
    """The parts of triton's Autotuner that BucketedAutotuner uses; best_config follows the first arg."""

    arg_names = ["x", "C_in", "M", "KD"]
    keys = ["C_in", "M", "KD"]

    def __init__(self) -> None:
        self.launches: list = []
        self.fn = FakeKernel(self.launches)
        self.configs = [triton.Config({"BLOCK_M": b}, num_warps=4) for b in (256, 128, 64)]
        self.nargs = None

    def prune_configs(self, kwargs):
        """As triton's: reads self.nargs (set by the caller); here BLOCK_M 256 is pruned at C_in >= 40."""
        return [c for c in self.configs if self.nargs["C_in"] < 40 or c.kwargs["BLOCK_M"] < 256]

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.best_config = triton.Config({"BLOCK_M": 64 if args[1] < 40 else 128}, num_warps=4)
            self.launches.append(("tuned", args, kwargs))

        return run


def test_one_autotuning_per_bucket_then_the_winner_directly():
    tuner = FakeTuner()
    tuned = BucketedAutotuner(tuner, ("C_in", "M"))
    x16, x32 = torch.zeros(1, dtype=torch.float16), torch.zeros(1)
    tuned[(1,)](x16, 33, 1000, 3)  # bucket (64, 1024, 3, float16): autotuned
    tuned[(1,)](x16, 60, 600, 3)  # same bucket: direct, with the winner of C_in=33
    tuned[(1,)](x16, 65, 600, 3)  # C_in bucket 128: autotuned
    tuned[(1,)](x32, 60, 600, 3)  # another dtype: autotuned
    tuned[(1,)](x16, 60, 600, 1)  # KD is not bucketed: autotuned
    kinds = [launch[0] for launch in tuner.launches]
    assert kinds == ["tuned", "direct", "tuned", "tuned", "tuned"]
    direct = tuner.launches[1][2]
    assert direct["BLOCK_M"] == 64 and direct["num_warps"] == 4  # C_in=33's winner, not C_in=60's (128)


def test_a_pinned_config_replaces_the_autotuning_and_leaves_the_buckets_alone():
    tuner = FakeTuner()
    tuned = BucketedAutotuner(tuner, ("C_in", "M"))
    x = torch.zeros(1)
    tuned[(1,)](x, 33, 1000, 3)  # autotuned: the bucket's winner is BLOCK_M 64
    with tuned.pin(BLOCK_M=32, num_warps=8):
        tuned[(1,)](x, 33, 1000, 3)  # same bucket: the pinned config
        tuned[(1,)](x, 80, 1000, 3)  # a new bucket: pinned too, never autotuned
    tuned[(1,)](x, 33, 1000, 3)  # the bucket's winner again
    kinds = [launch[0] for launch in tuner.launches]
    assert kinds == ["tuned", "direct", "direct", "direct"]
    assert [tuner.launches[i][2]["BLOCK_M"] for i in (1, 2, 3)] == [32, 32, 64]
    assert tuner.launches[1][2]["num_warps"] == 8
    assert len(tuned.chosen) == 1 and tuned.pinned is None


def test_capture_mode_sends_every_launch_through_the_autotuner(monkeypatch):
    tuner = FakeTuner()
    tuned = BucketedAutotuner(tuner, ("M",))
    monkeypatch.setattr(BucketedAutotuner, "remember", False)
    for _ in range(3):
        tuned[(1,)](torch.zeros(1), 8, 100, 3)
    assert [launch[0] for launch in tuner.launches] == ["tuned"] * 3


def test_inside_a_cuda_graph_capture_a_new_bucket_is_never_timed(monkeypatch):
    """Timing synchronises the device, which a CUDA graph capture forbids: a bucket first met inside a
    capture takes the first candidate left after pruning (said once), a bucket already timed keeps its
    winner, and a launch after the capture times the new bucket as usual."""
    import prostate_kernels.ops.launch as launch

    tuner = FakeTuner()
    tuned = BucketedAutotuner(tuner, ("C_in", "M"))
    x = torch.zeros(1)
    tuned[(1,)](x, 8, 100, 3)  # timed before the capture: winner BLOCK_M 64
    monkeypatch.setattr(launch, "capture_underway", lambda t: True)
    with pytest.warns(UserWarning, match="first launched at this size inside a CUDA graph capture") as said:
        tuned[(1,)](x, 8, 100, 3)  # timed bucket: its winner, no warning
        tuned[(1,)](x, 60, 600, 3)  # new bucket: untimed, BLOCK_M 256 pruned at C_in >= 40 -> 128
        tuned[(1,)](x, 60, 600, 3)
        tuned[(1,)](x, 9, 900, 3)  # another new bucket: untimed, no second warning
    assert len(said) == 1
    monkeypatch.setattr(launch, "capture_underway", lambda t: False)
    tuned[(1,)](x, 60, 600, 3)  # after the capture: the bucket is timed
    kinds = [(kind, kwargs.get("BLOCK_M")) for kind, _, kwargs in tuner.launches]
    assert kinds == [("tuned", None), ("direct", 64), ("direct", 128), ("direct", 128), ("direct", 256),
                     ("tuned", None)]  # fmt: skip


def test_capture_underway_is_false_off_cuda_without_asking_cuda():
    """torch.cuda.is_current_stream_capturing raises on a CPU-only torch: CPU and meta tensors never ask."""
    from prostate_kernels.ops.launch import capture_underway

    assert not capture_underway(torch.zeros(1)) and not capture_underway(torch.empty(1, device="meta"))


def test_a_bucketed_name_must_be_an_autotune_key():
    with pytest.raises(ValueError, match="sxc"):
        BucketedAutotuner(FakeTuner(), ("sxc",))


def test_fused_layer_in_one_bucket_matches_the_reference_at_each_shape():
    """Two launches sharing a bucket (C_in 33 and 40, M about 2000): the second one runs the first one's
    config directly and still computes its own shape right."""
    from prostate_kernels import functional, use_backend

    g = torch.Generator().manual_seed(0)
    for c_in, size in ((33, (4, 9, 13)), (40, (5, 8, 11))):
        x = torch.randn((2, c_in, *size), generator=g)
        w = torch.randn((16, c_in, 3, 3, 3), generator=g) / (27 * c_in) ** 0.5
        gamma, beta = torch.rand(c_in, generator=g) + 0.5, torch.randn(c_in, generator=g)
        with use_backend("triton"):
            ours = functional.bn_relu_conv3d(x, w, None, gamma, beta, None, None, True)
        with use_backend("torch"):
            expected = functional.bn_relu_conv3d(
                x.double(), w.double(), None, gamma.double(), beta.double(), None, None, True
            )
        assert (ours.double() - expected).abs().max() < 1e-4


def test_host_cdiv_and_next_power_of_2_equal_tritons():
    """The launchers' plain-Python cdiv / next_power_of_2 (Triton 3.6's are constexpr_functions, slow to
    call from the host) give Triton's results."""
    import triton

    from prostate_kernels.ops.launch import cdiv, next_power_of_2

    for a in [0, 1, 2, 3, 7, 8, 9, 255, 256, 257, 2**31 - 1, 2**31, 3 * 2**40 + 5]:
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in [1, 2, 3, 16, 64, 256, 1000]:
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_spill_entries_prune_only_at_their_dot_path_and_offset_width():
    """prune_spilling: an entry for float32 IEEE dots leaves a bf16 launch its candidate (its tensor-core
    variant does not spill), an int64 entry prunes only int64 launches, ANY prunes everywhere, and at
    least one config always remains."""
    import triton.language as tl

    from prostate_kernels.ops.launch import ANY, prune_spilling

    configs = [triton.Config({"BLOCK_M": m}, num_warps=4) for m in (32, 64, 128)]
    prune = prune_spilling({(64, 4, "fp32-ieee", ANY), (128, 4, ANY, True), (32, 4, "bf16", False)},
                           ("BLOCK_M",))  # fmt: skip

    def kept(dot_dtype, precision, int64):
        launch = {"DOT_DTYPE": dot_dtype, "INPUT_PRECISION": precision, "INT64": int64}
        return [c.kwargs["BLOCK_M"] for c in prune(configs, {}, **launch)]

    assert kept(tl.float32, "ieee", False) == [32, 128]
    assert kept(tl.float32, "tf32", False) == [32, 64, 128]
    assert kept(tl.bfloat16, "ieee", False) == [64, 128]
    assert kept(tl.bfloat16, "ieee", True) == [32, 64]
    assert kept(tl.float32, "ieee", True) == [32]
    every = prune_spilling({(m, 4, ANY, ANY) for m in (32, 64, 128)}, ("BLOCK_M",))
    assert [c.kwargs["BLOCK_M"] for c in every(configs, {})] == [128]


def test_voxel_alignment_is_the_largest_power_of_two_dividing_strides_and_channels():
    from prostate_kernels.ops.launch import voxel_alignment

    def channels_last(*shape):
        return torch.empty(shape).to(memory_format=torch.channels_last_3d)

    assert voxel_alignment(channels_last(2, 728, 3, 4, 5)) == 8  # DeepLabv3+'s middle flow
    assert voxel_alignment(channels_last(2, 128, 3, 4, 5)) == 16
    assert voxel_alignment(channels_last(2, 128, 3, 4, 5), channels_last(2, 12, 3, 4, 5)) == 4
    assert voxel_alignment(torch.empty(2, 128, 3, 4, 5)) == 1  # NCDHW: W's stride is 1
    assert voxel_alignment(torch.empty(1, 16, 1, 1, 1)) == 16  # size-1 dimensions: strides never used
    buffer = channels_last(2, 40, 3, 4, 5)
    assert voxel_alignment(buffer[:, 8:32]) == 8  # a channel slice: the buffer's strides, its 24 channels
    assert voxel_alignment(buffer[:, 8:14]) == 2


def test_deterministic_mode_takes_the_first_candidate_untimed():
    """Under torch.use_deterministic_algorithms(True) no launch is timed: each bucket takes the first config
    left after pruning (the same in every process), kept apart from the timed winners of the same bucket."""
    tuner = FakeTuner()
    tuned = BucketedAutotuner(tuner, ("C_in", "M"))
    x = torch.zeros(1)
    with deterministic_mode(True):
        tuned[(1,)](x, 33, 1000, 3)  # first candidate: BLOCK_M 256
        tuned[(1,)](x, 70, 1000, 3)  # C_in bucket 128: 256 is pruned there, so 128
        tuned[(1,)](x, 80, 1000, 3)  # the same bucket again
        assert tuner.nargs is None
    tuned[(1,)](x, 33, 1000, 3)  # deterministic mode off: this bucket is timed, apart from the untimed one
    kinds = [launch[0] for launch in tuner.launches]
    assert kinds == ["direct", "direct", "direct", "tuned"]
    assert [tuner.launches[i][2]["BLOCK_M"] for i in (0, 1, 2)] == [256, 128, 128]
