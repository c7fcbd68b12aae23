"""Layers and sliding-window inference under careless input (items 13 and 17 of the reliability issue)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prostate_kernels import sliding_window_inference
from prostate_kernels.nn import ASPP3d, BNReLUConv3d, DenseBlock3d, DepthwiseConv3d, SeparableConv3d

# ----------------------------------------------------------------------------- DenseBlock3d (13)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_an_empty_batch_leaves_the_statistics_as_batchnorm_does(memory_efficient):
    block = DenseBlock3d(4, 2, 3, dropout=0.0, memory_efficient=memory_efficient).train()
    norm = torch.nn.BatchNorm3d(4).train()
    y = block(torch.randn(0, 4, 3, 5, 4))
    norm(torch.randn(0, 4, 3, 5, 4))
    assert y.shape == (0, 10, 3, 5, 4)
    for layer in block.layers:
        assert torch.equal(layer.norm.running_mean, torch.zeros_like(layer.norm.running_mean))
        assert torch.equal(layer.norm.running_var, torch.ones_like(layer.norm.running_var))
        assert layer.norm.num_batches_tracked == norm.num_batches_tracked == 1
    x = torch.randn(2, 4, 3, 5, 4)
    assert torch.isfinite(block.eval()(x)).all()


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_through_an_up_path_block_keeps_its_new_channels(memory_efficient, training):
    """return_input=False (Tiramisu's up path): an empty batch gave 0 channels when memory_efficient (the
    naive path, which it takes, drops the input already, and the block dropped it again)."""
    block = DenseBlock3d(4, 2, 3, return_input=False, memory_efficient=memory_efficient).train(training)
    assert block.out_channels == 6
    assert block(torch.randn(0, 4, 3, 5, 4)).shape == (0, 6, 3, 5, 4)
    assert block(torch.randn(2, 4, 3, 5, 4)).shape == (2, 6, 3, 5, 4)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_one_value_per_channel_in_training_is_a_value_error(memory_efficient):
    block = DenseBlock3d(4, 2, 2, memory_efficient=memory_efficient).train()
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 4, 1, 1, 1\)"):
        block(torch.randn(1, 4, 1, 1, 1))
    assert all(layer.norm.num_batches_tracked == 0 for layer in block.layers)  # refused before any step
    assert block.eval()(torch.randn(1, 4, 1, 1, 1)).shape == (1, 8, 1, 1, 1)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_integer_and_mismatched_float_inputs_fail_up_front(memory_efficient):
    block = DenseBlock3d(4, 2, 2, memory_efficient=memory_efficient).train()
    with pytest.raises(TypeError, match="x must be floating point, got torch.int64"):
        block(torch.randint(0, 5, (2, 4, 3, 3, 3)))
    with pytest.raises(
        TypeError, match=r"x dtype torch.float64 differs from the parameters' dtype \(torch.float32\)"
    ):
        block(torch.randn(2, 4, 3, 3, 3, dtype=torch.float64))
    assert all(layer.norm.num_batches_tracked == 0 for layer in block.layers)


# ------------------------------------------------------------------ sliding_window_inference (17)


def doubled(windows: torch.Tensor) -> torch.Tensor:
    return windows * 2


def test_roi_size_takes_numpy_and_torch_integers_and_flip_axes_an_int():
    x = torch.randn(1, 1, 5, 6, 7)
    out = sliding_window_inference(x, (np.int64(4), torch.tensor(4), np.int32(5)), 2, doubled, flip_axes=1)
    assert torch.allclose(out, 2 * x)
    assert torch.allclose(sliding_window_inference(x, 4, np.int64(2), doubled), 2 * x)  # sw_batch_size too
    out = sliding_window_inference(x, np.int16(4), 2, doubled, flip_axes=np.int64(0))
    assert torch.allclose(out, 2 * x)


@pytest.mark.parametrize("bad", [4.0, True, torch.tensor(4.0), "4"])
def test_roi_size_rejects_non_integers(bad):
    with pytest.raises((ValueError, TypeError), match="roi_size"):
        sliding_window_inference(torch.randn(1, 1, 5, 6, 7), (bad, 4, 4), 1, doubled)


@pytest.mark.parametrize("key", ["device", "sw_device"])
@pytest.mark.parametrize(
    "value, fragment",
    [
        ("gpu", "'gpu' is not a device (use cpu, cuda or cuda:N)"),
        (2.5, "2.5 is not a device"),
        ("meta", "'meta': the meta device holds no values"),
        pytest.param(
            "cuda", "'cuda' is not available: torch sees no CUDA device here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA"),
        ),
    ],
)  # fmt: skip
def test_a_device_argument_this_machine_lacks_is_named(key, value, fragment):
    """These were torch's AssertionError, RuntimeError or NotImplementedError at the first copy."""
    with pytest.raises(ValueError) as info:
        sliding_window_inference(torch.randn(1, 1, 5, 6, 7), 4, 1, doubled, **{key: value})
    assert str(info.value).startswith(f"{key} {fragment}")


