"""Op layer for SwiGLU: autograd and ``torch.library`` registration around the Triton launchers.

Eager calls go through :func:`swiglu_eager` / :func:`swiglu_packed_eager`: one launch and no autograd
bookkeeping when no gradient is needed, else the ``torch.autograd.Function`` classes (little Python per
call). Under ``torch.compile`` the functional layer calls the custom ops instead, which the compiler
sees as opaque ops with fake (meta) implementations:

* ``rotalabs_accel::swiglu_fwd(gate, up) -> out`` and ``rotalabs_accel::swiglu_bwd(grad_out, gate, up)
  -> (grad_gate, grad_up)`` for separate 2-D ``gate`` / ``up``;
* ``rotalabs_accel::swiglu_packed_fwd(gate_up) -> out`` and ``rotalabs_accel::swiglu_packed_bwd(grad_out,
  gate_up) -> grad_gate_up`` for one 2-D ``[M, 2N]`` tensor holding ``gate | up``.

The custom ops take 2-D operands with unit column stride (the functional layer flattens and checks);
row strides are free. The eager ``autograd.Function`` classes take the caller's ``[..., N]`` tensors as
they are and address them as rows (:func:`as_rows`) without creating views, so the autograd graph of
one call is one node. The kernel module is imported the first time a kernel is needed, never at
package import.

:class:`SwiGLUFFNFunction` is the whole feed-forward block ``down(silu(gate(x)) * up(x))`` as one autograd
node that saves ``gate`` and ``up`` but not the activation: its backward recomputes the activation in
the same kernel that computes the activation's gradients, and writes those gradients over the saved
``gate`` / ``up`` buffers (they never leave the node, so nothing else can observe them).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from ..reference.swiglu import swiglu_backward_reference, swiglu_reference
from ._autograd import direct_apply, reference_grads

__all__ = [
    "swiglu_eager",
    "swiglu_packed_eager",
    "SwiGLUFunction",
    "SwiGLUPackedFunction",
    "SwiGLUFFNFunction",
    "packed_pair",
    "unit_col_stride",
    "as_rows",
]

_kernel_module: ModuleType | None = None


def _kernels() -> ModuleType:
    global _kernel_module
    if _kernel_module is None:
        from ..triton_kernels import swiglu

        _kernel_module = swiglu
    return _kernel_module


def unit_col_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has unit stride (or size <= 1), else a contiguous copy."""
    if t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(base, row_stride)`` addressing ``t`` as ``[numel / N, N]`` rows with unit column stride.

    ``base`` is ``t`` itself (no view is created) when ``t`` is 2-D with unit column stride or
    contiguous; otherwise a 2-D view of ``t``, or a copy when the leading dimensions do not collapse
    into one stride or the last dimension is strided.
    """
    if t.dim() == 2:
        if t.stride(1) == 1:
            return t, t.stride(0)
    elif t.is_contiguous():
        return t, t.shape[-1]
    rows = t.reshape(-1, t.shape[-1])
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows, rows.stride(0)


def _halves(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = gate_up.shape[-1] // 2
    return gate_up[..., :n], gate_up[..., n:]


# --------------------------------------------------------------------------------------------------
# Eager autograd
# --------------------------------------------------------------------------------------------------


def _forward(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """``(out, rows)``: one forward launch; ``rows`` is what the backward needs to address the inputs."""
    n = gate.shape[-1]
    g, stride_g = as_rows(gate)
    u, stride_u = as_rows(up)
    n_rows = g.numel() // n
    out = gate.new_empty(gate.shape)
    _kernels().swiglu_forward_rows(g, u, out, n_rows, n, stride_g, stride_u, n)
    return out, (g, u, n_rows, n, stride_g, stride_u)


def _packed_forward(gate_up: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    width = gate_up.shape[-1]
    n = width // 2
    gu, stride = as_rows(gate_up)
    n_rows = gu.numel() // width
    out = gate_up.new_empty((*gate_up.shape[:-1], n))
    _kernels().swiglu_forward_rows(gu, gu, out, n_rows, n, stride, stride, n, n)  # up: n columns in
    return out, (gu, n_rows, n, stride)


def swiglu_eager(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Eager entry for ``gate`` / ``up`` of one shape ``[..., N]`` (validated, non-empty, kernel dtype).

    Without a gradient to record (inference, ``torch.no_grad``) it is one launch and no autograd
    bookkeeping; otherwise :class:`SwiGLUFunction`.
    """
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _swiglu_apply(gate, up)
    return _forward(gate, up)[0]


