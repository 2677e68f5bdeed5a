"""Op layer for RoPE: autograd for eager calls and ``torch.library`` ops for ``torch.compile``.

Both paths call the same launcher, :func:`rotalabs_accel.triton_kernels.rope.rope_apply`, which is
imported lazily (the first time a kernel is needed), so importing this module never imports Triton.

Inputs here are already validated. The eager entry (:func:`rope_eager`) takes q and k in the caller's
layout and passes the layout to the launcher, which reads either layout through the strides: no
transposed view is created and the autograd graph of one call is one node. The custom ops take
``(batch, seq, heads, head_dim)`` views (under ``torch.compile`` views cost nothing at run time).

Custom ops (namespace ``rotalabs_accel``):

* ``rope_fwd(q, k, cos, sin, position_ids, offset, interleaved, rotary_dim) -> (q_rot, k_rot)``:
  out of place; its gradient is ``rope_bwd``.
* ``rope_bwd(dq, dk, ...) -> (dq_in, dk_in)``: rotation by the negative angle; its gradient is
  ``rope_fwd`` (both are linear maps, each the transpose of the other).
* ``rope_inplace_(q, k, ...) -> ()``: rotates ``q`` and ``k`` in place (declared with
  ``mutates_args``). It has no autograd formula: the functional layer uses it under ``torch.compile``
  only when no gradient is needed, and otherwise computes out of place and copies into ``q``/``k``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ._autograd import direct_apply

__all__ = ["rope_eager", "rope_fwd", "rope_bwd", "rope_inplace_"]

_kernels: ModuleType | None = None


def _kernel_module() -> ModuleType:
    global _kernels
    if _kernels is None:
        from ..triton_kernels import rope as module

        _kernels = module
    return _kernels


def _launch(q, k, cos, sin, position_ids, offset, interleaved, rotary_dim, backward=False, inplace=False):
    kernels = _kernels if _kernels is not None else _kernel_module()
    return kernels.rope_apply(
        q, k, cos, sin, position_ids, offset, interleaved, rotary_dim, False, backward, inplace
    )


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # Incoming gradients can be broadcast views (stride 0); the kernel needs unit-stride rows.
    return t if t.stride(-1) == 1 else t.contiguous()


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, offset, interleaved, rotary_dim, head_major):
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.args = (offset, interleaved, rotary_dim, head_major)
        kernels = _kernels if _kernels is not None else _kernel_module()
        return kernels.rope_apply(q, k, cos, sin, position_ids, offset, interleaved, rotary_dim, head_major)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        offset, interleaved, rotary_dim, head_major = ctx.args
        if dq.stride(-1) != 1:
            dq = dq.contiguous()
        if dk.stride(-1) != 1:
            dk = dk.contiguous()
        if torch.is_grad_enabled():
            # create_graph=True: the backward, a rotation by the negative angle, runs through this
            # Function itself, so the gradients it returns are differentiable in dq and dk.
            dq_in, dk_in = _rope_apply(dq, dk, cos, -sin, position_ids, offset, interleaved, rotary_dim,
                                       head_major)
            return dq_in, dk_in, None, None, None, None, None, None, None
        dq_in, dk_in = _kernels.rope_apply(
            dq, dk, cos, sin, position_ids, offset, interleaved, rotary_dim, head_major, True
        )
        return dq_in, dk_in, None, None, None, None, None, None, None


_rope_apply = direct_apply(_RopeFunction, 0, 1, 2, 3, 4)


def rope_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    interleaved: bool,
    rotary_dim: int,
    inplace: bool = False,
    head_major: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager entry: a plain launch when no gradient is needed, else the autograd.Function.

    ``q``/``k`` are ``(batch, seq, heads, head_dim)``, or ``(batch, heads, seq, head_dim)`` when
    ``head_major``, with unit stride in the last dimension. With ``inplace`` and a gradient to track,
    the rotation runs out of place and is copied into ``q``/``k`` by the caller (``copy_`` keeps
    autograd's view bookkeeping right; an in-place autograd.Function cannot return two modified
    views), so this returns new tensors then.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _rope_apply(q, k, cos, sin, position_ids, offset, interleaved, rotary_dim, head_major)
    kernels = _kernels if _kernels is not None else _kernel_module()
    return kernels.rope_apply(
        q, k, cos, sin, position_ids, offset, interleaved, rotary_dim, head_major, False, inplace
    )


# ---------------------------------------------------------------------------------------------------
# torch.library registration (used while torch.compile traces)


@torch.library.custom_op("rotalabs_accel::rope_fwd", mutates_args=())
def rope_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    interleaved: bool,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` by the angles of their positions (out of place)."""
    # also the gradient of rope_bwd, whose incoming gradients may have any strides
    return _launch(_unit_last_stride(q), _unit_last_stride(k), cos, sin, position_ids, offset, interleaved,
                   rotary_dim)


@torch.library.custom_op("rotalabs_accel::rope_bwd", mutates_args=())
def rope_bwd(
    dq: torch.Tensor,
    dk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    interleaved: bool,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``dq`` and ``dk`` by the negative angles (the gradient of :func:`rope_fwd`)."""
    return _launch(
        _unit_last_stride(dq),
        _unit_last_stride(dk),
        cos,
        sin,
        position_ids,
        offset,
        interleaved,
        rotary_dim,
        backward=True,
    )


@torch.library.custom_op("rotalabs_accel::rope_inplace_", mutates_args=("q", "k"))
def rope_inplace_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    interleaved: bool,
    rotary_dim: int,
) -> None:
    """Rotate ``q`` and ``k`` in place (no autograd formula)."""
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"rope_inplace_: {name} must have unit stride along its last dimension to be "
                             f"rotated in place, got strides {tuple(t.stride())}")
    _launch(q, k, cos, sin, position_ids, offset, interleaved, rotary_dim, inplace=True)


def _like_launcher(x: torch.Tensor) -> torch.Tensor:
    # Same allocation rule as the launcher (after _unit_last_stride): strides of x when x is dense,
    # else a dense layout in the same dimension order.
    return torch.empty_like(_unit_last_stride(x))


@rope_fwd.register_fake
def _rope_fwd_fake(q, k, cos, sin, position_ids, offset, interleaved, rotary_dim):
    return _like_launcher(q), _like_launcher(k)


@rope_bwd.register_fake
def _rope_bwd_fake(dq, dk, cos, sin, position_ids, offset, interleaved, rotary_dim):
    return _like_launcher(dq), _like_launcher(dk)


@rope_inplace_.register_fake
def _rope_inplace_fake(q, k, cos, sin, position_ids, offset, interleaved, rotary_dim):
    return None


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, position_ids, offset, interleaved, rotary_dim = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.args = (offset, interleaved, rotary_dim)


def _rope_fwd_backward(ctx, dq, dk):
    cos, sin, position_ids = ctx.saved_tensors
    dq_in, dk_in = rope_bwd(dq, dk, cos, sin, position_ids, *ctx.args)
    return dq_in, dk_in, None, None, None, None, None, None


def _rope_bwd_backward(ctx, ddq, ddk):
    cos, sin, position_ids = ctx.saved_tensors
    gq, gk = rope_fwd(ddq, ddk, cos, sin, position_ids, *ctx.args)
    return gq, gk, None, None, None, None, None, None


rope_fwd.register_autograd(_rope_fwd_backward, setup_context=_setup_context)
rope_bwd.register_autograd(_rope_bwd_backward, setup_context=_setup_context)
