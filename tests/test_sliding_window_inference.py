"""sliding_window_inference against a float64 reference written here and against MONAI."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import prostate_kernels
from prostate_kernels import sliding_window_inference, use_backend

# float32 stitching of O(1) values vs a float64 reference: a few float32 ulps, far below this bound.
ATOL = 1e-5


# ---------------------------------------------------------------------------------- reference


def _axis_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis, MONAI's rule stated directly: every multiple of the stride that
    leaves room for a whole window, plus one window flush with the end."""
    if roi == size:
        return [0]
    stride = max(int(roi * (1 - overlap)), 1)
    return sorted({k * stride for k in range(size) if k * stride < size - roi} | {size - roi})


def _importance64(roi, mode, sigma_scale=0.125):
    if mode == "constant":
        return torch.ones(roi, dtype=torch.float64)
    weights = torch.ones(roi, dtype=torch.float64)
    for axis, size in enumerate(roi):
        x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        profile = torch.exp(-(x**2) / (2 * (sigma_scale * size) ** 2))
        shape = [1] * len(roi)
        shape[axis] = size
        weights = weights * profile.reshape(shape)
    return weights.clamp(min=max(weights.min().item(), 1e-3))


def reference_sliding_window(x, roi, predictor, overlap, mode, cval=0.0, padding_mode="constant"):
    """float64 sliding-window blending of predictor over x (N, C, D, H, W)."""
    x = x.double()
    size = x.shape[2:]
    missing = [max(r - s, 0) for r, s in zip(roi, size, strict=True)]
    pad = [p for m in reversed(missing) for p in (m // 2, m - m // 2)]
    if padding_mode == "constant":
        xp = torch.nn.functional.pad(x, pad, value=cval)
    else:
        xp = torch.nn.functional.pad(x, pad, mode=padding_mode)
    psize = xp.shape[2:]
    importance = _importance64(roi, mode)
    out = weight = None
    for n in range(x.shape[0]):
        per_axis = [_axis_starts(s, r, overlap) for s, r in zip(psize, roi, strict=True)]
        for z, y, w in itertools.product(*per_axis):
            region = (slice(z, z + roi[0]), slice(y, y + roi[1]), slice(w, w + roi[2]))
            pred = predictor(xp[n : n + 1, :, region[0], region[1], region[2]]).double()[0]
            if out is None:
                out = torch.zeros((x.shape[0], pred.shape[0], *psize), dtype=torch.float64)
                weight = torch.zeros((x.shape[0], 1, *psize), dtype=torch.float64)
            out[(n, slice(None), *region)] += pred * importance
            weight[(n, slice(None), *region)] += importance
    out = out / weight
    crop = tuple(slice(m // 2, m // 2 + s) for m, s in zip(missing, size, strict=True))
    return out[(slice(None), slice(None), *crop)]


def two_channel_predictor(windows: torch.Tensor) -> torch.Tensor:
    """A predictor that changes the channel count and is not flip-equivariant along W."""
    first = torch.sigmoid(1.7 * windows[:, :1] - 0.3)
    second = torch.cumsum(windows[:, -1:], dim=-1) / windows.shape[-1]
    return torch.cat([first, second], dim=1)


CASES = [  # (input shape N, C, D, H, W), roi
    ((1, 1, 13, 37, 29), (8, 16, 16)),  # odd sizes, not divisible by the stride
    ((2, 2, 11, 20, 18), (4, 8, 10)),  # N = 2, C = 2
    ((1, 1, 5, 9, 7), (8, 16, 16)),  # roi larger than the volume on every axis: padded, then cropped
    ((2, 1, 16, 12, 33), (16, 12, 8)),  # roi equal to the volume on two axes
]


@pytest.mark.parametrize("shape,roi", CASES)
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_matches_float64_reference(shape, roi, mode, overlap):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = sliding_window_inference(x, roi, 3, two_channel_predictor, overlap=overlap, mode=mode)
    expected = reference_sliding_window(x, roi, two_channel_predictor, overlap, mode)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert (ours.double() - expected).abs().max().item() < ATOL


@pytest.mark.parametrize("shape,roi", CASES)
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_matches_monai(shape, roi, mode, overlap):
    monai_inferers = pytest.importorskip("monai.inferers")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours = sliding_window_inference(x, roi, 4, two_channel_predictor, overlap=overlap, mode=mode)
    theirs = monai_inferers.sliding_window_inference(
        x, roi, 4, two_channel_predictor, overlap=overlap, mode=mode
    )
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < ATOL


def test_matches_monai_2d_and_sigma_per_axis():
    monai_inferers = pytest.importorskip("monai.inferers")
    x = torch.randn((2, 1, 45, 31), generator=torch.Generator().manual_seed(3))
    kwargs = dict(overlap=(0.5, 0.25), mode="gaussian", sigma_scale=(0.2, 0.1))
    ours = sliding_window_inference(x, (16, 12), 5, two_channel_predictor, **kwargs)
    theirs = monai_inferers.sliding_window_inference(x, (16, 12), 5, two_channel_predictor, **kwargs)
    assert ours.shape == theirs.shape == (2, 2, 45, 31)
    assert (ours - theirs).abs().max().item() < ATOL


@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate", "circular"])
def test_padding_modes(padding_mode):
    x = torch.randn((1, 1, 6, 10, 12), generator=torch.Generator().manual_seed(4))
    ours = sliding_window_inference(
        x, (8, 12, 8), 2, two_channel_predictor, mode="gaussian", padding_mode=padding_mode, cval=0.7
    )
    expected = reference_sliding_window(
        x, (8, 12, 8), two_channel_predictor, 0.5, "gaussian", 0.7, padding_mode
    )
    assert (ours.double() - expected).abs().max().item() < ATOL


def test_constant_padding_value_matches_monai():
    # (MONAI 1.6 passes cval to torch's pad for every mode, which torch rejects for the other modes.)
    monai_inferers = pytest.importorskip("monai.inferers")
    x = torch.randn((1, 1, 6, 10, 12), generator=torch.Generator().manual_seed(4))
    kwargs = dict(overlap=0.5, mode="gaussian", padding_mode="constant", cval=0.7)
    ours = sliding_window_inference(x, (8, 12, 8), 2, two_channel_predictor, **kwargs)
    theirs = monai_inferers.sliding_window_inference(x, (8, 12, 8), 2, two_channel_predictor, **kwargs)
    assert (ours - theirs).abs().max().item() < ATOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_agree(backend):
    """The PyTorch twin and the Triton kernels (interpreter on CPU) stitch like the default path."""
    x = torch.randn((2, 2, 9, 13, 11), generator=torch.Generator().manual_seed(5))
    expected = sliding_window_inference(x, (4, 8, 6), 3, two_channel_predictor, mode="gaussian")
    with use_backend(backend):
        got = sliding_window_inference(x, (4, 8, 6), 3, two_channel_predictor, mode="gaussian")
    assert (got - expected).abs().max().item() < 1e-6


def test_flip_axes_average_mirrored_predictions():
    x = torch.randn((1, 2, 8, 12, 10), generator=torch.Generator().manual_seed(6))
    flips = (0, 2)
    combos = [(), (2,), (4,), (2, 4)]  # tensor axes of every combination of spatial axes 0 and 2

    def mirrored(windows):
        preds = [torch.flip(two_channel_predictor(torch.flip(windows, c)), c) for c in combos]
        return sum(preds) / len(preds)

    ours = sliding_window_inference(x, (4, 8, 6), 2, two_channel_predictor, mode="gaussian", flip_axes=flips)
    expected = reference_sliding_window(x, (4, 8, 6), mirrored, 0.5, "gaussian")
    assert (ours.double() - expected).abs().max().item() < ATOL
    plain = sliding_window_inference(x, (4, 8, 6), 2, two_channel_predictor, mode="gaussian")
    assert (plain - ours).abs().max().item() > 1e-3  # cumsum along W is not mirror-symmetric


def test_flip_axes_calls_predictor_once_per_combination():
    calls = []

    def counting(windows):
        calls.append(windows.shape[0])
        return windows

    x = torch.randn((1, 1, 4, 8, 8))
    sliding_window_inference(x, (4, 8, 8), 1, counting, flip_axes=(0, 1, 2))
    assert len(calls) == 8  # one window, 2^3 mirrorings


@pytest.mark.parametrize(
    "shape, sw_batch_size, calls_expected",
    [
        ((1, 2, 4, 8, 6), 4, [4, 4]),  # one window, 8 mirror images: 4 per call
        ((1, 2, 4, 8, 6), 3, [3, 3, 2]),
        ((2, 2, 4, 8, 6), 4, [4, 4, 4, 4]),  # two windows: 2 mirror images per call
        ((1, 2, 4, 8, 12), 2, [2] * 8 + [2] * 4),  # 3 windows: a batch of 2 (1 image per call), then 1
    ],
)
def test_mirror_images_share_calls_up_to_sw_batch_size(shape, sw_batch_size, calls_expected):
    """Fewer windows than sw_batch_size: their mirror images fill the predictor calls (batch 1 is
    PyTorch's slow CPU conv3d path), never beyond sw_batch_size, and the average is the same as one call
    per mirror image."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    calls = []

    def counting(windows):
        calls.append(windows.shape[0])
        return two_channel_predictor(windows)

    combos = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]

    def mirrored(windows):
        preds = [torch.flip(two_channel_predictor(torch.flip(windows, c)), c) for c in combos]
        return sum(preds) / len(preds)

    ours = sliding_window_inference(
        x, (4, 8, 6), sw_batch_size, counting, mode="gaussian", flip_axes=(0, 1, 2)
    )
    assert calls == calls_expected
    expected = reference_sliding_window(x, (4, 8, 6), mirrored, 0.5, "gaussian")
    assert (ours.double() - expected).abs().max().item() < ATOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_predictions_accumulate_in_float32(dtype):
    x = torch.randn((1, 1, 12, 20, 20), generator=torch.Generator().manual_seed(7))
    reference = sliding_window_inference(x, (8, 8, 8), 4, two_channel_predictor, mode="gaussian")
    low = sliding_window_inference(
        x, (8, 8, 8), 4, lambda w: two_channel_predictor(w).to(dtype), mode="gaussian"
    )
    assert low.dtype == torch.float32
    # each window prediction is rounded once to the low dtype; blending does not add error beyond that
    eps = torch.finfo(dtype).eps
    assert (low - reference).abs().max().item() <= eps * reference.abs().max().item()


def test_fp16_predictions_do_not_overflow():
    """60000 is representable in float16; a float16 buffer summing 8 overlapping windows would be inf."""
    x = torch.zeros((1, 1, 16, 32, 32))
    big = sliding_window_inference(
        x, (8, 16, 16), 8, lambda w: torch.full_like(w, 60000.0, dtype=torch.float16)
    )
    assert torch.isfinite(big).all() and (big == 60000.0).all()


def test_progress_bar_counts_windows(capsys):
    x = torch.randn((1, 1, 8, 16, 16))
    sliding_window_inference(x, (4, 8, 8), 3, lambda w: w, progress=True)
    err = capsys.readouterr().err
    assert "sliding window" in err and "27/27" in err  # 3 x 3 x 3 windows


def test_device_arguments_and_output_layout():
    x = torch.randn((1, 1, 8, 16, 16), dtype=torch.float64)
    out = sliding_window_inference(x, (4, 8, 8), 2, lambda w: w, sw_device="cpu", device=torch.device("cpu"))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out.double(), x, atol=1e-6)  # identity predictor: blending reproduces the input


def test_none_roi_axis_takes_the_full_axis_and_int_roi_repeats():
    monai_inferers = pytest.importorskip("monai.inferers")
    x = torch.randn((1, 1, 6, 20, 20), generator=torch.Generator().manual_seed(8))
    ours = sliding_window_inference(x, (None, 8, 8), 2, two_channel_predictor)
    theirs = monai_inferers.sliding_window_inference(x, (6, 8, 8), 2, two_channel_predictor, overlap=0.5)
    assert (ours - theirs).abs().max().item() < ATOL
    cube = sliding_window_inference(x, 6, 2, two_channel_predictor)
    assert (
        cube - monai_inferers.sliding_window_inference(x, 6, 2, two_channel_predictor, overlap=0.5)
    ).abs().max() < ATOL


def test_paper_patch_size_window_count():
    """The paper's 64x64x16 patch on a 40x512x512 volume with overlap 0.5 gives 4 x 15 x 15 windows."""
    calls = []
    x = torch.zeros((1, 1, 40, 512, 512))
    sliding_window_inference(x, (16, 64, 64), 64, lambda w: calls.append(w.shape[0]) or w)
    assert sum(calls) == 900 == 4 * 15 * 15 and math.ceil(900 / 64) == len(calls)


# ------------------------------------------------------------------------------------ bad input

BAD_CALLS = [
    (dict(inputs=torch.zeros(8, 8, 8)), ValueError, "(8, 8, 8)"),
    (dict(inputs=[1.0]), TypeError, "list"),
    (dict(inputs=torch.zeros(1, 1, 8, 8, 8, dtype=torch.int64)), TypeError, "int64"),
    (dict(roi_size=(4.5, 4, 4)), ValueError, "(4.5, 4, 4)"),
    (dict(roi_size=(4, "4", 4)), ValueError, "(4, '4', 4)"),
    (dict(roi_size=(4, 4)), ValueError, "(4, 4)"),
    (dict(overlap=1.0), ValueError, "overlap 1.0"),
    (dict(overlap=-0.1), ValueError, "overlap -0.1"),
    (dict(mode="linear"), ValueError, "'linear'"),
    (dict(padding_mode="edge"), ValueError, "'edge'"),
    (dict(sw_batch_size=0), ValueError, "sw_batch_size 0"),
    (dict(sigma_scale=0.0, mode="gaussian"), ValueError, "sigma_scale 0.0"),
    (dict(predictor="model"), TypeError, "str"),
    (dict(predictor=lambda w: w[:, 0]), ValueError, "predictor returned shape (2, 4, 4, 4) for 2 windows"),
    (dict(predictor=lambda w: w[:1]), ValueError, "predictor returned shape (1, 1, 4, 4, 4) for 2 windows"),
    (dict(predictor=lambda w: w[:, :, :0]), ValueError, "with every S >= 1"),
    (dict(predictor=lambda w: ()), ValueError, "predictor returned an empty tuple"),
    (dict(predictor=lambda w: {}), ValueError, "predictor returned an empty dict"),
    (dict(predictor=lambda w: {1: w, "a": w}), TypeError, "keys cannot be sorted ([1, 'a'])"),
    (dict(predictor=lambda w: (w, w.numpy())), TypeError, "predictor output 1 must be a torch.Tensor"),
    (dict(predictor=lambda w: {"seg": w, "aux": w > 0}), TypeError, "predictor output 'aux' is torch.bool"),
    (dict(predictor=lambda w: [w, w[:, :, :, :, :1, None]]), ValueError, "predictor output 1 returned shape"),
    (dict(predictor=lambda w: w.numpy()), TypeError, "ndarray"),
    (dict(predictor=lambda w: w > 0), TypeError, "bool"),
    (dict(flip_axes=(3,)), ValueError, "flip_axes (3,)"),
    (dict(flip_axes=(1, 1)), ValueError, "flip_axes (1, 1)"),
]


@pytest.mark.parametrize("overrides,error,needle", BAD_CALLS)
def test_bad_input_raises_naming_the_value(overrides, error, needle):
    kwargs = dict(
        inputs=torch.zeros(1, 1, 8, 8, 8), roi_size=(4, 4, 4), sw_batch_size=2, predictor=lambda w: w
    )
    kwargs.update(overrides)
    with pytest.raises(error) as info:
        sliding_window_inference(**kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize("roi", [10**12, (4, 4, 10**12)])
def test_a_window_that_pads_past_the_devices_memory_is_named(roi):
    """Padding up to such a window overflowed torch's size computation or failed in its allocator."""
    with pytest.raises(ValueError) as info:
        sliding_window_inference(torch.zeros(1, 1, 8, 8, 8), roi, 1, lambda w: w)
    assert f"roi_size {roi!r} pads inputs of size (1, 1, 8, 8, 8) to" in str(info.value)
    assert "GiB of memory of cpu" in str(info.value)
    # a bad argument and an out-of-memory condition: caught as either (the CLI reports it as the latter)
    assert isinstance(info.value, prostate_kernels.RoiTooLargeError) and isinstance(info.value, MemoryError)


def test_the_padded_size_check_counts_the_padded_input_exactly(monkeypatch):
    """Memory of exactly the padded input's bytes (2 x 3 x 8 x 9 x 10 float32) lets the call run."""
    from prostate_kernels import inference

    x = torch.randn(2, 3, 5, 9, 4)
    monkeypatch.setattr(inference, "memory_bytes", lambda device: 2 * 3 * 8 * 9 * 10 * 4)
    assert sliding_window_inference(x, (8, 6, 10), 1, lambda w: w).shape == x.shape
    monkeypatch.setattr(inference, "memory_bytes", lambda device: 2 * 3 * 8 * 9 * 10 * 4 - 1)
    with pytest.raises(ValueError, match=r"to \(8, 9, 10\) voxels"):
        sliding_window_inference(x, (8, 6, 10), 1, lambda w: w)


@pytest.mark.parametrize("roi", [(4, -1, 7), (0, 8, 0), (-3, -3, -3), (None, 5, -1)])
def test_non_positive_roi_entries_take_the_whole_axis_as_monai(roi):
    """MONAI's fall_back_tuple: an entry <= 0 (or None) is that axis' full size."""
    x = torch.randn((2, 2, 11, 20, 18), generator=torch.Generator().manual_seed(5))
    full = tuple(s if r is None or r <= 0 else r for r, s in zip(roi, x.shape[2:], strict=True))
    ours = sliding_window_inference(x, roi, 3, two_channel_predictor, overlap=0.5, mode="gaussian")
    expected = reference_sliding_window(x, full, two_channel_predictor, 0.5, "gaussian")
    assert (ours.double() - expected).abs().max().item() < ATOL
    monai_inferers = pytest.importorskip("monai.inferers")
    if None not in roi:
        theirs = monai_inferers.sliding_window_inference(
            x, roi, 3, two_channel_predictor, overlap=0.5, mode="gaussian"
        )
        assert (ours - theirs).abs().max().item() < ATOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_window_bounds_are_checked_once_on_the_host_not_per_batch(backend, monkeypatch):
    """Reading starts' values on a GPU waits for the device: the loop's ops check only their layout, after
    one bounds check of every window on the host (the result is unchanged)."""
    import prostate_kernels.inference as inference
    import prostate_kernels.ops.window_ops as window_ops

    calls = []
    original = window_ops.check_starts

    def counting(op, starts, volume_shape, roi, bounds=True):
        calls.append((op, bounds, starts.device.type))
        return original(op, starts, volume_shape, roi, bounds)

    monkeypatch.setattr(window_ops, "check_starts", counting)
    monkeypatch.setattr(inference, "check_starts", counting)
    x = torch.randn((2, 2, 9, 13, 11), generator=torch.Generator().manual_seed(5))
    expected = sliding_window_inference(x, (4, 8, 6), 3, two_channel_predictor, mode="gaussian")
    calls.clear()
    with use_backend(backend):
        got = sliding_window_inference(x, (4, 8, 6), 3, two_channel_predictor, mode="gaussian")
    assert (got - expected).abs().max().item() < 1e-6
    bounds_checked = [c for c in calls if c[1]]
    loop_ops = [c for c in calls if c[0] in ("window_gather", "window_accumulate_")]
    assert bounds_checked[0][0] == "sliding_window_inference" and bounds_checked[0][2] == "cpu"
    assert len(loop_ops) >= 4 and not any(bounds for _, bounds, _ in loop_ops)  # several batches, no reads
    assert [c[0] for c in bounds_checked] == ["sliding_window_inference", "window_normalize_by_positions_"]


def test_window_ops_still_refuse_starts_outside_the_volume_when_called_directly():
    from prostate_kernels.ops.window_ops import window_ops_for

    with use_backend("torch"):
        ops = window_ops_for(torch.device("cpu"))
        with pytest.raises(ValueError, match="reaches outside the volume"):
            ops.gather(torch.zeros((1, 1, 4, 4, 4)), torch.tensor([[0, 3, 0, 0]]), [2, 2, 2])
