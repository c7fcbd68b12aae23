"""The window ops directly: every implementation against the PyTorch twin and float64, fuzzed shapes,
bad input, and the torch.library registration (opcheck, torch.compile tracing)."""

from __future__ import annotations

import random

import pytest
import torch

from prostate_kernels import HAS_EXT, backend, functional, reference, use_backend
from prostate_kernels._ext import _C
from prostate_kernels.ops.window_ops import window_ops_for

CPU = torch.device("cpu")
IMPLEMENTATIONS = ["cpp", "torch", "triton"]


def ops_of(name: str):
    """WindowOps of one implementation on the CPU ("triton" runs through the interpreter)."""
    if name == "cpp":
        if not HAS_EXT:
            pytest.skip("C++ extension not built")
        return window_ops_for(CPU)
    with use_backend(name):
        return window_ops_for(CPU)


def random_case(rng: random.Random, max_size: int = 9, dtype=torch.float32):
    """A volume, windows, starts (B, 4) and importance of random small shapes (starts may repeat)."""
    n, c = rng.randint(1, 3), rng.randint(1, 3)
    size = [rng.randint(1, max_size) for _ in range(3)]
    roi = [rng.randint(1, s) for s in size]
    b = rng.randint(0, 7)
    rows = [
        [rng.randrange(n)] + [rng.randint(0, s - r) for s, r in zip(size, roi, strict=True)] for _ in range(b)
    ]
    starts = torch.tensor(rows, dtype=torch.int64).reshape(b, 4)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    volume = torch.randn((n, c, *size), generator=g)
    windows = torch.randn((b, c, *roi), generator=g).to(dtype)
    importance = torch.rand(roi, generator=g) + 0.1
    return volume, windows, starts, importance


def accumulate64(output, weight, windows, starts, importance):
    """float64 expectation of window_accumulate_."""
    out64, w64 = output.double().clone(), None if weight is None else weight.double().clone()
    rd, rh, rw = importance.shape
    for b, (n, z, y, x) in enumerate(starts.tolist()):
        region = (n, slice(None), slice(z, z + rd), slice(y, y + rh), slice(x, x + rw))
        out64[region] += windows[b].double() * importance.double()
        if w64 is not None:
            w64[region] += importance.double()
    return out64, w64


