"""Functional SwiGLU: validate once, flatten to 2-D, dispatch to the Triton kernels or the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import check_same_device, select_backend, transform_reason
from ..ops.swiglu import SwiGLUFFNFunction, packed_pair, swiglu_eager, swiglu_packed_eager
from ..reference.swiglu import swiglu_reference
from ..utils import autocast_enabled

__all__ = ["swiglu_fused", "swiglu_ffn", "packed_pair"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OP = "swiglu_fused"


def _kernel_reason(dtype: torch.dtype) -> str | None:
    if dtype in _KERNEL_DTYPES:
        return None
    return f"{dtype} has no SwiGLU kernel (float32, float16 and bfloat16 do)"


def _check_float_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must have a floating dtype, got {t.dtype}")
    return t


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, last]`` with unit column stride: a view when the strides allow, else a copy."""
    width = t.shape[-1]
    # reshape is a view whenever the leading dimensions collapse into one stride, else a copy (and,
    # unlike a view attempted in a try block, something torch.compile can trace)
    rows = t if t.dim() == 2 else t.reshape(-1, width)
    if width > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def swiglu_fused(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    r"""SwiGLU activation :math:`y = \mathrm{silu}(g) \odot u = g\,\sigma(g)\,u`, forward and backward fused.

    Two calling conventions:

    * ``swiglu_fused(gate, up)``: ``gate`` and ``up`` have the same shape ``[..., N]``;
    * ``swiglu_fused(gate_up)``: one tensor ``[..., 2N]`` holding ``g`` in ``[..., :N]`` and ``u`` in
      ``[..., N:]``, as a fused gate+up projection produces; its gradient is one ``[..., 2N]`` tensor.

    The result is evaluated in float32 and rounded once to the input dtype (PyTorch's
    ``F.silu(g) * u`` in half precision rounds twice). The backward recomputes :math:`\sigma(g)`
    rather than saving it: with :math:`s = \sigma(g)`,
    :math:`\partial g = \bar y\,u\,s\,(1 + g(1 - s))` and :math:`\partial u = \bar y\,g\,s`.

    On CUDA tensors with Triton installed this runs one Triton kernel forward (2 reads, 1 write per
    element) and one backward (3 reads, 2 writes); elsewhere the PyTorch reference. Inputs may have any
    row strides (slices of wider buffers are read in place); the last dimension must have unit stride
    or it is copied. Under ``torch.compile`` the kernels are the custom ops
    ``rotalabs_accel::swiglu_fwd`` / ``swiglu_packed_fwd`` (no graph break).

    Args:
        gate: ``[..., N]`` float32 / float16 / bfloat16 (float64 runs the reference), or ``[..., 2N]``
            when ``up`` is ``None``.
        up: ``[..., N]``, same shape, dtype and device as ``gate``; or ``None``.

    Returns:
        ``[..., N]`` in the dtype of ``gate``.

    Raises:
        TypeError: a non-tensor or non-floating argument, or ``up`` with another dtype.
        ValueError: mismatched shapes or devices, a 0-d tensor, or an odd last dimension when
            ``up`` is ``None``.

    Example:
        >>> import torch
        >>> from rotalabs_accel import swiglu_fused
        >>> gate, up = torch.randn(4, 16), torch.randn(4, 16)
        >>> y = swiglu_fused(gate, up)
        >>> torch.allclose(y, torch.nn.functional.silu(gate) * up, atol=1e-6)
        True
        >>> swiglu_fused(torch.cat([gate, up], dim=-1)).shape
        torch.Size([4, 16])
    """
    if not torch.compiler.is_compiling():
        # Fast path: the common, valid call is checked with a handful of attribute reads; anything
        # unusual (or invalid) takes the general path below, which explains what is wrong.
        if up is None:
            if _packed_ready(gate) and select_backend(_OP, gate) == "triton":
                return swiglu_packed_eager(gate)
        elif _pair_ready(gate, up) and select_backend(_OP, gate, up) == "triton":
            return swiglu_eager(gate, up)
    return _swiglu_fused_general(gate, up)


def _same_device(a: torch.Tensor, b: torch.Tensor) -> bool:
    index = a.get_device()
    if b.get_device() != index:
        return False
    return a.is_cuda and b.is_cuda if index >= 0 else a.is_cpu and b.is_cpu


def _pair_ready(gate: object, up: object) -> bool:
    """Whether ``swiglu_fused(gate, up)`` is a valid non-empty call in a kernel dtype."""
    return (
        isinstance(gate, torch.Tensor)
        and isinstance(up, torch.Tensor)
        and gate.dtype in _KERNEL_DTYPES
        and up.dtype == gate.dtype
        and up.shape == gate.shape
        and gate.dim() > 0
        and gate.numel() > 0
        and _same_device(gate, up)
    )


def _packed_ready(gate_up: object) -> bool:
    """Whether ``swiglu_fused(gate_up)`` is a valid non-empty call in a kernel dtype."""
    return (
        isinstance(gate_up, torch.Tensor)
        and gate_up.dtype in _KERNEL_DTYPES
        and gate_up.dim() > 0
        and gate_up.shape[-1] % 2 == 0
        and gate_up.numel() > 0
    )


def _swiglu_fused_general(gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    op = _OP
    _check_float_tensor(op, "gate", gate)
    if gate.dim() == 0:
        raise ValueError(f"{op}: gate must have at least one dimension, got a 0-d tensor")
    if up is None:
        width = gate.shape[-1]
        if width % 2:
            raise ValueError(
                f"{op}: with up=None the last dimension of gate holds [gate | up] and must be even, "
                f"got shape {list(gate.shape)}"
            )
        n = width // 2
        select = select_backend(op, gate, kernel_reason=_kernel_reason(gate.dtype))
        if select == "torch" or gate.numel() == 0:
            return swiglu_reference(gate[..., :n], gate[..., n:])
        if torch.compiler.is_compiling():
            out = torch.ops.rotalabs_accel.swiglu_packed_fwd(_rows(gate))
            return out.view(*gate.shape[:-1], n)
        return swiglu_packed_eager(gate)

    _check_float_tensor(op, "up", up)
    if up.shape != gate.shape:
        raise ValueError(f"{op}: up must have the shape of gate {list(gate.shape)}, got {list(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"{op}: up must have the dtype of gate ({gate.dtype}), got {up.dtype}")
    check_same_device(op, gate=gate, up=up)
    select = select_backend(op, gate, up, kernel_reason=_kernel_reason(gate.dtype))
    if select == "torch" or gate.numel() == 0:
        return swiglu_reference(gate, up)
    if torch.compiler.is_compiling():
        out = torch.ops.rotalabs_accel.swiglu_fwd(_rows(gate), _rows(up))
        return out.view(gate.shape)
    return swiglu_eager(gate, up)


def _check_weight(op: str, name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype,
                  check_dtype: bool) -> None:
    t = _check_float_tensor(op, name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if check_dtype and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have the dtype of x ({dtype}), got {t.dtype}")


def swiglu_ffn(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""SwiGLU feed-forward block :math:`y = W_d\,(\mathrm{silu}(W_g x + b_g) \odot (W_u x + b_u)) + b_d`.

    The same function as Hugging Face's ``LlamaMLP`` (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``),
    built for training memory and speed:

    * it keeps only the two projections ``W_g x`` and ``W_u x`` for backward, not the activation
      output (``[tokens, I]``): the backward recomputes it in the same kernel pass that computes the
      activation's gradients, and writes those gradients over the saved projections;
    * when ``gate_weight`` and ``up_weight`` sit back to back in one buffer (as
      :class:`~rotalabs_accel.kernels.activations.SwiGLU` with ``fused_gate_up=True`` arranges), both
      projections run as one GEMM over ``[W_g; W_u]`` forward and backward, with no copy of the weights.

    One backward per forward is supported (a second one through a retained graph raises); a backward
    with ``create_graph=True`` differentiates the PyTorch reference of the block, so higher-order
    gradients are exact. Under ``torch.compile``, autocast, a ``torch.func`` transform or forward-mode
    AD the block is composed from ``F.linear`` and :func:`swiglu_fused` instead (the compiler plans
    memory itself; autocast picks the GEMM dtypes; the transforms see plain PyTorch ops).

    Args:
        x: ``[..., H]``.
        gate_weight: ``W_g``, ``[I, H]``, the dtype of ``x``.
        up_weight: ``W_u``, ``[I, H]``.
        down_weight: ``W_d``, ``[H, I]``.
        gate_bias: optional ``[I]``.
        up_bias: optional ``[I]``.
        down_bias: optional ``[H]``.

    Returns:
        ``[..., H]`` in the dtype of ``x``.

    Example:
        >>> import torch
        >>> from rotalabs_accel.functional.activations import swiglu_ffn
        >>> x = torch.randn(3, 8, requires_grad=True)
        >>> w_g, w_u, w_d = torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16)
        >>> y = swiglu_ffn(x, w_g, w_u, w_d)
        >>> y.sum().backward()
        >>> x.grad.shape
        torch.Size([3, 8])
    """
    op = "swiglu_ffn"
    _check_float_tensor(op, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension, got a 0-d tensor")
    _check_float_tensor(op, "gate_weight", gate_weight)
    if gate_weight.dim() != 2:
        raise ValueError(f"{op}: gate_weight must be 2-D [I, H], got shape {list(gate_weight.shape)}")
    n_inter, hidden = gate_weight.shape
    if x.shape[-1] != hidden:
        raise ValueError(
            f"{op}: the last dimension of x must be hidden_size={hidden} (gate_weight is "
            f"{list(gate_weight.shape)}), got x of shape {list(x.shape)}"
        )
    autocast = autocast_enabled(x.device.type)
    dtype = x.dtype
    _check_weight(op, "gate_weight", gate_weight, (n_inter, hidden), dtype, not autocast)
    _check_weight(op, "up_weight", up_weight, (n_inter, hidden), dtype, not autocast)
    _check_weight(op, "down_weight", down_weight, (hidden, n_inter), dtype, not autocast)
    for name, bias, size in (("gate_bias", gate_bias, n_inter), ("up_bias", up_bias, n_inter),
                             ("down_bias", down_bias, hidden)):
        if bias is not None:
            _check_weight(op, name, bias, (size,), dtype, not autocast)
    check_same_device(op, x=x, gate_weight=gate_weight, up_weight=up_weight, down_weight=down_weight,
                      gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias)

    if autocast or torch.compiler.is_compiling() or transform_reason() is not None:
        gate = F.linear(x, gate_weight, gate_bias)
        up = F.linear(x, up_weight, up_bias)
        return F.linear(swiglu_fused(gate, up), down_weight, down_bias)

    select = select_backend(op, x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias,
                            kernel_reason=_kernel_reason(dtype))
    y = SwiGLUFFNFunction.apply(
        x.reshape(-1, hidden), gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias,
        select == "triton",
    )
    return y.view(*x.shape[:-1], hidden)
