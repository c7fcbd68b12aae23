"""Fused BN -> ReLU -> Conv3d: the Triton kernels (interpreter on CPU) against a float64 reference.

Every check covers the output and all gradients (x, conv weight and bias, BN weight and bias) and the
running statistics. The reference is the eager PyTorch Sequential computed in float64.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from prostate_kernels import functional, reference, use_backend
from prostate_kernels.nn import BNReLUConv3d

# float32 kernels against float64: sums of up to 27 * C_in float32 products; relative to the largest
# magnitude of each compared tensor, a few 1e-6 (measured ~5e-7); 2e-5 leaves room, not slack for bugs.
RTOL32 = 2e-5


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    c_in: int
    c_out: int
    size: tuple[int, int, int]
    kernel: tuple[int, int, int] = (3, 3, 3)
    stride: int = 1
    padding: int | tuple[int, int, int] = 1
    dilation: int = 1
    bias: bool = False
    layout: str = "contiguous"  # "contiguous" | "channel_slice" | "transposed"


CASES = [
    Case("odd-sizes", 2, 5, 16, (5, 7, 9)),
    Case("stride2-n1-bias", 1, 20, 7, (6, 5, 7), stride=2, bias=True),
    Case("dilation2", 2, 3, 16, (7, 6, 5), padding=2, dilation=2),
    Case("channel-slice", 2, 7, 16, (4, 5, 6), layout="channel_slice"),
    Case("non-contiguous", 2, 4, 16, (4, 5, 6), layout="transposed"),
    Case("anisotropic-kernel-2-k-blocks", 1, 40, 16, (3, 6, 5), kernel=(1, 3, 3), padding=(0, 1, 1)),
    Case("valid-two-output-blocks", 1, 6, 70, (4, 5, 6), padding=0, bias=True),  # halo: 2 channel blocks
]


def make_input(case: Case, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """x of shape (N, C_in, *size) laid out as the case says (a view, never a copy)."""
    n, c, size = case.n, case.c_in, case.size
    if case.layout == "channel_slice":  # channels [2, 2 + C) of a channels-last buffer with 12 channels
        buffer = torch.randn((n, 12, *size), generator=generator).to(memory_format=torch.channels_last_3d)
        x = buffer[:, 2 : 2 + c]
        assert x.stride(1) == 1 and not x.is_contiguous()
    elif case.layout == "transposed":
        x = torch.randn((n, c, size[2], size[1], size[0]), generator=generator).transpose(2, 4)
        assert not x.is_contiguous()
    else:
        x = torch.randn((n, c, *size), generator=generator)
    return (x * 1.5 + 0.3).to(dtype)  # non-zero mean: the BN statistics matter


def make_params(case: Case, generator: torch.Generator) -> dict[str, torch.Tensor]:
    fan_in = case.c_in * case.kernel[0] * case.kernel[1] * case.kernel[2]
    return {
        "weight": torch.randn((case.c_out, case.c_in, *case.kernel), generator=generator) / fan_in**0.5,
        "bias": torch.randn((case.c_out,), generator=generator) if case.bias else None,
        "bn_weight": torch.rand((case.c_in,), generator=generator) + 0.5,
        "bn_bias": torch.randn((case.c_in,), generator=generator) * 0.5,
        "running_mean": torch.randn((case.c_in,), generator=generator) * 0.1,
        "running_var": torch.rand((case.c_in,), generator=generator) + 0.5,
    }


def run(x, params, case: Case, training: bool, backend: str, dtype=None, grad_out=None):
    """Output, grads (x, weight, bias, bn_weight, bn_bias) and running stats of one step."""
    dtype = dtype or x.dtype
    x = x.detach().clone() if x.is_contiguous() else x.detach()  # keep the view's strides
    x = x.to(dtype) if x.dtype != dtype else x
    x.requires_grad_(True)

    def cast(k, v):  # conv parameters in the compute dtype, BatchNorm parameters and statistics in float32
        return v.detach().clone().to(dtype if k in ("weight", "bias") else torch.float32)

    p = {k: cast(k, v) for k, v in params.items() if v is not None}
    if dtype == torch.float64:
        p = {k: v.double() for k, v in p.items()}
    for k in ("weight", "bias", "bn_weight", "bn_bias"):
        if k in p:
            p[k].requires_grad_(True)
    with use_backend(backend):
        y = functional.bn_relu_conv3d(
            x, p["weight"], p.get("bias"), p.get("bn_weight"), p.get("bn_bias"), p.get("running_mean"),
            p.get("running_var"), training, 0.1, 1e-5, case.stride, case.padding, case.dilation,
        )  # fmt: skip
    gy = (
        grad_out if grad_out is not None else torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    )
    y.backward(gy.to(y.dtype))
    out = {"y": y, "grad_x": x.grad}
    out.update({f"grad_{k}": p[k].grad for k in ("weight", "bias", "bn_weight", "bn_bias") if k in p})
    out.update({k: p[k] for k in ("running_mean", "running_var") if k in p})
    return out, gy


def max_rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (
        (got.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-12)
    ).item()


# training on every case; eval on the contiguous ones (keeps the interpreter time down)
MODES = [(c, True) for c in CASES] + [(c, False) for c in CASES if c.layout == "contiguous"]


@pytest.mark.parametrize(
    "case,training", MODES, ids=lambda v: v.name if isinstance(v, Case) else ("eval", "train")[v]
)
def test_triton_matches_float64_reference(case: Case, training: bool):
    g = torch.Generator().manual_seed(0)
    x, params = make_input(case, g), make_params(case, g)
    got, gy = run(x, params, case, training, "triton")
    expected, _ = run(x, params, case, training, "torch", dtype=torch.float64, grad_out=gy)
    assert got["y"].dtype == torch.float32 and got["grad_x"].shape == x.shape
    for key, value in expected.items():
        assert key in got and got[key] is not None, key
        err = max_rel_error(got[key], value)
        assert err < RTOL32, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("absent", [("bn_weight", "bn_bias"), ("bn_weight",), ("bn_bias",)])
def test_batch_norm_without_affine_parameters(absent, training):
    """BatchNorm affine=False (and either parameter alone): 1 and 0 in their place, in the statistics
    kernel's fold (training) and on the host (eval), against the float64 reference."""
    case = CASES[0]
    g = torch.Generator().manual_seed(5)
    x, params = make_input(case, g), make_params(case, g)
    params.update({name: None for name in absent})
    got, gy = run(x, params, case, training, "triton")
    expected, _ = run(x, params, case, training, "torch", dtype=torch.float64, grad_out=gy)
    assert set(got) == set(expected) and not set(absent) & {k[5:] for k in got if k.startswith("grad_")}
    for key, value in expected.items():
        err = max_rel_error(got[key], value)
        assert err < RTOL32, f"{key}: relative error {err:.2e}"


