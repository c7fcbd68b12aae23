"""Every Triton launch the library makes, captured on a CPU machine exactly as a GPU would compile it.

The library's ops run on CPU tensors with the "triton" backend, but no kernel executes: `JITFunction.run`
is replaced by a recorder that binds the call with Triton's own binder for a CUDA target (so argument
types, int32/int64 choice, 16-byte divisibility and constexprs are what `kernel[grid](...)` on an H100
or A100 would specialise on), and `Autotuner.run` records the call once per config it can choose
(after its own pruning). The captured runs use tensors on the "meta" device: nothing is allocated or
computed (a launch over 4e9 elements costs nothing), Triton's binder still sees every size, stride and
dtype, and a meta tensor's data pointer (0) counts as 16-byte aligned, as CUDA allocations are.

Must run without TRITON_INTERPRET (the launchers then offer every autotune config and the GPU dot paths).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

ARCHES = {90: "sm_90a", 80: "sm_80"}


@dataclass(frozen=True)
class Variant:
    """One compilation: a kernel specialised on its signature and constexprs, for one target."""

    module: str
    kernel: str
    arch: int  # 90 or 80
    signature: tuple  # ((name, type), ...) without constexprs' values
    constexprs: tuple  # ((path, value), ...) with tl.dtype values as strings in `label`
    attrs: tuple  # ((path, (("tt.divisibility", 16),)), ...)
    options: tuple  # ((name, value), ...) of the backend options that differ from its defaults
    config: str  # "BLOCK_M=64 BLOCK_K=32 warps=4 stages=3"
    path: str  # dot path of the run that launched it: fp32-tf32, fp32-ieee, bf16, fp16
    default_config: bool  # the autotuner's first config after its pruning (or a kernel without autotuning)
    int64: bool = False  # int64 offsets: INT64 set, or an argument typed i64 (tensors past 2**31 elements)
    dot: str = ""  # what its tl.dot multiplies (bf16, fp16, fp32-tf32, fp32-ieee); "" for a kernel without


@dataclass
class Recorder:
    path: str = "fp32-ieee"
    variants: dict = field(
        default_factory=dict
    )  # Variant -> (JITFunction, signature, constexprs, attrs, options)
    launches: int = 0


RECORDER = Recorder()
_BINDERS: dict = {}  # (JITFunction, arch) -> (backend, binder)


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _config_label(constexprs: dict, options) -> str:
    blocks = " ".join(f"{k[0] if isinstance(k, tuple) else k}={v}" for k, v in constexprs.items())
    return f"{blocks} warps={options.num_warps} stages={options.num_stages}".strip()


def _record(fn, args, kwargs, default_config: bool, config_kwargs: dict) -> None:
    """Bind one launch for every target arch and remember its compilation variant."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from prostate_kernels.ops.launch import dot_path_label

    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    RECORDER.launches += 1
    for arch in ARCHES:
        if (fn, arch) not in _BINDERS:  # one backend and binder per kernel and target, as Triton caches them
            backend = make_backend(GPUTarget("cuda", arch, 32))
            _BINDERS[fn, arch] = backend, create_function_from_signature(fn.signature, fn.params, backend)
        backend, binder = _BINDERS[fn, arch]
        all_kwargs = {**kwargs, "debug": False}
        bound_args, specialization, options = binder(*args, **all_kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, all_kwargs, bound_args, specialization,
                                                              options)  # fmt: skip
        names = [p.name for p in fn.params]
        named = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        label_constexprs = {k: v for k, v in named.items() if k in config_kwargs or k.startswith("BLOCK")}
        int64 = bool(named.get("INT64")) or any(v in ("i64", "u64") for v in signature.values())
        dot = dot_path_label(named.get("DOT_DTYPE"), named.get("INPUT_PRECISION"))
        variant = Variant(
            module=fn.module, kernel=fn.__name__, arch=arch, signature=_freeze(signature),
            constexprs=_freeze({str(k): v for k, v in constexprs.items()}),
            attrs=_freeze({str(k): v for k, v in attrs.items()}),
            options=_freeze({k: v for k, v in options.__dict__.items() if k in ("num_warps", "num_stages")}),
            config=_config_label(label_constexprs, options), path=RECORDER.path,
            default_config=default_config, int64=int64, dot=dot,
        )  # fmt: skip
        if variant not in RECORDER.variants:
            RECORDER.variants[variant] = (fn, signature, constexprs, attrs, options)