def test_inputs_on_the_meta_device_are_refused():
    with pytest.raises(ValueError, match="inputs are on the meta device"):
        sliding_window_inference(torch.empty(1, 1, 5, 6, 7, device="meta"), 4, 1, doubled)


@pytest.mark.parametrize("overlap", ["0.5", None, b"1", {"a": 1}])
def test_an_overlap_of_the_wrong_type_is_a_type_error_naming_it(overlap):
    with pytest.raises(TypeError, match=r"overlap .* must be a number or a sequence of numbers"):
        sliding_window_inference(torch.randn(1, 1, 5, 6, 7), 4, 1, doubled, overlap=overlap)


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_padding_wider_than_the_volume_is_applied_in_steps(mode):
    x = torch.randn(1, 2, 3, 4, 5).double()  # float32 values: exact in both dtypes
    roi = (16, 13, 20)  # more than twice every axis

    def check_window(windows):
        expected = torch.from_numpy(
            np.pad(
                x.numpy(),
                [(0, 0), (0, 0), (6, 7), (4, 5), (7, 8)],
                mode="wrap" if mode == "circular" else mode,
            )
        )
        assert torch.equal(windows[0].double(), expected[0])
        return windows

    out = sliding_window_inference(x.float(), roi, 1, check_window, padding_mode=mode)
    assert out.shape == (1, 2, 3, 4, 5) and torch.allclose(out.double(), x, atol=1e-6)


def test_reflect_padding_of_a_single_slice_names_the_limit():
    with pytest.raises(ValueError, match="cannot pad an axis of size 1"):
        sliding_window_inference(torch.randn(1, 1, 1, 6, 7), (4, 6, 7), 1, doubled, padding_mode="reflect")


