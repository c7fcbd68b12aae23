"""3D depthwise-separable atrous convolution: Triton kernels (interpreter on CPU) against float64."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from prostate_kernels import backend as backends
from prostate_kernels import functional, reference, use_backend
from prostate_kernels.nn import ASPP3d, DepthwiseConv3d, SeparableConv3d
from prostate_kernels.ops import depthwise_conv3d as depthwise_entry
from prostate_kernels.ops.depthwise_conv3d import CPU_NCDHW_FROM_CHANNELS, TRITON_FROM_ELEMENTS, runs_ncdhw

# float32 depthwise sums of 27 products against float64: ~1e-7 relative to the largest value (measured
# 2e-7); the bound leaves room for other shapes, not for a wrong tap or a missed voxel.
RTOL32 = 2e-6


@dataclass(frozen=True)
class Case:
    name: str
    c: int
    size: tuple[int, int, int]
    stride: int | tuple[int, int, int] = 1
    padding: int | tuple[int, int, int] = 1
    dilation: int | tuple[int, int, int] = 1
    layout: str = "contiguous"  # | "channels_last" | "transposed"
    bias: bool = True
    gy_channels_last: bool = False  # the output gradient's layout (else NCDHW)


CASES = [
    Case("dilation1-odd", 5, (5, 7, 9)),
    Case("dilation2", 37, (6, 5, 7), padding=2, dilation=2),  # 37 channels: not a multiple of any block
    Case("dilation4", 3, (7, 6, 9), padding=4, dilation=4, layout="channels_last"),
    Case("dilation12", 6, (5, 5, 5), padding=12, dilation=12, bias=False),
    Case("stride2", 9, (7, 8, 9), stride=2),
    Case("per-axis", 4, (5, 9, 8), stride=(1, 2, 2), padding=(1, 2, 3), dilation=(1, 2, 3)),
    Case("non-contiguous", 7, (4, 6, 5), layout="transposed"),
    # channels-last with channel counts that are multiples of 8 and of 4, not 16 (as DeepLabv3+'s 728):
    # the kernels declare their voxel offsets multiples of 8 and 4 (launch.voxel_alignment)
    Case("channels-last-24ch", 24, (4, 5, 6), padding=2, dilation=2, layout="channels_last"),
    Case("channels-last-12ch-stride2", 12, (5, 6, 7), stride=2, layout="channels_last"),
    # stride 1, channels-last x: the depthwise halo kernels, in float32 here (the shapes of their tests
    # below): partial blocks of 32 and 64 channels; an output smaller than the input (padding 0 along D and
    # W); gy channels-last (the input gradient's halo kernel) and NCDHW (its direct kernel)
    Case("halo-70ch-odd", 70, (5, 7, 9), layout="channels_last", gy_channels_last=True),
    Case("halo-16ch-valid", 16, (6, 6, 11), padding=(0, 1, 0), layout="channels_last", bias=False),
    # an NCDHW x with a channels-last gy: the input gradient's halo kernel writes an NCDHW gx
    Case("ncdhw-x-channels-last-gy", 20, (5, 6, 7), padding=2, dilation=2, gy_channels_last=True),
]


def make_input(case: Case, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    size = case.size
    if case.layout == "transposed":
        x = torch.randn((2, case.c, size[2], size[1], size[0]), generator=g).transpose(2, 4)
    else:
        x = torch.randn((2, case.c, *size), generator=g)
        if case.layout == "channels_last":
            x = x.to(memory_format=torch.channels_last_3d)
    return x.to(dtype)


def run(case: Case, x, w, b, backend: str, dtype, gy=None):
    x = x.detach().to(dtype).requires_grad_(True)
    w = w.detach().to(dtype).requires_grad_(True)
    b = b.detach().to(dtype).requires_grad_(True) if b is not None else None
    with use_backend(backend):
        y = functional.depthwise_conv3d(x, w, b, case.stride, case.padding, case.dilation)
    if gy is None:
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        if case.gy_channels_last:
            gy = gy.to(memory_format=torch.channels_last_3d)
    y.backward(gy.to(y.dtype))
    return {"y": y, "grad_x": x.grad, "grad_w": w.grad, "grad_b": b.grad if b is not None else None}, gy


def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_matches_float64(case: Case):
    g = torch.Generator().manual_seed(0)
    x = make_input(case, g)
    w = torch.randn((case.c, 1, 3, 3, 3), generator=g)
    b = torch.randn((case.c,), generator=g) if case.bias else None
    got, gy = run(case, x, w, b, "triton", torch.float32)
    expected, _ = run(case, x, w, b, "torch", torch.float64, gy)
    assert got["y"].shape == expected["y"].shape
    for key, value in expected.items():
        if value is None:
            assert got[key] is None
            continue
        assert rel(got[key], value) < RTOL32, f"{key}: {rel(got[key], value):.1e}"


@pytest.mark.parametrize("wanted", [("x",), ("w", "b"), ("b",)])
def test_only_the_wanted_gradients(wanted):
    """Frozen parameters or an input without grad: the others' gradients as in float64, no gradient for
    the rest (the eager path skips what autograd does not ask for)."""
    case = CASES[1]
    g = torch.Generator().manual_seed(1)
    x = make_input(case, g)
    w, b = torch.randn((case.c, 1, 3, 3, 3), generator=g), torch.randn((case.c,), generator=g)
    gy = torch.randn((2, case.c, *case.size), generator=g)
    results = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        tensors = {"x": x.detach().to(dtype), "w": w.detach().to(dtype), "b": b.detach().to(dtype)}
        for name, t in tensors.items():
            t.requires_grad_(name in wanted)
        with use_backend(backend):
            y = functional.depthwise_conv3d(tensors["x"], tensors["w"], tensors["b"], 1, 2, 2)
        y.backward(gy.to(dtype))
        results[backend] = {name: t.grad for name, t in tensors.items()}
    for name in ("x", "w", "b"):
        got, expected = results["triton"][name], results["torch"][name]
        if name not in wanted:
            assert got is None and expected is None, name
            continue
        assert rel(got, expected) < RTOL32, f"{name}: {rel(got, expected):.1e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_is_comparable_to_pytorch(dtype):
    """Error against float64 at most 2x PyTorch's own conv3d(groups=C) error in the same dtype, plus
    2 ulp of the dtype (the interpreter's float32 -> bfloat16 rounding is up to 2 ulp off)."""
    case = CASES[1]
    g = torch.Generator().manual_seed(1)
    x, w, b = (
        make_input(case, g),
        torch.randn((case.c, 1, 3, 3, 3), generator=g),
        torch.randn(case.c, generator=g),
    )
    ours, gy = run(case, x, w, b, "triton", dtype)
    eager, _ = run(case, x, w, b, "torch", dtype, gy)
    exact, _ = run(case, x.to(dtype), w.to(dtype), b.to(dtype), "torch", torch.float64, gy.to(dtype))
    for key in exact:
        assert ours[key].dtype == dtype
        bound = 2 * rel(eager[key], exact[key]) + 2 * torch.finfo(dtype).eps
        assert rel(ours[key], exact[key]) <= bound, key


@pytest.mark.parametrize("layout", ["ncdhw", "channels_last"])  # the direct kernels, the halo kernels
def test_autocast_saves_the_float32_weight_and_keeps_its_gradient_float32(layout):
    """Under autocast x is cast as conv3d casts it; the float32 weight goes to the kernels as it is (their
    relayout casts it), so it is what backward keeps (no bfloat16 copy) and its gradient is float32 with
    no cast to bfloat16 and back; results close to eager autocast's."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn((2, 40, 5, 6, 9), generator=g)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    conv = DepthwiseConv3d(40, 3, padding=2, dilation=2, bias=True)
    results, saved = {}, []
    for backend in ("triton", "torch"):
        x.grad = None
        conv.zero_grad(set_to_none=True)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
                y = conv(x)
        y.float().square().sum().backward()
        results[backend] = (y, x.grad, conv.weight.grad, conv.bias.grad)
        if backend == "triton":
            weights = [t for t in saved if t.shape == conv.weight.shape]
            assert [t.data_ptr() for t in weights] == [conv.weight.data_ptr()], [t.dtype for t in weights]
    (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = results["triton"], results["torch"]
    assert (y.dtype, gx.dtype, gw.dtype, gb.dtype) == (torch.bfloat16,) + (torch.float32,) * 3
    for name, ours, eager in (("y", y, y_ref), ("grad x", gx, gx_ref), ("grad weight", gw, gw_ref),
                              ("grad bias", gb, gb_ref)):  # fmt: skip
        assert rel(ours, eager) < 2e-2, f"{name}: {rel(ours, eager):.1e}"  # both round to bfloat16


def test_forward_writes_every_output_element():
    """Poisoned output memory: the kernel must overwrite all of it."""
    from prostate_kernels.ops import depthwise_conv3d_triton as ops
    from prostate_kernels.ops.conv_geometry import conv_geometry

    x = torch.randn((2, 5, 5, 6, 7))
    w = torch.randn((5, 1, 3, 3, 3))
    poisoned = torch.full((2, 5, 5, 6, 7), float("nan"))
    with use_backend("triton"):
        y = ops.depthwise_forward(x, w, None, conv_geometry((3, 3, 3), 1, 1, 1), out=poisoned)
    assert y.data_ptr() == poisoned.data_ptr() and not y.isnan().any()
    assert rel(y, torch.nn.functional.conv3d(x, w, None, 1, 1, 1, groups=5)) < RTOL32


# ---------------------------------------------------------------------------------------- modules


def test_depthwise_module_is_a_drop_in_for_grouped_conv3d():
    conv = nn.Conv3d(6, 6, 3, stride=2, padding=2, dilation=2, groups=6)
    module = DepthwiseConv3d.from_conv(conv)
    assert set(module.state_dict()) == set(conv.state_dict())
    x = torch.randn(1, 6, 7, 8, 9)
    with use_backend("triton"):
        assert rel(module(x), conv(x)) < RTOL32
    with pytest.raises(ValueError, match="groups=1"):
        DepthwiseConv3d.from_conv(nn.Conv3d(6, 6, 3))


def plain_separable(module: SeparableConv3d) -> nn.Module:
    """The same SepConv built from torch.nn layers only, with module's weights."""
    d = module.depthwise
    layers = [] if module.depth_activation else [nn.ReLU()]
    layers += [
        nn.Conv3d(
            d.in_channels, d.in_channels, d.kernel_size, d.stride, d.padding, d.dilation, d.in_channels, False
        ),
        nn.BatchNorm3d(d.in_channels, eps=module.depthwise_bn.eps),
    ]
    layers += [nn.ReLU()] if module.depth_activation else []
    layers += [nn.Conv3d(d.in_channels, module.pointwise.out_channels, 1, bias=False)]
    layers += [nn.BatchNorm3d(module.pointwise.out_channels, eps=module.pointwise_bn.eps)]
    layers += [nn.ReLU()] if module.depth_activation else []
    plain = nn.Sequential(*layers)
    convs = [m for m in plain if isinstance(m, nn.Conv3d)]
    bns = [m for m in plain if isinstance(m, nn.BatchNorm3d)]
    convs[0].load_state_dict(module.depthwise.state_dict())
    convs[1].load_state_dict(module.pointwise.state_dict())
    bns[0].load_state_dict(module.depthwise_bn.state_dict())
    bns[1].load_state_dict(module.pointwise_bn.state_dict())
    return plain.to(module.pointwise.weight.dtype)


def plain_separable_forward(module: SeparableConv3d, x: torch.Tensor) -> torch.Tensor:
    """module's SepConv computed with torch layers only (gradients land on module's parameters)."""
    d = module.depthwise
    h = x if module.depth_activation else torch.relu(x)
    h = torch.nn.functional.conv3d(h, d.weight, None, d.stride, d.padding, d.dilation, groups=d.in_channels)
    h = module.depthwise_bn(h)
    h = torch.relu(h) if module.depth_activation else h
    h = module.pointwise_bn(module.pointwise(h))
    return torch.relu(h) if module.depth_activation else h


@pytest.mark.parametrize("depth_activation", [False, True])
def test_separable_conv_matches_plain_layers_in_training(depth_activation):
    torch.manual_seed(2)
    module = SeparableConv3d(6, 16, dilation=(1, 2, 2), stride=(1, 2, 2), depth_activation=depth_activation)
    plain = plain_separable(module).double()
    x = torch.randn(2, 6, 5, 8, 9, dtype=torch.float64)
    with use_backend("triton"):
        y = module(x.float())
    y_ref = plain(x)
    gy = torch.randn_like(y_ref)
    y.backward(gy.float())
    y_ref.backward(gy)
    assert rel(y, y_ref) < 1e-5
    assert rel(module.depthwise.weight.grad, plain[1 if not depth_activation else 0].weight.grad) < 1e-5
    assert (
        rel(
            module.depthwise_bn.running_var,
            [m for m in plain if isinstance(m, nn.BatchNorm3d)][0].running_var,
        )
        < 1e-6
    )


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels-last"])
@pytest.mark.parametrize("depth_activation", [False, True])
def test_fused_inference_kernel_matches_unfused(depth_activation, channels_last):
    torch.manual_seed(3)
    module = SeparableConv3d(40, 24, dilation=2, depth_activation=depth_activation)  # 40: two channel blocks
    with torch.no_grad():  # non-trivial running statistics
        for bn in (module.depthwise_bn, module.pointwise_bn):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    module.eval()
    x = torch.randn(2, 40, 5, 6, 7)
    if channels_last:  # 40 and 24 channels: voxel offsets and channel bounds multiples of 8
        x = x.to(memory_format=torch.channels_last_3d)
    assert not module._fusable(x)  # on the CPU "auto" runs the twin
    with torch.no_grad(), use_backend("triton"):
        assert module._fusable(x)
        fused = module(x)
    with torch.no_grad():
        unfused = copy.deepcopy(module).double().reference_inference(x.double())
        eager = plain_separable(module).eval().double()(x.double())
    assert rel(unfused, eager) < 1e-12  # the twin is the eager stack
    assert rel(fused, unfused) < 1e-5


def test_aspp_matches_plain_layers():
    torch.manual_seed(4)
    aspp = ASPP3d(8, 16, rates=((1, 2, 2), 3, (2, 1, 4)))
    x = torch.randn(2, 8, 5, 6, 7)
    gy = torch.randn(2, 16, 5, 6, 7)

    def plain_forward(m: ASPP3d, x):
        pooled = torch.relu(m.pool_bn(m.pool_conv(x.mean(dim=(2, 3, 4), keepdim=True)))).expand(
            -1, -1, *x.shape[2:]
        )
        branches = [pooled, torch.relu(m.conv1x1_bn(m.conv1x1(x)))]
        branches += [plain_separable_forward(b, x) for b in m.atrous]
        return torch.relu(m.project_bn(m.project(torch.cat(branches, 1))))

    aspp.dropout.p = 0.0  # compare the deterministic part
    twin = ASPP3d(8, 16, rates=((1, 2, 2), 3, (2, 1, 4))).double()
    twin.load_state_dict(aspp.state_dict())
    with use_backend("triton"):
        y = aspp(x)
    y_ref = plain_forward(twin, x.double())
    y.backward(gy)
    y_ref.backward(gy.double())
    assert y.shape == (2, 16, 5, 6, 7)
    assert rel(y, y_ref) < 1e-5
    for (name, p), (_, q) in zip(aspp.named_parameters(), twin.named_parameters(), strict=True):
        assert rel(p.grad, q.grad) < 1e-4, name


def test_aspp_default_configuration():
    aspp = ASPP3d(2048)
    assert aspp.rates == ((6, 6, 6), (12, 12, 12), (18, 18, 18)) and aspp.project.in_channels == 5 * 256
    assert aspp.atrous[0].depthwise.padding == (6, 6, 6) and aspp.atrous[0].depth_activation
    assert aspp.dropout.p == 0.1


# ------------------------------------------------------------------------------------- bad input

BAD = [
    (dict(x=torch.randn(2, 4, 5, 5)), ValueError, r"x must be 5-D"),
    (dict(weight=torch.randn(4, 2, 3, 3, 3)), ValueError, r"weight must have shape \(4, 1, kD, kH, kW\)"),
    (dict(weight=torch.randn(5, 1, 3, 3, 3)), ValueError, r"for x with 4 channels, got \(5, 1, 3, 3, 3\)"),
    (dict(bias=torch.randn(3)), ValueError, r"bias must have shape \(4,\), got \(3,\)"),
    (dict(x=torch.randn(2, 4, 5, 5, 5).int()), TypeError, r"floating point, got torch.int32"),
    (dict(dilation=0), ValueError, r"dilation \(0, 0, 0\)"),
    (dict(stride=(1, 0, 1)), ValueError, r"stride \(1, 0, 1\)"),
    (dict(padding=(1, 1)), ValueError, r"padding \(1, 1\)"),
    (dict(dilation=12, padding=0), ValueError, r"output size would be"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("overrides,error,pattern", BAD)
def test_bad_arguments_raise(backend, overrides, error, pattern):
    args = dict(x=torch.randn(2, 4, 5, 5, 5), weight=torch.randn(4, 1, 3, 3, 3), bias=None, padding=1)
    args.update(overrides)
    with use_backend(backend), pytest.raises(error, match=pattern):
        functional.depthwise_conv3d(**args)


def test_separable_settings_are_checked():
    with pytest.raises(ValueError, match=r"kernel_size \(2, 2, 2\) must be odd"):
        SeparableConv3d(4, 8, kernel_size=2)
    with pytest.raises(ValueError, match=r"dilation \(1, 0\)"):
        SeparableConv3d(4, 8, dilation=(1, 0))


def test_twin_is_grouped_conv3d():
    x, w = torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3)
    expected = torch.nn.functional.conv3d(x, w, None, 1, 1, 1, groups=3)
    assert torch.equal(reference.depthwise_conv3d(x, w, None, (1, 1, 1), (1, 1, 1), (1, 1, 1)), expected)


@pytest.mark.parametrize("channels", [CPU_NCDHW_FROM_CHANNELS - 8, CPU_NCDHW_FROM_CHANNELS])
def test_the_cpu_path_runs_wide_channels_last_layers_ncdhw(channels, monkeypatch):
    """On the CPU, PyTorch's depthwise conv3d of a channels-last x of CPU_NCDHW_FROM_CHANNELS channels or
    more runs NCDHW (measured faster) and hands back a channels-last output; narrower layers stay
    channels-last. Output and every gradient against float64, in both cases."""
    seen = []
    twin = reference.depthwise_conv3d

    def spy(x, *args):
        seen.append(x.is_contiguous())
        return twin(x, *args)

    monkeypatch.setattr(reference, "depthwise_conv3d", spy)
    case = Case("wide", channels, (2, 3, 4), padding=(1, 2, 2), dilation=(1, 2, 2), layout="channels_last")
    g = torch.Generator().manual_seed(0)
    x, w, b = make_input(case, g), torch.randn((channels, 1, 3, 3, 3), generator=g), torch.randn(channels)
    w = w.to(memory_format=torch.channels_last_3d)
    got, gy = run(case, x, w, b, "torch", torch.float32)
    assert seen == [channels >= CPU_NCDHW_FROM_CHANNELS]
    assert got["y"].is_contiguous(memory_format=torch.channels_last_3d)
    expected, _ = run(case, x, w, b, "torch", torch.float64, gy)
    for key, value in expected.items():
        assert rel(got[key], value) < RTOL32, f"{key}: {rel(got[key], value):.1e}"


def _as_on_cuda(monkeypatch) -> None:
    """backend.resolve answers as for CUDA tensors ("auto" -> "triton"), so the CPU sees auto's choice."""
    real = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda device, *a: "triton" if backends.get_backend() == "auto"
                        else real(device, *a))  # fmt: skip


def test_auto_takes_pytorch_below_the_size_where_the_kernels_pay(monkeypatch):
    """Under "auto", a CUDA x of fewer than TRITON_FROM_ELEMENTS elements runs PyTorch's grouped conv3d
    (the GPU runs measured it 3.5-11.5x faster there); "triton" takes the kernels at every size."""
    _as_on_cuda(monkeypatch)
    small = torch.empty((2, 8, TRITON_FROM_ELEMENTS // 16 - 1, 1, 1), device="meta")  # 1 voxel short
    large = torch.empty((2, 8, TRITON_FROM_ELEMENTS // 16, 1, 1), device="meta")
    assert depthwise_entry.implementation(small) == "torch"
    assert depthwise_entry.implementation(large) == "triton"
    with use_backend("triton"):
        assert depthwise_entry.implementation(small) == "triton"
    with use_backend("torch"):
        assert depthwise_entry.implementation(large) == "torch"


def test_auto_below_the_size_runs_the_twin_with_its_result(monkeypatch):
    _as_on_cuda(monkeypatch)
    calls = []
    twin = reference.depthwise_conv3d
    monkeypatch.setattr(reference, "depthwise_conv3d", lambda *a: calls.append(1) or twin(*a))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn((2, 5, 3, 4, 5), generator=g), torch.randn((5, 1, 3, 3, 3), generator=g)
    y = functional.depthwise_conv3d(x, w, None, 1, 2, 2)
    assert calls == [1]
    assert torch.equal(y, torch.nn.functional.conv3d(x, w, None, 1, 2, 2, groups=5))


def test_pytorchs_conv_runs_channels_last_x_ncdhw_on_cuda_and_wide_ones_on_the_cpu():
    """cuDNN's channels-last depthwise conv3d took 11-127x NCDHW's time forward + backward on the H200."""
    assert runs_ncdhw("cuda", 1) and runs_ncdhw("cuda", 128)
    assert not runs_ncdhw("cpu", CPU_NCDHW_FROM_CHANNELS - 1) and runs_ncdhw("cpu", CPU_NCDHW_FROM_CHANNELS)
    assert not runs_ncdhw("meta", CPU_NCDHW_FROM_CHANNELS)


HALO_70 = Case("halo", 70, (5, 7, 9), layout="channels_last", gy_channels_last=True)  # 16 boxes of 4x4x8
HALO_VALID = Case("halo-valid", 16, (6, 6, 11), padding=(0, 1, 0), layout="channels_last")  # NCDHW gy


@pytest.mark.parametrize(
    "case, programs_wanted, grid",
    [(HALO_70, 1, (1, 2)), (HALO_70, 100, (16, 2)), (HALO_70, None, None), (HALO_VALID, 4, (4, 1))],
    ids=["one-split", "16-splits", "off", "valid-padding-ncdhw-gy"],
)
def test_the_halo_weight_gradient_writes_every_sum_in_any_split(case, programs_wanted, grid, monkeypatch):
    """A half-precision channels-last x at stride 1 takes depthwise_conv3d_wgrad_halo_kernel. Its partial
    sums start as NaN here: each program's first box writes its row, there is no zero fill. One program
    per channel block, and as many as there are boxes (16); an output smaller than the input (padding 0)
    with an NCDHW gy; against float64 on the same fp16 inputs (the gradients come back in fp16: rounding
    only). Under direct_kernels() (the one halo switch) the direct kernel runs instead."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as fused
    from prostate_kernels.ops import depthwise_conv3d_kernels as kernels

    real, grids = kernels.depthwise_conv3d_wgrad_halo_kernel, []

    class Spy:  # records each launch's grid; the partial sums (argument 2) start as NaN
        def __getitem__(self, launch_grid):
            def launch(*args, **kwargs):
                args[2].fill_(float("nan"))
                grids.append(launch_grid)
                return real[launch_grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernels, "depthwise_conv3d_wgrad_halo_kernel", Spy())
    if programs_wanted is not None:
        monkeypatch.setattr(fused, "halo_programs_wanted", lambda device: programs_wanted)
    g = torch.Generator().manual_seed(0)
    x = make_input(case, g).half()
    w, b = torch.randn((case.c, 1, 3, 3, 3), generator=g).half(), torch.randn((case.c,), generator=g).half()
    with fused.direct_kernels() if programs_wanted is None else contextlib.nullcontext():
        got, gy = run(case, x, w, b, "triton", torch.float16)
    expected, _ = run(case, x, w, b, "torch", torch.float64, gy.half())
    assert grids == ([grid] if grid else [])
    for key in ("grad_w", "grad_b"):
        assert rel(got[key], expected[key]) < 2e-3, f"{key}: {rel(got[key], expected[key]):.1e}"


# fmt: off
@pytest.mark.parametrize(
    "case, launches, dtype",
    [
        (HALO_70, 2, torch.float16),  # three blocks of 32 channels, the last partial; forward and input grad
        (HALO_70, 2, torch.float32),  # a float32 scratch
        (HALO_VALID, 1, torch.float16),  # padding 0: y smaller than x (input gradient's padding 2); NCDHW gy
        (Case("padding3", 24, (5, 6, 7), padding=3, layout="channels_last", gy_channels_last=True), 2,
         torch.float16),
        (Case("dilation2", 40, (6, 7, 12), padding=2, dilation=2, layout="channels_last",
              gy_channels_last=True), 2, torch.float16),
    ],
    ids=["70ch", "70ch-float32", "valid-padding-ncdhw-gy", "padding3-mirrored-negative", "dilation2"],
)
# fmt: on
def test_the_halo_forward_and_input_gradient_write_every_element(case, launches, dtype, monkeypatch):
    """A channels-last x at stride 1 takes depthwise_conv3d_halo_kernel for the forward, and a
    channels-last gy takes it for the input gradient (the conv of gy with the taps reversed and the
    padding mirrored: (K - 1) * dilation - padding, negative at padding 3, where y is larger than x). Its
    outputs start as NaN here, so an element it missed fails; against float64 on the same fp16 inputs
    (float32: on the same float32 inputs, within float32 sums' rounding)."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as fused
    from prostate_kernels.ops import depthwise_conv3d_kernels as kernels

    real, outputs = kernels.depthwise_conv3d_halo_kernel, []

    class Spy:  # records each launch's output (argument 3), filled with NaN first
        def __getitem__(self, launch_grid):
            def launch(*args, **kwargs):
                args[3].fill_(float("nan"))
                outputs.append(tuple(args[3].shape))
                return real[launch_grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernels, "depthwise_conv3d_halo_kernel", Spy())
    monkeypatch.setattr(fused, "halo_programs_wanted", lambda device: 5)  # programs with several boxes
    g = torch.Generator().manual_seed(0)
    x = make_input(case, g).to(dtype)
    w = torch.randn((case.c, 1, 3, 3, 3), generator=g).to(dtype)
    b = torch.randn((case.c,), generator=g).to(dtype)
    got, gy = run(case, x, w, b, "triton", dtype)
    expected, _ = run(case, x, w, b, "torch", torch.float64, gy.to(dtype))
    assert outputs == [tuple(expected["y"].shape), tuple(x.shape)][:launches]
    bound = RTOL32 if dtype == torch.float32 else 2e-3
    for key in ("y", "grad_x", "grad_w", "grad_b"):
        assert rel(got[key], expected[key]) < bound, f"{key}: {rel(got[key], expected[key]):.1e}"


def test_direct_kernels_turn_the_depthwise_halo_kernels_off(monkeypatch):
    """Under direct_kernels() (the one halo switch) the direct kernels run, in half precision and float32."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as fused
    from prostate_kernels.ops import depthwise_conv3d_kernels as kernels

    def refuse(*args, **kwargs):
        raise AssertionError("a depthwise halo kernel was launched")

    for name in ("depthwise_conv3d_halo_kernel", "depthwise_conv3d_wgrad_halo_kernel"):
        monkeypatch.setattr(kernels, name, type("Refuse", (), {"__getitem__": lambda self, grid: refuse})())
    g = torch.Generator().manual_seed(0)
    x = make_input(HALO_70, g)
    w, b = torch.randn((HALO_70.c, 1, 3, 3, 3), generator=g), torch.randn((HALO_70.c,), generator=g)
    with fused.direct_kernels():
        got, gy = run(HALO_70, x, w, b, "triton", torch.float16)
        got32, _ = run(HALO_70, x, w, b, "triton", torch.float32, gy)
    expected, _ = run(HALO_70, x, w, b, "torch", torch.float64, gy)
    for key in ("y", "grad_x", "grad_w"):
        assert rel(got[key], expected[key]) < 2e-3 and rel(got32[key], expected[key]) < RTOL32, key


@pytest.mark.parametrize("case, launches", [(HALO_70, 1), (HALO_VALID, 0)], ids=["cl-gy", "ncdhw-gy"])
def test_float32_weight_gradient_takes_the_halo_kernel_with_a_channels_last_gy(case, launches, monkeypatch):
    """In float32 the halo weight gradient's variants with an NCDHW gy spilled on sm_80 (255 registers,
    compile sweep of 2026-12-03), so there it takes the direct kernel; with a channels-last gy the halo
    kernel. Both against float64 at float32's bound."""
    from prostate_kernels.ops import depthwise_conv3d_kernels as kernels

    real, launched = kernels.depthwise_conv3d_wgrad_halo_kernel, []

    class Spy:
        def __getitem__(self, launch_grid):
            launched.append(launch_grid)
            return real[launch_grid]

    monkeypatch.setattr(kernels, "depthwise_conv3d_wgrad_halo_kernel", Spy())
    g = torch.Generator().manual_seed(0)
    x = make_input(case, g)
    w, b = torch.randn((case.c, 1, 3, 3, 3), generator=g), torch.randn((case.c,), generator=g)
    got, gy = run(case, x, w, b, "triton", torch.float32)
    expected, _ = run(case, x, w, b, "torch", torch.float64, gy)
    assert len(launched) == launches
    for key in ("grad_w", "grad_b"):
        assert rel(got[key], expected[key]) < RTOL32, f"{key}: {rel(got[key], expected[key]):.1e}"
