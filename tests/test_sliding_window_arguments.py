"""sliding_window_inference's MONAI arguments beyond the window settings: roi_weight_map, with_coord,
extra predictor arguments (and the `condition` keyword MONAI cuts into windows), buffer_steps/buffer_dim
and process_fn, each against MONAI's sliding_window_inference called the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prostate_kernels import sliding_window_inference

ATOL = 1e-5  # float32 stitching of O(1) values, as tests/test_sliding_window_inference.py


def monai_sliding_window(*args, **kwargs):
    return pytest.importorskip("monai.inferers").sliding_window_inference(*args, **kwargs)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < ATOL


def net(windows: torch.Tensor) -> torch.Tensor:
    """(B, 2, *roi), not flip-equivariant along the last axis: window placement and weights show."""
    return torch.cat([torch.sigmoid(1.3 * windows[:, :1]), torch.cumsum(windows, -1)[:, :1] / 5], 1)


def random_weights(roi: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(roi, generator=torch.Generator().manual_seed(seed)) + 0.05


# --------------------------------------------------------------------------------------- roi_weight_map

WEIGHTED = [  # (input shape, roi, overlap)
    ((1, 1, 13, 37, 29), (8, 16, 16), 0.25),
    ((2, 2, 11, 20, 18), (4, 8, 12), 0.5),
    ((1, 1, 5, 9, 7), (8, 16, 16), 0.5),  # padded to the window, then cropped
]


@pytest.mark.parametrize(("shape", "roi", "overlap"), WEIGHTED)
@pytest.mark.parametrize("form", ["roi", "1,1,roi", "numpy"])
def test_roi_weight_map_equals_monai(shape, roi, overlap, form) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    weights = random_weights(roi)
    given = {"roi": weights, "1,1,roi": weights[None, None], "numpy": weights.numpy()}[form]
    ours = sliding_window_inference(x, roi, 3, net, overlap, roi_weight_map=given)
    theirs = monai_sliding_window(x, roi, 3, net, overlap, roi_weight_map=weights)
    assert_close(ours, theirs)
    # the weights do count where windows overlap: the mode's own (constant) map gives another result
    if all(size > r for size, r in zip(shape[2:], roi, strict=True)):
        assert (ours - sliding_window_inference(x, roi, 3, net, overlap)).abs().max().item() > 1e-3


def test_roi_weight_map_with_a_half_resolution_output_and_in_2d_equals_monai() -> None:
    x = torch.randn((1, 1, 12, 20, 16), generator=torch.Generator().manual_seed(2))
    roi = (4, 8, 8)
    weights = random_weights(roi, 3)

    def two_heads(windows):
        return net(windows), F.avg_pool3d(windows, 2)

    ours = sliding_window_inference(x, roi, 2, two_heads, 0.5, roi_weight_map=weights)
    theirs = monai_sliding_window(x, roi, 2, two_heads, 0.5, roi_weight_map=weights)
    for mine, other in zip(ours, theirs, strict=True):
        assert_close(mine, other)
    image, roi_2d = x[:, :, 0], (8, 8)
    ours_2d = sliding_window_inference(image, roi_2d, 2, net, 0.5, roi_weight_map=weights[0])
    assert_close(ours_2d, monai_sliding_window(image, roi_2d, 2, net, 0.5, roi_weight_map=weights[0]))


def test_roi_weight_map_with_zeros_that_every_voxel_escapes_equals_monai() -> None:
    """Zero weight on an inner plane of the window: at overlap 0.75 (stride 1) every voxel still gets
    weight from a neighbouring window."""
    x = torch.randn((1, 1, 6, 7, 9), generator=torch.Generator().manual_seed(4))
    roi = (4, 4, 4)
    weights = random_weights(roi)
    weights[:, :, 1] = 0
    ours = sliding_window_inference(x, roi, 4, net, 0.75, roi_weight_map=weights)
    assert_close(ours, monai_sliding_window(x, roi, 4, net, 0.75, roi_weight_map=weights))


def test_roi_weight_map_leaving_a_voxel_without_weight_is_refused_where_monai_gives_nan() -> None:
    x = torch.randn((1, 1, 4, 4, 7), generator=torch.Generator().manual_seed(5))
    roi = (4, 4, 4)  # windows at x = 0 and 3: voxel x = 0 lies in the first window's plane 0 only
    weights = torch.ones(roi)
    weights[:, :, 0] = 0
    message = r"roi_weight_map is 0 wherever the windows cover voxel \(z, y, x\) = \(0, 0, 0\) of predictor's"
    with pytest.raises(ValueError, match=message):
        sliding_window_inference(x, roi, 2, net, 0.5, roi_weight_map=weights)
    theirs = monai_sliding_window(x, roi, 2, net, 0.5, roi_weight_map=weights)
    assert torch.isnan(theirs[0, 0, 0, 0, 0]) and not torch.isnan(theirs[..., 1:]).any()
    # 2-D: the voxel named by its two axes
    with pytest.raises(ValueError, match=r"cover voxel \(y, x\) = \(0, 0\) of predictor's result"):
        sliding_window_inference(x[:, :, 0], roi[1:], 2, net, 0.5, roi_weight_map=weights[0])


BAD_WEIGHTS = [
    (
        torch.ones(4, 4),
        ValueError,
        r"roi_weight_map has shape \(4, 4\); expected the window's size \(4, 4, 4\)",
    ),
    (torch.ones(2, 1, 4, 4, 4), ValueError, r"has shape \(2, 1, 4, 4, 4\)"),
    (-torch.ones(4, 4, 4), ValueError, r"must be finite and >= 0: it holds -1.0 at \(0, 0, 0\)"),
    (torch.full((4, 4, 4), float("nan")), ValueError, r"must be finite and >= 0: it holds nan"),
    (torch.zeros(4, 4, 4), ValueError, r"roi_weight_map is 0 everywhere"),
    (torch.ones(4, 4, 4, dtype=torch.bool), TypeError, r"must hold real numbers, got torch.bool"),
    ("ones", TypeError, r"roi_weight_map must be a tensor of the window's size \(4, 4, 4\), got str"),
]


@pytest.mark.parametrize(("weights", "error", "message"), BAD_WEIGHTS)
def test_bad_roi_weight_map_is_refused_naming_it(weights, error, message) -> None:
    with pytest.raises(error, match=message):
        sliding_window_inference(torch.randn(1, 1, 6, 6, 6), 4, 2, net, roi_weight_map=weights)


# ------------------------------------------------------------------------------------------ with_coord


def recording(calls: list):
    """A predictor(windows, coords) that records its coordinates and uses them (adds the window's z)."""

    def predict(windows, coords):
        calls.append([tuple((s.start, s.stop) for s in c) for c in coords])
        assert len(coords) == windows.shape[0]
        z = torch.tensor([float(c[2].start) for c in coords]).reshape(-1, *[1] * (windows.dim() - 1))
        return net(windows) + z

    return predict


@pytest.mark.parametrize(("shape", "roi"), [((2, 1, 9, 13, 11), (4, 8, 8)), ((1, 1, 3, 5, 6), (4, 8, 8)),
                                            ((2, 1, 13, 11), (8, 8))])  # fmt: skip
def test_with_coord_passes_monais_coordinates(shape, roi) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    ours_calls: list = []
    theirs_calls: list = []
    ours = sliding_window_inference(x, roi, 3, recording(ours_calls), 0.4, "gaussian", with_coord=True)
    theirs = monai_sliding_window(x, roi, 3, recording(theirs_calls), 0.4, "gaussian", with_coord=True)
    assert ours_calls == theirs_calls and ours_calls
    assert_close(ours, theirs)


def test_with_coord_coordinates_locate_each_window_in_the_inputs() -> None:
    x = torch.randn((2, 2, 10, 12, 9), generator=torch.Generator().manual_seed(7))

    def check(windows, coords):
        for window, where in zip(windows, coords, strict=True):
            assert torch.equal(window, x[tuple(where)][0])
        return windows

    out = sliding_window_inference(x, (4, 6, 5), 4, check, 0.3, with_coord=True)
    assert torch.allclose(out, x, atol=1e-6)


def test_with_coord_and_mirroring_repeat_the_coordinates_for_each_mirror_image() -> None:
    x = torch.randn((1, 1, 8, 8, 8), generator=torch.Generator().manual_seed(8))
    seen: list = []

    def predict(windows, coords):
        seen.append(len(coords))
        assert len(coords) == windows.shape[0]
        return windows * 2

    out = sliding_window_inference(x, 8, 4, predict, with_coord=True, flip_axes=(0, 1))
    assert seen == [4] and torch.allclose(out, 2 * x, atol=1e-6)  # one window, four mirror images


# ----------------------------------------------------------------------- extra arguments and condition


def scaled(windows, factor, *, offset=0.0):
    return net(windows) * factor + offset


def test_extra_positional_and_keyword_arguments_reach_the_predictor_as_in_monai() -> None:
    x = torch.randn((1, 1, 9, 14, 12), generator=torch.Generator().manual_seed(9))
    roi = (4, 8, 8)
    # MONAI's positional order up to with_coord, then the predictor's own arguments
    positional = (
        0.25,
        "gaussian",
        0.125,
        "constant",
        0.0,
        None,
        None,
        False,
        None,
        None,
        None,
        -1,
        False,
        3.0,
    )
    ours = sliding_window_inference(x, roi, 2, scaled, *positional, offset=0.5)
    theirs = monai_sliding_window(x, roi, 2, scaled, *positional, offset=0.5)
    assert_close(ours, theirs)
    assert_close(ours, sliding_window_inference(x, roi, 2, net, 0.25, "gaussian") * 3 + 0.5)


def test_a_misspelt_argument_reaching_the_predictor_is_named_in_its_error() -> None:
    """Arguments sliding_window_inference does not take go to the predictor (as in MONAI): the
    predictor's TypeError says which ones it was given."""
    message = r"unexpected keyword argument 'overlaps' .*the keyword argument\(s\) \['overlaps'\]"
    with pytest.raises(TypeError, match=message):
        sliding_window_inference(torch.randn(1, 1, 6, 6, 6), 4, 2, net, overlaps=0.5)


def conditioned(windows, condition):
    return net(windows) * (1 + condition.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
@pytest.mark.parametrize(("shape", "roi"), [((2, 1, 9, 13, 11), (4, 8, 8)), ((1, 1, 3, 5, 6), (4, 8, 8)),
                                            ((1, 1, 13, 11), (8, 8))])  # fmt: skip
def test_condition_is_cut_into_the_windows_as_in_monai(shape, roi, dtype) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(10))
    condition = torch.randint(0, 3, (shape[0], 2, *shape[2:]), generator=torch.Generator().manual_seed(11))
    condition = condition.to(dtype)
    seen: list = []

    def predict(windows, condition):
        seen.append(condition.dtype)
        return conditioned(windows, condition[:, :1])

    ours = sliding_window_inference(x, roi, 3, predict, 0.5, "gaussian", condition=condition)
    theirs = monai_sliding_window(x, roi, 3, predict, 0.5, "gaussian", condition=condition)
    assert_close(ours, theirs)
    assert set(seen) == {dtype}


def test_condition_is_mirrored_with_its_windows() -> None:
    """An elementwise predictor of (windows, condition) is mirror-equivariant only if the condition is
    flipped with the windows: then mirroring changes nothing."""
    x = torch.randn((1, 1, 9, 13, 11), generator=torch.Generator().manual_seed(12))
    condition = torch.randn((1, 1, 9, 13, 11), generator=torch.Generator().manual_seed(13))

    def elementwise(windows, condition):
        return torch.sigmoid(windows * 2 + condition)

    plain = sliding_window_inference(x, (4, 8, 8), 2, elementwise, 0.5, condition=condition)
    mirrored = sliding_window_inference(
        x, (4, 8, 8), 2, elementwise, 0.5, condition=condition, flip_axes=(0, 2)
    )
    assert torch.allclose(plain, mirrored, atol=1e-6)
    assert torch.allclose(plain, torch.sigmoid(x * 2 + condition), atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 6, 6), (2, 1, 6, 6, 6), (1, 1, 6, 6, 5), (1, 0, 6, 6, 6)])