def test_a_mirrored_prediction_of_the_wrong_shape_is_reported():
    calls = []

    def changes_shape_when_mirrored(windows):
        calls.append(1)
        return windows if len(calls) == 1 else windows[:, :, :, :2]

    with pytest.raises(ValueError, match=r"predictor returned shape \(1, 1, 4, 2, 4\) for 1 windows"):
        sliding_window_inference(
            torch.randn(1, 1, 4, 4, 4), 4, 1, changes_shape_when_mirrored, flip_axes=(1,)
        )

    def changes_channels_when_mirrored(windows):
        calls.append(1)
        return windows if len(calls) % 2 else torch.cat([windows, windows], 1)

    calls.clear()
    mirrored = r"shape \(1, 2, 4, 4, 4\) for 1 windows; earlier windows gave \(1, 1, 4, 4, 4\)"
    with pytest.raises(
        ValueError, match=mirrored + r" \(the unmirrored windows; these mirrored along \(2,\)\)"
    ):
        sliding_window_inference(
            torch.randn(1, 1, 4, 4, 4), 4, 1, changes_channels_when_mirrored, flip_axes=(0,)
        )


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: BNReLUConv3d(8, 0), "BNReLUConv3d: out_channels 0 must be a positive int"),
        (lambda: BNReLUConv3d(-1, 4), "BNReLUConv3d: in_channels -1"),
        (lambda: BNReLUConv3d(8.0, 4), "BNReLUConv3d: in_channels 8.0"),
        (lambda: DepthwiseConv3d(0), "DepthwiseConv3d: channels 0"),
        (lambda: DepthwiseConv3d(8, 0), "kernel_size 0 must be a positive int"),
        (lambda: DepthwiseConv3d(8, stride=(1, 1)), "stride (1, 1) must be"),
        (lambda: DepthwiseConv3d(8, (3, 0, 3)), "kernel_size (3, 0, 3) must be a positive int"),
        (lambda: DepthwiseConv3d(8, dilation=(1, 1, -2)), "dilation (1, 1, -2) must be a positive int"),
        (lambda: DepthwiseConv3d(8, padding=(1, 1)), "padding (1, 1) must be an int or 3 ints"),
        (lambda: SeparableConv3d(8, 0), "SeparableConv3d: out_channels 0"),
        (lambda: ASPP3d(0), "ASPP3d: in_channels 0"),
        (lambda: DenseBlock3d(8, True), "DenseBlock3d: growth_rate True"),
        (lambda: BNReLUConv3d(8, 4, -1), "BNReLUConv3d: kernel_size -1 must be a positive int"),
        (lambda: BNReLUConv3d(8, 4, stride=0), "BNReLUConv3d: stride (0, 0, 0) must be positive"),
        (lambda: BNReLUConv3d(8, 4, padding=-1), "BNReLUConv3d: padding (-1, -1, -1) must be >= 0"),
        (lambda: BNReLUConv3d(8, 4, dilation=(1, 0, 1)), "BNReLUConv3d: dilation (1, 0, 1) must be positive"),
        (lambda: BNReLUConv3d(8, 4, stride=2, padding="same"), "BNReLUConv3d: padding='same' needs stride 1"),
        (lambda: BNReLUConv3d(8, 4, eps=float("nan")), "BNReLUConv3d: eps nan must be a number > 0"),
        (lambda: BNReLUConv3d(8, 4, momentum=1.5), "BNReLUConv3d: momentum 1.5 must be a number in [0, 1]"),
        (lambda: DenseBlock3d(8, dropout="0.2"), "DenseBlock3d: dropout '0.2' must be a number in [0, 1)"),
        (lambda: DenseBlock3d(8, dropout=None), "DenseBlock3d: dropout None"),
        (lambda: ASPP3d(8, dropout=float("nan")), "ASPP3d: dropout nan must be a number in [0, 1)"),
        (lambda: ASPP3d(8, dropout=True), "ASPP3d: dropout True"),
        (lambda: ASPP3d(8, dropout=1.0), "ASPP3d: dropout 1.0"),
    ],
)
def test_bad_constructor_arguments_name_the_module_and_the_value(build, fragment):
    """torch's layers accept these and fail at the first forward, deep in a conv, naming neither."""
    with pytest.raises(ValueError) as info:
        build()
    assert fragment in str(info.value)


def test_a_dense_block_larger_than_memory_is_refused_before_building_a_layer():
    """10**12 small layers would be built one by one for hours; the block's size is known up front."""
    with pytest.raises(ValueError) as info:
        DenseBlock3d(4, 16, num_layers=10**12)
    message = str(info.value)
    assert "DenseBlock3d: num_layers 1000000000000 (in_channels 4, growth_rate 16, bn_size 0)" in message
    assert "GiB of memory of cpu" in message


def test_a_dense_block_of_more_modules_than_the_host_holds_is_refused_on_the_meta_device_too(monkeypatch):
    """On meta the weights take no memory, and 10**12 layers were built one by one for hours. A host of
    10 MiB stands in for this one, so that code without the check builds a few thousand layers and
    fails here in a second instead of building millions."""
    from prostate_kernels.nn import dense

    host = 10 * 2**20
    monkeypatch.setattr(dense, "memory_bytes", lambda device: host if device.type == "cpu" else None)
    layers = host // dense.LAYER_HOST_BYTES + 1
    with torch.device("meta"), pytest.raises(ValueError) as info:
        DenseBlock3d(4, 16, num_layers=layers)
    assert str(info.value).startswith(
        f"DenseBlock3d: num_layers {layers} are {layers} Python modules, at least"
    )
    with torch.device("meta"):
        assert len(DenseBlock3d(4, 16, num_layers=300).layers) == 300  # the bound is far from real blocks