@contextlib.contextmanager
def _real_kernels_on_meta() -> Iterator[None]:
    """Within the block, the library's torch.library custom ops run their real implementation on meta
    tensors (their launchers, and so the launches to record) instead of their fake kernels, autograd
    kept. Each CustomOpDef's fake function (what its Meta kernel calls) is swapped for its own function
    and swapped back after. Not register_kernel("meta"): torch 2.11 refuses a second Python kernel for
    the Meta key, which the fake registration already holds (2.13 lets it override)."""
    import importlib

    from torch._library.custom_ops import CustomOpDef

    ops = []
    for module in ("bn_relu_conv3d_triton", "depthwise_conv3d_triton", "dense_block"):
        namespace = vars(importlib.import_module(f"prostate_kernels.ops.{module}"))
        ops += [v for v in namespace.values() if isinstance(v, CustomOpDef)]
    saved = [op._abstract_fn for op in ops]
    for op in ops:
        op._abstract_fn = op._init_fn
    try:
        yield
    finally:
        for op, fake in zip(ops, saved, strict=True):
            op._abstract_fn = fake


@contextlib.contextmanager
def capturing() -> Iterator[Recorder]:
    """Within the block, Triton launches are recorded instead of run (CPU tensors, backend "triton")."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the capture must see the GPU launch paths")
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit

    import prostate_kernels.backend as backend
    import prostate_kernels.ops.launch  # noqa: F401 - evaluates INTERPRET (False) before the patch below

    def jit_run(self, *args, grid, warmup, **kwargs):
        config_kwargs = kwargs.pop("__config_kwargs", {})
        default = kwargs.pop("__default_config", True)
        _record(self, args, kwargs, default, config_kwargs)

    def autotune_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        for index, config in enumerate(self.prune_configs(kwargs)):
            self.fn.run(*args, **kwargs, **config.all_kwargs(), __config_kwargs=config.kwargs,
                        __default_config=index == 0)  # fmt: skip
        self.nargs = None

    import prostate_kernels.ops.seeded_dropout as seeded_dropout
    from prostate_kernels.ops.launch import BucketedAutotuner

    saved = (jit.JITFunction.run, autotuner.Autotuner.run, backend.triton_interpreting,
             seeded_dropout.draws_with_philox)  # fmt: skip
    jit.JITFunction.run, autotuner.Autotuner.run = jit_run, autotune_run
    BucketedAutotuner.remember = False  # every launch with every config its autotuner may choose
    backend.triton_interpreting = lambda: True  # resolve() then lets "triton" run on CPU tensors
    # meta tensors stand in for CUDA ones: the dropout masks take the Philox kernels, as on a GPU
    seeded_dropout.draws_with_philox = lambda device: device.type in ("cuda", "meta")
    try:
        with backend.use_backend("triton"), _real_kernels_on_meta():
            yield RECORDER
    finally:
        (jit.JITFunction.run, autotuner.Autotuner.run, backend.triton_interpreting,
         seeded_dropout.draws_with_philox) = saved  # fmt: skip
        BucketedAutotuner.remember = True


@contextlib.contextmanager
def dot_path(name: str) -> Iterator[None]:
    """Labels the launches of the block with a dot path ("fp32-tf32", "fp32-ieee", "bf16", "fp16")."""
    previous = RECORDER.path
    RECORDER.path = name
    try:
        yield
    finally:
        RECORDER.path = previous
