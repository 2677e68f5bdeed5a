"""Op layer of the INT8 linear kernels: autograd and ``torch.library`` registration, nothing else.

* Eager calls go through :class:`Int8LinearFunction` (little Python per call).
* Under ``torch.compile`` the functional layer calls ``torch.ops.rotalabs_accel.int8_linear`` /
  ``int8_linear_w8a8``: opaque custom ops with fake implementations (no graph break, no host sync,
  outputs from the caching allocator, so CUDA graphs can capture them).

Both call the same launchers in ``triton_kernels/int8_gemm.py``, imported the first time a kernel runs.
The weights are frozen (int8 buffers): gradients flow to the activations (``dx = dy @ dequant(W)``,
straight-through for W8A8's activation rounding) and to the bias, so a quantized layer can sit in a model
whose other parameters are being fine-tuned.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..reference.int8 import int8_linear_input_grad

__all__ = ["Int8LinearFunction", "int8_linear", "int8_linear_op", "int8_linear_w8a8_op", "int8_gemv_group",
           "int8_gemv_group_op"]

_kernel_module = None


def _kernels():
    global _kernel_module
    if _kernel_module is None:
        from ..triton_kernels import int8_gemm

        _kernel_module = int8_gemm
    return _kernel_module


def _launch(x, weight, scale, bias, group_size: int, w8a8: bool, kernel: str) -> torch.Tensor:
    k = _kernel_module or _kernels()
    if w8a8:
        return k.w8a8_linear(x, weight, scale, bias)
    return k.w8a16_linear(x, weight, scale, bias, group_size or None, kernel)


def _backward(grad_out, weight, scale, group_size, needs_x: bool, needs_bias: bool, bias_dtype):
    dx = int8_linear_input_grad(grad_out, weight, scale, group_size or None) if needs_x else None
    db = grad_out.sum(0).to(bias_dtype) if needs_bias else None
    return dx, db


class Int8LinearFunction(torch.autograd.Function):
    """``x[M, K] -> x @ dequant(W)^T + b`` with a Triton kernel; gradients for ``x`` and ``b``."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, group_size, w8a8, kernel):
        out = _launch(x, weight, scale, bias, group_size, w8a8, kernel)
        ctx.group_size = group_size
        ctx.bias_dtype = None if bias is None else bias.dtype
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(weight, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors if ctx.needs_input_grad[0] else (None, None)
        dx, db = _backward(
            grad_out, weight, scale, ctx.group_size, ctx.needs_input_grad[0], ctx.needs_input_grad[3],
            ctx.bias_dtype,
        )
        return dx, None, None, db, None, None, None


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    w8a8: bool,
    kernel: str,
) -> torch.Tensor:
    """Eager entry point (validated 2-D inputs; ``group_size`` 0 means per-channel scales).

    Without a gradient to track (inference, or no input requiring one) the launcher is called
    directly: the autograd node would record nothing, and building it costs microseconds per call,
    a sizeable share of a decode step's kernel time.
    """
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return Int8LinearFunction.apply(x, weight, scale, bias, group_size, w8a8, kernel)
    return _launch(x, weight, scale, bias, group_size, w8a8, kernel)


# --------------------------------------------------------------------------------------------------
# torch.library custom ops (used while torch.compile traces)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("rotalabs_accel::int8_linear", mutates_args=())
def int8_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    kernel: str,
) -> torch.Tensor:
    """W8A16 linear on 2-D ``x``; ``group_size`` 0 means per-channel scales."""
    return _launch(x, weight, scale, bias, group_size, False, kernel)


@int8_linear_op.register_fake
def _int8_linear_fake(x, weight, scale, bias, group_size, kernel):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("rotalabs_accel::int8_linear_w8a8", mutates_args=())
def int8_linear_w8a8_op(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8 dynamic linear on 2-D ``x`` (per-token activation quantization inside)."""
    return _launch(x, weight, scale, bias, 0, True, "w8a8")


@int8_linear_w8a8_op.register_fake
def _int8_linear_w8a8_fake(x, weight, scale, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, scale, bias = inputs[:4]
    ctx.group_size = inputs[4] if len(inputs) > 4 else 0
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(weight, scale)


def _op_backward(ctx, grad_out):
    weight, scale = ctx.saved_tensors
    dx, db = _backward(
        grad_out, weight, scale, ctx.group_size, ctx.needs_input_grad[0], ctx.needs_input_grad[3],
        ctx.bias_dtype,
    )
    return dx, None, None, db, None, None


def _op_backward_w8a8(ctx, grad_out):
    return _op_backward(ctx, grad_out)[:4]


torch.library.register_autograd("rotalabs_accel::int8_linear", _op_backward, setup_context=_setup_context)
torch.library.register_autograd(
    "rotalabs_accel::int8_linear_w8a8", _op_backward_w8a8, setup_context=_setup_context
)


# --------------------------------------------------------------------------------------------------
# Several weights of one input in one launch (inference only: no autograd). ``biases`` holds one
# entry per weight, all tensors or all None (torch.library has no optional list).
# --------------------------------------------------------------------------------------------------


def int8_gemv_group(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    scales: list[torch.Tensor],
    biases: list[Optional[torch.Tensor]],  # noqa: UP045 (the form torch.library reads)
) -> torch.Tensor:
    """Eager entry: ``[M, sum N_i]``, the outputs of each weight side by side (no gradient)."""
    return (_kernel_module or _kernels()).w8a16_gemv_group(x, weights, scales, biases)


@torch.library.custom_op("rotalabs_accel::int8_gemv_group", mutates_args=())
def int8_gemv_group_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    scales: list[torch.Tensor],
    biases: list[Optional[torch.Tensor]],  # noqa: UP045 (the form torch.library reads)
) -> torch.Tensor:
    """W8A16 GEMV over 2-3 per-channel weights sharing ``x``; outputs side by side."""
    return (_kernel_module or _kernels()).w8a16_gemv_group(x, weights, scales, biases)


@int8_gemv_group_op.register_fake
def _int8_gemv_group_fake(x, weights, scales, biases):
    return x.new_empty((x.shape[0], sum(w.shape[0] for w in weights)))
