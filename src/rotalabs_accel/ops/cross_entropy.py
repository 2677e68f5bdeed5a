"""Op layer for cross-entropy over class logits.

Two doors onto the same launchers (:mod:`rotalabs_accel.triton_kernels.cross_entropy`):

* eager calls go through a ``torch.autograd.Function`` (or straight to the forward launcher when no
  gradient is needed);
* ``torch.compile`` sees the ``torch.library`` custom ops ``rotalabs_accel::cross_entropy_fwd`` and
  ``rotalabs_accel::cross_entropy_bwd``, each with a fake (meta) implementation, the forward with a
  registered autograd formula, so a compiled model traces them as single opaque nodes.

Both return the per-row losses ``(N,)`` in float32; the functional layer reduces them (sum, mean over
the counted rows) with ordinary PyTorch ops, whose gradients autograd supplies. The logits are saved
for the backward as they are (never copied, never written). The Triton kernel module is imported the
first time a kernel is needed.
"""

# No `from __future__ import annotations`: torch.library infers the op schemas from the annotations.
import torch

from ..reference.cross_entropy import cross_entropy_reference
from ._autograd import direct_apply, reference_grads

__all__ = ["cross_entropy_rows", "cross_entropy_rows_compiled"]

_kernels = None


def _kernel_module():
    global _kernels
    if _kernels is None:
        from ..triton_kernels import cross_entropy as module

        _kernels = module
    return _kernels


# ---------------------------------------------------------------------------------------------
# Eager: autograd.Function
# ---------------------------------------------------------------------------------------------


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, options):
        loss, lse = _kernel_module().cross_entropy_forward(logits, target, *options)
        ctx.save_for_backward(logits, target, lse)
        ctx.options = options
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            return _cross_entropy_backward_differentiable(ctx, grad_loss)
        return _cross_entropy_backward(ctx, grad_loss)


def _cross_entropy_backward(ctx, grad_loss):
    logits, target, lse = ctx.saved_tensors
    grad = _kernel_module().cross_entropy_backward(grad_loss, logits, target, lse, *ctx.options)
    return grad, None, None


def _cross_entropy_backward_differentiable(ctx, grad_loss):
    # Grad mode is on in a backward only under create_graph=True: a higher-order gradient is being
    # recorded, so differentiate the PyTorch reference (gradients that carry their own graph).
    logits, target, _ = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss = ctx.options

    def reference(logits):
        return cross_entropy_reference(logits, target, ignore_index=ignore_index, reduction="none",
                                       label_smoothing=label_smoothing, z_loss=z_loss,
                                       out_dtype=torch.float32)

    return (*reference_grads(reference, (logits,), (True,), (grad_loss,)), None, None)


_cross_entropy_apply = direct_apply(_CrossEntropyFunction, 0, 1)


def cross_entropy_rows(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> torch.Tensor:
    """Eager per-row cross-entropy ``(N,)`` fp32 of ``(N, V)`` logits through the Triton kernels."""
    options = (ignore_index, label_smoothing, z_loss)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _cross_entropy_apply(logits, target, options)
    return _kernel_module().cross_entropy_forward(logits, target, *options)[0]


# ---------------------------------------------------------------------------------------------
# torch.compile: torch.library custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("rotalabs_accel::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy forward of ``(N, V)`` logits; returns ``(loss, lse)``, both ``(N,)`` float32."""
    return _kernel_module().cross_entropy_forward(logits, target, ignore_index, label_smoothing, z_loss)


@cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss):
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("rotalabs_accel::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """Cross-entropy backward; returns the ``(N, V)`` gradient of the logits in their dtype."""
    return _kernel_module().cross_entropy_backward(
        grad_loss, logits, target, lse, ignore_index, label_smoothing, z_loss
    )


@cross_entropy_bwd.register_fake
def _(grad_loss, logits, target, lse, ignore_index, label_smoothing, z_loss):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, z_loss = inputs
    _, lse = output
    ctx.save_for_backward(logits, target, lse)
    ctx.options = (ignore_index, label_smoothing, z_loss)


def _fwd_backward(ctx, grad_loss, _grad_lse):
    # lse never leaves the functional layer, so no gradient flows into it.
    logits, target, lse = ctx.saved_tensors
    grad = torch.ops.rotalabs_accel.cross_entropy_bwd(grad_loss, logits, target, lse, *ctx.options)
    return grad, None, None, None, None


cross_entropy_fwd.register_autograd(_fwd_backward, setup_context=_setup_context)


def cross_entropy_rows_compiled(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> torch.Tensor:
    """Per-row cross-entropy through the custom op (what ``torch.compile`` traces)."""
    op = torch.ops.rotalabs_accel.cross_entropy_fwd
    return op(logits, target, ignore_index, label_smoothing, z_loss)[0]