def test_the_host_bytes_per_layer_bound_is_below_what_a_layer_takes():
    import tracemalloc

    from prostate_kernels.nn.dense import LAYER_HOST_BYTES

    with torch.device("meta"):
        DenseBlock3d(4, 16, num_layers=1)  # imports and caches warmed outside the measurement
        for bn_size in (0, 4):
            tracemalloc.start()
            try:
                block = DenseBlock3d(4, 16, num_layers=50, bn_size=bn_size)
                per_layer = tracemalloc.get_traced_memory()[0] / 50
            finally:
                tracemalloc.stop()
            assert per_layer > LAYER_HOST_BYTES, (bn_size, per_layer)
            del block


def _values(block: torch.nn.Module) -> int:
    """Parameters and BatchNorm running statistics: what the memory check counts."""
    running = sum(b.numel() for name, b in block.named_buffers() if "running" in name)
    return sum(p.numel() for p in block.parameters()) + running


@pytest.mark.parametrize("bn_size", [0, 3])
def test_the_dense_block_memory_check_counts_exactly_the_blocks_values(monkeypatch, bn_size):
    """A memory of exactly the block's float32 bytes builds it; one byte less refuses it (the closed form
    equals what the layers hold, plain and bottleneck); an unknown memory (None) checks nothing."""
    from prostate_kernels.nn import dense

    need = 4 * _values(DenseBlock3d(5, 3, num_layers=4, bn_size=bn_size))
    monkeypatch.setattr(dense, "LAYER_HOST_BYTES", 0)  # the modules' host bytes are another test's
    monkeypatch.setattr(dense, "memory_bytes", lambda device: need)
    DenseBlock3d(5, 3, num_layers=4, bn_size=bn_size)
    monkeypatch.setattr(dense, "memory_bytes", lambda device: need - 1)
    with pytest.raises(ValueError, match="num_layers 4 .*more than the"):
        DenseBlock3d(5, 3, num_layers=4, bn_size=bn_size)
    monkeypatch.setattr(dense, "memory_bytes", lambda device: None)
    DenseBlock3d(5, 3, num_layers=4, bn_size=bn_size)


def test_memory_bytes_reports_the_hosts_memory():
    from prostate_kernels.devices import memory_bytes

    total = memory_bytes(torch.device("cpu"))
    if sys.platform.startswith("linux"):  # the kernel's count: MemTotal in /proc/meminfo, in kB
        meminfo = Path("/proc/meminfo").read_text().split("\n")
        mem_total = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
        # equal on a VM; a container's /proc/meminfo may show its own limit, below the host's memory
        assert total >= mem_total * 1024 > 0
    else:
        assert total is None or total > 0
    assert memory_bytes(torch.device("meta")) is None


def test_numpy_and_torch_integer_channel_counts_are_accepted():
    layer = BNReLUConv3d(np.int64(8), torch.tensor(4))
    assert (layer.in_channels, layer.out_channels) == (8, 4) and type(layer.out_channels) is int
    assert DepthwiseConv3d(np.int32(6)).weight.shape == (6, 1, 3, 3, 3)
    block = DenseBlock3d(np.int64(8), np.int64(4), 2)
    assert type(block.in_channels) is int and type(block.growth_rate) is int


