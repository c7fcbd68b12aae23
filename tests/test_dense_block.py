"""DenseBlock3d: the shared-storage block against the naive torch.cat block.

The naive block in float64 is the reference: output, input gradient, every parameter gradient and the
running statistics after several training steps; dropout on (both draw the same seeded masks) and off;
eval mode; return_input both ways; odd sizes. The efficient block runs on the PyTorch twin (float64,
so the comparison is tight) and on the Triton kernels (float32, through the interpreter).
"""

from __future__ import annotations

import copy

import pytest
import torch

from prostate_kernels import use_backend
from prostate_kernels.nn import DenseBlock3d

# per engine: (dtype of the efficient block, relative tolerance against float64 and why)
ENGINES = {
    "torch": (torch.float64, 1e-10),  # same float64 arithmetic, other summation order
    "triton": (torch.float32, 3e-5),  # float32 kernels: sums of up to 27 * C float32 products
}


def _step(block, x, seed, weights):
    """One training step's output, input gradient (a fixed non-uniform loss), with torch seeded."""
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    y = block(x)
    (y * weights.to(y.dtype)).sum().backward()
    return y.detach(), x.grad


def _rel(got, expected) -> float:
    return (
        (got.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)
    ).item()


def _compare(eff, naive, rtol, label):
    for name, p in naive.named_parameters():
        got = dict(eff.named_parameters())[name].grad
        assert _rel(got, p.grad) < rtol, f"{label}: grad of {name}"
    for name, b in naive.named_buffers():
        got = dict(eff.named_buffers())[name]
        err = _rel(got, b) if b.is_floating_point() else float(not torch.equal(got, b))
        assert err < rtol, f"{label}: buffer {name}"


def _assert_trains_like_naive(efficient: DenseBlock3d, engine: str) -> torch.Tensor:
    """Three training steps and an eval forward of `efficient` (on `engine`, in its dtype) against its
    float64 naive twin: output, input gradient, every parameter gradient and buffer (running statistics)
    within the engine's tolerance. Returns the last training output."""
    dtype, rtol = ENGINES[engine]
    naive = copy.deepcopy(efficient).double()
    naive.memory_efficient = False
    efficient = efficient.to(dtype)
    g = torch.Generator().manual_seed(1)
    for step in range(3):  # running statistics after several steps
        x = torch.randn((2, 5, 3, 5, 4), generator=g, dtype=torch.float64) * (1 + step) + 0.5
        weights = torch.randn((2, efficient.out_channels, 3, 5, 4), generator=g, dtype=torch.float64)
        for block in (efficient, naive):
            block.zero_grad(set_to_none=True)
        with use_backend(engine):
            y, gx = _step(efficient, x.to(dtype), step, weights)
        y_ref, gx_ref = _step(naive, x, step, weights)
        label = f"step {step}"
        assert y.shape == y_ref.shape == (2, efficient.out_channels, 3, 5, 4)
        assert _rel(y, y_ref) < rtol, f"{label}: output"
        assert _rel(gx, gx_ref) < rtol, f"{label}: input grad"
        _compare(efficient, naive, rtol, label)
    efficient.eval(), naive.eval()
    with use_backend(engine), torch.no_grad():
        assert _rel(efficient(x.to(dtype)), naive(x)) < rtol, "eval mode"
    return y


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize(
    "dropout,return_input,bn_size",
    [(0.0, True, 0), (0.3, True, 0), (0.0, False, 0), (0.3, False, 0), (0.0, True, 2), (0.3, False, 3)],
)
def test_efficient_block_equals_naive_block(engine, dropout, return_input, bn_size):
    """bn_size > 0: DenseNet-BC layers (the bottleneck output is recomputed in backward)."""
    torch.manual_seed(0)
    efficient = DenseBlock3d(
        5, growth_rate=4, num_layers=3, dropout=dropout, return_input=return_input, bn_size=bn_size
    )
    y = _assert_trains_like_naive(efficient, engine)
    if dropout:  # the masks really drop: some new features are exactly zero
        assert (y[:, -4:] == 0).float().mean().item() > 0.1


