"""Correctness of every kernel on CUDA against a float64 reference, for bench/gpu_suite.py.

Each check returns rows {"check", "result" (PASS/FAIL), "detail"}; a failing comparison is reported,
not raised, so that one broken kernel does not hide the others.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from prostate_kernels import functional, reference, sliding_window_inference, use_backend
from prostate_kernels.backend import Backend
from prostate_kernels.data.errors import first_line
from prostate_kernels.determinism import deterministic_mode
from prostate_kernels.ops.conv_geometry import conv_geometry
from prostate_kernels.ops.launch import UNTIMED_IN_CAPTURE
from prostate_kernels.ops.window_ops import window_ops_for


def _row(check: str, ok: bool, detail: str) -> dict:
    return {"check": check, "result": "PASS" if ok else "FAIL", "detail": detail}


def _rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """max |a - b| / max |b|; a gradient that is None on one side only is a failure (inf)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _worst(errors: dict[str, float]) -> str:
    """The name of the largest error."""
    return max(errors, key=lambda name: errors[name])


def check_sliding_window(device: str = "cuda") -> list[dict]:
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for mode in ("constant", "gaussian"):
        x = torch.randn((2, 2, 13, 37, 29), generator=g).to(device)

        def predictor(w):
            return torch.cat([torch.sigmoid(w), w.cumsum(-1) / w.shape[-1]], dim=1)

        ours = sliding_window_inference(x, (8, 16, 16), 3, predictor, overlap=0.5, mode=mode)
        with use_backend("torch"):
            expected = sliding_window_inference(x, (8, 16, 16), 3, predictor, overlap=0.5, mode=mode)
        err = (ours - expected).abs().max().item()
        rows.append(
            _row(f"sliding_window {mode} (Triton) vs PyTorch twin", err < 1e-5, f"max abs err {err:.1e}")
        )

    def heads(w):  # two outputs, the second at half the window's resolution (deep-supervision-like)
        return torch.sigmoid(w[:, :1]), torch.nn.functional.avg_pool3d(w, 2)

    ours_heads = sliding_window_inference(x, (8, 16, 16), 3, heads, overlap=0.5, mode="gaussian")
    with use_backend("torch"):
        expected_heads = sliding_window_inference(x, (8, 16, 16), 3, heads, overlap=0.5, mode="gaussian")
    assert isinstance(ours_heads, tuple) and isinstance(expected_heads, tuple)
    err = max((a - b).abs().max().item() for a, b in zip(ours_heads, expected_heads, strict=True))
    rows.append(_row("sliding_window two outputs, one at half resolution (Triton) vs PyTorch twin",
                     err < 1e-5, f"max abs err {err:.1e}"))  # fmt: skip

    def conditioned(w, coords, condition):  # MONAI's with_coord and condition arguments
        z = torch.tensor([float(c[2].start) for c in coords], device=w.device).reshape(-1, 1, 1, 1, 1)
        return torch.sigmoid(w * condition) + z

    extras: dict[str, Any] = {
        "roi_weight_map": torch.rand((8, 16, 16), generator=g).to(device) + 0.1,
        "with_coord": True,
        "condition": torch.randn(x.shape, generator=g).to(device),
        "flip_axes": (2,),
    }
    ours_extras = sliding_window_inference(x, (8, 16, 16), 3, conditioned, 0.5, **extras)
    with use_backend("torch"):
        expected_extras = sliding_window_inference(x, (8, 16, 16), 3, conditioned, 0.5, **extras)
    err = (ours_extras - expected_extras).abs().max().item()
    rows.append(_row("sliding_window weight map, coordinates, condition, mirroring (Triton) vs PyTorch twin",
                     err < 1e-5, f"max abs err {err:.1e}"))  # fmt: skip
    rng = random.Random(0)
    ops, worst = window_ops_for(torch.device(device)), 0.0
    for _ in range(50):
        n, c = rng.randint(1, 3), rng.randint(1, 3)
        size = [rng.randint(1, 40) for _ in range(3)]
        roi = [rng.randint(1, s) for s in size]
        b = rng.randint(1, 20)
        starts = torch.tensor(
            [
                [rng.randrange(n)] + [rng.randint(0, s - r) for s, r in zip(size, roi, strict=True)]
                for _ in range(b)
            ]
        ).to(device)
        windows = torch.randn((b, c, *roi), device=device)
        importance = torch.rand(roi, device=device) + 0.1
        out, out64 = (
            torch.zeros((n, c, *size), device=device),
            torch.zeros((n, c, *size), device=device).double(),
        )
        weight, weight64 = (
            torch.zeros((n, 1, *size), device=device),
            torch.zeros((n, 1, *size), device=device).double(),
        )
        ops.accumulate_(out, weight, windows, starts, importance)
        reference.window_accumulate_(out64, weight64, windows.double(), starts, importance.double())
        gathered = ops.gather(torch.randn((n, c, *size), device=device), starts, roi)
        worst = max(
            worst, (out.double() - out64).abs().max().item(), (weight.double() - weight64).abs().max().item()
        )
        assert gathered.shape == (b, c, *roi)
    rows.append(
        _row("window ops (Triton, 50 random cases) vs float64", worst < 1e-4, f"max abs err {worst:.1e}")
    )
    return rows


class DenseCase(NamedTuple):
    """One fused-layer check's shape: x (n, c_in, *size) -> (n, c_out, ...) through a 3x3x3 conv;
    channel_slice: x is a channel range of a wider buffer, as in the dense block."""

    n: int
    c_in: int
    c_out: int
    size: tuple[int, int, int]
    stride: int
    padding: int
    dilation: int
    bias: bool
    channel_slice: bool


