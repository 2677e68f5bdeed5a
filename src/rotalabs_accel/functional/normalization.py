"""Functional RMSNorm and fused residual-add RMSNorm: validate once, flatten, dispatch.

On CUDA tensors with Triton installed these run the Triton kernels; otherwise the PyTorch reference
(:mod:`rotalabs_accel.reference.rmsnorm`), which computes the same function.
"""

from __future__ import annotations

import math

import torch

from .._backend import check_same_device, kernels_unobstructed, select_backend
from ..ops import rmsnorm as _ops
from ..reference.rmsnorm import CASTING_MODES, add_rmsnorm_reference, rmsnorm_reference
from ..triton_kernels._launch import current_device

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


# The repeat path of `rmsnorm` and `rmsnorm_residual_fused`: an inference call (no gradient recorded)
# of a layout that was validated and sent to the kernel before launches again after a handful of
# checks, which is what a decode step's many small norms need (the full path's checks cost a few
# microseconds of host time per call, as much as the launch). Key: x's shape, strides and dtype, the
# weight's shape, strides and dtype (three Nones without a weight), the casting mode, and for the
# fused op the residual's shape, strides and dtype. Value: the device index (-1 for CPU tensors,
# which run the kernels under Triton's interpreter), the kernel's launch plan and launch function,
# and the eps that eps=None means for the call. Only layouts the kernels take without a copy get an
# entry: x (and the residual) with unit column stride, 2-D or contiguous; a weight of unit stride.
_REPEAT: dict[tuple, tuple] = {}
_REPEAT_LIMIT = 512


def _repeat_key(x, weight, casting_mode: str, residual=None):
    """The call's ``_REPEAT`` key, or ``None`` where the types rule the repeat path out."""
    if type(x) is not _Tensor:
        return None
    if weight is None:
        key = (x.shape, x.stride(), x.dtype, None, None, None, casting_mode)
    else:
        kind = type(weight)
        if kind is not _Parameter and kind is not _Tensor:
            return None
        key = (x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), weight.dtype, casting_mode)
    if residual is None:
        return key
    if type(residual) is not _Tensor:
        return None
    return (*key, residual.shape, residual.stride(), residual.dtype)


def _repeat_ok(device: int, x, weight, residual=None) -> bool:
    """Whether the tensors of a call whose layout has an entry for ``device`` may take its plan: on
    that device (the current one, for CUDA), no gradient to record, nothing obstructing the kernels."""
    if x.get_device() != device:
        return False
    if device >= 0:
        if not x.is_cuda or device != current_device():
            return False
        if weight is not None and (weight.get_device() != device or not weight.is_cuda):
            return False
        if residual is not None and (residual.get_device() != device or not residual.is_cuda):
            return False
    elif not x.is_cpu or (weight is not None and not weight.is_cpu) or (
        residual is not None and not residual.is_cpu
    ):  # get_device is -1 for meta tensors too
        return False
    return not _ops._needs_grad(x, weight, residual) and kernels_unobstructed(device < 0)


def _repeat_call(x, weight, eps, offset: float, casting_mode: str, residual=None):
    """The op's output when this call repeats the layout of an earlier one that ran the kernel without
    autograd, and nothing else changed what it needs; otherwise ``None`` (the full path)."""
    if type(offset) is not float or (weight is None and offset != 0.0):
        return None
    if type(x) is not _Tensor or (x.requires_grad and torch.is_grad_enabled()):
        return None  # the common training call leaves before the key is built (_repeat_ok checks all)
    key = _repeat_key(x, weight, casting_mode, residual)
    entry = None if key is None else _REPEAT.get(key)
    if entry is None:
        return None
    device, plan, launch, eps_none = entry
    if eps is None:
        eps = eps_none
    elif type(eps) is not float:
        return None
    if not _repeat_ok(device, x, weight, residual):
        return None
    if residual is None:
        return launch(plan, x, weight, eps, offset)
    return launch(plan, x, weight, eps, offset, residual)


def _remember_call(x, x2, weight, casting_mode: str, residual=None, r2=None) -> None:
    """Give an inference call that just ran the kernel an entry in ``_REPEAT`` if its layout allows:
    ``x2`` (``r2``) is the 2-D form the kernel got of ``x`` (``residual``)."""
    device = x.get_device()
    if not (x.is_cuda if device >= 0 else x.is_cpu):
        return
    if x2.stride(1) != 1 or (x2 is not x and not x.is_contiguous()):
        return
    if residual is not None and (r2.stride(1) != 1 or (r2 is not residual and not residual.is_contiguous())):
        return
    if weight is not None and weight.stride(0) != 1:
        return
    key = _repeat_key(x, weight, casting_mode, residual)
    if key is None or key in _REPEAT:
        return
    launcher = _ops.inference_launcher(x2, weight, casting_mode, r2, x.shape)
    if launcher is None:
        return
    if len(_REPEAT) >= _REPEAT_LIMIT:
        _REPEAT.clear()
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    _REPEAT[key] = (device, *launcher, _resolve_eps(None, dtype))


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
    compiling = torch.compiler.is_compiling()
    if not compiling and _REPEAT:
        y = _repeat_call(x, weight, eps, offset, casting_mode)
        if y is not None:
            return y
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
    if compiling:
        y = _ops.rmsnorm_rows_compiled(x2, weight, eps, offset, casting_mode)
    else:
        y = _ops.rmsnorm_rows(x2, weight, eps, offset, casting_mode)
        if y.grad_fn is None:
            _remember_call(x, x2, weight, casting_mode)
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
    compiling = torch.compiler.is_compiling()
    if not compiling and _REPEAT:
        out = _repeat_call(x, weight, eps, offset, casting_mode, residual)
        if out is not None:
            return out
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
    if compiling:
        y, new_residual = _ops.add_rmsnorm_rows_compiled(x2, r2, weight, eps, offset, casting_mode)
    else:
        y, new_residual = _ops.add_rmsnorm_rows(x2, r2, weight, eps, offset, casting_mode)
        if y.grad_fn is None and new_residual.grad_fn is None:
            _remember_call(x, x2, weight, casting_mode, residual, r2)
    if x.dim() == 2:
        return y, new_residual
    return y.view(x.shape), new_residual.view(x.shape)