def test_dropout_masks_are_those_of_the_seed():
    """A seed's mask stays what it was (rand >= p from a generator seeded with it, scaled by 1/(1-p)), so
    that a run with the same seeds trains the same (the phantom demo's Dice moved from 0.856 to 0.436
    with another draw from the same seeds)."""
    from prostate_kernels.ops.seeded_dropout import dropout_scale

    for seed, p in ((0, 0.2), (7, 0.5)):
        g = torch.Generator().manual_seed(seed)
        expected = (torch.rand((2, 3, 4, 5, 6), generator=g) >= p).to(torch.float32) / (1 - p)
        seeds = torch.tensor([5, seed], dtype=torch.int64)
        got = dropout_scale(seeds, 1, (2, 3, 4, 5, 6), p, torch.device("cpu"))
        assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_gpu_masks_come_from_philox_reading_the_seed_on_the_device():
    """Off the CPU the draws are Philox in a Triton kernel that loads seeds[layer] itself (run here through
    the interpreter on CPU tensors): uniform in [0, 1), a pure function of the seed, another seed or layer
    another draw, and p of them below p."""
    from prostate_kernels.ops.seeded_dropout_triton import philox_uniform

    seeds = torch.tensor([3, 2**61 + 17, 3], dtype=torch.int64)
    shape = (2, 5, 7, 9, 11)  # 6930 draws: 7 programs, the last one partly masked
    first = philox_uniform(seeds, 0, shape)
    assert first.shape == shape and first.dtype == torch.float32 and first.is_contiguous()
    assert 0 <= first.min() and first.max() < 1
    assert torch.equal(philox_uniform(seeds, 2, shape), first)  # the same seed value, the same draws
    other = philox_uniform(seeds, 1, shape)
    assert (other != first).float().mean() > 0.99
    for p in (0.2, 0.5):
        assert abs((first < p).float().mean().item() - p) < 0.02
    # element i is tl.rand(seed, i) at flat index i, whatever the shape
    assert philox_uniform(seeds, 0, (6930,))[100] == first.flatten()[100]
    assert philox_uniform(seeds, 0, (0, 3)).shape == (0, 3)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf * 0
def test_fused_gpu_dropout_multiplies_by_the_philox_mask_bit_for_bit():
    """philox_dropout_ (the dense block's backward off the CPU: draw, compare, scale and multiply in one
    launch) leaves every element as mul_ by scale_from_uniform_(philox_uniform(...)) does, bit for bit, in
    each float dtype, on contiguous tensors and on channel slices of NCDHW and channels-last buffers (the
    channels around the slice untouched); NaN and inf follow the multiplication; it declines (False,
    nothing written) a tensor whose spatial strides do not collapse into one."""
    from prostate_kernels.ops.seeded_dropout import scale_from_uniform_
    from prostate_kernels.ops.seeded_dropout_triton import philox_dropout_, philox_uniform

    seeds = torch.tensor([9, 2**61 + 5, 4], dtype=torch.int64)
    g = torch.Generator().manual_seed(0)

    def buffer(shape, dtype, channels_last=False):
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        return t.to(memory_format=torch.channels_last_3d) if channels_last else t

    cl_buf = buffer((2, 40, 3, 5, 7), torch.bfloat16, channels_last=True)
    nc_buf = buffer((3, 11, 4, 1, 6), torch.float16)
    cases = [  # (buffer, the slice scaled, p, layer)
        (buffer((2, 5, 7, 9, 11), torch.float32), (slice(None),), 0.2, 0),
        # the dense block's grad_new in a CL buffer; p 0.5 keeps the bf16 products exact (scale 2): the
        # interpreter truncates float32 -> bf16 where a GPU rounds (bench/gpu_checks checks bf16 there)
        (cl_buf, (slice(None), slice(8, 24)), 0.5, 1),
        (nc_buf, (slice(None), slice(3, 8)), 0.3, 2),  # an NCDHW slice with a size-1 axis
        (buffer((2, 37, 1, 6, 1), torch.float64, channels_last=True), (slice(None),), 0.2, 0),
        (buffer((1, 3, 2, 2, 2), torch.float32), (slice(None),), 0.9, 1),
    ]
    cases[-1][0].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for buf, index, p, layer in cases:
        expected = buf.clone()
        part = expected[index]
        part.mul_(scale_from_uniform_(philox_uniform(seeds, layer, tuple(part.shape)), p))
        got = buf.clone()
        assert philox_dropout_(got[index], seeds, layer, p)
        assert torch.equal(got.isnan(), expected.isnan()), (buf.dtype, index)
        assert torch.equal(got.nan_to_num(), expected.nan_to_num()), (buf.dtype, index)
    kept = cases[0][0].clone()
    philox_dropout_(kept, seeds, 0, 0.2)
    assert 0.15 < (kept == 0).float().mean().item() < 0.25  # p of them dropped
    strided = buffer((2, 3, 4, 6, 5), torch.float32)[:, :, :, ::2]  # H strided: no single voxel stride
    before = strided.clone()
    assert not philox_dropout_(strided, seeds, 0, 0.2)
    assert torch.equal(strided, before)


