"""The paper's networks: Table 1's parameter counts, shapes, forward/backward on both backends."""

from __future__ import annotations

import copy

import pytest
import torch
from prostate_kernels.models import MODEL_NAMES, build_model, count_parameters, downsampling

from prostate_kernels import use_backend
from prostate_kernels.nn import DenseBlock3d


def on_meta(name: str, **overrides):
    with torch.device("meta"):
        return build_model(name, **overrides)


@pytest.mark.parametrize(
    "name,convention,expected",
    [
        ("unet3d", "keras", 1_605_381),
        ("tiramisu3d_p4a", "conv", 49_382_353),
        ("tiramisu3d_p3a", "conv", 22_962_289),  # Table 1 prints 22,692,289: two digits swapped
        ("tiramisu3d_p3b", "conv", 23_487_169),
    ],
)
def test_parameter_counts_reproduce_table_1(name, convention, expected):
    assert count_parameters(on_meta(name), convention) == expected


def test_deeplab_2d_parameter_count_is_within_0_05_percent_of_table_1():
    count = count_parameters(on_meta("deeplabv3plus_2d"), "keras")
    assert abs(count - 41_253_023) / 41_253_023 < 5e-4, count
    # the Keras port's own total (3 inputs, 21 classes) is reproduced exactly
    assert (
        count_parameters(on_meta("deeplabv3plus_2d", in_channels=3, out_channels=21), "keras") == 41_258_213
    )


def test_count_parameters_conventions():
    model = on_meta("unet3d")
    torch_count = count_parameters(model, "torch")
    assert torch_count < count_parameters(model, "keras")
    assert count_parameters(model, "conv") < torch_count
    with pytest.raises(ValueError, match="'tf'"):
        count_parameters(model, "tf")