def _dense_layer_case(case: DenseCase, device, dtype, g, channels_last=True):
    n, c_in, c_out, size, stride, padding, dilation, bias, channel_slice = case
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    if channel_slice:  # the dense block's view: a channel range of a wider shared buffer
        buffer = torch.randn((n, c_in + 9, *size), generator=g).to(memory_format=layout)
        x = buffer[:, 3 : 3 + c_in]
    else:
        x = torch.randn((n, c_in, *size), generator=g).to(memory_format=layout)
    x = (x * 1.5 + 0.3).to(device=device, dtype=dtype)
    params = {
        "weight": torch.randn((c_out, c_in, 3, 3, 3), generator=g) / (27 * c_in) ** 0.5,
        "bias": torch.randn((c_out,), generator=g) if bias else None,
        "bn_weight": torch.rand((c_in,), generator=g) + 0.5,
        "bn_bias": torch.randn((c_in,), generator=g) * 0.5,
        "running_mean": torch.zeros(c_in),
        "running_var": torch.ones(c_in),
    }
    return (
        x,
        {k: (v.to(device) if v is not None else None) for k, v in params.items()},
        (stride, padding, dilation),
    )


def _run_dense_layer(x, params, conv, training, backend, dtype, gy=None):
    x = x.detach().to(dtype).requires_grad_(True) if x.dtype != dtype else x.detach().requires_grad_(True)

    def cast(k, v):  # conv parameters in the compute dtype, BN parameters float32 (float64 for the reference)
        return (
            v.detach()
            .clone()
            .to(dtype if k in ("weight", "bias") or dtype == torch.float64 else torch.float32)
        )

    p = {k: cast(k, v) for k, v in params.items() if v is not None}
    for k in ("weight", "bias", "bn_weight", "bn_bias"):
        if k in p:
            p[k].requires_grad_(True)
    with use_backend(backend):
        y = functional.bn_relu_conv3d(
            x, p["weight"], p.get("bias"), p["bn_weight"], p["bn_bias"], p["running_mean"], p["running_var"],
            training, 0.1, 1e-5, *conv,
        )  # fmt: skip
    gy = torch.randn_like(y, dtype=torch.float32) if gy is None else gy
    y.backward(gy.to(y.dtype))
    out = {"y": y, "grad_x": x.grad, "running_mean": p["running_mean"], "running_var": p["running_var"]}
    out.update({f"grad_{k}": p[k].grad for k in ("weight", "bias", "bn_weight", "bn_bias") if k in p})
    return out, gy


DENSE_CASES = [  # (name, DenseCase)
    ("odd sizes", DenseCase(2, 5, 16, (5, 7, 9), 1, 1, 1, False, False)),
    ("stride 2 + bias", DenseCase(1, 40, 7, (6, 5, 7), 2, 1, 1, True, False)),
    ("dilation 2", DenseCase(2, 19, 16, (7, 6, 9), 1, 2, 2, False, False)),
    ("channel slice, 100 ch", DenseCase(2, 100, 16, (8, 16, 16), 1, 1, 1, False, True)),
]


# Tiramisu p3a's first block's last layer
P3A_LAYER = DenseCase(2, 112, 16, (16, 64, 64), 1, 1, 1, False, True)


def check_bn_relu_conv3d(device: str = "cuda") -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # float32 checks: IEEE dots in the kernels
    try:
        cases = [(name, case, True) for name, case in DENSE_CASES]
        cases += [(f"{name}, NCDHW", case, False) for name, case in DENSE_CASES[::2]]
        for name, case, channels_last in cases:
            x, params, conv = _dense_layer_case(case, device, torch.float32, g, channels_last)
            for training in (True, False):
                got, gy = _run_dense_layer(x, params, conv, training, "triton", torch.float32)
                exp, _ = _run_dense_layer(x, params, conv, training, "torch", torch.float64, gy)
                errs = {k: _rel(got[k], v) for k, v in exp.items()}
                worst = _worst(errs)
                rows.append(
                    _row(
                        f"bn_relu_conv3d fp32 {name} {'train' if training else 'eval'} vs float64",
                        errs[worst] < 1e-4,
                        f"worst {worst} rel {errs[worst]:.1e} over {len(errs)} tensors",
                    )
                )
        # reduced precision at the p3a shape, both layouts: our error within 2x eager's (same dtype)
        for dtype in (torch.bfloat16, torch.float16, "tf32"):
            for channels_last in (True, False):
                rows.append(_check_reduced_precision(dtype, channels_last, device, g))
        if device == "cuda":
            rows.append(_tf32_diagnostic(device, g))
            rows.append(_check_int64_offsets(device))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return rows


def _check_reduced_precision(dtype, channels_last: bool, device: str, g) -> dict:
    """bf16, fp16 or TF32 (float32 with cuDNN's TF32 flag on: the kernels' dots follow it) at p3a's
    shape: the error of ours against float64 at most 2x the error of eager PyTorch in the same precision."""
    compute = torch.float32 if dtype == "tf32" else dtype
    torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    try:
        x, params, conv = _dense_layer_case(P3A_LAYER, device, compute, g, channels_last)
        ours, gy = _run_dense_layer(x, params, conv, True, "triton", compute)
        eager, _ = _run_dense_layer(x, params, conv, True, "torch", compute, gy)
    finally:
        torch.backends.cudnn.allow_tf32 = False
    exact, _ = _run_dense_layer(x, params, conv, True, "torch", torch.float64, gy)
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    layout = "channels-last" if channels_last else "NCDHW"
    return _error_ratio_row(f"bn_relu_conv3d {name} p3a 112ch 16x64x64 {layout}", ours, eager, exact)


def _error_ratio_row(what: str, ours: dict, eager: dict, exact: dict, focus: str = "") -> dict:
    """Passes when each tensor's error against float64 is at most 2x eager PyTorch's in the same
    precision. Tensors both compute in float32 (running statistics) have errors near 1e-7: below 1e-5,
    a ratio over 2 is rounding noise, not a defect."""
    ratios = {
        k: _rel(ours[k], exact[k]) / max(_rel(eager[k], exact[k]), 1e-30)
        for k in exact
        if _rel(ours[k], exact[k]) > 1e-5
    } or {"y": 0.0}
    worst = _worst(ratios)
    detail = f"worst {worst}: {ratios[worst]:.2f}x eager's error ({_rel(ours[worst], exact[worst]):.1e})"
    if focus:  # the tensor the case is about, whether or not it is the worst
        ratio = _rel(ours[focus], exact[focus]) / max(_rel(eager[focus], exact[focus]), 1e-30)
        detail += f"; {focus}: {ratio:.2f}x ({_rel(ours[focus], exact[focus]):.1e})"
    return _row(f"{what}: error / eager's error", ratios[worst] <= 2.0, detail)


