"""Helpers shared by the Triton launchers: autotune candidates, dot precision, output layout, conv args."""

from __future__ import annotations

import contextlib
import warnings

import torch
import triton
import triton.language as tl
import triton.testing

from prostate_kernels.backend import triton_interpreting
from prostate_kernels.ops.conv_geometry import ConvGeometry

INTERPRET = triton_interpreting()
INT32_SPAN = 2**31 - 2**24  # offsets below this fit int32 with room for a tile past the end
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# the words of the warning a launch gives when a capture meets an untimed bucket (bench/gpu_checks.py
# counts the warnings that hold them)
UNTIMED_IN_CAPTURE = "was first launched at this size inside a CUDA graph capture"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints on the host. triton.cdiv and triton.next_power_of_2 are constexpr_functions in
    Triton 3.6: a host call goes through their constexpr unwrapping (~3-5 us each on these CPUs; the fused
    layer's forward + backward made 20 of them)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n itself for 0 and 1, as Triton's), on the host (see cdiv)."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


def autotune_configs(options: list[dict], warps_stages: list[tuple[int, int]]) -> list[triton.Config]:
    """Autotuning candidates on the GPU; the first one alone in the interpreter (it cannot benchmark)."""
    if INTERPRET:
        return [triton.Config(options[0], num_warps=4)]
    return [triton.Config(o, num_warps=w, num_stages=s) for o in options for w, s in warps_stages]