def test_dropout_on_the_meta_device_keeps_shapes_and_draws_nothing():
    """Meta tensors have no values: the draws are an empty float32 tensor of the shape, and applying a mask
    leaves a meta tensor of t's shape (Triton, which cannot run on meta, is not called)."""
    from prostate_kernels.ops.seeded_dropout import apply_dropout_, draw_seeds, dropout_uniform

    seeds = draw_seeds(3, "meta")
    draws = dropout_uniform(seeds, 2, (2, 5, 3), torch.device("meta"))
    assert draws.device.type == "meta" and draws.shape == (2, 5, 3) and draws.dtype == torch.float32
    t = torch.empty(2, 4, 3, 5, 6, device="meta", dtype=torch.bfloat16)
    assert apply_dropout_(t, seeds, 1, 0.3) is t and t.shape == (2, 4, 3, 5, 6)


def test_dropout_seeds_are_checked_by_name():
    from prostate_kernels.ops.seeded_dropout import apply_dropout_, draw_seeds, dropout_uniform
    from prostate_kernels.ops.seeded_dropout_triton import philox_dropout_, philox_uniform

    seeds = draw_seeds(2)
    assert seeds.dtype == torch.int64 and seeds.shape == (2,) and seeds.device.type == "cpu"
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"entry for layer 2, got torch.int64 \(2,\)"):
        dropout_uniform(seeds, 2, (3,), cpu)
    with pytest.raises(ValueError, match=r"entry for layer 0, got torch.float32"):
        dropout_uniform(seeds.float(), 0, (3,), cpu)
    with pytest.raises(
        ValueError, match="dropout_uniform: dropout seeds are on cpu but the mask is drawn on meta"
    ):
        dropout_uniform(seeds, 0, (3,), torch.device("meta"))
    with pytest.raises(ValueError, match=r"4294967296 elements, at most 4294967295 per layer"):
        philox_uniform(seeds.to("meta"), 0, (2**16, 2**16))
    with pytest.raises(ValueError, match=r"4294967296 elements, at most 4294967295 per layer"):
        philox_dropout_(torch.empty((2, 2**15, 2**16), device="meta"), seeds.to("meta"), 0, 0.2)
    with pytest.raises(
        ValueError, match="apply_dropout_: dropout seeds are on meta but the mask is drawn on cpu"
    ):
        apply_dropout_(torch.ones(2, 3, 4), seeds.to("meta"), 0, 0.2)
    with pytest.raises(ValueError, match=r"apply_dropout_: seeds must be .* entry for layer 2"):
        apply_dropout_(torch.ones(2, 3, 4), seeds, 2, 0.2)
    from prostate_kernels.ops.dense_block import dense_block

    with pytest.raises(ValueError, match=r"dense_block: seeds must be a 1-D int64 tensor, got torch.int32"):
        dense_block(torch.zeros(2, 4, 2, 2, 2), 2, [], [], 0.2, seeds.int())


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("bn_size", [0, 2])
def test_one_layer_block_equals_naive_block(engine, bn_size):
    """One layer: the input's statistics are the block's only ones (no concatenation makes them separate
    tensors; the custom op's outputs must still not alias)."""
    torch.manual_seed(2)
    _assert_trains_like_naive(DenseBlock3d(5, growth_rate=4, num_layers=1, bn_size=bn_size), engine)


