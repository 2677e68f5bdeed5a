"""Functional RMSNorm and fused residual-add RMSNorm: validate once, flatten, dispatch.

On CUDA tensors with Triton installed these run the Triton kernels; otherwise the PyTorch reference
(:mod:`rotalabs_accel.reference.rmsnorm`), which computes the same function.
"""

from __future__ import annotations

import math

import torch

from .._backend import check_same_device, select_backend
from ..ops import rmsnorm as _ops
from ..reference.rmsnorm import CASTING_MODES, add_rmsnorm_reference, rmsnorm_reference

__all__ = ["rmsnorm", "rmsnorm_residual_fused"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(op: str, name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must have a floating-point dtype, got {t.dtype}")


_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter


def _common_call(x, weight, offset: float, casting_mode: str) -> bool:
    """Whether ``rmsnorm``'s arguments are of the common, valid kind that needs no further checks: a
    plain tensor of a kernel dtype with at least one dimension, no weight (and no offset) or a 1-D
    weight of a kernel dtype matching the last dimension on the same device, a known casting mode.
    A handful of attribute reads; everything it declines goes through :func:`_validate`."""
    if type(x) is not _Tensor or x.dtype not in _KERNEL_DTYPES or casting_mode not in CASTING_MODES:
        return False
    shape = x.shape
    if not shape:
        return False
    if weight is None:
        return offset == 0.0
    kind = type(weight)
    if (kind is not _Parameter and kind is not _Tensor) or weight.dtype not in _KERNEL_DTYPES:
        return False
    w_shape = weight.shape
    if len(w_shape) != 1 or w_shape[0] != shape[-1]:
        return False
    return _same_device(weight, x)


def _same_device(a: torch.Tensor, b: torch.Tensor) -> bool:
    # get_device is -1 for both CPU and meta tensors: is_cuda / is_cpu tell those apart
    return a.get_device() == b.get_device() and a.is_cuda == b.is_cuda and a.is_cpu == b.is_cpu


def _common_residual_call(x, residual, weight, offset: float, casting_mode: str) -> bool:
    """:func:`_common_call` for ``rmsnorm_residual_fused``: also a plain ``residual`` tensor of
    ``x``'s dtype, shape and device."""
    if type(residual) is not _Tensor or not _common_call(x, weight, offset, casting_mode):
        return False
    return residual.dtype == x.dtype and residual.shape == x.shape and _same_device(residual, x)


def _validate(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    offset: float,
    casting_mode: str,
) -> None:
    _check_tensor(op, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (the hidden size), got a 0-d tensor")
    device = x.device
    if residual is not None:
        _check_tensor(op, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"{op}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        if residual.device != device:
            check_same_device(op, x=x, residual=residual)
    if weight is not None:
        _check_tensor(op, "weight", weight)
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(
                f"{op}: weight must have shape {tuple(x.shape[-1:])} (the last dimension of x), "
                f"got {tuple(weight.shape)}"
            )
        if weight.device != device:
            check_same_device(op, x=x, weight=weight)
    elif offset != 0.0:
        raise ValueError(f"{op}: offset={offset} scales the weight, but weight is None")
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"{op}: casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")


def _kernel_reason(*tensors: torch.Tensor | None) -> str | None:
    for t in tensors:
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            return f"{t.dtype} inputs have no kernel (the kernels take float32, float16 and bfloat16)"
    return None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., N)`` as ``(M, N)``: a view whenever the leading dimensions collapse (any row stride)."""
    n = t.shape[-1]
    if t.stride(-1) != 1 and n > 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t
    # A view whenever the leading dimensions merge into one row stride; otherwise reshape copies.
    return t.reshape(math.prod(t.shape[:-1]), n)


def _resolve_eps(eps: float | None, dtype: torch.dtype) -> float:
    # eps=None follows torch.nn.RMSNorm / F.rms_norm: the machine epsilon of the dtype the norm is
    # computed in, float32 for float16 / bfloat16 inputs (ATen takes the epsilon of the input's
    # "opmath" type), float64 for float64.
    if eps is None:
        return torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    return eps if type(eps) is float else float(eps)


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float | None = 1e-6,
    *,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> torch.Tensor:
    r"""Root-mean-square normalization over the last dimension.

    For each row :math:`x \in \mathbb{R}^N`:

    .. math::

        y = \frac{x}{\sqrt{\frac{1}{N}\sum_i x_i^2 + \epsilon}} \odot (\text{offset} + w)

    The sum of squares is accumulated in fp32. ``casting_mode`` says where the result is rounded to
    low precision, matching the module the weights come from:

    * ``"llama"`` (Hugging Face ``LlamaRMSNorm``, Mistral, Qwen): normalize in fp32, cast to
      ``x.dtype``, then multiply by the weight. Output dtype ``promote(x.dtype, weight.dtype)``.
    * ``"gemma"`` (Hugging Face ``GemmaRMSNorm`` with ``offset=1``; ``torch.nn.RMSNorm`` with
      ``offset=0``): everything in fp32, one cast at the end. Output dtype ``x.dtype``.
    * ``"none"``: no casts; intermediates round to ``x.dtype``. Output ``promote(x.dtype, weight.dtype)``.

    Args:
        x: ``(..., N)`` float32 / float16 / bfloat16 (float64 runs the PyTorch reference). Any number of
            leading dimensions; rows may be strided (e.g. a slice of a wider tensor) without a copy.
        weight: ``(N,)`` scale, or ``None`` for none.
        eps: added to the mean square; ``None`` takes the machine epsilon of the dtype the norm is
            computed in (``float32`` for fp16 / bf16 inputs), as ``torch.nn.RMSNorm`` does.
        offset: added to the weight before scaling (``1.0`` for Gemma checkpoints, which store ``w - 1``).
        casting_mode: ``"llama"``, ``"gemma"`` or ``"none"``.

    Returns:
        Tensor of the shape of ``x``. Differentiable with respect to ``x`` and ``weight``; the weight
        gradient is reduced in fp32 in a fixed order (deterministic).

    Raises:
        TypeError: ``x`` or ``weight`` is not a floating-point tensor.
        ValueError: ``weight.shape != x.shape[-1:]``, tensors on different devices, unknown
            ``casting_mode``, or a non-zero ``offset`` without a weight.

    Example:
        >>> import torch
        >>> from rotalabs_accel import rmsnorm
        >>> x = torch.randn(2, 16, 64)
        >>> y = rmsnorm(x, torch.ones(64), eps=1e-6)
        >>> y.shape
        torch.Size([2, 16, 64])
    """
    if _common_call(x, weight, offset, casting_mode):
        reason = None
    else:
        _validate("rmsnorm", x, weight, None, offset, casting_mode)
        reason = _kernel_reason(x, weight)
    if eps is None or type(eps) is not float:
        eps = _resolve_eps(eps, x.dtype)
    if type(offset) is not float:
        offset = float(offset)
    if select_backend("rmsnorm", x, kernel_reason=reason) == "torch":
        return rmsnorm_reference(x, weight, eps, offset=offset, casting_mode=casting_mode)
    x2 = x if x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] <= 1) else _rows(x)
    if torch.compiler.is_compiling():
        y = _ops.rmsnorm_rows_compiled(x2, weight, eps, offset, casting_mode)
    else:
        y = _ops.rmsnorm_rows(x2, weight, eps, offset, casting_mode)
    return y if x2 is x else y.view(x.shape)


def rmsnorm_residual_fused(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float | None = 1e-6,
    *,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Residual add then RMSNorm in one pass, as a pre-norm decoder layer needs it.

    .. math::

        s = x + r, \qquad y = \operatorname{rmsnorm}(s, w)

    ``s`` is rounded to ``promote(x.dtype, residual.dtype)`` and ``y`` is computed from that rounded
    ``s``, exactly as the unfused ``residual + x`` followed by the norm. On the GPU the kernel reads
    ``x`` and ``residual`` once and writes ``y`` and ``s`` once.

    Args:
        x: ``(..., N)`` the sublayer output (float32 / float16 / bfloat16).
        residual: the residual stream, same shape as ``x``.
        weight, eps, offset, casting_mode: as in :func:`rmsnorm`.

    Returns:
        ``(normed, new_residual)`` where ``new_residual = x + residual`` (to carry to the next layer)
        and ``normed = rmsnorm(new_residual, weight, ...)``. Both are differentiable; the gradients of
        ``x`` and ``residual`` are equal (up to their dtypes).

    Example:
        >>> import torch
        >>> from rotalabs_accel import rmsnorm_residual_fused
        >>> hidden, residual = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
        >>> normed, residual = rmsnorm_residual_fused(hidden, residual, torch.ones(64))
        >>> normed.shape, residual.shape
        (torch.Size([2, 8, 64]), torch.Size([2, 8, 64]))
    """
    if _common_residual_call(x, residual, weight, offset, casting_mode):
        # x, residual and weight are checked to share one device: x alone tells select_backend
        tensors, reason = (x,), None
    else:
        _check_tensor("rmsnorm_residual_fused", "residual", residual)
        _validate("rmsnorm_residual_fused", x, weight, residual, offset, casting_mode)
        tensors, reason = (x, residual, weight), _kernel_reason(x, residual, weight)
    if eps is None or type(eps) is not float:
        eps = _resolve_eps(eps, torch.promote_types(x.dtype, residual.dtype))
    if type(offset) is not float:
        offset = float(offset)
    if select_backend("rmsnorm_residual_fused", *tensors, kernel_reason=reason) == "torch":
        return add_rmsnorm_reference(x, residual, weight, eps, offset=offset, casting_mode=casting_mode)
    x2, r2 = _rows(x), _rows(residual)
    if torch.compiler.is_compiling():
        y, new_residual = _ops.add_rmsnorm_rows_compiled(x2, r2, weight, eps, offset, casting_mode)
    else:
        y, new_residual = _ops.add_rmsnorm_rows(x2, r2, weight, eps, offset, casting_mode)
    if x.dim() == 2:
        return y, new_residual
    return y.view(x.shape), new_residual.view(x.shape)
