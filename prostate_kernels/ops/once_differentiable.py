"""A backward that cannot be differentiated again, saying which op and what to use instead.

torch.autograd.function.once_differentiable answers a double backward (differentiating a gradient: a
gradient penalty, a Hessian-vector product) with "trying to differentiate twice a function that was
marked with @once_differentiable", which names neither the op nor a way out. It also attaches that error
only when an incoming gradient requires grad; a gradient that does not (autograd.grad(y.sum(), x,
create_graph=True)) comes back as a constant, and a second-order term through the op would be dropped
without a word. Here the error is attached whenever the backward runs with create_graph (grad mode on),
and it names the op and the remedy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch._C import _functions


def once_differentiable(op: str, remedy: str) -> Callable[[Callable], Callable]:
    """Decorate an autograd.Function's backward(ctx, *grads): it runs under no_grad; under create_graph its
    tensor results carry a node that raises, on a double backward, '<op>: its backward
    cannot be differentiated again ...; <remedy>'."""
    message = (
        f"{op}: its backward cannot be differentiated again (double backward: a gradient penalty, a "
        f"Hessian-vector product); {remedy}"
    )

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                results = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return results
            results = results if isinstance(results, tuple) else (results,)
            raise_on_backward = _functions.DelayedError(message, len(results))
            # Its outputs get its grad_fn only if an input requires grad; one input gives one tensor back.
            outputs = (None if r is None else r.detach().requires_grad_() for r in results)
            return raise_on_backward(*outputs)  # type: ignore[arg-type]  # it takes None: no gradient

        return wrapper

    return decorate