def test_running_statistics_after_two_training_steps():
    """Module path, momentum 0.1 and momentum=None (cumulative average), num_batches_tracked."""
    for momentum in (0.1, None):
        torch.manual_seed(3)
        fused = BNReLUConv3d(6, 16, momentum=momentum, bias=True)
        eager = nn.Sequential(
            OrderedDict(
                norm=nn.BatchNorm3d(6, momentum=momentum), relu=nn.ReLU(), conv=nn.Conv3d(6, 16, 3, padding=1)
            )
        ).double()
        eager.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
        for step in range(2):
            x = torch.randn((2, 6, 4, 5, 6), generator=torch.Generator().manual_seed(step)) + step
            with use_backend("triton"):
                fused(x).square().mean().backward()
            eager(x.double()).square().mean().backward()
        for name in ("running_mean", "running_var"):
            err = max_rel_error(getattr(fused.norm, name), getattr(eager.norm, name))
            assert err < RTOL32, f"momentum={momentum} {name}: {err:.2e}"
        assert fused.norm.num_batches_tracked.item() == eager.norm.num_batches_tracked.item() == 2
        assert max_rel_error(fused.conv.weight.grad, eager.conv.weight.grad) < RTOL32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_is_comparable_to_pytorch(dtype):
    """Error against float64 at most 2x that of eager PyTorch in the same dtype (the CPU's own
    float16/bfloat16 conv3d), plus 2 units in the last place of the output dtype: the Triton
    interpreter rounds float32 -> bfloat16 with up to 2 ulp error where GPUs round to nearest."""
    case = CASES[0]
    g = torch.Generator().manual_seed(1)
    x, params = make_input(case, g), make_params(case, g)
    x_low = x.to(dtype)
    ours, gy = run(x_low, params, case, True, "triton", dtype=dtype)
    eager, _ = run(x_low, params, case, True, "torch", dtype=dtype, grad_out=gy)
    exact, _ = run(x_low, params, case, True, "torch", dtype=torch.float64, grad_out=gy.to(dtype))
    ulp = torch.finfo(dtype).eps
    for key in ("y", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias"):
        assert ours[key].dtype == eager[key].dtype, key
        ours_err, eager_err = max_rel_error(ours[key], exact[key]), max_rel_error(eager[key], exact[key])
        assert ours_err <= 2 * eager_err + 2 * ulp, f"{key}: ours {ours_err:.2e} vs eager {eager_err:.2e}"


def test_autocast_matches_eager_autocast():
    """Under autocast the conv runs in the autocast dtype, BatchNorm in float32, as in the Sequential."""
    case = CASES[0]
    g = torch.Generator().manual_seed(2)
    x, params = make_input(case, g), make_params(case, g)
    outputs = {}
    for backend in ("triton", "torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[backend], _ = run(x, params, case, True, backend)
    assert outputs["triton"]["y"].dtype == outputs["torch"]["y"].dtype == torch.bfloat16
    assert outputs["triton"]["grad_x"].dtype == torch.float32
    for key in ("y", "grad_x", "grad_weight", "running_mean", "running_var"):
        err = max_rel_error(outputs["triton"][key], outputs["torch"][key])
        assert err < 2e-2, f"{key}: {err:.2e}"  # both round operands to bfloat16 (eps 7.8e-3)


def test_autocast_with_a_bias_keeps_the_parameters_dtypes():
    """Under autocast the float32 weight and bias go to the kernels uncast (the weight's relayout casts
    it, the bias is added in float32): the output is bfloat16 as eager's, the gradients float32 like the
    parameters, and close to eager autocast's (which rounds the bias to bfloat16 first)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, 6, 5, 6, 7), generator=g, requires_grad=True)
    layer = BNReLUConv3d(6, 8, bias=True)
    with torch.no_grad():
        layer.conv.bias.copy_(torch.randn(8, generator=g))
    results = {}
    for backend in ("triton", "torch"):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        results[backend] = (y, x.grad, layer.conv.weight.grad, layer.conv.bias.grad)
    (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = results["triton"], results["torch"]
    assert (y.dtype, gx.dtype, gw.dtype, gb.dtype) == (torch.bfloat16,) + (torch.float32,) * 3
    for name, ours, eager in (("y", y, y_ref), ("grad x", gx, gx_ref), ("grad weight", gw, gw_ref),
                              ("grad bias", gb, gb_ref)):  # fmt: skip
        err = max_rel_error(ours, eager)
        assert err < 2e-2, f"{name}: {err:.2e}"  # both round operands to bfloat16 (eps 7.8e-3)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_nothing_but_the_input_and_channel_vectors_is_saved_for_backward(autocast):
    """Under autocast too: the float32 weight itself is saved, no bfloat16 copy of it (the kernels' weight
    relayout casts it, in forward and again in backward)."""
    case = CASES[0]
    g = torch.Generator().manual_seed(4)
    x, params = make_input(case, g), make_params(case, g)
    x.requires_grad_(True)
    w = params["weight"].requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = functional.bn_relu_conv3d(
                x, w, None, params["bn_weight"], params["bn_bias"], params["running_mean"],
                params["running_var"], True,
            )  # fmt: skip
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    # besides x and the weight: one (5, C_in) tensor of per-channel statistics (mean, var, scale, shift, rstd)
    big = [t for t in saved if t.numel() > 5 * case.c_in]
    assert {t.data_ptr() for t in big} == {x.data_ptr(), w.data_ptr()}, [tuple(t.shape) for t in big]
    vectors = [tuple(t.shape) for t in saved if t.data_ptr() not in (x.data_ptr(), w.data_ptr())]
    assert vectors == [(5, case.c_in)], vectors


def test_forward_writes_every_output_element():
    from prostate_kernels.ops.bn_relu_conv3d_triton import conv_forward
    from prostate_kernels.ops.conv_geometry import conv_geometry

    g = torch.Generator().manual_seed(5)
    x = torch.randn((2, 5, 5, 7, 9), generator=g)
    w = torch.randn((16, 5, 3, 3, 3), generator=g)
    geometry = conv_geometry((3, 3, 3), 1, 1, 1)
    out = torch.full((2, 16, 5, 7, 9), float("nan"))
    with use_backend("triton"):
        conv_forward(x, w, None, torch.ones(5), torch.zeros(5), geometry, torch.float32, out=out)
    assert not out.isnan().any()
    expected = torch.nn.functional.conv3d(x.relu(), w, padding=1)
    assert max_rel_error(out, expected) < RTOL32


def _input_grad_tiles():
    """(kernel, tile): the direct input gradient's candidate tiles and the halo one's."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    return [("_dgrad", t) for t in launchers.DGRAD_TILES] + [("_dgrad_halo", launchers.HALO_DGRAD_TILE)]


@pytest.mark.parametrize("kernel,tile", _input_grad_tiles(), ids=lambda v: "-".join(map(str, v.values()))
                         if isinstance(v, dict) else v)  # fmt: skip
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
def test_input_gradient_writes_every_element(batch_stats, kernel, tile, monkeypatch):
    """Every element of grad_input and every row of the partial sums is written, at each candidate tile
    of the direct kernel (a row per program of its smallest tile; a larger tile's program fills its rows,
    sums in the first, zeros in the rest) and by the halo kernel (a row per box): both start as NaN.
    150 voxels: the last row of the smallest direct tile is one a 128-voxel program owns alone; the halo
    kernel's 4x4x8 boxes cover the 5x5x6 volume with 4 boxes, 3 of them partial."""
    import contextlib

    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers
    from prostate_kernels.ops.conv_geometry import conv_geometry

    tuned = getattr(launchers, kernel)

    class Spy:  # the partial sums (argument 9 of both kernels) start as NaN
        pinned = None

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args[9].fill_(float("nan"))
                tuned[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(launchers, kernel, Spy())
    g = torch.Generator().manual_seed(6)
    x = torch.randn((1, 5, 5, 5, 6), generator=g)
    gy = torch.randn((1, 16, 5, 5, 6), generator=g)
    w = torch.randn((16, 5, 3, 3, 3), generator=g)
    mean, rstd = x.mean((0, 2, 3, 4)), x.var((0, 2, 3, 4), unbiased=False).add(1e-5).rsqrt()
    scale, shift = rstd, -mean * rstd
    poisoned = torch.full_like(x, float("nan"))
    direct = launchers.direct_kernels() if kernel == "_dgrad" else contextlib.nullcontext()
    with use_backend("triton"), tuned.pin(**tile), direct:
        grad_x, dgamma, dbeta = launchers.conv_input_grad(
            x, gy, w, scale, shift, mean, rstd, conv_geometry((3, 3, 3), 1, 1, 1), torch.float32, batch_stats,
            grad_input=poisoned,
        )  # fmt: skip
    assert grad_x.data_ptr() == poisoned.data_ptr() and not grad_x.isnan().any()
    assert not dgamma.isnan().any() and not dbeta.isnan().any()


# ---------------------------------------------------------------------------------------- module


def _sequential(c_in=6, c_out=16, **conv):
    return nn.Sequential(
        OrderedDict(
            norm=nn.BatchNorm3d(c_in), relu=nn.ReLU(inplace=True), conv=nn.Conv3d(c_in, c_out, 3, **conv)
        )
    )


def test_state_dict_loads_both_ways_and_cpu_path_equals_sequential():
    torch.manual_seed(5)
    seq = _sequential(padding=1, bias=False)
    fused = BNReLUConv3d(6, 16)
    assert set(fused.state_dict()) == set(seq.state_dict())
    fused.load_state_dict(seq.state_dict())
    seq.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 4, 5, 6)
    assert torch.equal(fused(x), seq(x))  # "auto" on the CPU runs the PyTorch twin: identical
    assert torch.equal(fused.norm.running_mean, seq.norm.running_mean)
    fused.eval(), seq.eval()
    assert torch.equal(fused(x), seq(x))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_is_what_the_sequential_gives(backend, training):
    """N = 0 (the last, empty shard of a batch): the eager Sequential gives an empty output, keeps its
    running statistics and backpropagates zero gradients; ours refused it ("batch statistics need more
    than 1 value per channel")."""
    torch.manual_seed(9)
    seq = _sequential(padding=1, bias=True).train(training)
    fused = BNReLUConv3d.from_sequential(seq)
    x = torch.randn(0, 6, 4, 5, 6, requires_grad=True)
    expected = seq(x)
    with use_backend(backend):
        got = fused(x)
        got.sum().backward()
    assert got.shape == expected.shape == (0, 16, 4, 5, 6)
    assert torch.equal(fused.norm.running_mean, seq.norm.running_mean)
    assert torch.equal(fused.norm.running_var, seq.norm.running_var)
    assert fused.conv.weight.grad is not None and not fused.conv.weight.grad.any()


def test_from_sequential_copies_weights_settings_and_mode():
    torch.manual_seed(6)
    seq = _sequential(padding=2, dilation=2, bias=True).eval()
    fused = BNReLUConv3d.from_sequential(seq)
    assert not fused.training and fused.conv.dilation == (2, 2, 2) and fused.out_channels == 16
    x = torch.randn(1, 6, 6, 6, 6)
    with use_backend("triton"):
        assert max_rel_error(fused(x), seq(x)) < RTOL32
    assert fused.conv.weight.data_ptr() != seq.conv.weight.data_ptr()  # a copy: seq untouched


def test_from_sequential_rejects_other_structures():
    with pytest.raises(ValueError, match="BatchNorm3d, ReLU, Conv3d"):
        BNReLUConv3d.from_sequential(nn.Sequential(nn.ReLU(), nn.BatchNorm3d(4), nn.Conv3d(4, 4, 3)))
    with pytest.raises(ValueError, match="groups=2"):
        BNReLUConv3d.from_sequential(
            nn.Sequential(nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 4, 3, groups=2))
        )
    with pytest.raises(ValueError, match="'reflect'"):
        BNReLUConv3d.from_sequential(
            nn.Sequential(nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1, padding_mode="reflect"))
        )


