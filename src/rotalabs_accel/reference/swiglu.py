"""PyTorch reference for the SwiGLU activation and the SwiGLU feed-forward block.

These functions are the CPU fallback and the test oracle. The activation is computed in float32 (or
float64 for float64 inputs) and rounded once to the input dtype, which is what the Triton kernels do;
PyTorch's own ``F.silu(gate) * up`` in bfloat16 rounds twice (after the SiLU and after the product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "compute_dtype",
    "swiglu_reference",
    "swiglu_backward_reference",
    "swiglu_ffn_reference",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the activation is evaluated in: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    r"""SwiGLU activation :math:`y = \mathrm{silu}(g) \odot u = g\,\sigma(g)\,u`.

    Evaluated in float32 (float64 for float64 inputs) and rounded once to ``gate.dtype``. Differentiable
    by autograd; the gradients are also evaluated in the wide dtype and rounded once.

    Args:
        gate: ``g``, any shape, floating dtype.
        up: ``u``, same shape and dtype as ``gate``.

    Returns:
        ``y`` with the shape and dtype of ``gate``.

    Example:
        >>> import torch
        >>> from rotalabs_accel.reference.swiglu import swiglu_reference
        >>> swiglu_reference(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]))
        tensor([0.0000, 1.4621])
    """
    wide = compute_dtype(gate.dtype)
    return (F.silu(gate.to(wide)) * up.to(wide)).to(gate.dtype)


def swiglu_backward_reference(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gradients of :func:`swiglu_reference`, and the recomputed activation.

    With :math:`s = \sigma(g)`:

    .. math::
        \frac{\partial L}{\partial g} = \bar y\, u\, s\,\bigl(1 + g\,(1 - s)\bigr), \qquad
        \frac{\partial L}{\partial u} = \bar y\, g\, s, \qquad h = g\, s\, u .

    Args:
        grad_out: :math:`\bar y`, same shape as ``gate`` (any float dtype).
        gate: ``g``.
        up: ``u``, same shape and dtype as ``gate``.

    Returns:
        ``(grad_gate, grad_up, h)`` in ``gate.dtype``; ``h`` is the forward output recomputed (what a
        fused feed-forward backward needs for the down projection's weight gradient).

    Example:
        >>> import torch
        >>> from rotalabs_accel.reference.swiglu import swiglu_backward_reference
        >>> dg, du, h = swiglu_backward_reference(torch.ones(2), torch.zeros(2), torch.ones(2))
        >>> dg
        tensor([0.5000, 0.5000])
    """
    wide = compute_dtype(gate.dtype)
    g = gate.to(wide)
    u = up.to(wide)
    dy = grad_out.to(wide)
    s = torch.sigmoid(g)
    silu = g * s
    grad_gate = dy * u * s * (1.0 + g * (1.0 - s))
    grad_up = dy * silu
    return grad_gate.to(gate.dtype), grad_up.to(gate.dtype), (silu * u).to(gate.dtype)


def swiglu_ffn_reference(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""SwiGLU feed-forward block :math:`y = W_d\,(\mathrm{silu}(W_g x + b_g) \odot (W_u x + b_u)) + b_d`.

    The projections are ``F.linear``; the activation is :func:`swiglu_reference`. Differentiable.

    Args:
        x: ``[..., H]``.
        gate_weight: ``W_g``, ``[I, H]``.
        up_weight: ``W_u``, ``[I, H]``.
        down_weight: ``W_d``, ``[H, I]``.
        gate_bias: optional ``[I]``.
        up_bias: optional ``[I]``.
        down_bias: optional ``[H]``.

    Returns:
        ``[..., H]`` in the dtype of ``x``.

    Example:
        >>> import torch
        >>> from rotalabs_accel.reference.swiglu import swiglu_ffn_reference
        >>> w_g, w_u, w_d = torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16)
        >>> y = swiglu_ffn_reference(torch.randn(3, 8), w_g, w_u, w_d)
        >>> y.shape
        torch.Size([3, 8])
    """
    gate = F.linear(x, gate_weight, gate_bias)
    up = F.linear(x, up_weight, up_bias)
    return F.linear(swiglu_reference(gate, up), down_weight, down_bias)
