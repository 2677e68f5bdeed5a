"""PyTorch reference for symmetric INT8 quantization and INT8 linear layers.

These functions are the CPU fallback and the test oracle of the INT8 kernels (one home for the math):

* Symmetric quantization of a slice ``v`` (a row, a channel, a K group, or the whole tensor)::

      amax  = max(max|v|, AMAX_FLOOR)
      scale = amax / 127                                   (fp32)
      q     = clamp(round_half_even(v * (127 / amax)), -127, 127)   (int8)

  ``-128`` is never produced, so ``-q`` never overflows and the grid is symmetric. ``AMAX_FLOOR``
  (2**-64) gives an all-zero slice a tiny positive scale: it quantizes to zeros and dequantizes to
  exact zeros, with no NaN; an empty slice (size 0) is treated as an all-zero one. A slice holding a
  NaN or an infinity (``max|v|`` not finite) gets a NaN scale and zeros for ``q``, so it dequantizes
  (and its W8A8 output row comes out) as NaN rather than as finite garbage. Multiplying by
  ``127 / amax`` (one IEEE division per slice) instead of dividing every element lets the Triton
  activation quantizer reproduce this bit for bit.
* Group size of ``G`` scales over ``K`` elements when it is not given (:func:`infer_group_size`): a
  power of two ``g >= 16`` with ``ceil(K / g) == G``, else ``K / G`` when it divides exactly (or the
  only ``g`` that fits), else an error asking for it.
* W8A16 linear: ``y = x @ (q * s)^T + b`` computed in fp32 (fp64 for fp64 inputs), returned in
  ``x.dtype``.
* W8A8 dynamic linear: ``x`` is quantized per row (token) as above, the int8 product is exact, and
  ``y = (xq @ q^T) * sx[:, None] * s[None, :] + b``. Its gradient treats the activation rounding as the
  identity (straight-through), the gradient of the W8A16 product.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "AMAX_FLOOR",
    "INT8_MAX",
    "W8A8_MAX_K",
    "infer_group_size",
    "quantize_symmetric_reference",
    "dequantize_reference",
    "quantize_weight_reference",
    "dequantize_weight_reference",
    "int8_linear_reference",
    "int8_linear_input_grad",
    "w8a8_linear_reference",
]

INT8_MAX = 127
AMAX_FLOOR = 2.0**-64
# int32 accumulation of K products of int8 values (|q| <= 127) stays exact up to this K.
W8A8_MAX_K = (2**31 - 1) // (INT8_MAX * INT8_MAX)

# Rows of a weight quantized at once by quantize_weight_reference, as fp32 bytes: the temporaries (two
# fp32 copies of a chunk) stay near 32 MiB whatever the layer's size, so quantizing a model on the GPU
# never needs a float copy of a whole weight beside the original.
_CHUNK_BYTES = 16 * 1024**2


def _quantize_last_dim(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row (last dimension) of ``v``: int8 like ``v``, fp32 scales of shape ``v.shape[:-1]``."""
    v = v.float()
    if v.shape[-1]:
        amax = v.abs().amax(dim=-1)  # NaN when the row holds one, as torch.amax propagates NaN
    else:  # an empty row, as an all-zero one (amax raises on an empty dimension)
        amax = v.new_zeros(v.shape[:-1])
    # a row with a NaN or an infinity has no int8 representation: a NaN scale, never a finite one
    amax = amax.clamp_min(AMAX_FLOOR).where(amax.isfinite(), float("nan"))
    # Tensor / tensor divisions: correctly rounded on every device, as the Triton quantizer's. (With a
    # Python number, ``127 / t`` is computed as ``t.reciprocal() * 127`` and CUDA divides by a scalar
    # through a reciprocal multiply: both can differ in the last bit.)
    int8_max = torch.full_like(amax, INT8_MAX)
    inv = int8_max / amax
    # in place on the product (a fresh tensor): one fp32 temporary besides v. Only a NaN-scale row has
    # NaN products (inv is NaN there); they become 0, as in the Triton quantizer (a NaN has no int8).
    q = (v * inv.unsqueeze(-1)).round_().clamp_(-INT8_MAX, INT8_MAX).nan_to_num_(0.0).to(torch.int8)
    return q, amax / int8_max


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def infer_group_size(
    size: int,
    groups: int,
    group_size: int | None = None,
    *,
    what: str = "scale",
    hint: str = "pass group_size",
) -> int:
    """The group size of ``groups`` scales over ``size`` elements (the one home of the inference rule).

    ``ceil(size / g) == groups`` holds for a range of group sizes ``g`` when the last group is
    partial (130 elements in 2 groups: any ``g`` from 65 to 129), so the rule picks, in order:

    1. ``group_size`` when given (it must give ``groups`` groups);
    2. a power of two ``g >= 16`` with ``ceil(size / g) == groups``, the group sizes used in practice
       (unique for ``groups >= 2``; for ``groups == 1``, where any ``g >= size`` gives the same scales,
       the smallest power of two ``>= max(size, 16)``; for ``size == 0``, 16);
    3. ``size // groups`` when it divides exactly (a non-power-of-two group size with full groups),
       or the only group size that gives ``groups`` groups when there is one;
    4. otherwise a ``ValueError``: the shape is ambiguous and the caller must say.

    Args:
        size: the number of elements grouped (``K``, ``in_features``).
        groups: the number of scales along them (``scale.shape[1]`` of a ``[N, G]`` scale).
        group_size: the group size the caller declared, or ``None`` to infer it.
        what: the name of the scale in error messages.
        hint: what the caller should do when the shape is ambiguous (appended to the message).

    Returns:
        A positive ``g`` with ``ceil(size / g) == groups``.

    Raises:
        ValueError: ``group_size`` does not give ``groups`` groups, no group size does, or several do
            and none is a power of two ``>= 16`` or an exact divisor.

    Example:
        >>> infer_group_size(130, 2), infer_group_size(300, 3), infer_group_size(96, 2)
        (128, 128, 64)
        >>> infer_group_size(96, 4), infer_group_size(100, 1)  # an exact divisor; one group
        (24, 128)
        >>> infer_group_size(150, 3), infer_group_size(150, 3, 50)
        (64, 50)
    """
    plural = "s" if groups != 1 else ""
    if group_size is not None:
        if -(-size // group_size) != groups:
            raise ValueError(
                f"{what} has {groups} group{plural}, but group_size={group_size} over {size} elements "
                f"gives ceil({size} / {group_size}) = {-(-size // group_size)}"
            )
        return group_size
    if size == 0 and groups == 0:
        return 16
    if groups == 1 and size >= 1:
        return max(16, _next_power_of_two(size))
    # the integers g with ceil(size / g) == groups: (groups - 1) g < size <= groups g
    low = -(-size // groups) if groups >= 2 else 0
    high = (size - 1) // (groups - 1) if groups >= 2 else -1
    if low > high:
        raise ValueError(
            f"{what} has {groups} group{plural}, which no group size gives over {size} elements "
            f"(ceil({size} / group_size) != {groups} for every group_size)"
        )
    # one power of two at most lies in [low, high] (high < 2 low), the smallest one >= low
    g = _next_power_of_two(low)
    if 16 <= g <= high:
        return g
    if size % groups == 0 or low == high:
        return low  # size // groups when it divides; else the one group size that fits
    raise ValueError(
        f"cannot infer group_size: {groups} groups over {size} elements fit every group size from {low} "
        f"to {high}, none of them a power of two >= 16 or an exact divisor of {size}; the shape is "
        f"ambiguous, {hint}"
    )


def quantize_symmetric_reference(
    x: torch.Tensor, dim: int | None = -1, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale per slice along ``dim`` (see the module docstring).

    Args:
        x: a floating tensor.
        dim: the dimension the absolute maximum is taken over (``-1``: one scale per row);
            ``None``: one scale for the whole tensor.
        group_size: with ``dim``, split it into groups of this many elements (the last group may be
            shorter), one scale each.

    Returns:
        ``(q, scale)``: int8 of ``x``'s shape; fp32 scale of ``x``'s shape without ``dim``
        (per slice), with ``dim`` of size ``ceil(size / group_size)`` (per group), or 0-d (per tensor).
    """
    if dim is None:
        q, s = _quantize_last_dim(x.reshape(1, -1))
        return q.reshape(x.shape), s.reshape(())
    dim = dim % x.dim()
    v = x.movedim(dim, -1)
    if group_size is None:
        q, s = _quantize_last_dim(v)
        return q.movedim(-1, dim), s
    size = v.shape[-1]
    groups = -(-size // group_size)
    pad = groups * group_size - size
    if pad:
        # zero padding does not change a group's max |v| (and an all-padding group cannot occur)
        v = torch.nn.functional.pad(v.float(), (0, pad))
    q, s = _quantize_last_dim(v.reshape(*v.shape[:-1], groups, group_size))
    q = q.reshape(*v.shape[:-1], groups * group_size)[..., :size]
    return q.movedim(-1, dim), s.movedim(-1, dim)


def dequantize_reference(
    q: torch.Tensor,
    scale: torch.Tensor,
    dim: int | None = -1,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_symmetric_reference`: ``q * scale`` broadcast back, in ``dtype``.

    The product is formed in fp32 (fp64 when ``dtype`` is fp64) and rounded once to ``dtype``.
    """
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    qf = q.to(ct)
    if dim is None or scale.dim() == 0:
        return (qf * scale.to(ct)).to(dtype)
    dim = dim % q.dim()
    s = scale.to(ct)
    if group_size is None:
        return (qf * s.unsqueeze(dim)).to(dtype)
    s = s.movedim(dim, -1).repeat_interleave(group_size, dim=-1)[..., : q.shape[dim]].movedim(-1, dim)
    return (qf * s).to(dtype)


def quantize_weight_reference(
    weight: torch.Tensor, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (or per-group) quantization of a ``[N, K]`` weight, a bounded chunk of rows at once.

    Returns:
        int8 ``[N, K]`` and fp32 scale ``[N]`` (or ``[N, ceil(K / group_size)]``), on ``weight.device``.
    """
    n, k = weight.shape
    groups = -(-k // group_size) if group_size else None
    q = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    s = torch.empty((n,) if groups is None else (n, groups), dtype=torch.float32, device=weight.device)
    rows = max(1, _CHUNK_BYTES // max(1, 4 * k))
    with torch.no_grad():
        for r0 in range(0, n, rows):
            qc, sc = quantize_symmetric_reference(weight[r0 : r0 + rows], dim=-1, group_size=group_size)
            q[r0 : r0 + rows] = qc
            s[r0 : r0 + rows] = sc
    return q, s


def dequantize_weight_reference(
    weight: torch.Tensor,
    scale: torch.Tensor,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``weight[N, K] * scale`` (per channel ``[N]`` or per group ``[N, G]``) in ``dtype``."""
    return dequantize_reference(weight, scale, dim=-1, group_size=group_size, dtype=dtype)


def int8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """W8A16 linear: ``x @ (weight * scale)^T + bias`` computed in fp32 (fp64 for fp64 ``x``).

    Args:
        x: ``[..., K]`` floating.
        weight: int8 ``[N, K]``.
        scale: fp32 ``[N]`` or ``[N, ceil(K / group_size)]``.
        bias: ``[N]`` or ``None``.
        group_size: K-group size of ``scale`` or ``None``.

    Returns:
        ``[..., N]`` in ``x.dtype``; differentiable with respect to ``x`` and ``bias``.
    """
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_weight_reference(weight, scale, group_size, dtype=ct)
    out = torch.nn.functional.linear(x.to(ct), w, None if bias is None else bias.to(ct))
    return out.to(x.dtype)


def int8_linear_input_grad(
    grad_out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """``dx = dy @ dequant(W)`` in ``dy``'s dtype (the gradient of both the W8A16 and W8A8 products).

    The dequantized weight is formed in ``dy``'s dtype for the duration of the call (one layer at a
    time), which is what autograd of ``x @ w.to(dtype).T`` would hold as well.
    """
    w = dequantize_weight_reference(weight, scale, group_size, dtype=grad_out.dtype)
    return grad_out @ w


class _W8A8Reference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, scale, bias):
        xq, sx = quantize_symmetric_reference(x2, dim=-1)
        # fp64 holds every int32 dot product of int8 values exactly (K * 127^2 < 2^53)
        acc = (xq.to(torch.float64) @ weight.to(torch.float64).T).to(torch.float32)
        out = acc * sx[:, None] * scale.float()[None, :]
        if bias is not None:
            out = out + bias.float()
        ctx.save_for_backward(weight, scale)
        return out.to(x2.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        dx = int8_linear_input_grad(grad_out, weight, scale) if ctx.needs_input_grad[0] else None
        db = grad_out.sum(0) if ctx.needs_input_grad[3] else None
        return dx, None, None, db


def w8a8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A8 dynamic linear (per-token activation quantization, per-channel weight scales).

    Args:
        x: ``[..., K]`` floating.
        weight: int8 ``[N, K]``.
        scale: fp32 ``[N]``.
        bias: ``[N]`` or ``None``.

    Returns:
        ``[..., N]`` in ``x.dtype``; the gradient with respect to ``x`` is straight-through.
    """
    lead = x.shape[:-1]
    # the explicit row count: reshape(-1, 0) of an empty tensor is ambiguous
    out = _W8A8Reference.apply(x.reshape(math.prod(lead), x.shape[-1]), weight, scale, bias)
    return out.reshape(*lead, weight.shape[0])