def _batch_norms_without(block: DenseBlock3d, what: str) -> DenseBlock3d:
    """Every BatchNorm of the block without affine parameters, without running statistics, or with a
    cumulative average (momentum None), as nn.BatchNorm3d(..., affine=False / track_running_stats=False /
    momentum=None) would be built."""
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            if what == "affine":
                m.affine, m.weight, m.bias = False, None, None
            elif what == "running_stats":
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
            else:
                m.momentum = None
    return block


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("what", ["affine", "running_stats", "momentum"])
@pytest.mark.parametrize("bn_size", [0, 2])
def test_batch_norm_variants_equal_the_naive_block(engine, what, bn_size):
    """BatchNorms without affine parameters or running statistics (absent tensors in the custom op's
    parameter list) and with momentum None train like the naive block, in training and eval mode."""
    torch.manual_seed(1)
    block = DenseBlock3d(5, growth_rate=4, num_layers=2, dropout=0.0, bn_size=bn_size)
    _assert_trains_like_naive(_batch_norms_without(block, what), engine)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_steps_count_as_batchnorm_does(momentum):
    """batch_norm_steps increments every counter with one foreach op: each module counts once per forward
    (twice when listed twice, as two forwards would), and momentum None averages over the counted steps,
    as nn.BatchNorm3d.forward does; eval mode and untracked statistics count nothing."""
    from prostate_kernels.nn.dense import batch_norm_steps

    norms = [torch.nn.BatchNorm3d(3, momentum=momentum) for _ in range(3)]
    twins = copy.deepcopy(norms)
    untracked = torch.nn.BatchNorm3d(3, track_running_stats=False)
    x = torch.randn(2, 3, 2, 2, 2)
    for step in range(2):
        steps = batch_norm_steps([*norms, norms[0], untracked])
        for twin in [*twins, twins[0]]:
            twin(x)
        assert [int(n.num_batches_tracked) for n in norms] == [2 * (step + 1), step + 1, step + 1]
        assert [int(t.num_batches_tracked) for t in twins] == [2 * (step + 1), step + 1, step + 1]
        expected = 0.1 if momentum else 1.0 / (step + 1)
        assert steps[1].momentum == pytest.approx(expected) and steps[1].batch_stats
        assert steps[-1].running_mean is None and steps[-1].batch_stats
    for norm in norms:
        norm.eval()
    steps = batch_norm_steps(norms)
    assert [int(n.num_batches_tracked) for n in norms] == [4, 2, 2]
    assert not any(s.batch_stats for s in steps)


def test_output_is_the_shared_buffer_and_guards_it():
    block = DenseBlock3d(6, growth_rate=4, num_layers=2, dropout=0.0)
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    with use_backend("triton"):  # the Triton engine keeps its buffer channels-last (K-contiguous slices)
        assert block(x).is_contiguous(memory_format=torch.channels_last_3d)
    y = block(x)  # the PyTorch twin: NCDHW, what CPU convolutions prefer
    assert y.is_contiguous()
    assert torch.equal(y[:, :6], x)  # the input was copied in once
    y.mul_(2)  # the buffer is saved for backward: changing it in place must not go unnoticed
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def _saved_bytes(block: DenseBlock3d, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd keeps for backward, plus the output's (model state, i.e.
    parameters and buffers such as running statistics, and the input itself are not counted)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)
    storages[y.untyped_storage().data_ptr()] = y.untyped_storage().nbytes()
    params = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *block.buffers()]}
    return sum(
        n for ptr, n in storages.items() if ptr not in params and ptr != x.untyped_storage().data_ptr()
    )


def _kept_bytes(efficient: DenseBlock3d, x: torch.Tensor, label: str) -> tuple[int, int]:
    """(bytes kept for backward by the block, by its naive twin) on x, printed with `label`."""
    naive = copy.deepcopy(efficient)
    naive.memory_efficient = False
    ours, theirs = _saved_bytes(efficient, x), _saved_bytes(naive, x)
    print(f"\n{label}: kept for backward {ours / 2**20:.3f} MiB (efficient) vs {theirs / 2**20:.3f} MiB "
          f"(naive), ratio {ours / theirs:.3f}")  # fmt: skip
    return ours, theirs


