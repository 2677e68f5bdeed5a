"""Calling an ``autograd.Function`` without the Python preprocessing of ``Function.apply``.

``Function.apply`` is a Python method that, before handing over to the C++ ``apply``, checks for
functorch transforms and unwraps "dead" functorch wrappers (tensors that escaped a finished
``torch.func`` transform) in every argument. For the op layers' Functions that is about a third of
the host cost of recording a forward, paid on every call of a training step. :func:`direct_apply`
makes the same call straight to the C++ ``apply`` whenever the preprocessing would change nothing: no
transform is active and none of the tensor arguments is a functorch wrapper. Otherwise it calls
``Function.apply`` itself, so behaviour is the same in every case.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["direct_apply"]

_transforms_active = torch._C._are_functorch_transforms_active
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def direct_apply(function: type[torch.autograd.Function], *tensor_positions: int) -> Callable:
    """``function.apply``, calling the C++ ``apply`` directly when that is equivalent.

    Args:
        function: an ``autograd.Function`` subclass without ``setup_context`` (forward takes ``ctx``).
        *tensor_positions: the positions of the arguments that may be tensors (others are never
            checked; a ``None`` at one of these positions is allowed).

    Returns:
        A callable taking ``function.apply``'s positional arguments.

    Example:
        >>> import torch
        >>> class Double(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         return 2 * x
        ...     @staticmethod
        ...     def backward(ctx, g):
        ...         return 2 * g
        >>> double = direct_apply(Double, 0)
        >>> x = torch.ones(3, requires_grad=True)
        >>> double(x).sum().backward(); x.grad
        tensor([2., 2., 2.])
    """
    c_apply = super(torch.autograd.Function, function).apply
    py_apply = function.apply
    positions = tuple(tensor_positions)

    def apply(*args):
        if _transforms_active():
            return py_apply(*args)
        for i in positions:
            t = args[i]
            if t is not None and _is_wrapped(t):
                return py_apply(*args)
        return c_apply(*args)

    apply.__qualname__ = apply.__name__ = f"direct_apply({function.__name__})"
    return apply
