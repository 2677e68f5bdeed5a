"""Op layer for the embedding lookup: the forward is ``F.embedding``, the table's gradient a Triton kernel.

Two doors onto the same launcher (:func:`rotalabs_accel.triton_kernels.embedding.embedding_backward`):

* eager calls go through a ``torch.autograd.Function`` (or straight to ``F.embedding`` when no gradient
  is needed);
* ``torch.compile`` sees the ``torch.library`` custom ops ``rotalabs_accel::embedding_fwd`` (the lookup,
  with a registered autograd formula) and ``rotalabs_accel::embedding_bwd``, each with a fake
  implementation, so a compiled model traces them as single opaque nodes.

Inputs here are already validated: ``ids`` is an int64 tensor of any shape, ``weight`` ``(V, H)``,
``padding_idx`` resolved to a non-negative row or ``-1`` for none. The Triton kernel module is imported
the first time a kernel is needed.
"""

# No `from __future__ import annotations`: torch.library infers the op schemas from the annotations.
import torch
import torch.nn.functional as F

from ..reference.embedding import embedding_backward_reference
from ._autograd import direct_apply

__all__ = ["embedding_rows", "embedding_rows_compiled"]

_kernels = None


def _kernel_module():
    global _kernels
    if _kernels is None:
        from ..triton_kernels import embedding as module

        _kernels = module
    return _kernels


def _table_gradient(
    grad: torch.Tensor, ids: torch.Tensor, num_embeddings: int, padding_idx: int
) -> torch.Tensor:
    hidden = grad.shape[-1]
    grad2 = grad.reshape(-1, hidden)
    if grad2.stride(-1) != 1 and hidden > 1:
        grad2 = grad2.contiguous()
    return _kernel_module().embedding_backward(
        grad2, ids.reshape(-1), num_embeddings, None if padding_idx < 0 else padding_idx
    )


class _EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.shape = (weight.shape[0], padding_idx)
        return F.embedding(ids, weight, None if padding_idx < 0 else padding_idx)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            return _embedding_backward_differentiable(ctx, grad)
        return _embedding_backward(ctx, grad)


def _embedding_backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    num_embeddings, padding_idx = ctx.shape
    return None, _table_gradient(grad, ids, num_embeddings, padding_idx), None


def _embedding_backward_differentiable(ctx, grad):
    # Grad mode is on in a backward only under create_graph=True: the table gradient (a sum of grad's
    # rows per id, linear in grad) comes from the PyTorch reference, which autograd differentiates.
    (ids,) = ctx.saved_tensors
    num_embeddings, padding_idx = ctx.shape
    table = embedding_backward_reference(grad, ids, num_embeddings, None if padding_idx < 0 else padding_idx)
    return None, table, None


_embedding_apply = direct_apply(_EmbeddingFunction, 0, 1)


def embedding_rows(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Eager lookup ``weight[ids]`` whose table gradient runs the Triton kernel."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return _embedding_apply(ids, weight, padding_idx)
    return F.embedding(ids, weight, None if padding_idx < 0 else padding_idx)


# ---------------------------------------------------------------------------------------------
# torch.compile: torch.library custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("rotalabs_accel::embedding_fwd", mutates_args=())
def embedding_fwd(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """``weight[ids]``: ``(*ids.shape, H)``."""
    return F.embedding(ids, weight, None if padding_idx < 0 else padding_idx)


@embedding_fwd.register_fake
def _(ids, weight, padding_idx):
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.custom_op("rotalabs_accel::embedding_bwd", mutates_args=())
def embedding_bwd(
    grad: torch.Tensor, ids: torch.Tensor, num_embeddings: int, padding_idx: int
) -> torch.Tensor:
    """Gradient of the table ``(num_embeddings, H)`` in ``grad.dtype`` (fp32 sums, fixed order)."""
    return _table_gradient(grad, ids, num_embeddings, padding_idx)


@embedding_bwd.register_fake
def _(grad, ids, num_embeddings, padding_idx):
    return grad.new_empty((num_embeddings, grad.shape[-1]))


def _setup_context(ctx, inputs, output):
    ids, weight, padding_idx = inputs
    ctx.save_for_backward(ids)
    ctx.shape = (weight.shape[0], padding_idx)


def _fwd_backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    num_embeddings, padding_idx = ctx.shape
    return None, torch.ops.rotalabs_accel.embedding_bwd(grad, ids, num_embeddings, padding_idx), None


embedding_fwd.register_autograd(_fwd_backward, setup_context=_setup_context)


def embedding_rows_compiled(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """The lookup through the custom op (what ``torch.compile`` traces)."""
    return torch.ops.rotalabs_accel.embedding_fwd(ids, weight, padding_idx)