PAPER_SIZES = {  # the paper's inputs (D, H, W), batch 2
    "unet3d": (2, 1, 16, 256, 256),
    "deeplabv3plus_2d": (2, 13, 256, 256),
    "deeplabv3plus_3d": (2, 1, 16, 256, 256),
    "tiramisu3d_p4a": (2, 1, 16, 64, 64),
    "tiramisu3d_p3a": (2, 1, 16, 64, 64),
    "tiramisu3d_p3b": (2, 1, 16, 64, 64),
    "tiramisu3d_tiny": (2, 1, 16, 64, 64),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_paper_size_forward_shapes_on_meta(name):
    model = on_meta(name).eval()
    shape = PAPER_SIZES[name]
    with torch.no_grad():
        out = model(torch.empty(shape, device="meta"))
    assert tuple(out.shape) == (shape[0], 1, *shape[2:])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_training_step_propagates_shapes_on_meta(name):
    """Training mode draws dropout masks: on the meta device they are shapes without values (the dense
    blocks' masks once went to a Triton kernel there, which failed with "0 active drivers")."""
    model = on_meta(name).train()
    shape = PAPER_SIZES[name]
    out = model(torch.empty(shape, device="meta"))
    assert tuple(out.shape) == (shape[0], 1, *shape[2:]) and out.device.type == "meta"
    out.sum().backward()
    for name_, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.shape == parameter.shape, name_


SMALL = {  # CPU-affordable: (overrides, input shape)
    "unet3d": ({}, (2, 1, 8, 16, 16)),
    "deeplabv3plus_2d": ({"middle_blocks": 2}, (2, 13, 32, 32)),
    "deeplabv3plus_3d": ({"middle_blocks": 2}, (2, 1, 4, 32, 32)),
    "tiramisu3d_p4a": ({}, (2, 1, 16, 16, 16)),
    "tiramisu3d_p3a": ({}, (2, 1, 8, 8, 8)),
    "tiramisu3d_p3b": ({}, (2, 1, 8, 8, 8)),
    "tiramisu3d_tiny": ({}, (2, 1, 4, 8, 8)),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_and_backward_on_cpu(name):
    overrides, shape = SMALL[name]
    torch.manual_seed(0)
    model = build_model(name, **overrides)
    x = torch.randn(shape)
    y = model(x)
    assert y.shape == (shape[0], 1, *shape[2:]) and torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


TRITON_TINY = {
    "tiramisu3d_tiny": ({}, (2, 1, 4, 8, 8)),
    "deeplabv3plus_3d": ({"width": 1 / 32, "middle_blocks": 1}, (2, 1, 4, 16, 16)),
    "deeplabv3plus_2d": ({"width": 1 / 32, "middle_blocks": 1, "in_channels": 3}, (2, 3, 16, 16)),
}


@pytest.mark.parametrize("name", list(TRITON_TINY))
def test_triton_path_equals_pytorch_path(name):
    """Tiny configurations through the interpreter: outputs and gradients agree with the twin, in
    training (dropout off: model.eval() on dropouts only) and in eval mode (DeepLab: fused kernels)."""
    overrides, shape = TRITON_TINY[name]
    torch.manual_seed(1)
    model = build_model(name, **overrides)
    for m in model.modules():  # a deterministic training step: dropout off, BatchNorm in training mode
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(m, DenseBlock3d):
            m.dropout = 0.0
    twin = copy.deepcopy(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with use_backend("triton"):
        y = model(x)
    y_ref = twin(x)
    scale = y_ref.abs().max().item()
    assert (y - y_ref).abs().max().item() <= 1e-4 * scale
    y.square().mean().backward()
    y_ref.square().mean().backward()
    for (pname, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert (p.grad - q.grad).abs().max().item() <= 1e-3 * q.grad.abs().max().item() + 1e-7, pname
    model.eval(), twin.eval()
    with torch.no_grad():
        with use_backend("triton"):
            y = model(x)
        y_ref = twin(x)
    assert (y - y_ref).abs().max().item() <= 1e-4 * y_ref.abs().max().item() + 1e-6


def test_state_dict_round_trip_between_paths():
    torch.manual_seed(3)
    fused = build_model("tiramisu3d_tiny")
    naive = build_model("tiramisu3d_tiny", memory_efficient=False)
    naive.load_state_dict(fused.state_dict())
    fused.load_state_dict(naive.state_dict())
    fused.eval(), naive.eval()
    x = torch.randn(1, 1, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fused(x), naive(x), atol=1e-6)


@pytest.mark.parametrize(
    "name,shape,multiple",
    [
        ("unet3d", (1, 1, 8, 12, 16), r"\(8, 8, 8\)"),
        ("tiramisu3d_tiny", (1, 1, 6, 8, 8), r"\(4, 4, 4\)"),
        ("deeplabv3plus_2d", (1, 13, 40, 32), r"\(16, 16\)"),
        ("deeplabv3plus_3d", (1, 1, 6, 32, 32), r"\(4, 16, 16\)"),
    ],
)
def test_sizes_that_are_not_multiples_of_the_downsampling_raise(name, shape, multiple):
    model = on_meta(name).eval()
    with pytest.raises(ValueError, match=multiple):
        model(torch.empty(shape, device="meta"))


@pytest.mark.parametrize(
    "name,factors",
    [
        ("unet3d", (8, 8, 8)),
        ("tiramisu3d_tiny", (4, 4, 4)),
        ("tiramisu3d_p3a", (8, 8, 8)),
        ("deeplabv3plus_2d", (1, 16, 16)),
        ("deeplabv3plus_3d", (4, 16, 16)),
    ],
)
def test_downsampling_is_what_the_input_check_asks_for(name, factors):
    """models.downsampling: the (D, H, W) multiples train, predict and export check windows against."""
    model = on_meta(name).eval()
    assert downsampling(model) == factors
    inputs = 13 if name == "deeplabv3plus_2d" else 1
    spatial = factors[1:] if name == "deeplabv3plus_2d" else factors
    assert model(torch.empty((1, inputs, *spatial), device="meta")).shape[2:] == spatial


def test_downsampling_of_a_module_that_declares_none_is_a_type_error():
    with pytest.raises(TypeError, match="Conv3d declares no downsampling"):
        downsampling(torch.nn.Conv3d(1, 1, 3))


@pytest.mark.parametrize(
    "name,shape,expected",
    [
        ("unet3d", (1, 2, 8, 8, 8), "UNet3D expects a 5-D (N, 1, D, H, W) input, got (1, 2, 8, 8, 8)"),
        ("tiramisu3d_tiny", (1, 3, 4, 4, 4), "Tiramisu3D expects a 5-D (N, 1, D, H, W) input"),
        ("deeplabv3plus_2d", (1, 1, 32, 32), "expects a 4-D (N, 13, H, W) input, got (1, 1, 32, 32)"),
        ("deeplabv3plus_3d", (1, 13, 4, 32, 32), "expects a 5-D (N, 1, D, H, W) input"),
    ],
)
def test_another_channel_count_names_the_one_the_model_takes(name, shape, expected):
    """It reached the first BatchNorm or conv, whose RuntimeError named neither the model nor its input."""
    model = on_meta(name).eval()
    with pytest.raises(ValueError) as info:
        model(torch.empty(shape, device="meta"))
    assert expected in str(info.value)


def test_an_empty_batch_through_tiramisu_gives_an_empty_prediction():
    """The up path's blocks (return_input=False) cut their input channels twice for an empty batch."""
    model = build_model("tiramisu3d_tiny").eval()
    with torch.no_grad():
        assert model(torch.randn(0, 1, 8, 16, 16)).shape == (0, 1, 8, 16, 16)


@pytest.mark.parametrize(
    "name, overrides, said",
    [
        ("tiramisu3d_tiny", {"in_channels": -3}, "Tiramisu3D: in_channels -3 must be a positive int"),
        ("tiramisu3d_tiny", {"in_channels": 0}, "Tiramisu3D: in_channels 0 must be a positive int"),
        ("tiramisu3d_tiny", {"in_channels": 1.5}, "Tiramisu3D: in_channels 1.5 must be a positive int"),
        ("tiramisu3d_tiny", {"growth_rate": 0}, "Tiramisu3D: growth_rate 0 must be a positive int"),
        ("tiramisu3d_tiny", {"layers_per_block": (2, 0, 2)}, "Tiramisu3D: layers_per_block entry 0 must"),
        ("tiramisu3d_tiny", {"dropout": 1.5}, "Tiramisu3D: dropout 1.5 must be a number in [0, 1)"),
        ("unet3d", {"in_channels": -3}, "UNet3D: in_channels -3 must be a positive int"),
        ("unet3d", {"filters": (8, -1)}, "UNet3D: filters entry -1 must be a positive int"),
        ("unet3d", {"filters": (0, 8)}, "UNet3D: filters entry 0 must be a positive int"),
        ("unet3d", {"dropout": float("nan")}, "UNet3D: dropout nan must be a number in [0, 1)"),
        ("deeplabv3plus_3d", {"in_channels": 0}, "DeepLabV3Plus: in_channels 0 must be a positive int"),
        ("deeplabv3plus_3d", {"out_channels": -1}, "DeepLabV3Plus: out_channels -1 must be a positive int"),
        ("deeplabv3plus_3d", {"middle_blocks": -1}, "DeepLabV3Plus: middle_blocks -1 must be an int >= 0"),
        ("deeplabv3plus_2d", {"output_stride": 16.0}, "DeepLabV3Plus: output_stride 16.0 must be 8 or 16"),
        ("deeplabv3plus_2d", {"spatial_dims": 4}, "DeepLabV3Plus: spatial_dims 4 must be 2 or 3"),
        ("deeplabv3plus_2d", {"width": float("nan")}, "DeepLabV3Plus: width nan must be in (0, 1]"),
    ],
)
def test_bad_constructor_arguments_name_the_network_and_the_value(name, overrides, said):
    """A negative channel count ended in torch's RuntimeError ("negative dimension"), a float one in a
    TypeError, and a 0 built a network that failed at its first input: now ValueErrors that say which
    argument (a checkpoint's model_kwargs reach predict through these)."""
    with pytest.raises(ValueError) as info:
        on_meta(name, **overrides)
    assert str(info.value).startswith(said), str(info.value)


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="'vnet'.*unet3d"):
        build_model("vnet")
