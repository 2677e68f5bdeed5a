"""Functional rotary position embeddings: :func:`build_rope_cache` and :func:`apply_rope`.

``apply_rope`` validates its arguments once, views both layouts as ``(batch, seq, heads, head_dim)``
(no copy) and dispatches: the Triton kernel (one launch for q and k) on CUDA tensors, the PyTorch
reference otherwise (see :mod:`rotalabs_accel._backend`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._backend import check_same_device, select_backend
from ..ops import rope as _ops
from ..reference import rope as _ref

__all__ = ["apply_rope", "build_rope_cache"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def build_rope_cache(
    seq_len: int,
    dim: int,
    base: float = 10000.0,
    *,
    device: torch.device | str | None = None,
    scaling: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the cos/sin tables of rotary position embeddings.

    Row ``p`` holds, for ``j < dim / 2``::

        cos[p, j] = a * cos(p * inv_freq[j]),    sin[p, j] = a * sin(p * inv_freq[j])

    with ``inv_freq[j] = base ** (-2j / dim)`` modified by the scaling scheme, and ``a`` the scheme's
    attention factor (1 except for YaRN). The schemes and their parameter names follow Hugging Face
    ``transformers`` (``config.rope_parameters``):

    * ``None`` or ``{"rope_type": "default"}``: plain RoPE;
    * ``{"rope_type": "linear", "factor": f}``: position interpolation (frequencies divided by ``f``);
    * ``{"rope_type": "dynamic", "factor": f, "max_position_embeddings": L0}``: dynamic NTK, the base
      grows with ``seq_len`` once it exceeds ``L0`` (frequencies depend on ``seq_len``);
    * ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"}``: Llama 3.1 scaling;
    * ``{"rope_type": "yarn", "factor", "original_max_position_embeddings"}`` plus optional
      ``beta_fast``, ``beta_slow``, ``attention_factor``, ``mscale``, ``mscale_all_dim``, ``truncate``.

    A ``rope_theta`` key replaces ``base`` when ``base`` is left at its default (and must agree with
    it otherwise). Angles and cos/sin are computed in float64 and rounded once to ``dtype``, so
    positions in the hundreds of thousands stay accurate in fp32.

    Args:
        seq_len: number of positions (rows), ``>= 0``.
        dim: number of rotated features per head (the rotary dimension; even). For partial rotary
            embeddings pass ``rotary_dim``, not ``head_dim``.
        base: the RoPE base ``theta``.
        device: where the tables live (default CPU).
        scaling: ``None`` or a scaling dict as above.
        dtype: floating dtype of the tables (fp32 recommended; the kernels compute in fp32 anyway).

    Returns:
        ``(cos, sin)``, each ``(seq_len, dim // 2)`` of ``dtype`` on ``device``.

    Example:
        >>> import torch
        >>> from rotalabs_accel import build_rope_cache
        >>> cos, sin = build_rope_cache(4096, 128, base=500000.0, scaling={
        ...     "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        ...     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        >>> cos.shape, cos.dtype
        (torch.Size([4096, 64]), torch.float32)
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"build_rope_cache: seq_len must be an int >= 0, got {seq_len!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(
            f"build_rope_cache: dim (the rotary dimension) must be a positive even int, got {dim!r}"
        )
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"build_rope_cache: dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    if scaling is not None and scaling.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        raise ValueError(
            "build_rope_cache: scaling['partial_rotary_factor'] is not used here; pass the rotated width "
            "int(head_dim * partial_rotary_factor) as dim"
        )
    return _ref.build_rope_cache(seq_len, dim, base, device=device, scaling=scaling, dtype=dtype)


def _check_tensor(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"apply_rope: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"apply_rope: {name} must be a floating tensor ({_FLOAT_DTYPES}), got {t.dtype}")


def _validate(q, k, cos, sin, position_ids, offset, layout, rotary_dim, inplace) -> int:
    """Check every argument once; return the resolved rotary_dim."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_tensor(name, t)
    if layout not in _ref.LAYOUTS:
        raise ValueError(f"apply_rope: layout must be one of {_ref.LAYOUTS}, got {layout!r}")
    if q.dim() != 4 or k.dim() != 4:
        dims = "(batch, seq, heads, head_dim)" if layout == "bshd" else "(batch, heads, seq, head_dim)"
        raise ValueError(
            f"apply_rope: q and k must be 4-D {dims} for layout={layout!r}, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    if q.dtype != k.dtype:
        raise TypeError(f"apply_rope: q and k must have one dtype, got q {q.dtype} and k {k.dtype}")
    seq_dim = 1 if layout == "bshd" else 2
    if q.shape[0] != k.shape[0] or q.shape[seq_dim] != k.shape[seq_dim]:
        raise ValueError(
            f"apply_rope: q and k must agree in batch and seq (layout={layout!r}), got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    head_dim = q.shape[3]
    if k.shape[3] != head_dim:
        raise ValueError(f"apply_rope: q and k must have the same head_dim, got {head_dim} and {k.shape[3]}")
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(
            "apply_rope: cos and sin must both be (cache_len, rotary_dim // 2) tables (see "
            f"build_rope_cache), got cos {tuple(cos.shape)} and sin {tuple(sin.shape)}"
        )
    if rotary_dim is None:
        rotary_dim = 2 * cos.shape[1]
    elif isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"apply_rope: rotary_dim must be an int or None, got {rotary_dim!r}")
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"apply_rope: rotary_dim must be a positive even number, got {rotary_dim}")
    if rotary_dim > head_dim:
        raise ValueError(
            f"apply_rope: rotary_dim ({rotary_dim}) exceeds head_dim ({head_dim}); cos/sin have "
            f"{cos.shape[1]} columns and must have rotary_dim // 2 (half width, as build_rope_cache returns, "
            "not Hugging Face's duplicated full width)"
        )
    if cos.shape[1] != rotary_dim // 2:
        raise ValueError(
            f"apply_rope: cos/sin must have rotary_dim // 2 = {rotary_dim // 2} columns, got {cos.shape[1]}"
        )
    if position_ids is not None and not isinstance(position_ids, torch.Tensor):
        raise TypeError(
            f"apply_rope: position_ids must be a tensor or None, got {type(position_ids).__name__}"
        )
    check_same_device("apply_rope", q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    if not isinstance(inplace, bool):
        raise TypeError(f"apply_rope: inplace must be a bool, got {inplace!r}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"apply_rope: offset must be an int, got {offset!r}")
    seq = q.shape[seq_dim]
    cache_len = cos.shape[0]
    if position_ids is None:
        if offset < 0:
            raise ValueError(f"apply_rope: offset must be >= 0, got {offset}")
        if offset + seq > cache_len:
            raise ValueError(
                f"apply_rope: the cache has {cache_len} positions but offset + seq = {offset} + {seq} = "
                f"{offset + seq}; build a longer cache"
            )
        return rotary_dim
    if (
        position_ids.dtype.is_floating_point
        or position_ids.dtype.is_complex
        or position_ids.dtype == torch.bool
    ):
        raise TypeError(f"apply_rope: position_ids must be an integer tensor, got {position_ids.dtype}")
    if offset != 0:
        raise ValueError(
            "apply_rope: pass either position_ids or offset, not both (add the offset to position_ids)"
        )
    shape = tuple(position_ids.shape)
    if shape not in ((q.shape[0], seq), (1, seq), (seq,)):
        raise ValueError(
            f"apply_rope: position_ids must be (batch, seq) = {(q.shape[0], seq)}, (1, seq) or (seq,), "
            f"got {shape}"
        )
    # Checking the range of positions on a GPU would cost a device sync per call; on the CPU it is free.
    if position_ids.device.type == "cpu" and position_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0 or hi >= cache_len:
            raise ValueError(
                f"apply_rope: position_ids must lie in [0, {cache_len}) (the cache length), got values in "
                f"[{lo}, {hi}]; build a longer cache"
            )
    return rotary_dim


_OP = "apply_rope"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FAST_POSITION_DTYPES = (torch.int64, torch.int32)


def _fast_rotary_dim(q, k, cos, sin, position_ids, offset, layout, rotary_dim, inplace) -> int | None:
    """The rotary dimension when the call is a valid, kernel-ready one of the common kind, else ``None``.

    Common kind: plain tensors in a kernel dtype on one CUDA device (or all on the CPU), unit stride in
    the last dimension, cos/sin without gradients, int64/int32 positions. It reads a handful of
    attributes and launches nothing; whatever it declines goes through :func:`_validate`, which
    accepts the rarer valid calls and explains the invalid ones. Returning a value implies that
    :func:`_validate` would return the same value and that no ``kernel_reason`` applies.
    """
    tensor = torch.Tensor
    if type(q) is not tensor or type(k) is not tensor or type(cos) is not tensor or type(sin) is not tensor:
        return None
    q_shape, k_shape, cs_shape = q.shape, k.shape, cos.shape
    if len(q_shape) != 4 or len(k_shape) != 4 or len(cs_shape) != 2 or sin.shape != cs_shape:
        return None
    dtype = q.dtype
    if (
        dtype not in _KERNEL_DTYPES
        or k.dtype != dtype
        or cos.dtype not in _FLOAT_DTYPES
        or sin.dtype not in _FLOAT_DTYPES
        or cos.requires_grad
        or sin.requires_grad
    ):
        return None
    if layout == "bshd":
        seq = q_shape[1]
        if k_shape[1] != seq:
            return None
    elif layout == "bhsd":
        seq = q_shape[2]
        if k_shape[2] != seq:
            return None
    else:
        return None
    head_dim = q_shape[3]
    half = cs_shape[1]
    if rotary_dim is None:
        rotary_dim = 2 * half
    elif type(rotary_dim) is not int or rotary_dim != 2 * half:
        return None
    if half == 0 or rotary_dim > head_dim or k_shape[0] != q_shape[0] or k_shape[3] != head_dim:
        return None
    if q.stride(3) != 1 or k.stride(3) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        return None
    if (inplace is not False and inplace is not True) or type(offset) is not int:
        return None
    if q.is_cuda:
        device = q.get_device()
        if not (k.is_cuda and cos.is_cuda and sin.is_cuda) or not (
            k.get_device() == device and cos.get_device() == device and sin.get_device() == device
        ):
            return None
    elif not (q.is_cpu and k.is_cpu and cos.is_cpu and sin.is_cpu):
        return None
    if position_ids is None:
        if offset < 0 or offset + seq > cs_shape[0]:
            return None
        return rotary_dim
    if type(position_ids) is not tensor or position_ids.dtype not in _FAST_POSITION_DTYPES or offset != 0:
        return None
    # is_cpu as well as get_device(): both are -1 for the CPU and for the meta device
    if (position_ids.is_cuda != q.is_cuda or position_ids.is_cpu != q.is_cpu
            or position_ids.get_device() != q.get_device()):
        return None
    p_shape = position_ids.shape
    if p_shape != (q_shape[0], seq) and p_shape != (1, seq) and p_shape != (seq,):
        return None
    if not q.is_cuda and position_ids.numel():
        # On the CPU the range check is free (no device sync); an out-of-range position is explained
        # by _validate.
        if int(position_ids.min()) < 0 or int(position_ids.max()) >= cs_shape[0]:
            return None
    return rotary_dim


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    offset: int = 0,
    layout: str = "bshd",
    interleaved: bool = False,
    rotary_dim: int | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embeddings to queries and keys.

    For a token at position ``p`` and each rotated pair ``(x1, x2)`` of a head, with
    ``c = cos[p, j]`` and ``s = sin[p, j]``::

        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s

    Pairs are ``(x[j], x[j + r/2])`` (half-split, Llama/NeoX and Hugging Face checkpoints; default) or
    ``(x[2j], x[2j + 1])`` with ``interleaved=True`` (GPT-J), for ``j < r/2`` where ``r`` is
    ``rotary_dim``; features ``r:`` pass through unchanged. Arithmetic is fp32, the output has the
    input's dtype. On CUDA the Triton kernel rotates q and k in one launch, reads q/k through their
    strides (q and k sliced out of a fused qkv projection need no copy), and its backward pass is the
    rotation by ``-angle``.

    Under ``torch.compile`` the call becomes the custom op ``torch.ops.rotalabs_accel.rope_fwd``
    (backward ``rope_bwd``): no graph break, CUDA-graph safe; the in-place mode without autograd
    becomes the mutating op ``rope_inplace_``.

    Args:
        q: queries, ``(batch, seq, heads_q, head_dim)`` for ``layout="bshd"`` or
            ``(batch, heads_q, seq, head_dim)`` for ``layout="bhsd"`` (Hugging Face). fp32/fp16/bf16
            (float64 runs on the PyTorch reference).
        k: keys, same layout, batch, seq, head_dim and dtype; ``heads_k`` may differ (GQA/MQA).
        cos, sin: ``(cache_len, rotary_dim // 2)`` tables from :func:`build_rope_cache`.
        position_ids: integer positions ``(batch, seq)``, ``(1, seq)`` or ``(seq,)``; default
            ``offset + arange(seq)``. On CPU they are checked against the cache length; on CUDA
            (where that check would force a device sync) an out-of-range position gives NaN on the
            Triton path and an indexing error on the PyTorch path.
        offset: first position when ``position_ids`` is ``None`` (KV-cache decoding).
        layout: ``"bshd"`` (default) or ``"bhsd"``.
        interleaved: GPT-J style pairs.
        rotary_dim: rotated features (even, ``<= head_dim``); default ``2 * cos.shape[1]``.
        inplace: write the result into ``q`` and ``k`` and return them (opt-in; never implicit).
            Without autograd the kernel writes into them directly; when q or k need gradients the
            rotation runs out of place and is copied in with ``copy_`` (what autograd can track,
            also for views of a fused qkv tensor).

    Returns:
        ``(q_rot, k_rot)``, shaped like ``q`` and ``k`` (new tensors unless ``inplace``). New
        tensors keep the strides of dense inputs (a contiguous ``"bhsd"`` q gives a contiguous
        ``"bhsd"`` result) and are dense otherwise.

    Raises:
        TypeError, ValueError: on bad arguments (odd rotary dim, q/k head_dim mismatch, cache too short
            for the positions, unknown layout, tensors on different devices, ...).

    Example:
        >>> import torch
        >>> from rotalabs_accel import apply_rope, build_rope_cache
        >>> cos, sin = build_rope_cache(16, 8)
        >>> q, k = torch.randn(2, 16, 4, 8), torch.randn(2, 16, 2, 8)
        >>> q_rot, k_rot = apply_rope(q, k, cos, sin)
        >>> q_rot.shape, k_rot.shape
        (torch.Size([2, 16, 4, 8]), torch.Size([2, 16, 2, 8]))
    """
    if interleaved is not True and interleaved is not False:
        raise TypeError(f"apply_rope: interleaved must be a bool, got {interleaved!r}")
    if not torch.compiler.is_compiling():
        fast_rotary_dim = _fast_rotary_dim(q, k, cos, sin, position_ids, offset, layout, rotary_dim, inplace)
        # The fast check proved every tensor is on q's device, so q alone decides the backend.
        if fast_rotary_dim is not None and select_backend(_OP, q) == "triton":
            q_rot, k_rot = _ops.rope_eager(
                q, k, cos, sin, position_ids, offset, bool(interleaved), fast_rotary_dim, inplace,
                layout == "bhsd",
            )
            if inplace and q_rot is not q:
                # In place under autograd: rotated out of place (one launch), then copy_, which autograd
                # tracks (also when q/k are views of a fused qkv tensor).
                q.copy_(q_rot)
                k.copy_(k_rot)
                return q, k
            return q_rot, k_rot
    return _apply_rope_general(q, k, cos, sin, position_ids, offset, layout, interleaved, rotary_dim, inplace)


def _apply_rope_general(q, k, cos, sin, position_ids, offset, layout, interleaved, rotary_dim, inplace):
    """:func:`apply_rope` for every call the fast check declines, and under ``torch.compile``."""
    rotary_dim = _validate(q, k, cos, sin, position_ids, offset, layout, rotary_dim, inplace)
    interleaved = bool(interleaved)

    reason = None
    if cos.requires_grad or sin.requires_grad:
        reason = "the kernel does not differentiate cos/sin (they require grad)"
    elif q.dtype == torch.float64:
        reason = "the kernel computes in fp32 and has no float64 variant"
    elif inplace and (q.stride(-1) != 1 or k.stride(-1) != 1):
        reason = "in-place rotation needs q and k with unit stride in the last dimension"
    backend = select_backend(_OP, q, k, cos, sin, position_ids, kernel_reason=reason)

    if backend == "torch":
        q_rot, k_rot = _ref.apply_rope(
            q,
            k,
            cos,
            sin,
            position_ids=position_ids,
            offset=offset,
            layout=layout,
            interleaved=interleaved,
            rotary_dim=rotary_dim,
        )
        if inplace:
            q.copy_(q_rot)
            k.copy_(k_rot)
            return q, k
        return q_rot, k_rot

    # (in place implies unit last strides here: see the kernel_reason above)
    qk = q if q.stride(-1) == 1 else q.contiguous()
    kk = k if k.stride(-1) == 1 else k.contiguous()
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()

    if not torch.compiler.is_compiling():
        q_rot, k_rot = _ops.rope_eager(
            qk, kk, cos, sin, position_ids, offset, interleaved, rotary_dim, inplace, layout == "bhsd"
        )
        if inplace and q_rot is not q:
            q.copy_(q_rot)
            k.copy_(k_rot)
            return q, k
        return q_rot, k_rot

    # torch.compile: the custom ops take (batch, seq, heads, head_dim) views and (batch, seq)
    # positions; views are free in a compiled graph.
    if layout == "bshd":
        qv, kv = qk, kk
    else:
        qv, kv = qk.transpose(1, 2), kk.transpose(1, 2)
    pos = position_ids
    if pos is not None:
        if pos.dim() == 1:
            pos = pos.unsqueeze(0)
        pos = pos.expand(qv.shape[0], qv.shape[1])
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if inplace and not needs_grad:
        _ops.rope_inplace_(qv, kv, cos, sin, pos, offset, interleaved, rotary_dim)
        return q, k
    q_rot, k_rot = _ops.rope_fwd(qv, kv, cos, sin, pos, offset, interleaved, rotary_dim)
    if layout == "bhsd":
        q_rot, k_rot = q_rot.transpose(1, 2), k_rot.transpose(1, 2)
    if inplace:
        # In place under autograd: rotate out of place (one launch), then copy_, which autograd and
        # functionalization both track (also when q/k are views of a fused qkv tensor).
        q.copy_(q_rot)
        k.copy_(k_rot)
        return q, k
    return q_rot, k_rot