def check_bn_relu_conv3d_tiles(device: str = "cuda", layer: DenseCase = P3A_LAYER) -> list[dict]:
    """Every tile a GPU's autotuner may choose (each kernel's tiles x warps, spilling ones included),
    pinned one kernel at a time (BucketedAutotuner.pin; the other two autotuned), at p3a's layer shape in
    bf16: its error against float64 within 2x eager's bf16 error. The interpreter checks the tiles'
    indexing; this checks the tensor-core code each becomes (wgmma or mma.sync)."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as launchers

    g = torch.Generator().manual_seed(2)
    x, params, conv = _dense_layer_case(layer, device, torch.bfloat16, g, True)
    out_size = conv_geometry((3, 3, 3), *conv).output_size(layer.size)  # conv: (stride, padding, dilation)
    gy = torch.randn((layer.n, layer.c_out, *out_size), generator=g).to(device)  # not the global RNG's
    eager, _ = _run_dense_layer(x, params, conv, True, "torch", torch.bfloat16, gy)
    exact, _ = _run_dense_layer(x, params, conv, True, "torch", torch.float64, gy)
    shape = f"{layer.c_in}ch {'x'.join(map(str, layer.size))}"
    rows = []
    halo, direct = launchers.halo_kernels, launchers.direct_kernels  # whatever set_halo_kernels() chose
    plain, halo_ws = launchers.WARPS_STAGES, launchers.HALO_WARPS_STAGES
    kernels = (("forward (halo)", "y", launchers._fwd_halo, launchers.HALO_TILES, halo_ws, halo),
               ("forward (direct)", "y", launchers._fwd, launchers.FWD_TILES, plain, direct),
               ("input grad (halo)", "grad_x", launchers._dgrad_halo, [launchers.HALO_DGRAD_TILE], halo_ws,
                halo),
               ("input grad (direct)", "grad_x", launchers._dgrad, launchers.DGRAD_TILES, plain, direct),
               ("weight grad (halo)", "grad_weight", launchers._wgrad_halo, [launchers.HALO_WGRAD_TILE],
                halo_ws, halo),
               ("weight grad (direct)", "grad_weight", launchers._wgrad, launchers.WGRAD_TILES, plain,
                direct))  # fmt: skip
    for name, focus, tuned, tiles, warps_stages, kernel_kind in kernels:
        for tile in tiles:
            for warps, stages in warps_stages:
                with tuned.pin(**tile, num_warps=warps, num_stages=stages), kernel_kind():
                    ours, _ = _run_dense_layer(x, params, conv, True, "triton", torch.bfloat16, gy)
                label = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in tile.items())
                rows.append(_error_ratio_row(f"bn_relu_conv3d bf16 {shape} {name} tile {label} "
                                             f"{warps} warps", ours, eager, exact, focus))  # fmt: skip
    return rows


def _tf32_diagnostic(device: str, g) -> dict:
    """INFO, not a check: does eager (cuDNN) use TF32 in this layer's backward at all? Eager's error
    against float64 with cuDNN's TF32 flag on and off; equal errors mean that cuDNN picked no TF32
    algorithm there, and then "ours within 2x eager's TF32 error" compares TF32 against IEEE float32."""
    x, params, conv = _dense_layer_case(P3A_LAYER, device, torch.float32, g, True)
    errors = {}
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            ours, gy = _run_dense_layer(x, params, conv, True, "triton", torch.float32)
            eager, _ = _run_dense_layer(x, params, conv, True, "torch", torch.float32, gy)
        finally:
            torch.backends.cudnn.allow_tf32 = False
        exact, _ = _run_dense_layer(x, params, conv, True, "torch", torch.float64, gy)
        errors[tf32] = {k: (_rel(ours[k], exact[k]), _rel(eager[k], exact[k])) for k in exact}
    detail = "; ".join(
        f"{k}: ours {errors[True][k][0]:.1e}/{errors[False][k][0]:.1e}, "
        f"eager {errors[True][k][1]:.1e}/{errors[False][k][1]:.1e}"
        for k in ("y", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias")
        if k in errors[True]
    )
    return {
        "check": "TF32 diagnostic (rel error vs float64, TF32 on/off)",
        "result": "INFO",
        "detail": detail,
    }


def _check_int64_offsets(device: str) -> dict:
    """Every 108th channel of a 2.7e9-element buffer: x spans 2.8e9 elements, so its offsets need int64."""
    buffer = torch.zeros((1, 2600, 16, 256, 256), device=device, dtype=torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(1)
    x = buffer[:, ::108]  # 25 channels, channel stride 108 * 2^20
    x.normal_(generator=g)
    w = torch.randn((16, 25, 3, 3, 3), device=device, dtype=torch.bfloat16, generator=g) / 15
    args = (None, torch.ones(25, device=device), torch.zeros(25, device=device), None, None, True)
    with use_backend("triton"):
        y = functional.bn_relu_conv3d(x, w, *args)
    with use_backend("torch"):
        expected = functional.bn_relu_conv3d(x.float(), w.float(), *args)
    err = _rel(y, expected)
    del buffer
    return _row("bn_relu_conv3d on a slice past 2^31 elements (bf16)", err < 2e-2, f"rel err {err:.1e}")


def check_dense_block(device: str = "cuda") -> list[dict]:
    """Shared-storage block (Triton, float32 IEEE dots) against the naive block in float64, dropout on."""
    import copy

    from prostate_kernels.nn import DenseBlock3d

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        ours = DenseBlock3d(20, growth_rate=16, num_layers=4, dropout=0.2).to(device)
        naive = copy.deepcopy(ours).double()
        naive.memory_efficient = False
        errs = {}
        for step in range(2):
            x = torch.randn((2, 20, 8, 16, 16), device=device, dtype=torch.float64) + step
            outs = []
            for block, dtype in ((ours, torch.float32), (naive, torch.float64)):
                torch.manual_seed(10 + step)
                xi = x.to(dtype).requires_grad_(True)
                block.zero_grad(set_to_none=True)
                y = block(xi)
                (y * torch.linspace(-1, 1, y.numel(), device=device, dtype=dtype).view_as(y)).sum().backward()
                outs.append((y, xi.grad))
            errs[f"step{step} y"] = _rel(outs[0][0], outs[1][0])
            errs[f"step{step} grad_x"] = _rel(outs[0][1], outs[1][1])
        for (name, p), (_, q) in zip(ours.named_parameters(), naive.named_parameters(), strict=True):
            errs[f"grad {name}"] = _rel(p.grad, q.grad)
        for (name, b), (_, c) in zip(ours.named_buffers(), naive.named_buffers(), strict=True):
            if b.is_floating_point():
                errs[name] = _rel(b, c)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    worst = _worst(errs)
    return [
        _row(
            "DenseBlock3d (Triton, dropout 0.2, 2 steps) vs naive float64",
            errs[worst] < 1e-4,
            f"worst {worst} rel {errs[worst]:.1e} over {len(errs)} tensors",
        ),
        _check_fused_dropout(device),
    ]


def _check_fused_dropout(device: str, shape: tuple[int, ...] = (2, 64, 16, 64, 64)) -> dict:
    """The block backward's one-launch dropout (philox_dropout_) against mul_ by the mask tensor made from
    philox_uniform, bitwise, on a bf16 channel slice of a channels-last buffer (the block's grad_new)."""
    from prostate_kernels.ops.seeded_dropout import scale_from_uniform_
    from prostate_kernels.ops.seeded_dropout_triton import philox_dropout_, philox_uniform

    g = torch.Generator(device=device).manual_seed(3)
    seeds = torch.randint(0, 2**62, (3,), device=device, generator=g)
    # bf16 on the GPU; float16 elsewhere: the interpreter truncates float32 -> bf16 where a GPU rounds
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    buffer = torch.randn(shape, device=device, generator=g).to(dtype)
    buffer = buffer.to(memory_format=torch.channels_last_3d)
    expected, got = buffer.clone(), buffer.clone()
    part = expected[:, 32:48]
    part.mul_(scale_from_uniform_(philox_uniform(seeds, 1, tuple(part.shape)), 0.2))
    fused = philox_dropout_(got[:, 32:48], seeds, 1, 0.2)
    same = fused and torch.equal(got, expected)
    differing = int((got != expected).sum())
    name = str(dtype).removeprefix("torch.")
    return _row(f"dense block dropout, one launch ({name} CL slice) bitwise the mask multiply", same,
                f"fused {fused}, {differing} elements differ")  # fmt: skip


def check_depthwise(device: str = "cuda") -> list[dict]:
    """Depthwise conv (forward, input and weight grads) and the fused separable block vs float64."""
    from prostate_kernels.nn import SeparableConv3d

    rows, g = [], torch.Generator().manual_seed(0)
    for c, size, stride, dilation, channels_last in (
        (37, (7, 9, 11), 1, 1, True),
        (128, (8, 16, 16), 2, 2, True),
        (64, (6, 20, 20), 1, 12, False),
        (40, (5, 9, 13), (1, 2, 2), (1, 3, 6), True),
        (728, (4, 8, 8), 1, 2, True),  # DeepLabv3+'s 728 channels: offsets declared multiples of 8
    ):
        x = torch.randn((2, c, *size), generator=g).to(device)
        if channels_last:
            x = x.to(memory_format=torch.channels_last_3d)
        w, b = torch.randn((c, 1, 3, 3, 3), generator=g).to(device), torch.randn(c, generator=g).to(device)
        ours, gy = _run_depthwise(x, w, b, stride, dilation, "triton", torch.float32)
        exact, _ = _run_depthwise(x, w, b, stride, dilation, "torch", torch.float64, gy)
        errs = {k: _rel(ours[k], v) for k, v in exact.items()}
        worst = _worst(errs)
        rows.append(
            _row(
                f"depthwise C={c} {size} stride {stride} dilation {dilation} vs float64",
                errs[worst] < 1e-5,
                f"worst {worst} rel {errs[worst]:.1e}",
            )
        )
    for c, size, dilation in ((728, (4, 8, 8), 2), (37, (7, 9, 11), 1)):
        rows.append(_check_depthwise_bf16(device, g, c, size, dilation))
    torch.manual_seed(0)
    module = SeparableConv3d(96, 80, dilation=(2, 6, 6), depth_activation=True).to(device).eval()
    x = torch.randn((2, 96, 8, 16, 16), device=device).to(memory_format=torch.channels_last_3d)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad(), use_backend("triton"):
            fused = module(x)
        with torch.no_grad():
            import copy

            exact = copy.deepcopy(module).double().reference_inference(x.double())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32[1]
    err = _rel(fused, exact)
    rows.append(_row("fused separable inference vs float64 unfused", err < 1e-5, f"rel {err:.1e}"))
    return rows


def _run_depthwise(x, w, b, stride, dilation, backend: Backend, dtype, gy=None):
    """Output and gradients of the depthwise conv (padding = dilation) in dtype on `backend`, and the
    output gradient used (a random one when gy is None)."""
    xi, wi, bi = (t.detach().to(dtype).requires_grad_(True) for t in (x, w, b))
    with use_backend(backend):
        y = functional.depthwise_conv3d(xi, wi, bi, stride, dilation, dilation)
    gy = torch.randn_like(y, dtype=torch.float32) if gy is None else gy
    y.backward(gy.to(dtype))
    return {"y": y, "grad_x": xi.grad, "grad_w": wi.grad, "grad_b": bi.grad}, gy


def _check_depthwise_bf16(device: str, g, c: int, size: tuple[int, int, int], dilation: int) -> dict:
    """bf16, channels-last, stride 1: the depthwise halo kernels (forward, input gradient with a
    channels-last gy, weight gradient); at 728 channels their accesses are 16-byte vectors of 8 channels,
    at 37 the boxes and channel blocks are partial. Output and gradients against float64 within 2x the
    error of PyTorch's grouped conv3d in bf16."""
    x = torch.randn((2, c, *size), generator=g).to(device).to(memory_format=torch.channels_last_3d)
    w, b = torch.randn((c, 1, 3, 3, 3), generator=g).to(device), torch.randn(c, generator=g).to(device)
    ours, gy = _run_depthwise(x, w, b, 1, dilation, "triton", torch.bfloat16)
    eager, _ = _run_depthwise(x, w, b, 1, dilation, "torch", torch.bfloat16, gy)
    exact, _ = _run_depthwise(x, w, b, 1, dilation, "torch", torch.float64, gy)
    shape = "x".join(map(str, size))
    return _error_ratio_row(
        f"depthwise bf16 C={c} channels-last {shape} dilation {dilation}", ours, eager, exact
    )


def check_predict_stitching(device: str = "cuda") -> list[dict]:
    """predict_probabilities with the windows stitched on the GPU vs the same network on the CPU: the
    patch's 8 windows, and one whole-volume window whose 8 mirror images share calls of 4."""
    import numpy as np
    from prostate_kernels.models import build_model

    from prostate_kernels.predict import predict_probabilities

    torch.manual_seed(0)
    model = build_model("unet3d", filters=(8, 16)).eval()
    image = np.random.default_rng(0).standard_normal((20, 40, 44)).astype(np.float32)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    try:
        for roi, what in (((16, 32, 32), "8 windows"), ((24, 40, 48), "one whole-volume window")):
            gpu = predict_probabilities(model.to(device), image, roi, device=device, tta=True)
            cpu = predict_probabilities(model.cpu(), image, roi, device="cpu", tta=True)
            err = float(np.abs(gpu - cpu).max())
            rows.append(_row(f"predict_probabilities stitched on the GPU vs on the CPU (mirroring, {what})",
                             err < 1e-4, f"max abs err {err:.1e}"))  # fmt: skip
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return rows


def check_export(device: str = "cuda") -> list[dict]:
    """The program of `prostate-kernels export` (traced on the CPU), moved to `device`, vs the network on
    `device` (plain PyTorch backend, TF32 off): a deployment runs the file on its GPU."""
    import tempfile
    from pathlib import Path

    from prostate_kernels.models import build_model

    from prostate_kernels import use_backend
    from prostate_kernels.checkpoint import save_checkpoint
    from prostate_kernels.export import export_checkpoint

    rows = []
    deeplab = {"width": 0.25, "middle_blocks": 1}
    # (network, its settings, --any-size, the windows the program runs on the device)
    networks: tuple[tuple[str, dict, bool, tuple[int, ...]], ...] = (
        ("tiramisu3d_tiny", {}, False, (3, 1, 16, 32, 32)),
        ("deeplabv3plus_3d", deeplab, False, (3, 1, 16, 32, 32)),
        ("tiramisu3d_tiny", {}, True, (2, 1, 24, 48, 40)),
    )
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for name, kwargs, any_size, shape in networks:
            torch.manual_seed(0)
            model = build_model(name, **kwargs).eval()
            state = {
                "model": name,
                "model_kwargs": kwargs,
                "state_dict": model.state_dict(),
                "patch": [16, 32, 32],
            }
            x = torch.randn(shape, device=device)
            kind = " (--any-size)" if any_size else ""
            what = f"exported {name} program{kind} on {device} vs the network there"
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    checkpoint = save_checkpoint(state, Path(tmp) / "best.pt")
                    export_checkpoint(checkpoint, Path(tmp) / "net.pt2", any_size=any_size)
                    program = torch.export.load(str(Path(tmp) / "net.pt2")).module().to(device)
                with torch.no_grad(), use_backend("torch"):
                    err = _rel(program(x), model.to(device)(x))
                rows.append(
                    _row(what, err < 1e-4, f"max rel err {err:.1e} ({'x'.join(map(str, shape))} windows)")
                )
            except Exception as exc:  # the row says what failed; the other checks go on
                rows.append(_row(what, False, f"{type(exc).__name__}: {first_line(exc)}"))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return rows


def check_info(device: str = "cuda") -> list[dict]:
    """`prostate-kernels info --check` on `device` (prostate_kernels.self_check): every layer on small
    odd shapes (the Triton kernels forced on CUDA) against its float64 copy, in float32 and under bf16
    autocast; a row per layer and precision."""
    from prostate_kernels.self_check import run_checks

    rows = []
    for r in run_checks([torch.device(device)]):
        detail = r.failure or f"max rel err {r.error:.1e}"
        if r.eager_error is not None:
            detail += f" (eager PyTorch's {r.eager_error:.1e})"
        rows.append(_row(f"info --check: {r.check}, {r.precision} ({r.implementation})", r.passed,
                         f"{detail}, {r.seconds:.1f} s"))  # fmt: skip
    return rows + [_eager_bf16_conv3d_diagnostic(device)]


def _eager_bf16_conv3d_diagnostic(device: str) -> dict:
    """INFO, not a check: the error of eager PyTorch's own bf16 conv3d weight gradient for an input 2
    slices deep on `device` (cpu_bf16's probe; oneDNN's is garbage on the CPUs it was written on). The
    plain networks' layers, and the eager baselines of the bf16 checks, run there."""
    from prostate_kernels.cpu_bf16 import PROBE_TEXT, is_faulty, probe_error

    error = probe_error(device)
    verdict = "WRONG" if is_faulty(error) else "right"
    return {
        "check": f"eager bf16 conv3d weight gradient, input {PROBE_TEXT} (2 slices deep)",
        "result": "INFO",
        "detail": f"{verdict}: rel error {error:.2g} vs float64 (bf16's rounding: about 4e-3)",
    }


def check_determinism(
    device: str = "cuda",
    layer: DenseCase = P3A_LAYER,
    block: tuple[int, int, int] = (48, 16, 4),  # DenseBlock3d's in_channels, growth rate, layers
    block_size: tuple[int, int, int] = (16, 64, 64),
    volume_size=(40, 96, 96),
    roi=(16, 48, 48),
    # (name, overrides, patch, backend) of the training-step checks
    models: tuple[tuple[str, dict, tuple[int, int, int], Backend], ...] = (
        ("tiramisu3d_p3a", {}, (16, 64, 64), "triton"),
        ("deeplabv3plus_3d", {}, (16, 64, 64), "triton"),  # its resizes' backward: models/resize.py
    ),
) -> list[dict]:
    """Every gradient the same bits from run to run: the fused layer (bf16 at p3a's layer shape), a dense
    block with dropout and the depthwise conv, each run three times on the same input; no kernel of theirs
    uses atomics (the compile gate checks the PTX); the layer again under use_deterministic_algorithms, whose
    autotuners take untimed first candidates. Sliding-window stitching sums overlapping windows by
    atomics: the same bits under torch.use_deterministic_algorithms(True) (the PyTorch twin sums them),
    and how many voxels differ without it, reported as information. Last, three training steps of each
    of `models`, twice, under train --deterministic's mode (Tiramisu 3D p3a; DeepLabv3+ 3D, whose resizes
    take a matmul backward under the flag)."""
    from prostate_kernels.nn import DenseBlock3d, DepthwiseConv3d

    g = torch.Generator().manual_seed(0)
    x, params, conv = _dense_layer_case(layer, device, torch.bfloat16, g)
    gy = torch.randn((layer.n, layer.c_out, *layer.size), generator=g).to(device)

    def dense_layer():
        out, _ = _run_dense_layer(x, params, conv, True, "triton", torch.bfloat16, gy)
        return out

    torch.manual_seed(0)
    block_module = DenseBlock3d(*block, dropout=0.2).to(device)
    xb = torch.randn((2, block[0], *block_size), generator=g).to(
        device=device, memory_format=torch.channels_last_3d
    )

    def dense_block():
        torch.manual_seed(1)  # the dropout masks' seeds
        xi = xb.clone().requires_grad_(True)
        block_module.zero_grad(set_to_none=True)
        with torch.autocast(device_type=xi.device.type, dtype=torch.bfloat16, enabled=device == "cuda"):
            y = block_module(xi)
        y.float().square().mean().backward()
        grads = {f"grad {n}": p.grad for n, p in block_module.named_parameters()}
        return {"y": y, "grad_x": xi.grad, **grads}

    depthwise = DepthwiseConv3d(64, 3, padding=2, dilation=2).to(device)
    xd = torch.randn((2, 64, *block_size), generator=g).to(
        device=device, memory_format=torch.channels_last_3d
    )

    def depthwise_conv():
        xi = xd.clone().requires_grad_(True)
        depthwise.zero_grad(set_to_none=True)
        y = depthwise(xi)
        y.square().mean().backward()
        return {"y": y, "grad_x": xi.grad, "grad_weight": depthwise.weight.grad}

    rows = []
    with use_backend("triton"):
        for name, run in (("bn_relu_conv3d bf16 p3a layer", dense_layer),
                          (f"DenseBlock3d{block} dropout 0.2 bf16", dense_block),
                          ("DepthwiseConv3d(64, dilation 2)", depthwise_conv)):  # fmt: skip
            count, differing = _runs_differ(run, 3)
            rows.append(_row(f"{name}: 3 runs bitwise equal", not differing,
                             f"{count} tensors; differing: {differing or 'none'}"))  # fmt: skip
        with deterministic_mode(True):  # the autotuners take their first candidates, untimed
            _, differing = _runs_differ(dense_layer, 2)
        what = "bn_relu_conv3d bf16 p3a layer under use_deterministic_algorithms (untimed tiles): 2 runs"
        rows.append(_row(f"{what} bitwise equal", not differing, f"differing: {differing or 'none'}"))
        volume = torch.randn((1, 2, *volume_size), generator=g).to(device)

        def stitched():
            return sliding_window_inference(volume, roi, 4, lambda w: torch.sigmoid(w) * 2 + w,
                                            overlap=0.75, mode="gaussian")  # fmt: skip

        with deterministic_mode(True):  # the PyTorch twin sums the windows
            first, again = stitched(), stitched()
        what = "sliding window under use_deterministic_algorithms: 2 runs bitwise equal"
        rows.append(_row(what, torch.equal(first, again), f"{int((first != again).sum())} voxels differ"))
        plain = [stitched() for _ in range(3)]
        differ = max(int((plain[0] != p).sum()) for p in plain[1:])
        largest = max((plain[0] - p).abs().max().item() for p in plain[1:])
        rows.append({"check": "sliding window (Triton atomics), 3 runs", "result": "INFO",
                     "detail": f"{differ} of {plain[0].numel()} voxels differ between runs; "
                               f"max abs difference {largest:.1e}"})  # fmt: skip
    rows.extend(_training_repeats(device, *model) for model in models)
    return rows


def _runs_differ(run: Callable[[], dict], times: int) -> tuple[int, list[str]]:
    """(tensors compared, sorted names of those not bitwise equal to the first run's) over `times` runs of
    `run`, which returns named tensors (None entries skipped)."""
    first = {k: v.detach().clone() for k, v in run().items() if v is not None}
    differing = set()
    for _ in range(times - 1):
        differing |= set(_differing(first, run()))
    return len(first), sorted(differing)


def _differing(expected: dict, got: dict) -> list[str]:
    """Sorted names of expected's tensors (None skipped) that got's namesakes do not equal bit for bit."""
    return sorted(k for k, v in expected.items() if v is not None and not torch.equal(v, got[k]))


def _training_repeats(
    device: str, name: str, overrides: dict, patch: tuple[int, int, int], backend: Backend
) -> dict:
    """Three Adam steps of a network (bf16 autocast on CUDA, dropout on) from the same seeds, twice, under
    train --deterministic's mode: the same weights to the bit, and how many PyTorch ops warned that they
    have no deterministic version."""
    import warnings

    from prostate_kernels.models import build_model

    def train_steps():
        torch.manual_seed(0)
        net = build_model(name, **overrides).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn((2, 1, *patch), generator=g).to(device)
            y = (torch.rand((2, 1, *patch), generator=g) > 0.5).float().to(device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return {n: p.detach().clone() for n, p in net.named_parameters()}

    with warnings.catch_warnings(record=True) as caught, deterministic_mode(True), use_backend(backend):
        warnings.simplefilter("always")
        count, differing = _runs_differ(train_steps, 2)
    alerts = sorted({str(w.message).split(" ")[0] for w in caught if "deterministic" in str(w.message)})
    return _row(
        f"{name} {'x'.join(map(str, patch))}, 3 training steps twice under train --deterministic: "
        "weights bitwise equal",
        not differing,
        f"{len(differing)} of {count} tensors differ; ops without a deterministic version: "
        f"{alerts or 'none'}",
    )


def check_cuda_graphs(
    device: str = "cuda",
    layer: DenseCase = P3A_LAYER,
    # DenseBlock3d's in_channels, growth rate, layers (dropout 0.2)
    block: tuple[int, int, int] = (48, 16, 4),
    block_size: tuple[int, int, int] = (16, 64, 64),
    # (name, patch, backend) of the whole-step capture
    model: tuple[str, tuple[int, int, int], Backend] = ("tiramisu3d_p3a", (16, 64, 64), "auto"),
    # (name, patch, iterations) of train --cuda-graphs
    train_case: tuple[str, tuple[int, int, int], int] = ("tiramisu3d_tiny", (16, 32, 32), 30),
) -> list[dict]:
    """Training steps captured in CUDA graphs (common.capture) give what eager gives: the fused layer
    (bf16, p3a's layer) and a dense block with dropout, forward + backward, bitwise; the dense block's
    dropout seeds are drawn on the GPU in the graph, so each replay draws new masks (the eager reference
    runs with the replay's seeds); a whole Tiramisu 3D training step (bf16 autocast, Adam capturable,
    dropout 0 so that eager can repeat it) replayed 3 times against 3 eager steps; no autotuner met a new
    bucket inside a capture (the warm-up timed them all); `train --cuda-graphs` against the same run
    without it. Off CUDA (the dry run) nothing is captured."""
    import warnings

    from common import capture

    import prostate_kernels.nn.dense as dense_module
    from prostate_kernels.nn import DenseBlock3d

    dry = "" if device == "cuda" else " (dry run: not captured)"
    rows = []
    g = torch.Generator().manual_seed(0)
    x, params, conv = _dense_layer_case(layer, device, torch.bfloat16, g)
    gy = torch.randn((layer.n, layer.c_out, *layer.size), generator=g).to(device)
    with warnings.catch_warnings(record=True) as said, use_backend("triton"):
        warnings.simplefilter("always")
        static: dict = {}

        def layer_step():
            static.update(_run_dense_layer(x, params, conv, True, "triton", torch.bfloat16, gy)[0])

        replay = capture(layer_step, device)
        replay()
        eager, _ = _run_dense_layer(x, params, conv, True, "triton", torch.bfloat16, gy)
        differing = _differing(eager, static)
        rows.append(_row(f"bn_relu_conv3d bf16 p3a layer fwd+bwd: graph replay bitwise eager{dry}",
                         not differing, f"differing: {differing or 'none'}"))  # fmt: skip

        torch.manual_seed(0)
        block_module = DenseBlock3d(*block, dropout=0.2).to(device)
        xb = torch.randn((2, block[0], *block_size), generator=g).to(
            device=device, memory_format=torch.channels_last_3d
        )
        gb = torch.randn((2, block[0] + block[2] * block[1], *block_size), generator=g).to(device)
        drawn: list[torch.Tensor] = []  # the seeds of each call (in the graph: its static seeds tensor)
        draw = dense_module.draw_seeds

        def recording(count: int, device: torch.device | str = "cpu") -> torch.Tensor:  # draw_seeds's
            drawn.append(draw(count, device))
            return drawn[-1]

        def first_replay_seeds(count: int, device: torch.device | str = "cpu") -> torch.Tensor:
            return first_seeds.clone()

        def block_step():
            xi = xb.detach().requires_grad_(True)
            block_module.zero_grad(set_to_none=True)
            autocast = torch.autocast(
                xi.device.type, dtype=torch.bfloat16, enabled=device == "cuda", cache_enabled=False
            )  # no cast cache in a capture
            with autocast:
                y = block_module(xi)
            y.backward(gb.to(y.dtype))
            grads = {f"grad {n}": p.grad for n, p in block_module.named_parameters()}
            static.clear()
            static.update({"y": y, "grad_x": xi.grad, **grads})

        dense_module.draw_seeds = recording
        try:
            replay = capture(block_step, device)
            replay()  # in a graph, drawn[-1] is the capture's seeds tensor, which each replay refills
            first_seeds = drawn[-1].clone()
            replayed = {k: v.clone() for k, v in static.items()}
            replay()
            fresh = not torch.equal(drawn[-1], first_seeds) and not torch.equal(static["y"], replayed["y"])
            dense_module.draw_seeds = first_replay_seeds
            block_step()  # eager, with the first replay's seeds
        finally:
            dense_module.draw_seeds = draw
        differing = _differing(replayed, static)
        rows.append(_row(f"DenseBlock3d{block} dropout 0.2 bf16 fwd+bwd: graph replay bitwise eager with the "
                         f"replay's seeds{dry}", not differing,
                         f"{len(replayed)} tensors; differing: {differing or 'none'}"))  # fmt: skip
        rows.append(_row(f"DenseBlock3d{block} dropout 0.2: two replays draw other seeds and masks{dry}",
                         fresh, f"seeds differ and outputs differ: {fresh}"))  # fmt: skip
        rows.append(_whole_step_graph(device, *model, dry))  # on its own backend (model's third entry)
        rows.append(_train_with_cuda_graphs(device, *train_case, dry))
    # the library's own warning (ops/launch.py); any other warning is listed in an INFO row, not
    # counted: torch's AccumulateGrad stream warning also names "CUDA graph capture" (the first H200 run)
    untimed = [str(w.message)[:120] for w in said if UNTIMED_IN_CAPTURE in str(w.message)]
    rows.append(_row(f"no autotuner bucket first met inside a capture{dry}", not untimed,
                     f"warnings: {untimed or 'none'}"))  # fmt: skip
    others = sorted({str(w.message)[:160] for w in said if UNTIMED_IN_CAPTURE not in str(w.message)})
    rows.append({"check": f"other warnings during the captures{dry}", "result": "INFO",
                 "detail": "; ".join(others) or "none"})  # fmt: skip
    return rows


def _train_with_cuda_graphs(
    device: str, name: str, patch: tuple[int, int, int], iters: int, dry: str
) -> dict:
    """train() with cuda_graphs against train() without, from the same seed on 3 phantoms in memory
    (bf16 autocast on CUDA, dropout 0: eager cannot repeat a graph's draws): every iteration's loss
    within 1e-2 of the eager run's (relative), and both runs' time per iteration after the first (the
    capture and autotuning happen in the first). Off CUDA both runs are eager (the refusal)."""
    import csv
    import tempfile
    from pathlib import Path

    from prostate_kernels.data.phantoms import make_phantom
    from prostate_kernels.train import TrainConfig, train

    phantoms = [make_phantom(i, (patch[0], 2 * patch[1], 2 * patch[2])) for i in range(3)]
    arrays = [(f"Case{i:02d}", p.image.array.astype("float32"), p.mask.array.astype("uint8"))
              for i, p in enumerate(phantoms)]  # fmt: skip
    losses, per_iteration = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for graphs in (False, True):
            out = Path(tmp) / f"graphs-{graphs}"
            config = TrainConfig(data=Path(tmp), out=out, model=name, patch=patch, batch=2, iters=iters,
                                 val_cases=0, val_every=1, checkpoint_every=iters, progress=False,
                                 model_kwargs={"dropout": 0.0},
                                 cuda_graphs=graphs and device == "cuda")  # fmt: skip
            with use_backend("auto" if device == "cuda" else "torch"):  # not the interpreter's kernels
                train(config, log=lambda *a: None, arrays=arrays)
            with (out / "metrics.csv").open() as f:
                rows = list(csv.DictReader(f))
            losses[graphs] = [float(r["loss"]) for r in rows]
            seconds = [float(r["seconds"]) for r in rows]
            per_iteration[graphs] = (seconds[-1] - seconds[0]) / max(1, len(seconds) - 1)
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses[False], losses[True], strict=True))
    return _row(f"train --cuda-graphs {name} {'x'.join(map(str, patch))}: {iters} iterations' losses vs "
                f"eager{dry}", len(losses[True]) == iters and worst <= 1e-2,
                f"largest relative loss difference {worst:.1e}; ms per iteration after the first: eager "
                f"{per_iteration[False] * 1e3:.1f}, graphs {per_iteration[True] * 1e3:.1f}")  # fmt: skip