def _autotune_bench(kernel_call, quantiles):
    """Triton's do_bench with a shorter warm-up and measurement (5 and 20 ms instead of 25 and 100): the
    candidates differ by far more than that resolves, and a first training step launches many buckets."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def capture_underway(t: torch.Tensor) -> bool:
    """Whether a CUDA graph capture is underway on the current stream (always False off CUDA, where
    torch.cuda's query is not even defined)."""
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class BucketedAutotuner:
    """A triton.autotune'd kernel whose choice is shared by every launch in one size bucket.

    Triton's autotuner benchmarks all its configs at each new value of its key. A Tiramisu 3D p3a
    training step launches the fused layer at 246 distinct (kernel, C_in, M, ...) keys at one patch size
    (706 config benchmarks before the first step ends). Here the `bucketed` key arguments are rounded up to
    a power of two first: the autotuner runs at the first launch of a bucket (45 at that step), and later
    launches in the bucket call the kernel directly with the bucket's winner.
    Under torch.use_deterministic_algorithms(True) a bucket takes its first candidate left after pruning,
    untimed (as cudnn.benchmark=False does for cuDNN): tiles add in different orders, so a timed winner
    that differs between processes would change the last bits of the results. A bucket first met inside
    a CUDA graph capture takes that untimed choice too (timing would synchronise inside the capture).
    Launch as the autotuner: `tuned[grid](*args, **kwargs)`.
    """

    remember = True  # tools/compile_capture.py sets False: every launch then goes through the autotuner

    def __init__(self, tuner, bucketed: tuple[str, ...]) -> None:
        self.tuner = tuner
        unknown = set(bucketed) - set(tuner.keys)
        if unknown:
            raise ValueError(f"bucketed arguments {sorted(unknown)} are not autotune keys {tuner.keys}")
        self.chosen: dict[tuple, dict] = {}  # bucket -> its winner's launch kwargs (Config.all_kwargs())
        self.pinned: dict | None = None  # launch kwargs every launch takes instead of autotuning (pin())
        self.warned_capture = False  # said once that a launch in a CUDA graph capture took an untimed tile
        position = {name: i for i, name in enumerate(tuner.arg_names)}
        # (name, position among the arguments, bucketed) per key: read without building a dict per launch
        self._keys = [(k, position[k], k in bucketed) for k in tuner.keys]

    def bucket(self, args: tuple, kwargs: dict) -> tuple:
        """The launch's key: the autotune keys (bucketed ones rounded up to a power of two) and the dtype
        of its first argument, the input tensor every launcher passes first (the compute dtype is a key,
        DOT_DTYPE). Looking at the dtype of every argument cost ~40 isinstance calls per launch."""
        key = []
        for name, index, bucketed in self._keys:
            value = args[index] if index < len(args) else kwargs[name]
            key.append(next_power_of_2(value) if bucketed and value > 0 else value)
        key.append(args[0].dtype)
        return tuple(key)

    @contextlib.contextmanager
    def pin(self, **config):
        """Within the block every launch takes this config (its block sizes, and num_warps and num_stages
        when given) instead of the bucket's autotuned one, spilling or not: to check or time one tile.
        The buckets' choices are neither used nor changed."""
        previous, self.pinned = self.pinned, config
        try:
            yield
        finally:
            self.pinned = previous

    def _warn_untimed_in_capture(self) -> None:
        if not self.warned_capture:
            self.warned_capture = True
            name = getattr(self.tuner.fn, "__name__", "a kernel")
            warnings.warn(
                f"prostate_kernels: {name} {UNTIMED_IN_CAPTURE}, "
                "where its tiles cannot be timed: the capture runs the first candidate tile. Run the step "
                "once before capturing (torch.cuda.make_graphed_callables does) to capture the timed one.",
                stacklevel=4,
            )

    def first_candidate(self, args: tuple, kwargs: dict) -> dict:
        """Launch kwargs of the first config the autotuner's pruning keeps for this launch (no timing)."""
        self.tuner.nargs = dict(zip(self.tuner.arg_names, args, strict=False))  # the rest come as kwargs
        try:
            return self.tuner.prune_configs(kwargs)[0].all_kwargs()
        finally:
            self.tuner.nargs = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.pinned is not None:
                self.tuner.fn[grid](*args, **kwargs, **self.pinned)
                return
            untimed = torch.are_deterministic_algorithms_enabled()
            bucket = self.bucket(args, kwargs)
            key = (*bucket, "untimed") if untimed else bucket
            config = self.chosen.get(key) if self.remember else None
            if config is None and not untimed and capture_underway(args[0]):
                # timing synchronises the device, which a CUDA graph capture forbids: the untimed choice,
                # kept apart from the bucket's timed winner (a later launch outside the capture times it)
                untimed, key = True, (*bucket, "untimed")
                config = self.chosen.get(key) if self.remember else None
                self._warn_untimed_in_capture()
            if config is None and untimed:
                config = self.first_candidate(args, kwargs)
                if self.remember:
                    self.chosen[key] = config
            if config is None:
                self.tuner[grid](*args, **kwargs)
                if self.remember:
                    self.chosen[key] = self.tuner.best_config.all_kwargs()
            else:
                self.tuner.fn[grid](*args, **kwargs, **config)

        return launch


def bucketed_autotune(configs: list[triton.Config], key: list[str], bucketed: tuple[str, ...], **kwargs):
    """Decorator: triton.autotune (short benchmarks) wrapped in a BucketedAutotuner."""

    def wrap(kernel) -> BucketedAutotuner:
        tuner = triton.autotune(configs=configs, key=key, do_bench=_autotune_bench, **kwargs)(kernel)
        return BucketedAutotuner(tuner, bucketed)

    return wrap


def dot_setup(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """(DOT_DTYPE, INPUT_PRECISION): half inputs keep their dtype; float32 follows cuDNN's TF32 flag."""
    if INTERPRET:
        return tl.float32, "ieee"  # the interpreter computes bfloat16 dots wrongly
    if dtype == torch.float32:
        return tl.float32, "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return _TL_DTYPES[dtype], "ieee"


def torch_dtype(dot_dtype: tl.dtype) -> torch.dtype:
    """The torch dtype of a DOT_DTYPE (dot_setup's): of a buffer that a kernel fills with dot operands."""
    return next(t for t, d in _TL_DTYPES.items() if d == dot_dtype)


def conv_args(g: ConvGeometry) -> tuple[int, ...]:
    """stride, padding, dilation per axis, in the order every conv kernel takes them."""
    return (*g.stride, *g.padding, *g.dilation)


def output_like(x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Channels-last output when x is channels-last (channel stride 1), NCDHW otherwise."""
    fmt = torch.channels_last_3d if x.stride(1) == 1 and x.shape[1] > 1 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)


def needs_int64(*tensors: torch.Tensor, extra: tuple[int, ...] = ()) -> bool:
    """Whether a kernel over these tensors needs int64 offsets: some tensor spans (its largest element
    offset, from its sizes and strides) or holds INT32_SPAN elements or more, or some extra bound does."""
    for t in tensors:
        span = sum(
            (size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True) if size > 0
        )
        if span >= INT32_SPAN or t.numel() >= INT32_SPAN:
            return True
    return any(value >= INT32_SPAN for value in extra)


def voxel_alignment(*tensors: torch.Tensor) -> int:
    """The largest of 16, 8, 4, 2, 1 that divides every voxel stride (N, D, H, W; a dimension of size 1
    has no index but 0, so its stride never counts) and the channel count of every tensor, 5-D
    (N, C, D, H, W): every voxel offset of theirs is then a multiple of it, and so is every channel
    bound, which a kernel may declare (triton_index.voxel_offsets_aligned, aligned_count)."""
    align = 16
    for t in tensors:
        for value in [t.shape[1]] + [t.stride(dim) for dim in (0, 2, 3, 4) if t.shape[dim] > 1]:
            while value % align:
                align //= 2
    return align


def check_voxels(op: str, *counts: int) -> None:
    """ValueError when a launch would index more voxels than int32 holds (the kernels' voxel indices)."""
    for count in counts:
        if count >= INT32_SPAN:
            raise ValueError(f"{op}: {count} voxels in one call; at most {INT32_SPAN - 1} are supported")


ANY = None  # in a spill entry of prune_spilling: at every dot path, or at both offset widths


def dot_path_label(dot_dtype, precision: str | None) -> str:
    """The dot path a launch's DOT_DTYPE and INPUT_PRECISION select: "bf16", "fp16", "fp32-tf32" or
    "fp32-ieee" ("" for a kernel without them); the labels of `make gpu-compile`'s report."""
    if dot_dtype is None:
        return ""
    label = str(dot_dtype)  # tl.bfloat16 -> "bf16", tl.float16 -> "fp16", tl.float32 -> "fp32"
    return f"{label}-{precision}" if label == "fp32" else label


def prune_spilling(spilling: set[tuple], names: tuple[str, ...]):
    """An `early_config_prune` for triton.autotune that drops the configs `make gpu-compile` measured to
    spill registers (on sm_90a or sm_80) at this launch's block sizes, dot path and offset width.

    spilling: entries (values of `names` (block sizes, from the config or the launch's keyword
    arguments, or "num_stages", the config's)..., num_warps, dot path, int64): the dot path a
    dot_path_label or ANY, int64 a bool or ANY.
    A config spilling only with float32 IEEE dots (FMA, more registers) stays a candidate of the bf16
    launches, whose tensor-core variant does not spill. At least one config always remains (the last one,
    if every candidate is listed: the lists are written so that this does not happen at measured launches).
    """

    def prune(configs, named_args, **kwargs):
        launch = {**named_args, **kwargs}
        dot = dot_path_label(launch.get("DOT_DTYPE"), launch.get("INPUT_PRECISION"))
        int64 = bool(launch.get("INT64"))

        def spills(config) -> bool:
            values = {**launch, **config.kwargs, "num_stages": config.num_stages}
            blocks = (*(values.get(name) for name in names), config.num_warps)
            return any(
                entry[:-2] == blocks and entry[-2] in (ANY, dot) and entry[-1] in (ANY, int64)
                for entry in spilling
            )

        kept = [c for c in configs if not spills(c)]
        return kept or configs[-1:]

    return prune
