"""Op layer for RMSNorm and fused residual-add RMSNorm.

Two doors onto the same launchers (:mod:`rotalabs_accel.triton_kernels.rmsnorm`):

* eager calls go through ``torch.autograd.Function`` subclasses (or straight to the launcher when no
  gradient is needed: the cheapest path for inference);
* ``torch.compile`` sees the ``torch.library`` custom ops ``rotalabs_accel::rmsnorm_fwd``,
  ``rotalabs_accel::rmsnorm_bwd``, ``rotalabs_accel::add_rmsnorm_fwd`` and
  ``rotalabs_accel::add_rmsnorm_bwd``, each with a fake (meta) implementation and, for the forward
  ops, a registered autograd formula, so a compiled model traces them as single opaque nodes.

All functions here take 2-D ``(M, N)`` tensors; the functional layer validates and flattens.
The Triton kernel module is imported the first time a kernel is needed.
"""

# No `from __future__ import annotations`, and `Optional[...]` rather than `X | None`: torch.library
# infers the op schemas from the annotations, and every supported torch version reads these forms.
# ruff: noqa: UP045
from typing import Optional

import torch

from ..reference.rmsnorm import rmsnorm_output_dtype, rmsnorm_reference
from ._autograd import direct_apply, reference_grads

__all__ = [
    "rmsnorm_rows",
    "inference_launcher",
    "add_rmsnorm_rows",
    "rmsnorm_rows_compiled",
    "add_rmsnorm_rows_compiled",
]

_kernels = None


def _kernel_module():
    global _kernels
    if _kernels is None:
        from ..triton_kernels import rmsnorm as module

        _kernels = module
    return _kernels


def _needs_grad(
    x: torch.Tensor, weight: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None
) -> bool:
    if not torch.is_grad_enabled():
        return False
    return (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (residual is not None and residual.requires_grad)
    )


def _out_dtype(x_dtype: torch.dtype, weight: Optional[torch.Tensor], casting_mode: str) -> torch.dtype:
    if weight is None or weight.dtype == x_dtype:
        return x_dtype  # every casting mode agrees here; the common case skips the rule's call
    return rmsnorm_output_dtype(x_dtype, weight.dtype, casting_mode)


