"""Tensor subclasses that override torch functions (MONAI's MetaTensor) through the library's ops.

torch.nn.functional's ops take such a subclass through the __torch_function__ protocol: the subclass
sees the whole call once, runs it with its own per-op bookkeeping off, and wraps the result (a MetaTensor
in, a MetaTensor carrying the input's meta data out). `takes_tensor_subclasses` gives an op's public
entry the same, and runs the op itself on a plain alias of x (same storage, same autograd history), so
that what the op does inside (the Triton launch path, buffers made from x) sees a torch.Tensor: Triton's
interpreter failed on MetaTensor's own `new_empty`, and each of the op's torch calls went through
MetaTensor's bookkeeping. Subclasses without __torch_function__ (nn.Parameter; FakeTensor and
FunctionalTensor under torch.compile) pass as they are, and nothing changes while compiling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch.overrides import handle_torch_function, has_torch_function_unary

Op = TypeVar("Op", bound=Callable[..., Any])


def takes_tensor_subclasses(op: Op) -> Op:
    """op(x, ...) -> the same op, seen by x's __torch_function__ as one call when x is a subclass that
    overrides torch functions, and run on a plain alias of x."""

    @functools.wraps(op)
    def entry(x: Any, *args: Any, **kwargs: Any) -> Any:
        if type(x) is not torch.Tensor and isinstance(x, torch.Tensor) and not torch.compiler.is_compiling():
            if has_torch_function_unary(x):  # the subclass handles the call: it calls entry again, itself off
                return handle_torch_function(entry, (x,), x, *args, **kwargs)
            if type(x).__torch_function__ is not torch._C._disabled_torch_function_impl:
                x = x.as_subclass(torch.Tensor)
        return op(x, *args, **kwargs)

    return cast(Op, entry)
