"""PyTorch reference for the embedding lookup and its weight gradient (fallback and test oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["embedding_reference", "embedding_backward_reference"]


def embedding_reference(
    ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None
) -> torch.Tensor:
    """``weight[ids]``: ``F.embedding`` (its autograd gives the reference gradient)."""
    return F.embedding(ids, weight, padding_idx)


def embedding_backward_reference(
    grad: torch.Tensor, ids: torch.Tensor, num_embeddings: int, padding_idx: int | None = None
) -> torch.Tensor:
    """Gradient of the table: row ``v`` is the sum of ``grad`` over the tokens with id ``v``.

    Summed in float32 (float64 for float64 input) and rounded once to ``grad.dtype``; the row
    ``padding_idx`` (non-negative, already resolved) gets none.

    Args:
        grad: ``(..., H)`` gradient of the lookup's output.
        ids: integer ids of the shape of ``grad`` without its last dimension.
        num_embeddings: rows of the table.
        padding_idx: row left at zero, or ``None``.
    """
    hidden = grad.shape[-1]
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    out = torch.zeros((num_embeddings, hidden), dtype=acc, device=grad.device)
    out.index_add_(0, ids.reshape(-1).long(), grad.reshape(-1, hidden).to(acc))
    if padding_idx is not None:
        out[padding_idx] = 0
    return out.to(grad.dtype)