# ------------------------------------------------------------------------------------- bad input


def _good():
    return dict(
        x=torch.randn(2, 4, 5, 5, 5),
        weight=torch.randn(8, 4, 3, 3, 3),
        bias=None,
        bn_weight=torch.ones(4),
        bn_bias=torch.zeros(4),
        running_mean=torch.zeros(4),
        running_var=torch.ones(4),
        training=True,
    )


BAD = [
    (dict(x=torch.randn(4, 5, 5, 5)), ValueError, r"x must be 5-D .* \(4, 5, 5, 5\)"),
    (dict(weight=torch.randn(8, 4, 3, 3)), ValueError, r"weight must be 5-D .* \(8, 4, 3, 3\)"),
    (dict(weight=torch.randn(8, 3, 3, 3, 3)), ValueError, r"expects 3 input channels but x .* has 4"),
    (dict(bias=torch.randn(7)), ValueError, r"bias must have shape \(8,\), got \(7,\)"),
    (dict(bn_weight=torch.ones(5)), ValueError, r"bn_weight must have shape \(4,\), got \(5,\)"),
    (dict(running_var=None), ValueError, r"both running_mean and running_var"),
    (dict(x=torch.randn(2, 4, 5, 5, 5).long()), TypeError, r"floating point, got torch.int64"),
    (dict(weight=torch.randn(8, 4, 3, 3, 3).double()), TypeError, r"weight dtype torch.float64"),
    (dict(weight=torch.randn(8, 4, 2, 2, 2), padding="same"), ValueError, r"even kernel_size \(2, 2, 2\)"),
    (dict(stride=2, padding="same"), ValueError, r"'same' needs stride 1"),
    (dict(padding=-1), ValueError, r"padding \(-1, -1, -1\)"),
    (dict(dilation=0), ValueError, r"dilation \(0, 0, 0\)"),
    (dict(x=torch.randn(1, 4, 2, 2, 2), padding=0), ValueError, r"output size would be \(0, 0, 0\)"),
    (dict(x=torch.randn(1, 4, 1, 1, 1)), ValueError, r"more than 1 value per channel"),
    (dict(momentum=1.5), ValueError, r"momentum 1.5"),
    (dict(eps=0.0), ValueError, r"eps 0.0"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("overrides,error,pattern", BAD)
def test_bad_arguments_raise_naming_them(backend, overrides, error, pattern):
    args = _good()
    args.update(overrides)
    with use_backend(backend), pytest.raises(error, match=pattern):
        functional.bn_relu_conv3d(**args)


def test_triton_rejects_float64_with_a_clear_error():
    args = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in _good().items()}
    with use_backend("triton"), pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        functional.bn_relu_conv3d(**args)
    with use_backend("torch"):  # the PyTorch twin takes float64
        assert functional.bn_relu_conv3d(**args).dtype == torch.float64


def test_reference_is_the_eager_sequential():
    """The twin is literally the Sequential's computation (guards the oracle itself)."""
    torch.manual_seed(7)
    seq = _sequential(padding=1, bias=True)
    x = torch.randn(2, 6, 4, 4, 4)
    p = dict(seq.named_parameters())
    rm, rv = seq.norm.running_mean.clone(), seq.norm.running_var.clone()
    got = reference.bn_relu_conv3d(
        x, p["conv.weight"], p["conv.bias"], p["norm.weight"], p["norm.bias"], rm, rv, True, 0.1, 1e-5,
        (1, 1, 1), (1, 1, 1), (1, 1, 1),
    )  # fmt: skip
    assert torch.equal(got, seq(x)) and torch.equal(rm, seq.norm.running_mean)


def test_training_input_gradient_in_channel_blocks_equals_one_pass(monkeypatch):
    """A small scratch bound forces the gz scratch to be processed 64 channels at a time."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as ops

    case = Case("many-channels", 2, 70, 16, (3, 4, 5))
    g = torch.Generator().manual_seed(8)
    x, params = make_input(case, g), make_params(case, g)
    whole, gy = run(x, params, case, True, "triton")
    monkeypatch.setattr(ops, "SCRATCH_BYTES", 2 * 3 * 4 * 5 * 4 * 64)  # room for 64 channels
    blocks, _ = run(x, params, case, True, "triton", grad_out=gy)
    for key in ("grad_x", "grad_bn_weight", "grad_bn_bias"):
        assert max_rel_error(blocks[key], whole[key]) < 1e-6, key


def test_conv_forward_applies_the_seeded_dropout_of_its_draws():
    """The dense block's dropout in the forward kernel's epilogue: exactly the mask of
    seeded_dropout.scale_from_uniform_ at each output's own draw (batch 3, two blocks of output channels,
    odd sizes, the output a channel slice of a channels-last buffer), kept outputs scaled by 1/(1-p);
    draws of another shape are refused."""
    from prostate_kernels.ops.bn_relu_conv3d_triton import conv_forward
    from prostate_kernels.ops.conv_geometry import conv_geometry
    from prostate_kernels.ops.seeded_dropout import dropout_uniform, scale_from_uniform_

    g = torch.Generator().manual_seed(9)
    x = torch.randn((3, 6, 3, 4, 5), generator=g).to(memory_format=torch.channels_last_3d)
    weight = torch.randn((70, 6, 3, 3, 3), generator=g) * 0.1
    scale, shift = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    geometry = conv_geometry((3, 3, 3), 1, 1, 1)
    buffer = torch.zeros((3, 75, 3, 4, 5)).to(memory_format=torch.channels_last_3d)
    plain = conv_forward(x, weight, None, scale, shift, geometry, torch.float32)
    uniform = dropout_uniform(torch.tensor([11]), 0, (3, 70, 3, 4, 5), torch.device("cpu"))
    got = conv_forward(x, weight, None, scale, shift, geometry, torch.float32, out=buffer[:, 5:],
                       dropout=(uniform, 0.3))  # fmt: skip
    mask = scale_from_uniform_(uniform.clone(), 0.3)
    assert torch.equal(got == 0, mask == 0) and 0.2 < (mask == 0).float().mean() < 0.4
    torch.testing.assert_close(got, plain * mask, rtol=1e-6, atol=1e-6)
    assert (buffer[:, :5] == 0).all()
    with pytest.raises(
        ValueError, match=r"dropout draws torch.float32 \(3, 70, 3, 4, 4\) must be contiguous"
    ):
        conv_forward(x, weight, None, scale, shift, geometry, torch.float32,
                     dropout=(uniform[..., :4], 0.3))  # fmt: skip
    with pytest.raises(ValueError, match=r"dropout draws torch.float64 \(3, 70, 3, 4, 5\) must be"):
        conv_forward(x, weight, None, scale, shift, geometry, torch.float32,
                     dropout=(uniform.double(), 0.3))  # fmt: skip


@pytest.mark.parametrize(
    "case", [CASES[0], Case("stride2-bias", 2, 6, 7, (13, 12, 15), stride=2, bias=True)], ids=lambda c: c.name
)
def test_weight_gradient_in_several_splits(case, monkeypatch):
    """The weight gradient's voxel reduction split over several programs (as on a GPU, where the grid
    must fill the SMs; on the CPU one split is chosen): partial sums in the weight's layout, added by the
    launcher; weight and bias gradients against float64, the weight gradient contiguous as autograd
    stores it."""
    from prostate_kernels.ops import bn_relu_conv3d_triton

    monkeypatch.setattr(bn_relu_conv3d_triton, "wgrad_programs_wanted", lambda device: 10_000)
    tuned, splits = bn_relu_conv3d_triton._wgrad, []

    class Spy:  # records the grid's split axis of each weight-gradient launch
        def __getitem__(self, grid):
            splits.append(grid({"BLOCK_CI": 32})[2])
            return tuned[grid]

    monkeypatch.setattr(bn_relu_conv3d_triton, "_wgrad", Spy())
    g = torch.Generator().manual_seed(3)
    x, params = make_input(case, g), make_params(case, g)
    with bn_relu_conv3d_triton.direct_kernels():  # stride 1 takes the halo kernels otherwise
        got, gy = run(x, params, case, True, "triton")
    assert splits == [3], splits
    expected, _ = run(x, params, case, True, "torch", dtype=torch.float64, grad_out=gy)
    assert got["grad_weight"].is_contiguous()
    for key in ("grad_weight", "grad_bias", "grad_x"):
        if key in expected:
            err = max_rel_error(got[key], expected[key])
            assert err < RTOL32, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("programs_wanted,splits", [(1, 1), (100, 16)])
def test_halo_weight_gradient_in_splits(programs_wanted, splits, monkeypatch):
    """The halo weight gradient's persistent grid in one split and in as many splits as boxes: each
    split's first box writes its sums (the buffer, NaN here, is never zeroed), and the launcher's sum
    over the splits comes out in the weight's layout (contiguous, as autograd stores it). C_in 40 (a
    full and a partial block of 32) and C_out 18 (one padded block of 32) leave padding in the sums'
    plane. Weight and bias gradients against float64."""
    from prostate_kernels.ops import bn_relu_conv3d_triton

    monkeypatch.setattr(bn_relu_conv3d_triton, "halo_programs_wanted", lambda device: programs_wanted)
    tuned, grids = bn_relu_conv3d_triton._wgrad_halo, []

    class Spy:  # records each halo weight-gradient launch's grid; the sums (argument 4) start as NaN
        pinned = None

        def __getitem__(self, grid):
            grids.append(grid)

            def launch(*args, **kwargs):
                args[4].fill_(float("nan"))  # an element the kernel failed to write would stay NaN
                tuned[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(bn_relu_conv3d_triton, "_wgrad_halo", Spy())
    case = Case("c40-c18-bias", 2, 40, 18, (5, 6, 9), bias=True)  # 2 x 2 x 2 x 2 = 16 boxes of 4x4x8
    g = torch.Generator().manual_seed(4)
    x, params = make_input(case, g), make_params(case, g)
    got, gy = run(x, params, case, True, "triton")
    assert grids == [(splits, 2, 1)], grids
    expected, _ = run(x, params, case, True, "torch", dtype=torch.float64, grad_out=gy)
    assert got["grad_weight"].is_contiguous()
    for key in ("grad_weight", "grad_bias", "grad_x"):
        err = max_rel_error(got[key], expected[key])
        assert err < RTOL32, f"{key}: relative error {err:.2e}"


class _LaunchLog:
    """Stands in for a kernel: records each launch's keyword arguments, then launches the kernel."""

    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def _gpu_tiles():
    """(forward: direct, halo; input gradient: direct, halo; weight gradient: direct, halo) tiles covering
    each list of a GPU's candidates."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    lists = (launchers.FWD_TILES, launchers.HALO_TILES, launchers.DGRAD_TILES, [launchers.HALO_DGRAD_TILE],
             launchers.WGRAD_TILES, [launchers.HALO_WGRAD_TILE])  # fmt: skip
    return [tuple(tiles[i % len(tiles)] for tiles in lists) for i in range(max(map(len, lists)))]


@pytest.mark.parametrize("tiles", _gpu_tiles(), ids=lambda t: "-".join(str(v) for d in t for v in d.values()))
def test_every_autotune_tile_matches_float64_reference(tiles, monkeypatch):
    """Each tile a GPU's autotuner may choose (the 64- and 128-channel weight-gradient tiles included: the
    wgmma ones at C_out 16), pinned (BucketedAutotuner.pin), computes the output and every gradient, at
    C_in = 70 (a partial block of 64 and of 128 channels, two of 32 and a partial third) and odd sizes,
    in the weight-gradient's several splits. Stride 1 takes the halo kernels; the direct ones run the same
    step under direct_kernels()."""
    import contextlib

    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    monkeypatch.setattr(launchers, "wgrad_programs_wanted", lambda device: 10_000)
    tuned = (launchers._fwd, launchers._fwd_halo, launchers._dgrad, launchers._dgrad_halo, launchers._wgrad,
             launchers._wgrad_halo)  # fmt: skip
    logs = [_LaunchLog(t.tuner.fn) for t in tuned]
    for t, log in zip(tuned, logs, strict=True):
        monkeypatch.setattr(t.tuner, "fn", log)
    case = Case("c70", 1, 70, 16, (3, 5, 7), bias=True)
    g = torch.Generator().manual_seed(5)
    x, params = make_input(case, g), make_params(case, g)
    with contextlib.ExitStack() as stack:
        for t, tile in zip(tuned, tiles, strict=True):
            stack.enter_context(t.pin(**tile))
        got, gy = run(x, params, case, True, "triton")
        with launchers.direct_kernels():
            direct, _ = run(x, params, case, True, "triton", grad_out=gy)
    expected, _ = run(x, params, case, True, "torch", dtype=torch.float64, grad_out=gy)
    for key, value in expected.items():
        err = max_rel_error(got[key], value)
        assert err < RTOL32, f"{key}: relative error {err:.2e}"
    for key, value in expected.items():
        err = max_rel_error(direct[key], value)
        assert err < RTOL32, f"direct kernels, {key}: relative error {err:.2e}"
    for log, tile in zip(logs, tiles, strict=True):
        assert log.calls and all(call.items() >= tile.items() for call in log.calls), (tile, log.calls)
    assert [len(log.calls) for log in logs] == [1] * 6


def test_an_input_gradient_tile_below_the_smallest_candidate_is_refused():
    """The input gradient's per-program partial sums have a row for each program of the smallest
    candidate tile. A pinned tile with fewer voxels per program (more programs) would write rows past
    the buffer: it is refused before launch, naming the tile."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    case = Case("small tile", 1, 8, 16, (3, 5, 7))
    g = torch.Generator().manual_seed(0)
    x, params = make_input(case, g), make_params(case, g)
    below = launchers.DGRAD_MIN_BLOCK_M // 2
    with (
        launchers.direct_kernels(),  # stride 1 takes the halo input gradient otherwise
        launchers._dgrad.pin(BLOCK_M=below, BLOCK_K=16),
        pytest.raises(ValueError, match=f"BLOCK_M {below} "),
    ):
        run(x, params, case, True, "triton")