# ---------------------------------------------------------------------------------------------
# Eager: autograd.Function
#
# Everything between the forward launch and the backward launch is host time the GPU may spend
# waiting in a training step, so these stay lean: few arguments (``apply`` walks them), no work after
# the launch beyond saving three tensors. Grad mode is on in a backward only under
# ``create_graph=True``: a higher-order gradient is being recorded, and the backward differentiates
# the PyTorch reference instead of launching the kernels (``reference_grads``), so the gradients
# carry their own graph.
# ---------------------------------------------------------------------------------------------


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, options):
        eps, offset, casting_mode, out_dtype = options
        kernels = _kernel_module()
        y, _, rstd = kernels.rmsnorm_forward(x, weight, eps, offset, casting_mode, out_dtype=out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.options = options
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            return _rmsnorm_backward_differentiable(ctx, dy)
        return _rmsnorm_backward(ctx, dy)


def _rmsnorm_backward(ctx, dy):
    x, weight, rstd = ctx.saved_tensors
    _, offset, casting_mode, _ = ctx.options
    dx, dw = _kernel_module().rmsnorm_backward(
        dy, x, weight, rstd, offset, casting_mode, compute_dw=ctx.needs_input_grad[1]
    )
    return dx, dw, None


def _rmsnorm_backward_differentiable(ctx, dy):
    x, weight, _ = ctx.saved_tensors
    eps, offset, casting_mode, _ = ctx.options

    def reference(x, weight):
        return rmsnorm_reference(x, weight, eps, offset=offset, casting_mode=casting_mode)

    return (*reference_grads(reference, (x, weight), ctx.needs_input_grad[:2], (dy,)), None)


class _AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, options):
        eps, offset, casting_mode, out_dtype = options
        y, new_residual, rstd = _kernel_module().rmsnorm_forward(
            x, weight, eps, offset, casting_mode, residual=residual, out_dtype=out_dtype
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(new_residual, weight, rstd)
        ctx.options = options
        ctx.dtypes = (x.dtype, residual.dtype)
        return y, new_residual

    @staticmethod
    def backward(ctx, dy, dnew_residual):
        if torch.is_grad_enabled():
            return _add_rmsnorm_backward_differentiable(ctx, dy, dnew_residual)
        return _add_rmsnorm_backward_eager(ctx, dy, dnew_residual)


def _add_rmsnorm_backward_eager(ctx, dy, dnew_residual):
    new_residual, weight, rstd = ctx.saved_tensors
    _, offset, casting_mode, _ = ctx.options
    ds, dw = _add_rmsnorm_backward(
        dy, dnew_residual, new_residual, weight, rstd, offset, casting_mode, ctx.needs_input_grad[2]
    )
    x_dtype, residual_dtype = ctx.dtypes
    return ds.to(x_dtype), ds.to(residual_dtype), dw, None


def _add_rmsnorm_backward_differentiable(ctx, dy, dnew_residual):
    # new_residual = x + residual is this node's own output, so its graph leads back to x and residual.
    new_residual, weight, _ = ctx.saved_tensors
    eps, offset, casting_mode, _ = ctx.options
    need_x, need_residual, need_weight = ctx.needs_input_grad[:3]

    def reference(s, weight):
        return rmsnorm_reference(s, weight, eps, offset=offset, casting_mode=casting_mode)

    ds, dw = reference_grads(reference, (new_residual, weight), (need_x or need_residual, need_weight), (dy,))
    if ds is not None and dnew_residual is not None:
        ds = ds + dnew_residual
    x_dtype, residual_dtype = ctx.dtypes
    dx = ds.to(x_dtype) if need_x else None
    dres = ds.to(residual_dtype) if need_residual else None
    return dx, dres, dw, None

_rmsnorm_apply = direct_apply(_RMSNormFunction, 0, 1)
_add_rmsnorm_apply = direct_apply(_AddRMSNormFunction, 0, 1, 2)


def _add_rmsnorm_backward(dy, dnew_residual, new_residual, weight, rstd, offset, casting_mode, compute_dw):
    if dy is None:
        # The normalized output took no part in the loss: only the residual stream's gradient flows.
        ds = dnew_residual if dnew_residual is not None else torch.zeros_like(new_residual)
        dw = torch.zeros_like(weight) if compute_dw and weight is not None else None
        return ds, dw
    return _kernel_module().rmsnorm_backward(
        dy, new_residual, weight, rstd, offset, casting_mode, dresidual=dnew_residual, compute_dw=compute_dw
    )


def rmsnorm_rows(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float, casting_mode: str
) -> torch.Tensor:
    """Eager RMSNorm of a 2-D ``(M, N)`` tensor through the Triton kernels (differentiable)."""
    out_dtype = _out_dtype(x.dtype, weight, casting_mode)
    if _needs_grad(x, weight):
        return _rmsnorm_apply(x, weight, (eps, offset, casting_mode, out_dtype))
    return _kernel_module().rmsnorm_forward(
        x, weight, eps, offset, casting_mode, out_dtype=out_dtype, store_rstd=False
    )[0]


def inference_launcher(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    casting_mode: str,
    residual: Optional[torch.Tensor] = None,
    shape=None,
):
    """``(plan, launch)`` for repeating an inference call (no gradient) of :func:`rmsnorm_rows`, or of
    :func:`add_rmsnorm_rows` with a ``residual``, on tensors of the same layouts:
    ``launch(plan, x, weight, eps, offset[, residual])`` returns what that call returns, its outputs
    shaped ``shape`` (default: ``x``'s). ``None`` for an empty ``x``. The tensors are 2-D with unit
    column stride and ``weight`` (if any) has unit stride."""
    x_dtype = x.dtype
    if residual is not None and residual.dtype != x_dtype:
        x_dtype = torch.promote_types(x_dtype, residual.dtype)
    module = _kernel_module()
    plan = module.inference_plan(x, weight, casting_mode, _out_dtype(x_dtype, weight, casting_mode), residual,
                                 shape)
    return None if plan is None else (plan, module.launch_planned)


def add_rmsnorm_rows(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    offset: float,
    casting_mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager fused ``x + residual`` then RMSNorm of 2-D tensors; returns ``(normed, new_residual)``."""
    x_dtype = x.dtype
    if residual.dtype != x_dtype:
        x_dtype = torch.promote_types(x_dtype, residual.dtype)
    out_dtype = _out_dtype(x_dtype, weight, casting_mode)
    if _needs_grad(x, weight, residual):
        return _add_rmsnorm_apply(x, residual, weight, (eps, offset, casting_mode, out_dtype))
    y, new_residual, _ = _kernel_module().rmsnorm_forward(
        x, weight, eps, offset, casting_mode, residual=residual, out_dtype=out_dtype, store_rstd=False
    )
    return y, new_residual


# ---------------------------------------------------------------------------------------------
# torch.compile: torch.library custom ops
# ---------------------------------------------------------------------------------------------


def _empty_dw(x: torch.Tensor) -> torch.Tensor:
    # Custom ops cannot return None; an empty tensor stands for "no weight gradient".
    return x.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("rotalabs_accel::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float, casting_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm forward of ``x`` ``(M, N)``; returns ``(y, rstd)`` with ``rstd`` ``(M,)`` fp32."""
    y, _, rstd = _kernel_module().rmsnorm_forward(
        x, weight, eps, offset, casting_mode, out_dtype=_out_dtype(x.dtype, weight, casting_mode)
    )
    return y, rstd


@rmsnorm_fwd.register_fake
def _(x, weight, eps, offset, casting_mode):
    m, n = x.shape
    y = x.new_empty((m, n), dtype=_out_dtype(x.dtype, weight, casting_mode))
    return y, x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("rotalabs_accel::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    rstd: torch.Tensor,
    offset: float,
    casting_mode: str,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm backward; returns ``(dx, dw)`` (``dw`` empty when there is no weight gradient)."""
    dx, dw = _kernel_module().rmsnorm_backward(
        dy, x, weight, rstd, offset, casting_mode, compute_dw=compute_dw
    )
    return dx, (_empty_dw(x) if dw is None else dw)


@rmsnorm_bwd.register_fake
def _(dy, x, weight, rstd, offset, casting_mode, compute_dw):
    dx = x.new_empty(x.shape)
    dw = weight.new_empty(weight.shape) if (compute_dw and weight is not None) else _empty_dw(x)
    return dx, dw


def _rmsnorm_setup_context(ctx, inputs, output):
    x, weight, eps, offset, casting_mode = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset = offset
    ctx.casting_mode = casting_mode


def _rmsnorm_fwd_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[1]
    dx, dw = torch.ops.rotalabs_accel.rmsnorm_bwd(
        dy, x, weight, rstd, ctx.offset, ctx.casting_mode, compute_dw
    )
    return dx, (dw if compute_dw else None), None, None, None


rmsnorm_fwd.register_autograd(_rmsnorm_fwd_backward, setup_context=_rmsnorm_setup_context)


@torch.library.custom_op("rotalabs_accel::add_rmsnorm_fwd", mutates_args=())
def add_rmsnorm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    offset: float,
    casting_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``s = x + residual`` then RMSNorm(s); returns ``(y, s, rstd)``."""
    out_dtype = _out_dtype(torch.promote_types(x.dtype, residual.dtype), weight, casting_mode)
    return _kernel_module().rmsnorm_forward(
        x, weight, eps, offset, casting_mode, residual=residual, out_dtype=out_dtype
    )


@add_rmsnorm_fwd.register_fake
def _(x, residual, weight, eps, offset, casting_mode):
    m, n = x.shape
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    y = x.new_empty((m, n), dtype=_out_dtype(s_dtype, weight, casting_mode))
    return y, x.new_empty((m, n), dtype=s_dtype), x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("rotalabs_accel::add_rmsnorm_bwd", mutates_args=())
def add_rmsnorm_bwd(
    dy: torch.Tensor,
    dnew_residual: Optional[torch.Tensor],
    new_residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    rstd: torch.Tensor,
    offset: float,
    casting_mode: str,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused op backward; returns ``(ds, dw)``: ``ds`` is the gradient of ``x`` and of ``residual``."""
    ds, dw = _kernel_module().rmsnorm_backward(
        dy, new_residual, weight, rstd, offset, casting_mode, dresidual=dnew_residual, compute_dw=compute_dw
    )
    return ds, (_empty_dw(new_residual) if dw is None else dw)


@add_rmsnorm_bwd.register_fake
def _(dy, dnew_residual, new_residual, weight, rstd, offset, casting_mode, compute_dw):
    ds = new_residual.new_empty(new_residual.shape)
    dw = weight.new_empty(weight.shape) if (compute_dw and weight is not None) else _empty_dw(new_residual)
    return ds, dw


def _add_rmsnorm_setup_context(ctx, inputs, output):
    x, residual, weight, eps, offset, casting_mode = inputs
    _, new_residual, rstd = output
    ctx.save_for_backward(new_residual, weight, rstd)
    ctx.offset = offset
    ctx.casting_mode = casting_mode
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype


def _add_rmsnorm_fwd_backward(ctx, dy, dnew_residual, _drstd):
    new_residual, weight, rstd = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[2]
    if dy is None:
        dy = torch.zeros_like(new_residual)
    ds, dw = torch.ops.rotalabs_accel.add_rmsnorm_bwd(
        dy, dnew_residual, new_residual, weight, rstd, ctx.offset, ctx.casting_mode, compute_dw
    )
    return ds.to(ctx.x_dtype), ds.to(ctx.residual_dtype), (dw if compute_dw else None), None, None, None


add_rmsnorm_fwd.register_autograd(_add_rmsnorm_fwd_backward, setup_context=_add_rmsnorm_setup_context)


def rmsnorm_rows_compiled(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float, casting_mode: str
) -> torch.Tensor:
    """RMSNorm of a 2-D tensor through the custom op (what ``torch.compile`` traces)."""
    return torch.ops.rotalabs_accel.rmsnorm_fwd(x, weight, eps, offset, casting_mode)[0]


def add_rmsnorm_rows_compiled(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    offset: float,
    casting_mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused add + RMSNorm of 2-D tensors through the custom op; returns ``(normed, new_residual)``."""
    op = torch.ops.rotalabs_accel.add_rmsnorm_fwd
    y, new_residual, _ = op(x, residual, weight, eps, offset, casting_mode)
    return y, new_residual
