"""Functional INT8 linear: validate once, flatten to 2-D, dispatch to a Triton kernel or the reference."""

from __future__ import annotations

import math

import torch

from .._backend import check_same_device, select_backend
from ..ops import int8 as _ops
from ..reference.int8 import W8A8_MAX_K, int8_linear_reference, w8a8_linear_reference
from ..utils import autocast_enabled

__all__ = ["int8_gemm", "int8_gemm_group", "MODES", "KERNELS", "W8A8_AUTO_MIN_TOKENS"]

MODES = ("auto", "w8a16", "w8a8")
KERNELS = ("auto", "gemv", "splitk", "gemm", "dequant", "w8a8")

# mode="auto" may switch to W8A8 dynamic from this many rows (tokens) on, where int8 tensor cores make
# prefill faster than bf16. It is off (None) by default because per-token activation quantization costs
# accuracy on real models: on all-MiniLM-L6-v2's 37 linear layers with real activations, the worst
# layer's output SQNR is 29.7 dB with W8A8 against 36.0 dB weight-only (tests/quantization). Set an int
# to opt in for a process; mode="w8a8" opts in per call or per layer. The switch depends only on the row
# count, never on the device or backend, so the CPU fallback computes the same function as the kernels.
W8A8_AUTO_MIN_TOKENS: int | None = None

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(x, weight_int8, scale, bias, group_size, mode, kernel) -> None:
    # Called on every decode step: the common case costs a few attribute reads; each failure names the
    # argument, what was expected and what came.
    op = "int8_gemm"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{op}: x must be a floating-point tensor, got {got}")
    if not isinstance(weight_int8, torch.Tensor) or weight_int8.dtype != torch.int8:
        got = weight_int8.dtype if isinstance(weight_int8, torch.Tensor) else type(weight_int8).__name__
        raise TypeError(f"{op}: weight_int8 must be an int8 tensor, got {got}")
    w_shape = weight_int8.shape
    if len(w_shape) != 2:
        raise ValueError(f"{op}: weight_int8 must be 2-D [N, K], got shape {tuple(w_shape)}")
    n, k = w_shape
    x_shape = x.shape
    if not x_shape:
        raise ValueError(f"{op}: x must have at least one dimension [..., K], got a 0-d tensor")
    if x_shape[-1] != k:
        raise ValueError(
            f"{op}: x's last dimension must equal weight_int8.shape[1] = {k} (in_features), got x of shape "
            f"{tuple(x_shape)}"
        )
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise TypeError(f"{op}: scale must be a floating-point tensor, got {got}")
    if group_size is None:
        expected = (n,)
    elif isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{op}: group_size must be a positive int or None, got {group_size!r}")
    else:
        expected = (n, -(-k // group_size))
    if scale.shape != expected:
        hint = "" if group_size is not None or scale.dim() != 2 else " (a 2-D scale needs group_size)"
        raise ValueError(
            f"{op}: scale must have shape {list(expected)} for weight [{n}, {k}] and "
            f"group_size={group_size}, got {list(scale.shape)}{hint}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise TypeError(f"{op}: bias must be a floating-point tensor or None, got {got}")
        if bias.shape != (n,):
            raise ValueError(f"{op}: bias must have shape [{n}] (out_features), got {list(bias.shape)}")
    if mode != "auto" or kernel != "auto":
        _validate_choice(op, mode, kernel, group_size)
    device = x.device
    if weight_int8.device != device or scale.device != device or (bias is not None and bias.device != device):
        check_same_device(op, x=x, weight_int8=weight_int8, scale=scale, bias=bias)


def _validate_choice(op: str, mode, kernel, group_size) -> None:
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    if kernel not in KERNELS:
        raise ValueError(f"{op}: kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "w8a8" and mode == "w8a16":
        raise ValueError(f"{op}: kernel='w8a8' contradicts mode='w8a16'")
    if kernel in ("gemv", "splitk", "gemm", "dequant") and mode == "w8a8":
        raise ValueError(f"{op}: kernel={kernel!r} is a W8A16 kernel and contradicts mode='w8a8'")
    if group_size is not None and (mode == "w8a8" or kernel == "w8a8"):
        raise ValueError(f"{op}: W8A8 needs per-channel weight scales; got group_size={group_size}")


def _uses_w8a8(mode: str, kernel: str, rows: int, group_size: int | None) -> bool:
    if mode == "w8a8" or kernel == "w8a8":
        return True
    if W8A8_AUTO_MIN_TOKENS is None or mode == "w8a16" or kernel != "auto" or group_size is not None:
        return False
    return rows >= W8A8_AUTO_MIN_TOKENS


def _kernel_reason(x: torch.Tensor, k: int, group_size: int | None, w8a8: bool) -> str | None:
    if group_size is None and not w8a8 and x.dtype in _KERNEL_DTYPES:
        return None
    if x.dtype not in _KERNEL_DTYPES:
        return f"the kernels take fp16, bf16 or fp32 activations, not {x.dtype}"
    if group_size is not None and group_size % 16:
        return f"the kernels need group_size to be a multiple of 16, got {group_size}"
    if w8a8 and k > W8A8_MAX_K:
        return f"W8A8's int32 accumulation would overflow for K = {k} > {W8A8_MAX_K}"
    return None


def int8_gemm(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    mode: str = "auto",
    kernel: str = "auto",
) -> torch.Tensor:
    r"""Linear layer with symmetric int8 weights: ``y = x @ (weight_int8 * scale)^T + bias``.

    .. math::

        y_{mn} = \sum_k x_{mk}\, q_{nk}\, s_{n} + b_n \quad\text{(per channel)}, \qquad
        y_{mn} = \sum_k x_{mk}\, q_{nk}\, s_{n,\lfloor k/G \rfloor} + b_n \quad\text{(per group of } G\text{)}

    W8A16 (weight-only) keeps ``x`` in its dtype: the int8 weight is dequantized in registers and the
    products are accumulated in fp32; from ``int8_config.DEQUANT_MIN_ROWS`` rows on (prefill), where
    the product is compute-bound, the weight is instead dequantized into a transient buffer in ``x``'s
    dtype (at most ``int8_config.DEQUANT_MAX_BUFFER_BYTES`` at a time) and multiplied by cuBLAS.
    W8A8 dynamic also quantizes each row of ``x`` symmetrically (``x \approx x_q s_x``, int8 with an
    fp32 scale per row) and runs an exact int8 x int8 -> int32 product, scaled by ``s_x s_n`` in the
    epilogue. The weight is read in its ``nn.Linear`` layout
    ``[N, K]``; no transposed copy is made, and no float copy outlives the call.

    Args:
        x: activations ``[..., K]``, fp16, bf16 or fp32 (fp64 runs the PyTorch reference).
        weight_int8: int8 weights ``[N, K]`` with values in ``[-127, 127]``.
        scale: fp32 scales, ``[N]`` (per output channel) or ``[N, ceil(K / group_size)]`` (per group).
        bias: ``[N]`` or ``None``.
        group_size: the K-group size of ``scale`` (a multiple of 16 for the kernels), or ``None``.
        mode: ``"w8a16"`` (weight-only), ``"w8a8"`` (dynamic per-token activation quantization too:
            faster prefill on int8 tensor cores, a few dB less output SQNR on real activations), or
            ``"auto"``: W8A16, unless ``rotalabs_accel.functional.gemm.W8A8_AUTO_MIN_TOKENS`` is set
            to a row count from which per-channel layers switch to W8A8 (off by default).
        kernel: ``"auto"`` (chosen from the shape), or force ``"gemv"``, ``"splitk"``, ``"gemm"``,
            ``"dequant"`` (W8A16 kernels) or ``"w8a8"``; for tests and benchmarks. Ignored by the
            PyTorch reference except that ``"w8a8"`` selects the W8A8 math.

    Returns:
        ``[..., N]`` in ``x.dtype`` (in the autocast dtype inside ``torch.autocast`` unless ``x`` is
        fp64, which autocast leaves alone, as for ``nn.Linear``).
        Differentiable with respect to ``x`` (``dx = dy @ dequant(W)``,
        straight-through for W8A8) and ``bias``; the int8 weight is frozen.

    Raises:
        TypeError: a non-floating ``x``, ``scale`` or ``bias``, or a weight that is not int8.
        ValueError: mismatched shapes, devices, or contradictory ``mode`` / ``kernel`` / ``group_size``.

    Example:
        >>> import torch
        >>> from rotalabs_accel import int8_gemm, quantize_weight_per_channel
        >>> w = torch.randn(32, 64)
        >>> q, s = quantize_weight_per_channel(w)
        >>> x = torch.randn(4, 64)
        >>> y = int8_gemm(x, q, s)
        >>> y.shape
        torch.Size([4, 32])
        >>> bool(((y - x @ w.T).norm() / (x @ w.T).norm()) < 0.02)
        True
    """
    _validate(x, weight_int8, scale, bias, group_size, mode, kernel)
    return _int8_gemm_validated(x, weight_int8, scale, bias, group_size, mode, kernel)


def _int8_gemm_validated(x, weight_int8, scale, bias, group_size, mode, kernel):
    device_type = x.device.type
    if autocast_enabled(device_type):
        # as nn.Linear under autocast: compute in the autocast dtype, except for fp64, which autocast
        # never casts; the reference inside must then run with autocast off, or its fp32 matmul would
        # be cast down as well
        if x.dtype != torch.float64:
            x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return _int8_gemm(x, weight_int8, scale, bias, group_size, mode, kernel)
    return _int8_gemm(x, weight_int8, scale, bias, group_size, mode, kernel)


def _int8_gemm(x, weight_int8, scale, bias, group_size, mode, kernel):
    n, k = weight_int8.shape
    lead = None
    if x.dim() != 2:
        lead = x.shape[:-1]
        # the explicit row count: reshape(-1, 0) of an empty tensor (K = 0) is ambiguous
        x = x.reshape(math.prod(lead), k)
    rows = x.shape[0]
    w8a8 = _uses_w8a8(mode, kernel, rows, group_size)
    if rows == 0:
        # no rows, nothing to launch; the empty [0, N] result still depends on x and on the bias, so
        # backward gives them zero gradients of their shapes (as nn.Linear) instead of failing
        out = x[:, :0] @ x.new_zeros((0, n))
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out if lead is None else out.reshape(*lead, n)
    backend = select_backend(
        "int8_gemm", x, weight_int8, scale, bias, kernel_reason=_kernel_reason(x, k, group_size, w8a8)
    )
    if backend == "torch":
        if w8a8:
            out = w8a8_linear_reference(x, weight_int8, scale, bias)
        else:
            out = int8_linear_reference(x, weight_int8, scale, bias, group_size)
        return out if lead is None else out.reshape(*lead, n)
    if x.stride(-1) != 1:
        x = x.contiguous()  # K-contiguous rows give the kernels full-width vector loads
    if scale.dtype != torch.float32:
        scale = scale.float()
    gs = group_size or 0
    if torch.compiler.is_compiling():
        if w8a8:
            out = torch.ops.rotalabs_accel.int8_linear_w8a8(x, weight_int8, scale, bias)
        else:
            out = torch.ops.rotalabs_accel.int8_linear(x, weight_int8, scale, bias, gs, kernel)
    else:
        out = _ops.int8_linear(x, weight_int8, scale, bias, gs, w8a8, kernel)
    return out if lead is None else out.reshape(*lead, n)


def int8_gemm_group(
    x: torch.Tensor,
    weights: list[torch.Tensor] | tuple[torch.Tensor, ...],
    scales: list[torch.Tensor] | tuple[torch.Tensor, ...],
    biases: list[torch.Tensor | None] | tuple[torch.Tensor | None, ...] | None = None,
    *,
    group_size: int | None = None,
    mode: str = "auto",
    concat: bool = False,
):
    r"""Several int8 linear layers applied to the same input: ``int8_gemm(x, w_i, s_i, b_i)`` for each ``i``.

    The result equals the separate :func:`int8_gemm` calls. For one row of ``x`` (decode) with 2 or 3
    per-channel weights, no gradient to track and the Triton backend, the weights are streamed by one
    GEMV launch writing a packed ``[..., sum N_i]`` buffer and the outputs are column views of it: the
    query/key/value projections of an attention layer (whose key and value weights are too small to
    keep the GPU's memory busy on their own) or the gate and up projections of an MLP. Otherwise each
    layer runs on its own.

    Args:
        x: activations ``[..., K]``.
        weights: int8 ``[N_i, K]`` each.
        scales: fp32 ``[N_i]`` each (or ``[N_i, ceil(K / group_size)]`` with ``group_size``).
        biases: ``[N_i]`` or ``None`` per weight, or ``None`` for none at all.
        group_size, mode: as for :func:`int8_gemm`, shared by every weight.
        concat: return the fused path's packed ``[..., sum N_i]`` buffer itself, and ``None`` where
            the layers would run one by one (so a caller never pays for a concatenation).

    Returns:
        A tuple of ``[..., N_i]`` tensors in ``x.dtype`` (column views of one buffer on the fused path);
        with ``concat``, the packed tensor or ``None``.

    Example:
        >>> import torch
        >>> from rotalabs_accel import quantize_weight_per_channel
        >>> from rotalabs_accel.functional.gemm import int8_gemm, int8_gemm_group
        >>> x = torch.randn(1, 64)
        >>> q1, s1 = quantize_weight_per_channel(torch.randn(32, 64))
        >>> q2, s2 = quantize_weight_per_channel(torch.randn(16, 64))
        >>> a, b = int8_gemm_group(x, [q1, q2], [s1, s2])
        >>> torch.equal(a, int8_gemm(x, q1, s1)) and b.shape == (1, 16)
        True
    """
    if not isinstance(weights, (list, tuple)) or not isinstance(scales, (list, tuple)) or not weights:
        raise TypeError("int8_gemm_group: weights and scales must be non-empty lists of tensors")
    if len(scales) != len(weights):
        raise ValueError(f"int8_gemm_group: {len(weights)} weights but {len(scales)} scales")
    if biases is None:
        biases = [None] * len(weights)
    elif len(biases) != len(weights):
        raise ValueError(f"int8_gemm_group: {len(weights)} weights but {len(biases)} biases")
    for w, s, b in zip(weights, scales, biases):
        _validate(x, w, s, b, group_size, mode, "auto")
    if _fused_group_ok(x, weights, scales, biases, group_size, mode):
        k = x.shape[-1]
        rows = x.reshape(-1, k)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        scales = [s if s.dtype == torch.float32 else s.float() for s in scales]
        packed_biases = list(biases)
        if torch.compiler.is_compiling():
            out = torch.ops.rotalabs_accel.int8_gemv_group(rows, list(weights), scales, packed_biases)
        else:
            out = _ops.int8_gemv_group(rows, list(weights), scales, packed_biases)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        if concat:
            return out
        views, start = [], 0
        for w in weights:
            views.append(out[..., start : start + w.shape[0]])
            start += w.shape[0]
        return tuple(views)
    if concat:
        return None
    return tuple(
        _int8_gemm_validated(x, w, s, b, group_size, mode, "auto") for w, s, b in zip(weights, scales, biases)
    )


def _fused_group_ok(x, weights, scales, biases, group_size, mode) -> bool:
    if not 2 <= len(weights) <= 3 or group_size is not None or x.dtype not in _KERNEL_DTYPES:
        return False
    if x.numel() != x.shape[-1] or x.shape[-1] == 0:  # one row (decode), non-empty
        return False
    if _uses_w8a8(mode, "auto", 1, None) or autocast_enabled(x.device.type):
        return False
    first_bias = biases[0]
    if any((b is None) != (first_bias is None) for b in biases):
        return False
    if first_bias is not None and any(b.dtype != first_bias.dtype for b in biases):
        return False
    # the grouped launch has no backward; the separate calls do
    needs_grad = x.requires_grad or any(b is not None and b.requires_grad for b in biases)
    if needs_grad and torch.is_grad_enabled():
        return False
    tensors = [x, *weights, *scales, *(b for b in biases if b is not None)]
    return select_backend("int8_gemm", *tensors) == "triton"
