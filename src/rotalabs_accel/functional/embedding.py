"""Functional embedding lookup whose table gradient runs a deterministic Triton kernel.

The lookup itself is ``torch.nn.functional.embedding`` (a gather, already at the bandwidth limit); on
CUDA with Triton the gradient of the table is :mod:`rotalabs_accel.triton_kernels.embedding`'s
kernel, otherwise PyTorch's own backward, which computes the same sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import check_same_device, select_backend
from ..ops import embedding as _ops

__all__ = ["embedding"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _resolve_padding_idx(op: str, padding_idx: object, num_embeddings: int) -> int | None:
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"{op}: padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"{op}: padding_idx must be in [-{num_embeddings}, {num_embeddings}) for a table of "
            f"{num_embeddings} rows, got {padding_idx}"
        )
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    r"""Look up rows of ``weight``: ``weight[input]``, as ``torch.nn.functional.embedding``.

    The forward is ``F.embedding``. The gradient of ``weight`` is, for each row :math:`v`, the sum of
    the output gradients of the tokens whose id is :math:`v`; on CUDA with Triton it is computed by one
    kernel after a sort of the ids: every row summed in fp32, in token order (the same result on every
    run, no atomics), written once in the table's dtype. The row ``padding_idx`` gets no gradient.

    Args:
        input: integer ids of any shape (``int64`` or ``int32``), each in ``[0, V)``.
        weight: ``(V, H)`` float table (float32 / float16 / bfloat16 use the kernel; other dtypes the
            PyTorch backward).
        padding_idx: a row that receives no gradient (negative counts from the end), or ``None``.

    Returns:
        ``(*input.shape, H)`` in ``weight.dtype``.

    Raises:
        TypeError: ``input`` not an integer tensor, ``weight`` not a floating-point tensor, or a
            non-integer ``padding_idx``.
        ValueError: ``weight`` not 2-D, tensors on different devices, or ``padding_idx`` out of range.

    Example:
        >>> import torch
        >>> from rotalabs_accel.functional import embedding
        >>> table = torch.randn(10, 4, requires_grad=True)
        >>> out = embedding(torch.tensor([[1, 2, 1]]), table)
        >>> out.sum().backward()
        >>> table.grad[1].tolist()
        [2.0, 2.0, 2.0, 2.0]
    """
    op = "embedding"
    if not isinstance(input, torch.Tensor) or input.dtype not in (torch.int64, torch.int32):
        got = input.dtype if isinstance(input, torch.Tensor) else type(input).__name__
        raise TypeError(f"{op}: input must be an int64 or int32 tensor of ids, got {got}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"{op}: weight must be a floating-point tensor, got {got}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (num_embeddings, dim), got shape {tuple(weight.shape)}")
    check_same_device(op, input=input, weight=weight)
    padding_idx = _resolve_padding_idx(op, padding_idx, weight.shape[0])
    reason = None if weight.dtype in _KERNEL_DTYPES else f"{weight.dtype} tables have no kernel"
    # With no table gradient to compute, the plain lookup (inlined by torch.compile, no custom op).
    needs_grad = torch.is_grad_enabled() and weight.requires_grad
    if not needs_grad or select_backend(op, input, weight, kernel_reason=reason) == "torch":
        return F.embedding(input, weight, padding_idx)
    ids = input if input.dtype == torch.int64 else input.long()
    pad = -1 if padding_idx is None else padding_idx
    if torch.compiler.is_compiling():
        return _ops.embedding_rows_compiled(ids, weight, pad)
    return _ops.embedding_rows(ids, weight, pad)
