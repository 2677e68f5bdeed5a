r"""PyTorch reference for cross-entropy over class logits (the language-model loss).

These functions are the CPU fallback and the test oracle: the Triton kernels compute the same function
(up to floating-point rounding order). Everything is evaluated in float32 whatever the logits' dtype
(float64 stays float64, which is how the tests obtain their oracle), as Hugging Face's loss does after
its upcast.

Math, for one row of logits :math:`x \in \mathbb{R}^V` with target class :math:`t`, label smoothing
:math:`\varepsilon` and z-loss coefficient :math:`z`:

.. math::

    \mathrm{lse} = \log \sum_j e^{x_j}, \qquad
    \ell = (1 - \varepsilon)(\mathrm{lse} - x_t)
          + \varepsilon\Bigl(\mathrm{lse} - \frac{1}{V}\sum_j x_j\Bigr) + z\,\mathrm{lse}^2

which is ``torch.nn.functional.cross_entropy(x, t, label_smoothing=eps)`` plus the z-loss term. A row
whose target equals ``ignore_index`` contributes nothing: its loss is 0 and it is not counted by the
mean (a mean over no row is ``nan``, as in PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["REDUCTIONS", "cross_entropy_compute_dtype", "cross_entropy_reference"]

REDUCTIONS = ("mean", "sum", "none")


def cross_entropy_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is evaluated in: float64 stays float64, every other dtype float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of ``(N, V)`` logits against ``(N,)`` class indices, in plain PyTorch.

    The logits are upcast to float32 (float64 stays float64), the loss is computed there by
    ``torch.nn.functional.cross_entropy`` (plus :math:`z\,\mathrm{lse}^2` per counted row when
    ``z_loss > 0``) and the result is cast to ``out_dtype``. Differentiable by autograd; the gradient
    comes back in the logits' dtype.

    Args:
        logits: ``(N, V)`` floating tensor.
        target: ``(N,)`` integer class indices in ``[0, V)`` or ``ignore_index``.
        ignore_index: target value of rows that take no part in the loss.
        reduction: ``"mean"`` (over the counted rows), ``"sum"`` or ``"none"`` (per row, ``(N,)``).
        label_smoothing: :math:`\varepsilon \in [0, 1]`, as ``torch.nn.functional.cross_entropy``.
        z_loss: coefficient :math:`z \ge 0` of the :math:`\mathrm{lse}^2` term.
        out_dtype: dtype of the result; ``None`` keeps the logits' dtype.

    Returns:
        A 0-d tensor (``"mean"``, ``"sum"``) or ``(N,)`` (``"none"``) of dtype ``out_dtype``.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        >>> cross_entropy_reference(logits, torch.tensor([0, -100]), reduction="none")
        tensor([0.2395, 0.0000])
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy_reference: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    x = logits.to(cross_entropy_compute_dtype(logits.dtype))
    t = target if target.dtype == torch.int64 else target.long()
    out_dtype = logits.dtype if out_dtype is None else out_dtype
    if not z_loss:
        loss = F.cross_entropy(
            x, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
        return loss.to(out_dtype)
    per_row = F.cross_entropy(
        x, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    counted = t != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    # where, not a product with the mask: an ignored row's lse may be inf and inf * 0 is nan
    per_row = per_row + torch.where(counted, z_loss * lse.square(), torch.zeros_like(lse))
    if reduction == "none":
        return per_row.to(out_dtype)
    total = per_row.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    return (total / counted.sum()).to(out_dtype)
