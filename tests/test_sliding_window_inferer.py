"""SlidingWindowInferer against MONAI's SlidingWindowInferer built with the same arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import prostate_kernels.inferer as inferer_module
from prostate_kernels import SlidingWindowInferer, sliding_window_inference

ATOL = 1e-5  # float32 stitching of O(1) values, as tests/test_sliding_window_inference.py


def monai_inferer(*args, **kwargs):
    return pytest.importorskip("monai.inferers").SlidingWindowInferer(*args, **kwargs)


def net(windows: torch.Tensor) -> torch.Tensor:
    """(B, 2, *roi), not flip-equivariant along the last axis."""
    return torch.cat([torch.sigmoid(1.3 * windows[:, :1]), torch.cumsum(windows, -1)[:, :1] / 5], 1)


def heads(windows, scale, coords=None, *, shift=0.0):
    """Two outputs (one at half resolution), using an extra positional and keyword argument."""
    return net(windows) * scale + shift, F.avg_pool3d(windows, 2) if windows.dim() == 5 else windows


def with_coords(windows, coords, scale, *, shift=0.0):
    z = torch.tensor([float(c[2].start) for c in coords]).reshape(-1, *[1] * (windows.dim() - 1))
    return net(windows) * scale + shift + z


CASES = [  # (input shape, constructor arguments, network, call arguments, call keyword arguments)
    ((1, 1, 13, 37, 29), {"roi_size": (8, 16, 16), "sw_batch_size": 3, "overlap": 0.25}, net, (), {}),
    (
        (2, 2, 11, 20, 18),
        {
            "roi_size": (4, 8, 12),
            "sw_batch_size": 4,
            "overlap": 0.5,
            "mode": "gaussian",
            "cache_roi_weight_map": True,
        },
        heads,
        (2.0,),
        {"shift": 0.5},
    ),  # fmt: skip
    ((1, 1, 5, 9, 7), {"roi_size": (8, 16, 16), "overlap": 0.5, "padding_mode": "replicate"}, net, (), {}),
    (
        (1, 1, 9, 14, 12),
        {"roi_size": (4, 8, 8), "sw_batch_size": 2, "overlap": 0.5, "with_coord": True},
        with_coords,
        (3.0,),
        {"shift": 1.0},
    ),  # fmt: skip
    (
        (2, 1, 19, 23),
        {
            "roi_size": (8, 8),
            "sw_batch_size": 5,
            "overlap": 0.4,
            "mode": "gaussian",
            "sigma_scale": (0.2, 0.1),
        },
        net,
        (),
        {},
    ),  # fmt: skip
    (
        (1, 1, 10, 17, 13),
        {"roi_size": (4, 8, 8), "sw_batch_size": 3, "overlap": 0.5, "buffer_steps": 2, "buffer_dim": 0},
        net,
        (),
        {},
    ),  # fmt: skip
]


@pytest.mark.parametrize(("shape", "settings", "network", "args", "kwargs"), CASES)
def test_inferer_equals_monais(shape, settings, network, args, kwargs) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = SlidingWindowInferer(**settings)(x, network, *args, **kwargs)
    theirs = monai_inferer(**settings)(x, network, *args, **kwargs)
    ours, theirs = (ours, theirs) if isinstance(ours, tuple) else ((ours,), (theirs,))
    assert len(ours) == len(theirs)
    for mine, other in zip(ours, theirs, strict=True):
        assert mine.dtype == torch.float32 and mine.shape == other.shape
        assert (mine - other).abs().max().item() < ATOL


def test_inferer_mirrors_as_the_function_does() -> None:
    x = torch.randn((1, 1, 9, 13, 11), generator=torch.Generator().manual_seed(1))
    inferer = SlidingWindowInferer((4, 8, 8), 2, mode="gaussian", flip_axes=(0, 2))
    expected = sliding_window_inference(x, (4, 8, 8), 2, net, mode="gaussian", flip_axes=(0, 2))
    assert torch.equal(inferer(x, net), expected)


def test_cpu_thresh_and_per_call_settings_reach_sliding_window_inference(monkeypatch) -> None:
    """cpu_thresh moves the stitching to the CPU above the threshold only when no device is set; device,
    buffer_steps and buffer_dim given to the call override the inferer's and do not reach the network."""
    seen: list[dict] = []

    def recording(inputs, roi, batch, network, *args, **kwargs):
        seen.append({"device": args[6], "buffer_steps": args[10], "buffer_dim": args[11], "extra": args[13:],
                     "kwargs": kwargs})  # fmt: skip
        return inputs

    monkeypatch.setattr(inferer_module, "sliding_window_inference", recording)
    x = torch.zeros(1, 1, 4, 5, 6)  # 120 voxels
    SlidingWindowInferer(4, cpu_thresh=119)(x, net)
    SlidingWindowInferer(4, cpu_thresh=120)(x, net)
    SlidingWindowInferer(4, cpu_thresh=119, device="meta")(x, net)
    SlidingWindowInferer(4, buffer_steps=1)(x, net, 7, device="cpu", buffer_steps=3, buffer_dim=0, shift=1)
    assert [s["device"] for s in seen] == ["cpu", None, "meta", "cpu"]
    assert (seen[3]["buffer_steps"], seen[3]["buffer_dim"], seen[3]["extra"]) == (3, 0, (7,))
    assert seen[3]["kwargs"] == {"flip_axes": (), "shift": 1}


@pytest.mark.parametrize(("settings", "error", "message"), [
    ({"mode": "linear"}, ValueError, r"mode 'linear' is not one of \('constant', 'gaussian'\)"),
    ({"padding_mode": "zeros"}, ValueError, r"padding_mode 'zeros' is not one of"),
    ({"cpu_thresh": 1.5}, TypeError, r"cpu_thresh 1.5 must be None or an int"),
])  # fmt: skip
def test_bad_settings_are_refused_when_the_inferer_is_built(settings, error, message) -> None:
    with pytest.raises(error, match=message):
        SlidingWindowInferer((4, 4, 4), **settings)


def test_bad_roi_is_refused_when_called_naming_it() -> None:
    inferer = SlidingWindowInferer((4, 4), 2)
    with pytest.raises(ValueError, match=r"roi_size \(4, 4\) has 2 dims, expected 3"):
        inferer(torch.zeros(1, 1, 6, 6, 6), net)