def test_halo_tiles_that_their_buffers_do_not_fit_are_refused():
    """The halo kernels' scratch (forward), running sums (weight gradient) and per-box partial sums (input
    gradient) are sized on the host for their candidate tiles. A pinned tile with a larger halo, or
    another weight- or input-gradient tile, would write past them: refused before launch, naming the
    tile."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    case = Case("pinned", 1, 8, 16, (3, 5, 7))
    g = torch.Generator().manual_seed(0)
    x, params = make_input(case, g), make_params(case, g)
    big = {"BOX_D": 16, "BOX_H": 16, "BOX_W": 16, "BLOCK_K": 32, "FILL_M": 128}  # an 18^3 halo
    with launchers._fwd_halo.pin(**big), pytest.raises(ValueError, match="halo forward: tile .*BOX_D.: 16"):
        run(x, params, case, True, "triton")
    other = {**launchers.HALO_WGRAD_TILE, "BLOCK_CI": 64}
    with launchers._wgrad_halo.pin(**other), pytest.raises(ValueError, match="other warps and stages only"):
        run(x, params, case, True, "triton")
    other = {**launchers.HALO_DGRAD_TILE, "BOX_D": 2, "BOX_H": 8}
    with launchers._dgrad_halo.pin(**other), pytest.raises(ValueError, match="other warps and stages only"):
        run(x, params, case, True, "triton")
    with launchers._wgrad_halo.pin(**launchers.HALO_WGRAD_TILE, num_warps=8, num_stages=1):  # may change
        got, gy = run(x, params, case, True, "triton")
    expected, _ = run(x, params, case, True, "torch", dtype=torch.float64, grad_out=gy)
    assert max_rel_error(got["grad_weight"], expected["grad_weight"]) < RTOL32


def test_deterministic_mode_launches_the_first_candidates_untimed():
    """Under torch.use_deterministic_algorithms(True) the three conv kernels take the first config their
    autotuner's pruning keeps (Triton's own prune_configs, with the spill pruning), never timed, and the
    layer still matches float64."""
    from prostate_kernels.determinism import deterministic_mode
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    case = Case("deterministic", 2, 10, 16, (3, 4, 5))
    g = torch.Generator().manual_seed(3)
    x, params = make_input(case, g), make_params(case, g)
    tuned = (launchers._fwd_halo, launchers._dgrad_halo, launchers._wgrad_halo)
    before = [dict(t.chosen) for t in tuned]
    with deterministic_mode(True):
        got, gy = run(x, params, case, True, "triton")
    expected, _ = run(x, params, case, True, "torch", dtype=torch.float64, grad_out=gy)
    for key, value in expected.items():
        assert max_rel_error(got[key], value) < RTOL32, key
    for t, old in zip(tuned, before, strict=True):
        untimed = {k: v for k, v in t.chosen.items() if k not in old}
        assert untimed and all(k[-1] == "untimed" for k in untimed), t.chosen
        first = t.tuner.configs[0].all_kwargs()
        assert all(v == first for v in untimed.values())  # the interpreter's one candidate