def test_condition_of_another_size_is_refused_naming_its_shape(shape) -> None:
    condition = torch.ones(shape)
    with pytest.raises(
        ValueError, match=r"condition has shape .*expected \(N, C', \*spatial\) = \(1, C' >= 1, 6, 6, 6\)"
    ):
        sliding_window_inference(torch.randn(1, 1, 6, 6, 6), 4, 2, conditioned, condition=condition)
    with pytest.raises(TypeError, match="condition must be a torch.Tensor, got ndarray"):
        sliding_window_inference(
            torch.randn(1, 1, 6, 6, 6), 4, 2, conditioned, condition=np.ones((1, 1, 6, 6, 6))
        )


# ----------------------------------------------------------------------------- buffering, process_fn


@pytest.mark.parametrize(("buffer_steps", "buffer_dim"), [(1, -1), (2, 0), (3, 1)])
def test_buffer_steps_change_nothing_and_equal_monais_buffered_result(buffer_steps, buffer_dim) -> None:
    x = torch.randn((2, 1, 10, 17, 13), generator=torch.Generator().manual_seed(14))
    roi = (4, 8, 8)
    ours = sliding_window_inference(
        x, roi, 3, net, 0.5, "gaussian", buffer_steps=buffer_steps, buffer_dim=buffer_dim
    )
    assert torch.equal(ours, sliding_window_inference(x, roi, 3, net, 0.5, "gaussian"))
    theirs = monai_sliding_window(
        x, roi, 3, net, 0.5, "gaussian", buffer_steps=buffer_steps, buffer_dim=buffer_dim
    )
    assert_close(ours, theirs)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"buffer_steps": 2, "buffer_dim": 3}, ValueError, r"buffer_dim 3 must be in \[-3, 3\)"),
    ({"buffer_steps": 2, "buffer_dim": -4}, ValueError, r"buffer_dim -4 must be in \[-3, 3\)"),
    ({"buffer_steps": 1.5}, TypeError, r"buffer_steps 1.5 must be None or an int"),
    ({"buffer_dim": "z"}, TypeError, r"buffer_dim 'z' must be an int"),
    ({"process_fn": lambda out, win, w: (out, w)}, TypeError, r"process_fn .* is not supported"),
])  # fmt: skip
def test_bad_buffering_and_process_fn_are_refused_naming_them(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        sliding_window_inference(torch.randn(1, 1, 6, 6, 6), 4, 2, net, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_agree_with_weights_coordinates_and_condition(backend) -> None:
    """The PyTorch twin and the Triton kernels (interpreter on CPU) against the default (C++) path, with a
    zero-holding roi_weight_map, coordinates, a condition and mirroring at once."""
    from prostate_kernels import use_backend

    x = torch.randn((2, 1, 9, 13, 11), generator=torch.Generator().manual_seed(15))
    condition = torch.randn((2, 1, 9, 13, 11), generator=torch.Generator().manual_seed(16))
    weights = random_weights((4, 8, 6))
    weights[2] = 0

    def predict(windows, coords, condition):
        z = torch.tensor([float(c[2].start) for c in coords]).reshape(-1, 1, 1, 1, 1)
        return conditioned(windows, condition) + z, F.avg_pool3d(windows, 2)

    def run():
        extras = {"roi_weight_map": weights, "with_coord": True, "condition": condition, "flip_axes": (1,)}
        return sliding_window_inference(x, (4, 8, 6), 3, predict, 0.75, **extras)

    expected = run()
    with use_backend(backend):
        got = run()
    for mine, other in zip(got, expected, strict=True):
        assert (mine - other).abs().max().item() < 1e-6
