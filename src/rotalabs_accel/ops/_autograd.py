"""Helpers for the op layers' ``autograd.Function`` classes.

:func:`reference_grads`: the backward to use when a higher-order gradient is being recorded
(``create_graph=True``). The kernels' backward is not itself differentiable, and
``once_differentiable`` only refuses a double backward when an incoming gradient requires grad: a
gradient penalty such as ``(dx ** 2).sum()`` after ``y.sum()`` would silently get a constant ``dx``.
Differentiating the PyTorch reference instead gives gradients that carry their own graph.

:func:`direct_apply`: calling an ``autograd.Function`` without the Python preprocessing of
``Function.apply``.

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

__all__ = ["direct_apply", "reference_grads"]

_transforms_active = torch._C._are_functorch_transforms_active
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def reference_grads(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor | None, ...]],
    inputs: tuple[torch.Tensor | None, ...],
    needs: tuple[bool, ...],
    grad_outputs: tuple[torch.Tensor | None, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``fn(*inputs)`` by autograd through ``fn``, with ``create_graph=True``.

    Args:
        fn: the op's PyTorch reference (differentiable), taking ``inputs``.
        inputs: the op's inputs as saved for backward (so they carry the forward's graph).
        needs: per input, whether its gradient is wanted (``ctx.needs_input_grad``).
        grad_outputs: per output of ``fn``, the incoming gradient (``None``: none flows).

    Returns:
        One entry per input: its gradient (zeros when it does not influence the outputs), or ``None``
        where not needed. The gradients are differentiable functions of ``inputs`` and
        ``grad_outputs``.

    Example:
        >>> import torch
        >>> x = torch.tensor([2.0], requires_grad=True)
        >>> (g,) = reference_grads(lambda t: t ** 3, (x,), (True,), (torch.ones(1),))
        >>> g, torch.autograd.grad(g.sum(), x)[0]
        (tensor([12.], grad_fn=<MulBackward0>), tensor([12.]))
    """
    with torch.enable_grad():
        outputs = fn(*inputs)
    if not isinstance(outputs, tuple):
        outputs = (outputs,)
    wrt = [t for t, need in zip(inputs, needs) if need and t is not None]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
             if o is not None and g is not None and o.requires_grad]
    got = iter(
        torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=True,
                            allow_unused=True)
        if wrt and pairs else [None] * len(wrt)
    )
    result = []
    for t, need in zip(inputs, needs):
        if not need or t is None:
            result.append(None)
            continue
        g = next(got)
        result.append(torch.zeros_like(t) if g is None else g)
    return tuple(result)


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