def test_saved_memory_is_at_most_a_quarter_of_the_naive_block():
    torch.manual_seed(0)
    efficient = DenseBlock3d(48, growth_rate=16, num_layers=12, dropout=0.2)
    x = torch.randn(1, 48, 4, 8, 8, requires_grad=True)
    ours, theirs = _kept_bytes(efficient, x, "12-layer block, 48 in, growth 16")
    assert ours <= theirs / 4
    buffer_bytes = 1 * (48 + 12 * 16) * 4 * 8 * 8 * 4
    assert ours <= buffer_bytes + _vector_bytes(
        48, 16, 12
    )  # the buffer and per-channel vectors, nothing else


def _vector_bytes(c0: int, growth: int, layers: int, bottleneck: int = 0) -> int:
    """Per-channel vectors a block keeps (float32): mean and var of B's channels (and of each layer's T),
    each unit's folded BatchNorm (scale, shift, rstd of the channels it reads), one int64 seed per layer."""
    b_channels = c0 + (layers - 1) * growth
    unit_widths = sum(c0 + layer * growth for layer in range(layers)) + layers * bottleneck
    return 4 * 2 * (b_channels + layers * bottleneck) + 4 * 3 * unit_widths + 8 * layers


def test_bottleneck_block_keeps_no_bottleneck_output():
    """A DenseNet-BC block keeps what a plain one keeps: the buffer and per-channel vectors (T, 4x the
    growth per layer, is recomputed); the naive BC block keeps every layer's cat, T and activations."""
    torch.manual_seed(0)
    efficient = DenseBlock3d(32, growth_rate=8, num_layers=6, dropout=0.0, bn_size=4)
    x = torch.randn(1, 32, 4, 8, 8, requires_grad=True)
    ours, theirs = _kept_bytes(efficient, x, "BC block 32 in, growth 8, bn_size 4, 6 layers")
    buffer_bytes = 1 * (32 + 6 * 8) * 4 * 8 * 8 * 4
    assert ours <= buffer_bytes + _vector_bytes(32, 8, 6, bottleneck=32)
    assert ours <= theirs / 5


def test_bottleneck_block_layout():
    block = DenseBlock3d(8, growth_rate=4, num_layers=2, bn_size=4)
    keys = set(block.state_dict())
    assert "layers.1.bottleneck.conv.weight" in keys and "layers.1.conv.norm.running_var" in keys
    assert block.layers[1].bottleneck.conv.weight.shape == (16, 12, 1, 1, 1)
    assert block.layers[1].conv.conv.weight.shape == (4, 16, 3, 3, 3)
    assert block.out_channels == 16 and block.bottleneck_channels == 16


def test_state_dicts_are_interchangeable():
    efficient = DenseBlock3d(8, growth_rate=4, num_layers=3)
    naive = DenseBlock3d(8, growth_rate=4, num_layers=3, memory_efficient=False)
    assert set(efficient.state_dict()) == set(naive.state_dict())
    assert (
        "layers.2.norm.running_var" in efficient.state_dict()
        and "layers.0.conv.weight" in efficient.state_dict()
    )
    naive.load_state_dict(efficient.state_dict())
    efficient.eval(), naive.eval()
    x = torch.randn(1, 8, 3, 3, 3)
    assert torch.allclose(efficient(x), naive(x), atol=1e-6)


def test_out_channels():
    assert DenseBlock3d(48, 16, 4).out_channels == 112
    assert DenseBlock3d(48, 16, 4, return_input=False).out_channels == 64


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(in_channels=0), "in_channels 0"),
        (dict(in_channels=4, growth_rate=-1), "growth_rate -1"),
        (dict(in_channels=4, num_layers=1.5), "num_layers 1.5"),
        (dict(in_channels=4, dropout=1.0), "dropout 1.0"),
        (dict(in_channels=4, bn_size=-2), "bn_size -2 must be an int >= 0"),
    ],
)
def test_bad_settings_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DenseBlock3d(**kwargs)


def test_bad_input_raises():
    block = DenseBlock3d(4, growth_rate=4, num_layers=1)
    with pytest.raises(ValueError, match=r"\(N, 4, D, H, W\) input, got \(1, 5, 3, 3, 3\)"):
        block(torch.randn(1, 5, 3, 3, 3))
    with pytest.raises(ValueError, match=r"got \(4, 3, 3, 3\)"):
        block(torch.randn(4, 3, 3, 3))