# ----------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_fuzzed_ops_match_float64(impl):
    """A few hundred random shapes and offsets (fewer through the interpreter, which is slow)."""
    ops = ops_of(impl)
    rng = random.Random(1234)
    for _ in range(300 if impl != "triton" else 40):
        volume, windows, starts, importance = random_case(rng)
        roi = list(importance.shape)
        # gather: poisoned buffer, every element must be written
        out = torch.full((starts.shape[0], volume.shape[1], *roi), float("nan"))
        gathered = ops.gather(volume, starts, roi, out)
        assert gathered.data_ptr() == out.data_ptr()
        assert torch.equal(gathered, reference.window_gather(volume, starts, roi))
        assert torch.equal(ops.gather(volume, starts, roi), gathered)
        # accumulate into output and weight
        output = torch.randn(volume.shape)
        weight = torch.rand((volume.shape[0], 1, *volume.shape[2:]))
        expected_out, expected_w = accumulate64(output, weight, windows, starts, importance)
        ops.accumulate_(output, weight, windows, starts, importance)
        assert (output.double() - expected_out).abs().max().item() < 1e-5
        assert (weight.double() - expected_w).abs().max().item() < 1e-5


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_ops_equal_the_pytorch_twin(impl):
    """Same float32 operations in the same order: the C++ path matches the twin bit for bit."""
    ops = ops_of(impl)
    rng = random.Random(99)
    for _ in range(60 if impl == "cpp" else 15):
        volume, windows, starts, importance = random_case(rng)
        out_a, out_b = torch.zeros(volume.shape), torch.zeros(volume.shape)
        w_a = torch.zeros((volume.shape[0], 1, *volume.shape[2:]))
        w_b = w_a.clone()
        ops.accumulate_(out_a, w_a, windows, starts, importance)
        reference.window_accumulate_(out_b, w_b, windows, starts, importance)
        if impl == "cpp":
            assert torch.equal(out_a, out_b) and torch.equal(w_a, w_b)
        else:  # GPU-style atomics: the order of additions may differ
            assert torch.allclose(out_a, out_b, atol=1e-6) and torch.allclose(w_a, w_b, atol=1e-6)
        ops.normalize_(out_a, w_a)
        reference.window_normalize_(out_b, w_b)
        assert torch.allclose(out_a, out_b, atol=1e-6, equal_nan=False)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_accumulate_window_dtypes(impl, dtype):
    ops = ops_of(impl)
    volume, windows, starts, importance = random_case(random.Random(7), dtype=dtype)
    output = torch.zeros(volume.shape)
    expected, _ = accumulate64(output, None, windows, starts, importance)
    ops.accumulate_(output, None, windows, starts, importance)
    # windows are exact in their dtype; products and sums are float32
    assert (output.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_normalize_broadcasts_a_shared_weight_and_zeroes_uncovered_voxels(impl):
    ops = ops_of(impl)
    output = torch.randn((2, 3, 4, 5, 6))
    weight = torch.rand((1, 1, 4, 5, 6)) + 0.5
    weight[0, 0, 1, 2, 3] = 0.0
    expected = output / weight
    expected[:, :, 1, 2, 3] = 0.0
    ops.normalize_(output, weight)
    assert torch.allclose(output, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_normalize_by_positions_equals_weight_buffer_route(impl):
    ops = ops_of(impl)
    rng = random.Random(5)
    for _ in range(20 if impl != "triton" else 5):
        volume, _, starts, importance = random_case(rng)
        positions = starts[:, 1:].contiguous()
        output = torch.randn(volume.shape)
        expected = output.clone()
        weight = torch.zeros((1, 1, *volume.shape[2:]))
        reference.window_accumulate_(
            torch.zeros((1, 1, *volume.shape[2:])),
            weight,
            torch.zeros((len(starts), 1, *importance.shape)),
            torch.cat([torch.zeros_like(starts[:, :1]), positions], 1),
            importance,
        )
        reference.window_normalize_(expected, weight)
        ops.normalize_by_positions_(output, positions, importance)
        assert torch.allclose(output, expected, rtol=1e-6, atol=1e-7)


def test_deterministic_mode_sums_windows_in_batch_order_on_the_triton_backend(monkeypatch):
    """On a GPU the Triton ops add overlapping windows with float atomics, in an order that changes from
    run to run. Under torch.use_deterministic_algorithms(True) the two summing ops are the PyTorch twin's
    (window after window, in batch order); gather and normalisation stay Triton. Outside it, all Triton."""
    from prostate_kernels.determinism import deterministic_mode
    from prostate_kernels.ops import window_accumulate

    calls = []

    def spy(module, name, label):
        original = getattr(module, name)

        def wrapped(*args):
            calls.append(label)
            return original(*args)

        monkeypatch.setattr(module, name, wrapped)

    for module, label in ((reference, "twin"), (window_accumulate, "triton")):
        for name in ("window_gather", "window_accumulate_", "window_normalize_by_positions_"):
            spy(module, name, f"{label} {name}")
    output, weight, windows, starts, importance = _good_args()
    windows = torch.randn(windows.shape, generator=torch.Generator().manual_seed(0))
    expected, expected_weight = accumulate64(output, weight, windows, starts, importance)
    positions = starts[:, 1:].contiguous()

    def run_ops():
        ops = window_ops_for(CPU)
        out, w = output.clone(), weight.clone()
        ops.accumulate_(out, w, windows, starts, importance)
        ops.normalize_by_positions_(out.clone(), positions, importance)
        ops.gather(out, starts, list(importance.shape))
        return out, w

    with use_backend("triton"):
        with deterministic_mode(True):
            out, w = run_ops()
        deterministic_calls, calls[:] = list(calls), []
        run_ops()
    assert deterministic_calls == [
        "twin window_accumulate_", "twin window_normalize_by_positions_", "triton window_gather"
    ]  # fmt: skip
    assert calls == [
        "triton window_accumulate_", "triton window_normalize_by_positions_", "triton window_gather"
    ]  # fmt: skip
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.double(), expected_weight, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ bad input


def _good_args():
    output = torch.zeros((2, 2, 6, 7, 8))
    weight = torch.zeros((2, 1, 6, 7, 8))
    windows = torch.ones((3, 2, 3, 4, 5))
    starts = torch.tensor([[0, 0, 0, 0], [1, 3, 3, 3], [0, 1, 2, 3]], dtype=torch.int64)
    importance = torch.ones((3, 4, 5))
    return output, weight, windows, starts, importance


BAD_STARTS = [
    ([[0, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]], "(2, 0, 0, 0)"),  # image index out of range
    ([[0, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 0]], "(0, -1, 0, 0)"),  # negative start
    ([[0, 0, 0, 0], [0, 0, 0, 0], [0, 4, 0, 0]], "(0, 4, 0, 0)"),  # window ends past D (4 + 3 > 6)
    ([[0, 0, 4, 0], [0, 0, 0, 0], [0, 0, 0, 0]], "(0, 0, 4, 0)"),  # past H
    ([[0, 0, 0, 4], [0, 0, 0, 0], [0, 0, 0, 0]], "(0, 0, 0, 4)"),  # past W
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad_starts,needle", BAD_STARTS)
def test_out_of_bounds_windows_raise_and_write_nothing(impl, bad_starts, needle):
    ops = ops_of(impl)
    output, weight, windows, _, importance = _good_args()
    starts = torch.tensor(bad_starts, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"window \d+ starts at") as info:
        ops.accumulate_(output, weight, windows, starts, importance)
    assert needle in str(info.value)
    assert not output.any() and not weight.any()
    with pytest.raises(ValueError, match=r"window \d+ starts at"):
        ops.gather(output, starts, [3, 4, 5])
    positions = starts[:, 1:].contiguous()  # (z, y, x): out of bounds unless only n was
    if (starts[:, 0] < 2).all():
        with pytest.raises(ValueError, match=r"window \d+ starts at"):
            ops.normalize_by_positions_(output, positions, importance)


def _bad_accumulate_cases():
    output, weight, windows, starts, importance = _good_args()
    return [
        ("output int", (output.long(), weight, windows, starts, importance), TypeError, "Long|int64"),
        ("output 4-D", (output[0], weight, windows, starts, importance), ValueError, "output must be 5-D"),
        (
            "output strided",
            (output[:, :, ::2], weight, windows, starts, importance),
            ValueError,
            "contiguous",
        ),
        (
            "weight shape",
            (output, weight[:1], windows, starts, importance),
            ValueError,
            "weight must have shape",
        ),
        ("weight is output", (output, output, windows, starts, importance), ValueError, "weight"),
        ("windows int", (output, weight, windows.int(), starts, importance), TypeError, "Int|int32"),
        (
            "windows channels",
            (output, weight, windows[:, :1].contiguous(), starts, importance),
            ValueError,
            "channels",
        ),
        (
            "windows transposed",
            (output, weight, windows.transpose(3, 4), starts, importance),
            ValueError,
            "contiguous",
        ),
        ("starts float", (output, weight, windows, starts.float(), importance), TypeError, "Float|float32"),
        (
            "starts shape",
            (output, weight, windows, starts[:, :3].contiguous(), importance),
            ValueError,
            "(B, 4)",
        ),
        ("starts rows", (output, weight, windows, starts[:2], importance), ValueError, "3"),
        (
            "importance shape",
            (output, weight, windows, starts, importance[:2].contiguous()),
            ValueError,
            "importance",
        ),
        (
            "importance f64",
            (output, weight, windows, starts, importance.double()),
            TypeError,
            "Double|float64",
        ),
    ]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", _bad_accumulate_cases(), ids=lambda c: c[0])
def test_bad_accumulate_arguments_raise(impl, case):
    ops = ops_of(impl)
    _, args, error, pattern = case
    before = [a.clone() for a in args]
    with pytest.raises(error, match=pattern):
        ops.accumulate_(*args)
    assert all(torch.equal(a, b) for a, b in zip(args, before, strict=True))  # nothing written


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bad_gather_and_normalize_arguments_raise(impl):
    ops = ops_of(impl)
    output, weight, _, starts, importance = _good_args()
    with pytest.raises(ValueError, match=r"roi"):
        ops.gather(output, starts, [3, 0, 5])
    with pytest.raises(ValueError, match=r"roi"):
        ops.gather(output, starts, [3, 4])
    with pytest.raises(ValueError, match=r"volume must be 5-D"):
        ops.gather(output[0], starts, [3, 4, 5])
    with pytest.raises(ValueError, match=r"out must have shape"):
        ops.gather(output, starts, [3, 4, 5], torch.empty((2, 2, 3, 4, 5)))
    with pytest.raises(TypeError, match=r"out has dtype"):
        ops.gather(output, starts, [3, 4, 5], torch.empty((3, 2, 3, 4, 5), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight must have shape"):
        ops.normalize_(output, weight[:, :, :3].contiguous())
    with pytest.raises(TypeError, match=r"Double|float64"):
        ops.normalize_(output.double(), weight)
    with pytest.raises(ValueError, match=r"positions"):
        ops.normalize_by_positions_(output, starts, importance)  # (B, 4) instead of (P, 3)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_device_mismatch_is_named(impl):
    ops = ops_of(impl)
    output, weight, windows, starts, importance = _good_args()
    with pytest.raises(ValueError, match=r"meta"):
        ops.accumulate_(output, weight, windows.to("meta"), starts, importance)
    with pytest.raises(ValueError, match=r"meta"):
        ops.normalize_(output, weight.to("meta"))


# ------------------------------------------------------------------------------ registered ops


def test_opcheck_registered_ops():
    """torch.library.opcheck: schema, fake kernels and dispatch are consistent for every op."""
    output, weight, windows, starts, importance = _good_args()
    torch.library.opcheck(torch.ops.prostate_kernels.window_gather.default, (output, starts, [3, 4, 5]))
    torch.library.opcheck(
        torch.ops.prostate_kernels.window_accumulate_.default, (output, weight, windows, starts, importance)
    )
    torch.library.opcheck(
        torch.ops.prostate_kernels.window_accumulate_.default, (output, None, windows, starts, importance)
    )
    torch.library.opcheck(torch.ops.prostate_kernels.window_normalize_.default, (output, weight + 1))
    torch.library.opcheck(
        torch.ops.prostate_kernels.window_normalize_by_positions_.default,
        (output, starts[:, 1:].contiguous(), importance),
    )


def test_ops_trace_under_torch_compile():
    """A graph calling the ops compiles in one piece (fake kernels) and computes the same result."""
    output, weight, windows, starts, importance = _good_args()

    def stitch(volume, starts, importance):
        windows = functional.window_gather(volume, starts, [3, 4, 5]) * 2.0
        out = torch.zeros_like(volume)
        functional.window_accumulate_(out, None, windows, starts, importance)
        functional.window_normalize_by_positions_(out, starts[:, 1:].contiguous(), importance)
        return out

    volume = torch.randn(output.shape)
    compiled = torch.compile(stitch, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(volume, starts, importance), stitch(volume, starts, importance))


@pytest.mark.skipif(not HAS_EXT, reason="C++ extension not built")
def test_extension_checks_its_own_arguments():
    """The C++ functions are safe when called directly, without the Python checks."""
    output, weight, windows, starts, importance = _good_args()
    bad = starts.clone()
    bad[1, 3] = 1000
    with pytest.raises(ValueError, match=r"window 1 starts at"):
        _C.window_accumulate_(output, weight, windows, bad, importance)
    with pytest.raises(ValueError, match=r"window 1 starts at"):
        _C.window_gather(output, bad, [3, 4, 5])
    with pytest.raises(TypeError, match=r"int64"):
        _C.window_gather(output, starts.int(), [3, 4, 5])
    assert not output.any()


@pytest.mark.skipif(not HAS_EXT, reason="C++ extension not built")
def test_arguments_are_checked_in_python_before_the_extension_runs(monkeypatch):
    """One place validates: the ops check their arguments before calling the C++ functions (whose own
    checks are the safety net of direct calls), so bad input never reaches the extension."""
    from prostate_kernels.ops import window_ops

    class Unreachable:
        def __getattr__(self, name):
            raise AssertionError(f"the C++ extension's {name} was called with bad arguments")

    monkeypatch.setattr(window_ops, "_C", Unreachable())
    output, weight, windows, starts, importance = _good_args()
    bad = starts.clone()
    bad[1, 3] = 1000
    assert backend.resolve(CPU, has_cpu_extension=True) == "cpp"  # the default backend picks the extension
    ops = window_ops_for(CPU)
    with pytest.raises(ValueError, match=r"window_accumulate_: window 1 starts at"):
        ops.accumulate_(output, weight, windows, bad, importance)
    with pytest.raises(TypeError, match=r"window_gather: starts must be int64"):
        ops.gather(output, starts.int(), [3, 4, 5])
    with pytest.raises(AssertionError, match="window_gather was called"):  # good input does reach it
        ops.gather(output, starts, [3, 4, 5])