def _whole_step_graph(
    device: str, name: str, patch: tuple[int, int, int], backend: Backend, dry: str
) -> dict:
    """A whole training step (forward, BCE loss, backward, Adam) captured once and replayed on 3 batches
    copied into its static inputs, against 3 eager steps from the same weights and batches (dropout 0:
    eager cannot repeat the graph's draws). Autocast without its cast cache, as capture requires."""
    from bench_graphs import train_step
    from common import capture
    from prostate_kernels.models import build_model

    def network():
        torch.manual_seed(0)
        return build_model(name, **({"dropout": 0.0} if name.startswith("tiramisu") else {})).to(device)

    g = torch.Generator().manual_seed(1)
    shape = (2, 1, *patch)
    batches = [(torch.randn(shape, generator=g).to(device),
                (torch.rand(shape, generator=g) > 0.5).float().to(device)) for _ in range(3)]  # fmt: skip

    def stepper(net):
        static_x, static_y = (t.clone() for t in batches[0])
        return (*train_step(net, backend, static_x, static_y, device, lr=1e-3), static_x, static_y)

    eager_net, graph_net = network(), network()
    step, optimizer, static_x, static_y = stepper(eager_net)
    for bx, by in batches:
        static_x.copy_(bx), static_y.copy_(by)
        step()
    step, optimizer, static_x, static_y = stepper(graph_net)
    snapshot = {k: v.clone() for k, v in graph_net.state_dict().items()}
    replay = capture(step, device)  # the warm-up steps train: start again from the snapshot
    with torch.no_grad():
        for k, v in graph_net.state_dict().items():
            v.copy_(snapshot[k])
    for state in optimizer.state.values():  # Adam's moments and step count back to zero
        for v in state.values():
            v.zero_()
    for bx, by in batches:
        static_x.copy_(bx), static_y.copy_(by)
        replay()
    worst, where = 0.0, ""
    for (k, a), b in zip(eager_net.named_parameters(), graph_net.parameters(), strict=True):
        diff = (a.detach().float() - b.detach().float()).abs().max().item()
        if diff > worst:
            worst, where = diff, k
    return _row(f"{name} {'x'.join(map(str, patch))} training step (bf16 autocast, Adam): 3 graph replays vs "
                f"3 eager steps{dry}", worst <= 1e-4,
                f"largest weight difference {worst:.1e} ({where or 'none'}); one Adam step moves a weight "
                "by up to 1e-3")  # fmt: skip


CHECKS: list[tuple[str, Callable[[str], list[dict]]]] = [
    ("sliding window", check_sliding_window),
    ("predict stitching", check_predict_stitching),
    ("export", check_export),
    ("info", check_info),
    ("bn_relu_conv3d", check_bn_relu_conv3d),
    ("bn_relu_conv3d tiles", check_bn_relu_conv3d_tiles),
    ("dense block", check_dense_block),
    ("depthwise", check_depthwise),
    ("determinism", check_determinism),
    ("cuda graphs", check_cuda_graphs),
]