def swiglu_packed_eager(gate_up: torch.Tensor) -> torch.Tensor:
    """Eager entry for one ``[..., 2N]`` tensor ``[gate | up]`` (validated, non-empty, kernel dtype)."""
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return _swiglu_packed_apply(gate_up)
    return _packed_forward(gate_up)[0]


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` on ``gate`` / ``up`` of one shape ``[..., N]`` through the Triton kernels.

    The inputs keep their shape (no flattening view enters the autograd graph): the kernels address
    them as rows through :func:`as_rows`. The output and the gradients are new contiguous tensors.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        out, (_, _, *rows) = _forward(gate, up)
        # the inputs themselves (a double backward differentiates through them); the backward
        # addresses them as rows again, which costs nothing unless as_rows had to copy
        ctx.save_for_backward(gate, up)
        ctx.rows = (*rows, gate.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that carry their own graph
            return reference_grads(swiglu_reference, (gate, up), ctx.needs_input_grad, (grad_out,))
        g, u = as_rows(gate)[0], as_rows(up)[0]
        n_rows, n, stride_g, stride_u, shape = ctx.rows
        dy, stride_dy = as_rows(grad_out)
        grad_gate = g.new_empty(shape)
        grad_up = g.new_empty(shape)
        _kernels().swiglu_backward_rows(
            dy, g, u, grad_gate, grad_up, grad_gate, n_rows, n, stride_dy, stride_g, stride_u, n, n, 0
        )
        need = ctx.needs_input_grad
        return grad_gate if need[0] else None, grad_up if need[1] else None


class SwiGLUPackedFunction(torch.autograd.Function):
    """``silu(g) * u`` where ``gate_up = [g | u]`` along its last dimension ``[..., 2N]``.

    Both halves are read through one base tensor (``u`` starts ``N`` columns in); the gradient is one
    new ``[..., 2N]`` tensor written by one kernel launch.
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        out, (_, *rows) = _packed_forward(gate_up)
        ctx.save_for_backward(gate_up)
        ctx.rows = (*rows, gate_up.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that carry their own graph
            return reference_grads(lambda t: swiglu_reference(*_halves(t)), (gate_up,), (True,), (grad_out,))
        gu = as_rows(gate_up)[0]
        n_rows, n, stride, shape = ctx.rows
        dy, stride_dy = as_rows(grad_out)
        grad = gu.new_empty(shape)
        _kernels().swiglu_backward_rows(
            dy, gu, gu, grad, grad, grad, n_rows, n, stride_dy, stride, stride, 2 * n, 2 * n, 0, n, n
        )
        return grad


# --------------------------------------------------------------------------------------------------
# torch.library custom ops (the torch.compile path)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("rotalabs_accel::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for 2-D ``gate`` / ``up``; returns a new contiguous tensor."""
    return _kernels().swiglu_forward(unit_col_stride(gate), unit_col_stride(up))


@swiglu_fwd.register_fake
def _swiglu_fwd_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate.new_empty(gate.shape)


@torch.library.custom_op("rotalabs_accel::swiglu_bwd", mutates_args=())
def swiglu_bwd(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_gate, grad_up)`` of :func:`swiglu_fwd`; new contiguous tensors."""
    grad_gate, grad_up, _ = _kernels().swiglu_backward(
        unit_col_stride(grad_out), unit_col_stride(gate), unit_col_stride(up)
    )
    return grad_gate, grad_up


@swiglu_bwd.register_fake
def _swiglu_bwd_fake(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _swiglu_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _swiglu_fwd_backward(ctx, grad_out: torch.Tensor):
    gate, up = ctx.saved_tensors
    return swiglu_bwd(grad_out, gate, up)


swiglu_fwd.register_autograd(_swiglu_fwd_backward, setup_context=_swiglu_setup_context)


def _check_packed(op: str, gate_up: torch.Tensor, grad_out: torch.Tensor | None = None) -> None:
    """What the packed custom ops need (they are callable directly, as ``torch.ops.rotalabs_accel``)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"{op}: gate_up must be 2-D [M, 2N] (an even last dimension), got shape "
                         f"{list(gate_up.shape)}")
    if gate_up.dtype not in _kernels().KERNEL_DTYPES:
        raise TypeError(f"{op}: gate_up must be one of {_kernels().KERNEL_DTYPES}, got {gate_up.dtype}")
    if grad_out is not None:
        shape = [gate_up.shape[0], gate_up.shape[1] // 2]
        if list(grad_out.shape) != shape:
            raise ValueError(f"{op}: grad_out must have shape {shape}, got {list(grad_out.shape)}")
        if grad_out.dtype != gate_up.dtype:
            raise TypeError(f"{op}: grad_out must have the dtype of gate_up ({gate_up.dtype}), got "
                            f"{grad_out.dtype}")


@torch.library.custom_op("rotalabs_accel::swiglu_packed_fwd", mutates_args=())
def swiglu_packed_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` for a 2-D ``gate_up = [g | u]``; returns a new contiguous ``[M, N]`` tensor."""
    _check_packed("swiglu_packed_fwd", gate_up)
    gu = unit_col_stride(gate_up)
    n_rows, width = gu.shape
    n = width // 2
    out = gu.new_empty((n_rows, n))
    _kernels().swiglu_forward_rows(gu, gu, out, n_rows, n, gu.stride(0), gu.stride(0), n, n)
    return out


@swiglu_packed_fwd.register_fake
def _swiglu_packed_fwd_fake(gate_up: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("rotalabs_accel::swiglu_packed_bwd", mutates_args=())
def swiglu_packed_bwd(grad_out: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`swiglu_packed_fwd` with respect to ``gate_up``: one new ``[M, 2N]`` tensor."""
    _check_packed("swiglu_packed_bwd", gate_up, grad_out)
    gu, dy = unit_col_stride(gate_up), unit_col_stride(grad_out)
    n_rows, width = gu.shape
    n = width // 2
    grad = gu.new_empty((n_rows, width))
    _kernels().swiglu_backward_rows(
        dy, gu, gu, grad, grad, grad, n_rows, n, dy.stride(0), gu.stride(0), gu.stride(0), width, width, 0,
        n, n,
    )
    return grad