def test_numpy_and_torch_integer_conv_settings_are_accepted():
    """kernel_size, stride, padding, dilation take what the channel counts take (they were refused)."""
    x = torch.randn(1, 4, 5, 6, 7)
    plain = DepthwiseConv3d(4, 3, stride=2, padding=2, dilation=2)
    numpy = DepthwiseConv3d(
        4, np.int64(3), stride=np.int32(2), padding=(np.int64(2),) * 3, dilation=torch.tensor(2)
    )
    numpy.load_state_dict(plain.state_dict())
    assert torch.equal(numpy(x), plain(x))
    assert BNReLUConv3d(4, 2, np.int64(1), padding=np.int64(0))(x).shape == (1, 2, 5, 6, 7)
    with pytest.raises(ValueError, match=r"kernel_size 3.0 must be a positive int"):
        DepthwiseConv3d(4, 3.0)


# ------------------------------------------------------------------- module inputs (ASPP3d and friends)


def _untouched(module: torch.nn.Module) -> bool:
    return all(m.num_batches_tracked == 0 for m in module.modules() if isinstance(m, torch.nn.BatchNorm3d))


@pytest.mark.parametrize(
    "x, error, fragment",
    [
        ([[1.0]], ValueError, "ASPP3d expects (N, 4, D, H, W) input, got list"),
        (torch.randn(2, 3, 4, 5, 6), ValueError, "ASPP3d expects (N, 4, D, H, W) input, got (2, 3, 4, 5, 6)"),
        (torch.randn(2, 4, 0, 5, 6), ValueError, "ASPP3d: input of spatial size (0, 5, 6) has an empty axis"),
        (torch.ones(2, 4, 4, 5, 6, dtype=torch.int64), TypeError, "ASPP3d: x must be floating point"),
        (torch.randn(2, 4, 4, 5, 6, dtype=torch.float64), TypeError, "ASPP3d: x dtype torch.float64 differs"),
        (torch.empty(2, 4, 4, 5, 6, device="meta"), ValueError, "ASPP3d: x is on meta but its parameters"),
        (torch.randn(1, 4, 4, 5, 6), ValueError, "ASPP3d: training needs a batch of at least 2"),
    ],
)
def test_aspp_inputs_are_checked_before_any_statistic_moves(x, error, fragment):
    """These reached torch's conv, mean or BatchNorm (an AttributeError for a list, RuntimeErrors)."""
    aspp = ASPP3d(4, 8, rates=(1, 2)).train()
    with pytest.raises(error) as info:
        aspp(x)
    assert fragment in str(info.value)
    assert _untouched(aspp)


def test_aspp_in_eval_takes_a_batch_of_one():
    aspp = ASPP3d(4, 8, rates=(1, 2)).eval()
    assert aspp(torch.randn(1, 4, 4, 5, 6)).shape == (1, 8, 4, 5, 6)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_a_dense_block_in_eval_refuses_an_empty_spatial_axis(memory_efficient):
    block = DenseBlock3d(4, 2, 2, memory_efficient=memory_efficient).eval()
    with pytest.raises(
        ValueError, match=r"DenseBlock3d: input of spatial size \(0, 6, 7\) has an empty axis"
    ):
        block(torch.randn(1, 4, 0, 6, 7))


@pytest.mark.parametrize("x", [torch.ones(2, 4, 5, 6, 7, dtype=torch.bool), [[1.0]]])
def test_a_separable_conv_names_a_non_float_input(x):
    with pytest.raises(TypeError, match="SeparableConv3d: x must be a floating-point torch.Tensor"):
        SeparableConv3d(4, 3)(x)


def test_a_padding_that_no_tensor_could_hold_is_named():
    """oneDNN's error for it was "could not construct a memory descriptor using a format tag"."""
    with pytest.raises(
        ValueError,
        match=r"padding \(1000000000000, 1000000000000, 1000000000000\) makes an output of spatial",
    ):
        DepthwiseConv3d(4, 3, padding=10**12)(torch.randn(1, 4, 5, 6, 7))


def test_eval_affine_of_a_batch_norm_without_running_statistics_names_it():
    """An eval-mode fold needs the running statistics; without them it was an AttributeError on None."""
    from prostate_kernels.nn.separable import eval_affine

    with pytest.raises(ValueError, match=r"eval_affine: BatchNorm3d\(3, .*\) keeps no running statistics"):
        eval_affine(torch.nn.BatchNorm3d(3, track_running_stats=False))
