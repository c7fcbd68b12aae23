"""sliding_window_inference with predictors of several outputs (list, tuple, dict), each at its own
resolution, against MONAI's sliding_window_inference (the behaviour it defines) and against
single-output runs of ours."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prostate_kernels import sliding_window_inference, use_backend

ATOL = 1e-5  # float32 stitching of O(1) values, as tests/test_sliding_window_inference.py


def segmentation(windows: torch.Tensor) -> torch.Tensor:
    """(B, 2, *roi): changes the channel count and is not flip-equivariant along the last axis."""
    return torch.cat([torch.sigmoid(1.7 * windows[:, :1] - 0.3), torch.cumsum(windows, -1)[:, :1] / 7], 1)


def half(windows: torch.Tensor) -> torch.Tensor:
    """(B, 1, *roi / 2): a deep-supervision-like head at half the resolution (roi even)."""
    return F.avg_pool3d(windows[:, :1] * 2 + 1, 2) if windows.dim() == 5 else F.avg_pool2d(windows[:, :1], 2)


def double(windows: torch.Tensor) -> torch.Tensor:
    """(B, 1, *roi * 2): an output at twice the resolution."""
    return F.interpolate(torch.tanh(windows[:, :1]), scale_factor=2, mode="nearest")


def three_quarters(windows: torch.Tensor) -> torch.Tensor:
    """(B, 3, *roi * 3/4) (roi divisible by 4): a zoom whose window positions are not whole voxels."""
    size = [s * 3 // 4 for s in windows.shape[2:]]
    return F.interpolate(windows.repeat(1, 3, 1, 1, 1)[:, :3] ** 2, size=size, mode="trilinear")


def monai_sliding_window(*args, **kwargs):
    return pytest.importorskip("monai.inferers").sliding_window_inference(*args, **kwargs)


def assert_close(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    if isinstance(ours, dict):
        assert list(ours) == list(theirs)
        ours, theirs = list(ours.values()), list(theirs.values())
    if isinstance(ours, torch.Tensor):
        ours, theirs = [ours], [theirs]
    assert len(ours) == len(theirs)
    for mine, other in zip(ours, theirs, strict=True):
        assert mine.dtype == torch.float32 and mine.shape == other.shape
        assert (mine - other).abs().max().item() < ATOL


SHAPES = [  # (input shape, roi, overlap)
    ((1, 1, 13, 37, 29), (8, 16, 16), 0.25),  # odd sizes, strides that do not divide them
    ((2, 2, 11, 20, 18), (4, 8, 12), 0.5),  # N = 2, C = 2
    ((1, 1, 5, 9, 7), (8, 16, 16), 0.5),  # roi larger than the volume: padded, then cropped
    ((1, 1, 12, 19, 23), (8, 12, 8), 0.3),  # strides 5, 8, 5: half-resolution starts fall between voxels
]


@pytest.mark.parametrize("shape,roi,overlap", SHAPES)
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize(
    "heads",
    [(segmentation, half), (half,), (segmentation, double), (three_quarters,)],
    ids=lambda h: "+".join(f.__name__ for f in h),  # fmt: skip
)
def test_tuple_outputs_at_their_own_resolution_match_monai(shape, roi, overlap, mode, heads):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))

    def predictor(windows):
        return tuple(head(windows) for head in heads)

    ours = sliding_window_inference(x, roi, 3, predictor, overlap=overlap, mode=mode)
    theirs = monai_sliding_window(x, roi, 3, predictor, overlap=overlap, mode=mode)
    assert_close(ours, theirs)
    if len(heads) > 1:  # each output is stitched as if it were the only one
        for head, got in zip(heads, ours, strict=True):
            alone = sliding_window_inference(x, roi, 3, head, overlap=overlap, mode=mode)
            assert torch.equal(got, alone)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_dict_outputs_come_back_with_sorted_keys_as_in_monai(mode):
    x = torch.randn((2, 1, 9, 21, 17), generator=torch.Generator().manual_seed(8))
    keys = ("logits", "pool")  # the full-resolution output sorts first: MONAI 1.6 fails the other way round

    def predictor(windows):
        return {keys[0]: segmentation(windows), keys[1]: half(windows)}

    ours = sliding_window_inference(x, (4, 8, 8), 4, predictor, mode=mode)
    theirs = monai_sliding_window(x, (4, 8, 8), 4, predictor, overlap=0.5, mode=mode)
    assert list(ours) == sorted(keys)
    assert_close(ours, theirs)
    assert ours[keys[0]].shape == (2, 2, 9, 21, 17) and ours[keys[1]].shape == (2, 1, 4, 10, 8)


def test_a_list_of_one_output_gives_its_tensor_and_a_list_of_two_a_tuple():
    x = torch.randn((1, 1, 7, 10, 9), generator=torch.Generator().manual_seed(9))
    single = sliding_window_inference(x, 4, 2, segmentation)
    assert torch.equal(sliding_window_inference(x, 4, 2, lambda w: [segmentation(w)]), single)
    both = sliding_window_inference(x, 4, 2, lambda w: [segmentation(w), segmentation(w) + 1])
    assert isinstance(both, tuple) and len(both) == 2
    assert torch.equal(both[0], single) and torch.allclose(both[1], single + 1, atol=ATOL)
    theirs = monai_sliding_window(x, 4, 2, lambda w: [segmentation(w), segmentation(w) + 1], overlap=0.5)
    assert_close(both, theirs)


def test_2d_outputs_at_two_resolutions_match_monai():
    x = torch.randn((2, 1, 45, 31), generator=torch.Generator().manual_seed(3))

    def predictor(windows):
        return segmentation(windows), half(windows)

    kwargs = dict(overlap=(0.5, 0.25), mode="gaussian", sigma_scale=(0.2, 0.1))
    ours = sliding_window_inference(x, (16, 12), 5, predictor, **kwargs)
    assert_close(ours, monai_sliding_window(x, (16, 12), 5, predictor, **kwargs))
    assert ours[0].shape == (2, 2, 45, 31) and ours[1].shape == (2, 1, 22, 15)


def test_order_of_outputs_does_not_change_their_weights():
    """MONAI 1.6 resizes an output's importance map from the previous output's, and not at all for an
    output of the window's size: [half, full] fails there (its half-size map meets the full-size
    output). Ours resizes every map from the window's own, so each output is the same whatever the
    order (the README's list of differences)."""
    x = torch.randn((1, 1, 13, 21, 19), generator=torch.Generator().manual_seed(10))
    forward = sliding_window_inference(x, 8, 2, lambda w: (segmentation(w), half(w)), mode="gaussian")
    backward = sliding_window_inference(x, 8, 2, lambda w: (half(w), segmentation(w)), mode="gaussian")
    assert torch.equal(forward[0], backward[1]) and torch.equal(forward[1], backward[0])
    with pytest.raises(RuntimeError, match="must match the size"):
        monai_sliding_window(x, 8, 2, lambda w: (half(w), segmentation(w)), overlap=0.5, mode="gaussian")

    # a quarter-resolution output after a half one: MONAI weighs it with a map resized from the half
    # one's, not as when it is alone; ours weighs it as when alone, which MONAI matches
    def quarter(windows):
        return F.avg_pool3d(windows, 4)

    kwargs = dict(overlap=0.5, mode="gaussian")
    ours = sliding_window_inference(x, 8, 2, lambda w: (segmentation(w), half(w), quarter(w)), **kwargs)
    theirs = monai_sliding_window(x, 8, 2, lambda w: (segmentation(w), half(w), quarter(w)), **kwargs)
    alone = monai_sliding_window(x, 8, 2, quarter, **kwargs)
    assert (ours[2] - alone).abs().max().item() < ATOL
    assert (theirs[2] - alone).abs().max().item() > 1e-3


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_mirroring_averages_every_output_as_it_does_one(form):
    x = torch.randn((1, 1, 9, 13, 11), generator=torch.Generator().manual_seed(11))

    def predictor(windows):
        seg, aux = segmentation(windows), half(windows)
        return (seg, aux) if form == "tuple" else {"seg": seg, "aux": aux}

    ours = sliding_window_inference(x, (4, 8, 6), 3, predictor, mode="gaussian", flip_axes=(0, 2))
    seg, aux = ours if form == "tuple" else (ours["seg"], ours["aux"])
    for head, got in ((segmentation, seg), (half, aux)):
        alone = sliding_window_inference(x, (4, 8, 6), 3, head, mode="gaussian", flip_axes=(0, 2))
        assert (got - alone).abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_stitch_outputs_at_other_resolutions_alike(backend):
    """The PyTorch twin and the Triton kernels (interpreter on CPU) against the default (C++) path."""
    x = torch.randn((2, 1, 9, 13, 11), generator=torch.Generator().manual_seed(12))

    def predictor(windows):
        return segmentation(windows), half(windows), double(windows)

    expected = sliding_window_inference(x, (4, 8, 6), 3, predictor, mode="gaussian")
    with use_backend(backend):
        got = sliding_window_inference(x, (4, 8, 6), 3, predictor, mode="gaussian")
    for mine, other in zip(got, expected, strict=True):
        assert (mine - other).abs().max().item() < 1e-6


CHANGING = [  # (what the first call returns, what later calls return, the message)
    (lambda w: (w, w), lambda w: w, "predictor returned a tensor; earlier windows gave a sequence of 2"),
    (lambda w: {"a": w}, lambda w: {"b": w}, "keys ['b']; earlier windows gave a dict with keys ['a']"),
    (lambda w: (w, w), lambda w: (w, w[:, :, :2]), "predictor output 1 returned shape (2, 1, 2, 4, 4) for 2"),
]


@pytest.mark.parametrize("first,later,needle", CHANGING)
def test_a_predictor_that_changes_its_outputs_between_calls_is_named(first, later, needle):
    calls = []

    def predictor(windows):
        calls.append(1)
        return first(windows) if len(calls) == 1 else later(windows)

    with pytest.raises(ValueError) as info:
        sliding_window_inference(torch.zeros(1, 1, 8, 8, 8), 4, 2, predictor, overlap=0.5)
    assert needle in str(info.value)


def test_a_monai_metatensor_comes_back_with_its_meta_data_as_from_monai():
    """MONAI pipelines hand MetaTensors (LoadImage) to sliding_window_inference and save or invert its
    result by the affine it carries: a plain tensor would lose where the voxels lie."""
    monai_data = pytest.importorskip("monai.data")
    affine = torch.tensor(
        [[0.0, 0.0, 3.0, -40.0], [0.0, 0.6, 0.0, 12.0], [-0.6, 0.0, 0.0, 7.0], [0, 0, 0, 1.0]]
    )
    x = monai_data.MetaTensor(
        torch.randn((1, 1, 9, 21, 17), generator=torch.Generator().manual_seed(13)),
        affine=affine,
        meta={"filename_or_obj": "Case07.mhd"},
    )
    seen = []

    def predictor(windows):
        seen.append(type(windows))
        return segmentation(windows)

    ours = sliding_window_inference(x, (4, 8, 8), 3, predictor, mode="gaussian")
    theirs = monai_sliding_window(x, (4, 8, 8), 3, segmentation, overlap=0.5, mode="gaussian")
    assert type(ours) is type(theirs) is monai_data.MetaTensor
    assert torch.equal(ours.affine, theirs.affine) and torch.equal(ours.affine, affine.double())
    assert ours.meta["filename_or_obj"] == theirs.meta["filename_or_obj"] == "Case07.mhd"
    assert (ours.as_tensor() - theirs.as_tensor()).abs().max().item() < ATOL
    assert set(seen) == {torch.Tensor}  # stitched as a plain tensor: no MetaTensor bookkeeping per op
    heads = sliding_window_inference(x, (4, 8, 8), 3, lambda w: {"logits": segmentation(w), "pool": half(w)})
    their_heads = monai_sliding_window(
        x, (4, 8, 8), 3, lambda w: {"logits": segmentation(w), "pool": half(w)}, overlap=0.5
    )
    assert {k: type(v) for k, v in heads.items()} == {k: type(v) for k, v in their_heads.items()}
    plain = sliding_window_inference(x.as_tensor(), (4, 8, 8), 3, segmentation, mode="gaussian")
    assert type(plain) is torch.Tensor and torch.equal(plain, ours.as_tensor())