@swiglu_packed_bwd.register_fake
def _swiglu_packed_bwd_fake(grad_out: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty(gate_up.shape)


def _swiglu_packed_fwd_backward(ctx, grad_out: torch.Tensor):
    (gate_up,) = ctx.saved_tensors
    return swiglu_packed_bwd(grad_out, gate_up)


swiglu_packed_fwd.register_autograd(_swiglu_packed_fwd_backward, setup_context=_swiglu_setup_context)


# --------------------------------------------------------------------------------------------------
# The feed-forward block as one autograd node
# --------------------------------------------------------------------------------------------------


def packed_pair(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """A view covering ``first`` then ``second`` when they sit back to back in one buffer, else ``None``.

    Both must be contiguous with the same shape, dtype and device, and ``second`` must start where
    ``first`` ends in the same storage. The view has shape ``[2 * first.shape[0], *first.shape[1:]]``.
    """
    if first is None or second is None:
        return None
    if (
        first.shape != second.shape
        or first.dtype != second.dtype
        or first.device != second.device
        or first.device.type == "meta"
        or first.dim() == 0
        or not first.is_contiguous()
        or not second.is_contiguous()
        or second.storage_offset() != first.storage_offset() + first.numel()
        or type(first) not in (torch.Tensor, torch.nn.Parameter)
        or type(second) not in (torch.Tensor, torch.nn.Parameter)
        or first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    ):
        return None
    return first.as_strided((2 * first.shape[0], *first.shape[1:]), first.stride())


def _activation_forward(gate: torch.Tensor, up: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    if use_kernel:
        return _kernels().swiglu_forward(gate, up)
    return swiglu_reference(gate, up)


def _activation_backward_in_place(
    grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, store_h: bool, use_kernel: bool
) -> None:
    """Overwrite ``gate`` / ``up`` with their gradients and, if ``store_h``, ``grad_h`` with ``h``."""
    if use_kernel:
        _kernels().swiglu_backward(grad_h, gate, up, gate, up, grad_h, store_h=store_h)
        return
    grad_gate, grad_up, h = swiglu_backward_reference(grad_h, gate, up)
    gate.copy_(grad_gate)
    up.copy_(grad_up)
    if store_h:
        grad_h.copy_(h)


def _ffn_reference(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias):
    h = swiglu_reference(F.linear(x, gate_weight, gate_bias), F.linear(x, up_weight, up_bias))
    return F.linear(h, down_weight, down_bias)


_swiglu_apply = direct_apply(SwiGLUFunction, 0, 1)
_swiglu_packed_apply = direct_apply(SwiGLUPackedFunction, 0)


class SwiGLUFFNFunction(torch.autograd.Function):
    r"""``y = down(silu(gate(x)) * up(x))`` on a 2-D ``x``, saving ``gate`` and ``up`` only.

    Forward: ``gate = x W_g^T + b_g``, ``up = x W_u^T + b_u`` (one GEMM over ``[W_g; W_u]`` when the two
    weights sit back to back in one buffer, see :func:`packed_pair`), ``h = silu(gate) * up``,
    ``y = h W_d^T + b_d``. ``h`` is freed at once.

    Backward: ``dh = dy W_d``; one kernel pass overwrites ``gate`` with ``d gate``, ``up`` with ``d up``
    and ``dh`` with the recomputed ``h``; then ``dW_d = dy^T h``, ``dx = d gate W_g + d up W_u``,
    ``dW_g = d gate^T x``, ``dW_u = d up^T x``. Peak memory above the saved tensors is one ``[M, I]``
    buffer. Because the saved buffers are consumed, one backward per forward is supported.

    Inputs: ``x [M, H]``, ``gate_weight``/``up_weight [I, H]``, ``down_weight [H, I]``, optional biases,
    and ``use_kernel`` (Triton kernels, or the PyTorch reference for the activation).
    """

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, use_kernel):
        n_inter = gate_weight.shape[0]
        gate_up_weight = packed_pair(gate_weight, up_weight)
        if gate_up_weight is not None:
            gate_up_bias = None
            if gate_bias is not None or up_bias is not None:
                gate_up_bias = packed_pair(gate_bias, up_bias)
                if gate_up_bias is None:
                    zeros = gate_weight.new_zeros(n_inter)
                    gate_up_bias = torch.cat([zeros if gate_bias is None else gate_bias,
                                              zeros if up_bias is None else up_bias])
            gate_up = F.linear(x, gate_up_weight, gate_up_bias)
            gate, up = gate_up[:, :n_inter], gate_up[:, n_inter:]
            saved = (gate_up, None)
        else:
            gate = F.linear(x, gate_weight, gate_bias)
            up = F.linear(x, up_weight, up_bias)
            saved = (gate, up)
        h = _activation_forward(gate, up, use_kernel)
        y = F.linear(h, down_weight, down_bias)
        del h
        # gate_weight and up_weight are saved even when packed so that autograd's version check
        # catches an in-place update of either between forward and backward.
        ctx.save_for_backward(x, gate_weight, up_weight, down_weight, gate_up_weight, *saved,
                              gate_bias, up_bias, down_bias)
        ctx.packed = gate_up_weight is not None
        ctx.has_bias = (gate_bias is not None, up_bias is not None)
        ctx.use_kernel = use_kernel
        ctx.consumed = False
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference block instead (gradients that carry
            # their own graph); the saved projections are left as they are.
            x, gate_weight, up_weight, down_weight, _, _, _, gate_bias, up_bias, down_bias = ctx.saved_tensors
            inputs = (x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
            return (*reference_grads(_ffn_reference, inputs, ctx.needs_input_grad[:7], (grad_y,)), None)
        if ctx.consumed:
            raise RuntimeError(
                "SwiGLU feed-forward: backward ran twice through the same graph (retain_graph=True?). "
                "Its backward writes the gradients over the saved activations to save memory, so it "
                "supports one backward per forward; run the forward again for another backward."
            )
        ctx.consumed = True
        x, gate_weight, up_weight, down_weight, gate_up_weight, gate, up, *_ = ctx.saved_tensors
        if ctx.packed:
            gate_up = gate
            gate, up = _halves(gate_up)
        need = ctx.needs_input_grad
        need_down_weight = need[3]
        need_gate_up = need[0] or need[1] or need[2] or need[4] or need[5]

        grad_x = grad_gate_w = grad_up_w = grad_down_w = None
        grad_gate_b = grad_up_b = grad_down_b = None
        if need[6]:
            grad_down_b = grad_y.sum(0)
        if need_gate_up:
            buf = grad_y.mm(down_weight)  # d h, then h
            _activation_backward_in_place(buf, gate, up, need_down_weight, ctx.use_kernel)
            if need_down_weight:
                grad_down_w = grad_y.t().mm(buf)
            del buf
            grad_gate, grad_up = gate, up  # now holding the gradients
            if ctx.packed:
                n_inter = gate.shape[1]
                grad_gate_up = gate_up  # now holding [d gate | d up]
                if need[0]:
                    grad_x = grad_gate_up.mm(gate_up_weight)
                if need[1] or need[2]:
                    grad_w = grad_gate_up.t().mm(x)
                    grad_gate_w, grad_up_w = grad_w[:n_inter], grad_w[n_inter:]
                if need[4] or need[5]:
                    grad_b = grad_gate_up.sum(0)
                    grad_gate_b, grad_up_b = grad_b[:n_inter], grad_b[n_inter:]
            else:
                if need[0]:
                    grad_x = grad_gate.mm(gate_weight).addmm_(grad_up, up_weight)
                if need[1]:
                    grad_gate_w = grad_gate.t().mm(x)
                if need[2]:
                    grad_up_w = grad_up.t().mm(x)
                if need[4]:
                    grad_gate_b = grad_gate.sum(0)
                if need[5]:
                    grad_up_b = grad_up.sum(0)
        elif need_down_weight:
            grad_down_w = grad_y.t().mm(_activation_forward(gate, up, ctx.use_kernel))
        return (
            grad_x,
            grad_gate_w if need[1] else None,
            grad_up_w if need[2] else None,
            grad_down_w,
            grad_gate_b if need[4] and ctx.has_bias[0] else None,
            grad_up_b if need[5] and ctx.has_bias[1] else None,
            grad_down_b,
            None,
        )
