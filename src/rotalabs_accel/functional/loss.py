"""Functional cross-entropy and the causal language-model loss: validate once, flatten, dispatch.

On CUDA tensors with Triton installed these run the Triton kernels (the logits are read in their own
dtype and never copied or overwritten); otherwise the PyTorch reference
(:mod:`rotalabs_accel.reference.cross_entropy`), which computes the same function.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F

from .._backend import check_same_device, select_backend
from ..ops import cross_entropy as _ops
from ..reference.cross_entropy import REDUCTIONS, cross_entropy_reference
from ..utils import autocast_enabled

__all__ = ["cross_entropy", "causal_lm_loss"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_logits(op: str, logits: object) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{op}: logits must have a floating-point dtype, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError(f"{op}: logits must have at least one dimension (the classes), got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have at least one class, got shape {tuple(logits.shape)}")
    return logits


def _check_indices(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of class indices, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(
            f"{op}: {name} must hold integer class indices (class probabilities are not supported), "
            f"got {t.dtype}"
        )
    return t


def _check_options(op: str, ignore_index: Any, reduction: Any, label_smoothing: Any, z_loss: Any) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ValueError(f"{op}: z_loss must be a finite number >= 0, got {z_loss}")


def _kernel_reason(logits: torch.Tensor) -> str | None:
    if logits.dtype in _KERNEL_DTYPES:
        return None
    return f"{logits.dtype} logits have no cross-entropy kernel (float32, float16 and bfloat16 do)"


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """``(..., V)`` as ``(N, V)``: a view whenever the leading dimensions collapse (any row stride)."""
    if logits.dim() == 2:
        return logits
    return logits.reshape(-1, logits.shape[-1])


def _loss(
    op: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The loss of validated 2-D ``(N, V)`` logits and 1-D ``(N,)`` targets, reduced, in ``out_dtype``."""
    backend = select_backend(op, logits, target, kernel_reason=_kernel_reason(logits))
    if backend == "torch":
        return cross_entropy_reference(
            logits, target, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, out_dtype=out_dtype,
        )
    if torch.compiler.is_compiling():
        rows = _ops.cross_entropy_rows_compiled(logits, target, ignore_index, label_smoothing, z_loss)
    else:
        rows = _ops.cross_entropy_rows(logits, target, ignore_index, label_smoothing, z_loss)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        # Ignored rows hold 0; the mean is over the counted rows (0 / 0 = nan when there are none).
        loss = rows.sum() / (target != ignore_index).sum()
    return loss if loss.dtype == out_dtype else loss.to(out_dtype)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    r"""Cross-entropy between logits and integer class targets, as ``torch.nn.functional.cross_entropy``.

    For each row :math:`x \in \mathbb{R}^V` with target :math:`t`:

    .. math::

        \mathrm{lse} = \log \sum_j e^{x_j}, \qquad
        \ell = (1 - \varepsilon)(\mathrm{lse} - x_t)
             + \varepsilon\Bigl(\mathrm{lse} - \tfrac{1}{V}\textstyle\sum_j x_j\Bigr)
             + z\,\mathrm{lse}^2

    with :math:`\varepsilon` = ``label_smoothing`` and :math:`z` = ``z_loss`` (the PaLM-style
    auxiliary term that keeps :math:`\mathrm{lse}` near 0; 0 by default). Rows whose target is
    ``ignore_index`` have loss 0 and are not counted by ``"mean"``, which divides by the number of
    counted rows (a mean over no row is ``nan``, as in PyTorch). With ``z_loss=0`` this is
    ``torch.nn.functional.cross_entropy(logits, target, ignore_index=..., reduction=...,
    label_smoothing=...)`` for 2-D logits.

    The class dimension is the **last** one: ``(..., V)`` logits with ``(...)`` targets are the
    flattened ``(N, V)`` / ``(N,)`` problem (PyTorch's ``(N, C, d1, ...)`` layout is not used).

    On CUDA with Triton the forward is one kernel that reads each logit once in its own dtype and
    accumulates in fp32 (an online log-sum-exp), writing the per-row loss and log-sum-exp; the backward
    is one kernel that re-reads the logits and writes :math:`g\,(\mathrm{softmax}(x)(1 + 2z\,\mathrm{lse})
    - (1-\varepsilon)\,\mathrm{onehot}(t) - \varepsilon / V)` in the logits' dtype. No fp32 copy of the
    logits is made, and the logits are never modified. Rows may be strided (a slice of a wider buffer)
    without a copy; under ``torch.compile`` the kernels are the custom ops
    ``rotalabs_accel::cross_entropy_fwd`` / ``cross_entropy_bwd`` (no graph break). A target outside
    ``[0, V)`` that is not ``ignore_index`` gives a ``nan`` loss on the GPU path (PyTorch's reference
    raises ``IndexError``): checking it would cost a host synchronisation.

    Args:
        logits: ``(..., V)`` float32 / float16 / bfloat16 (float64 runs the PyTorch reference).
        target: ``logits.shape[:-1]`` integer class indices in ``[0, V)`` or ``ignore_index`` (any
            integer dtype), on the logits' device.
        ignore_index: target value of rows that take no part in the loss.
        reduction: ``"mean"`` (over the counted rows), ``"sum"`` or ``"none"``.
        label_smoothing: :math:`\varepsilon \in [0, 1]`, as in ``torch.nn.functional.cross_entropy``.
        z_loss: coefficient :math:`z \ge 0` of the :math:`\mathrm{lse}^2` term.

    Returns:
        A 0-d tensor (``"mean"``, ``"sum"``) or a tensor of ``target``'s shape (``"none"``), in the
        logits' dtype (float32 for half-precision logits inside ``torch.autocast``, as PyTorch does).
        Differentiable with respect to ``logits``; the gradient has the logits' dtype.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor, ``target`` does not hold integers, or an
            option has the wrong type.
        ValueError: ``target.shape != logits.shape[:-1]``, no classes, tensors on different devices,
            unknown ``reduction``, ``label_smoothing`` outside ``[0, 1]`` or a negative ``z_loss``.

    Example:
        >>> import torch
        >>> from rotalabs_accel.functional.loss import cross_entropy
        >>> logits = torch.randn(2, 8, 32000)
        >>> target = torch.randint(0, 32000, (2, 8))
        >>> target[0, :3] = -100  # e.g. prompt tokens that are not trained on
        >>> cross_entropy(logits, target).shape
        torch.Size([])
        >>> cross_entropy(logits, target, reduction="none").shape
        torch.Size([2, 8])
    """
    op = "cross_entropy"
    _check_logits(op, logits)
    _check_indices(op, "target", target)
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"{op}: target must have shape {tuple(logits.shape[:-1])} (logits' shape without its last, "
            f"class dimension), got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        check_same_device(op, logits=logits, target=target)
    _check_options(op, ignore_index, reduction, label_smoothing, z_loss)
    out_dtype = logits.dtype
    if autocast_enabled(logits.device.type):
        out_dtype = torch.promote_types(out_dtype, torch.float32)
    loss = _loss(
        op, _rows(logits), target.reshape(-1), ignore_index, reduction, float(label_smoothing),
        float(z_loss), out_dtype,
    )
    if reduction == "none" and loss.shape != target.shape:
        loss = loss.view(target.shape)
    return loss


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    r"""The next-token loss of a causal language model: a drop-in for Hugging Face's ``ForCausalLMLoss``.

    Same signature and result as ``transformers.loss.loss_utils.ForCausalLMLoss``: position
    :math:`i` predicts label :math:`i + 1`, so the labels are shifted left by one and padded with
    ``ignore_index`` (or ``shift_labels`` is used as given), then

    * without ``num_items_in_batch``: the mean cross-entropy over the counted positions;
    * with it: the summed cross-entropy divided by ``num_items_in_batch`` (what gradient accumulation
      over several micro-batches needs).

    The difference is the cost: Hugging Face first copies the logits to fp32 and runs PyTorch's
    ``log_softmax`` and ``nll_loss`` on the copy (about 36 bytes of memory traffic per bf16 logit over
    forward and backward); here the logits go to :func:`cross_entropy`'s kernels as they are (6 bytes
    per bf16 logit). The arithmetic is fp32 in both, and the result is float32 as Hugging Face's.
    ``optimize_model`` installs this function as a Hugging Face model's ``loss_function``.

    Args:
        logits: ``(batch, seq, vocab_size)`` (any shape whose last dimension is ``vocab_size``).
        labels: ``(batch, seq)`` integer token ids, ``ignore_index`` where no loss is wanted; unused
            (may be ``None``) when ``shift_labels`` is given.
        vocab_size: the number of classes, ``logits.shape[-1]``.
        num_items_in_batch: ``None`` for the mean; otherwise the divisor of the summed loss (a tensor
            or a number).
        ignore_index: label value that takes no part in the loss.
        shift_labels: labels already aligned with the logits (``logits.shape[:-1]`` elements), for
            callers that shift themselves (sequence parallelism).
        **kwargs: other keyword arguments the model passes along; ignored, as Hugging Face's loss
            ignores them.

    Returns:
        A 0-d float32 tensor, differentiable with respect to ``logits``.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor or the labels do not hold integers.
        ValueError: ``logits.shape[-1] != vocab_size``, or the labels do not have one entry per
            position.

    Example:
        >>> import torch
        >>> from rotalabs_accel.functional.loss import causal_lm_loss
        >>> logits = torch.randn(2, 6, 100, dtype=torch.bfloat16)
        >>> labels = torch.randint(0, 100, (2, 6))
        >>> loss = causal_lm_loss(logits, labels, vocab_size=100)
        >>> loss.dtype, loss.shape
        (torch.float32, torch.Size([]))
    """
    op = "causal_lm_loss"
    _check_logits(op, logits)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or logits.shape[-1] != vocab_size:
        raise ValueError(
            f"{op}: vocab_size must equal the last dimension of logits ({logits.shape[-1]}), "
            f"got {vocab_size!r}"
        )
    if shift_labels is None:
        _check_indices(op, "labels", labels)
        # Position i predicts label i + 1; the last position has no next token.
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    else:
        _check_indices(op, "shift_labels", shift_labels)
    rows = _rows(logits)
    target = shift_labels.reshape(-1)
    if target.device != logits.device:
        target = target.to(logits.device)
    if target.shape[0] != rows.shape[0]:
        raise ValueError(
            f"{op}: the labels must have one entry per position of logits {tuple(logits.shape[:-1])}, got "
            f"{target.shape[0]} (shape {tuple(shift_labels.shape)})"
        )
    _check_options(op, ignore_index, "mean", 0.0, 0.0)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = _loss(op, rows, target, ignore_index, reduction, 0.0, 0.0, torch.float32)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
