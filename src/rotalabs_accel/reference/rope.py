"""PyTorch reference for rotary position embeddings (RoPE): the CPU fallback and the test oracle.

Two parts live here:

* the frequency schemes that fill the cos/sin cache (plain, ``linear``, ``dynamic`` NTK, ``llama3``,
  ``yarn``), following the formulas of Hugging Face ``transformers`` (``modeling_rope_utils``) with the
  same parameter names, but computed in float64 so that long positions keep full fp32 accuracy;
* :func:`apply_rope`, the rotation itself, for both memory layouts, half-split and interleaved pairs,
  partial rotary dimensions, per-token ``position_ids`` or a scalar offset.

Conventions: a cache row ``p`` holds ``cos(p * inv_freq[j])`` and ``sin(p * inv_freq[j])`` for
``j < rotary_dim / 2`` (half width, no duplication), times the scheme's attention factor (YaRN only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "ROPE_TYPES",
    "LAYOUTS",
    "rope_inv_freq",
    "rope_cos_sin",
    "build_rope_cache",
    "apply_rope",
    "resolve_positions",
]

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
LAYOUTS = ("bshd", "bhsd")

# Keys of the scaling dict that do not change the frequencies (handled elsewhere or informational).
_IGNORED_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
_KNOWN_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor", "max_position_embeddings", "original_max_position_embeddings"}),
    "llama3": frozenset(
        {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    ),
    "yarn": frozenset(
        {
            "factor",
            "original_max_position_embeddings",
            "max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        }
    ),
}


def rope_type_of(scaling: Mapping[str, Any] | None) -> str:
    """The scheme named by a Hugging Face style scaling dict (``None`` means ``"default"``)."""
    if scaling is None:
        return "default"
    if not isinstance(scaling, Mapping):
        raise TypeError(
            f"scaling must be None or a dict like {{'rope_type': 'llama3', ...}}, got {type(scaling)}"
        )
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"scaling['rope_type'] must be one of {ROPE_TYPES}, got {rope_type!r}")
    return rope_type


def _require(scaling: Mapping[str, Any], key: str, rope_type: str) -> float:
    if scaling.get(key) is None:
        raise ValueError(
            f"scaling with rope_type={rope_type!r} needs the key {key!r}; got keys {sorted(scaling)}"
        )
    return scaling[key]


def resolve_base(base: float, scaling: Mapping[str, Any] | None, default_base: float = 10000.0) -> float:
    """The base (``theta``) to use: ``base``, or ``scaling['rope_theta']`` when ``base`` was left at default.

    Raises ``ValueError`` when both are given and disagree.
    """
    base = float(base)
    if scaling is not None and scaling.get("rope_theta") is not None:
        theta = float(scaling["rope_theta"])
        if theta != base:
            if base != default_base:
                raise ValueError(
                    f"base={base} disagrees with scaling['rope_theta']={theta}; give the base once"
                )
            base = theta
    if not base > 1.0:
        raise ValueError(f"base must be > 1, got {base}")
    return base


def rope_inv_freq(
    dim: int,
    base: float = 10000.0,
    scaling: Mapping[str, Any] | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of a RoPE scheme, in float64 on the CPU.

    The formulas are those of Hugging Face ``transformers`` (``ROPE_INIT_FUNCTIONS``), with the same
    parameter names in ``scaling``:

    * default: ``inv_freq[j] = base ** (-2j / dim)`` for ``j < dim / 2``;
    * ``linear`` (``factor``): ``inv_freq / factor``;
    * ``dynamic`` NTK (``factor``, ``max_position_embeddings`` or ``original_max_position_embeddings``):
      ``base' = base * (factor * L / L0 - (factor - 1)) ** (dim / (dim - 2))`` with
      ``L = max(seq_len, L0)``;
    * ``llama3`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings``): long wavelengths divided by ``factor``, short ones kept,
      a smooth interpolation in between;
    * ``yarn`` (``factor``, ``original_max_position_embeddings``, optional ``beta_fast`` = 32,
      ``beta_slow`` = 1, ``attention_factor``, ``mscale``, ``mscale_all_dim``, ``truncate`` = True):
      a linear ramp between interpolated and extrapolated frequencies, plus an attention factor
      that scales cos and sin.

    Args:
        dim: number of rotated features (the rotary dimension, even).
        base: the RoPE base (``rope_theta``).
        scaling: ``None`` or a dict with ``rope_type`` and that scheme's parameters.
        seq_len: current sequence length (used by ``dynamic`` only).

    Returns:
        ``(inv_freq, attention_factor)``: a float64 tensor of shape ``(dim // 2,)`` and a float.

    Example:
        >>> inv, af = rope_inv_freq(8, 10000.0, {"rope_type": "linear", "factor": 2.0})
        >>> inv.shape, af
        (torch.Size([4]), 1.0)
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"dim (the rotary dimension) must be a positive even int, got {dim!r}")
    rope_type = rope_type_of(scaling)
    base = resolve_base(base, scaling)
    if scaling is not None:
        unknown = set(scaling) - _IGNORED_KEYS - _KNOWN_KEYS[rope_type]
        if unknown:
            raise ValueError(
                f"scaling with rope_type={rope_type!r} got unknown keys {sorted(unknown)}; "
                f"known keys: {sorted(_KNOWN_KEYS[rope_type])}"
            )
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    attention_factor = 1.0

    if rope_type == "default":
        inv_freq = 1.0 / base**exponents
    elif rope_type == "linear":
        factor = float(_require(scaling, "factor", rope_type))
        inv_freq = 1.0 / base**exponents / factor
    elif rope_type == "dynamic":
        factor = float(_require(scaling, "factor", rope_type))
        original = scaling.get("max_position_embeddings") or scaling.get("original_max_position_embeddings")
        if original is None:
            raise ValueError(
                "scaling with rope_type='dynamic' needs 'max_position_embeddings' (or "
                f"'original_max_position_embeddings'); got keys {sorted(scaling)}"
            )
        if dim <= 2:
            raise ValueError(f"dynamic NTK scaling needs dim > 2, got {dim}")
        length = max(int(seq_len) if seq_len is not None else 0, int(original))
        scaled_base = base * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / scaled_base**exponents
    elif rope_type == "llama3":
        factor = float(_require(scaling, "factor", rope_type))
        low = float(_require(scaling, "low_freq_factor", rope_type))
        high = float(_require(scaling, "high_freq_factor", rope_type))
        old_len = float(_require(scaling, "original_max_position_embeddings", rope_type))
        if not high > low:
            raise ValueError(f"llama3 scaling needs high_freq_factor > low_freq_factor, got {high} <= {low}")
        inv = 1.0 / base**exponents
        wavelen = 2 * math.pi / inv
        long_wave = wavelen > old_len / low
        short_wave = wavelen < old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        medium = (1 - smooth) * inv / factor + smooth * inv
        inv_freq = torch.where(long_wave, inv / factor, torch.where(short_wave, inv, medium))
    else:  # yarn
        factor = scaling.get("factor")
        original = float(_require(scaling, "original_max_position_embeddings", rope_type))
        if factor is None:
            factor = float(_require(scaling, "max_position_embeddings", rope_type)) / original
        factor = float(factor)

        def mscale_of(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim)
            else:
                attention_factor = mscale_of(factor)
        attention_factor = float(attention_factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1
        truncate = scaling.get("truncate", True)

        def correction_dim(num_rotations: float) -> float:
            # the feature index whose wavelength fits num_rotations times into the original context
            return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # a zero-width ramp would divide by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation_weight = 1 - ramp
        pos_freqs = base**exponents
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
            1.0 / pos_freqs
        ) * extrapolation_weight
    return inv_freq, attention_factor


def rope_cos_sin(
    inv_freq: torch.Tensor,
    seq_len: int,
    attention_factor: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill a cache: ``cos[p, j] = attention_factor * cos(p * inv_freq[j])`` (same for ``sin``).

    Angles and their cos/sin are computed in float64 (on ``device`` when it supports float64, else on
    the CPU) and rounded once to ``dtype``: at position 100,000 an fp32 angle would already be off by
    about 1e-2 radians.

    Returns:
        ``(cos, sin)``, each of shape ``(seq_len, inv_freq.numel())`` and dtype ``dtype``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    work = device if device.type in ("cpu", "cuda") else torch.device("cpu")
    positions = torch.arange(seq_len, dtype=torch.float64, device=work)
    angles = torch.outer(positions, inv_freq.to(device=work, dtype=torch.float64))
    cos, sin = torch.cos(angles), torch.sin(angles)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def build_rope_cache(
    seq_len: int,
    dim: int,
    base: float = 10000.0,
    *,
    device: torch.device | str | None = None,
    scaling: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference cache builder: :func:`rope_inv_freq` then :func:`rope_cos_sin` (no validation of
    ``seq_len`` beyond what those do; the public entry is ``rotalabs_accel.build_rope_cache``)."""
    inv_freq, attention_factor = rope_inv_freq(dim, base, scaling, seq_len=seq_len)
    return rope_cos_sin(inv_freq, seq_len, attention_factor, dtype=dtype, device=device)


def resolve_positions(
    position_ids: torch.Tensor | None, offset: int, batch: int, seq: int, device: torch.device
) -> torch.Tensor:
    """Positions as a ``(batch, seq)`` int64 tensor (broadcast views allowed)."""
    if position_ids is None:
        return (torch.arange(seq, device=device) + offset).expand(batch, seq)
    pos = position_ids
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    return pos.long().expand(batch, seq)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool):
    if interleaved:
        even, odd = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        first, second = x[..., :half], x[..., half:rotary_dim]
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference rotation of ``q`` and ``k`` (differentiable in all tensor arguments).

    For each token at position ``p`` and each pair ``(x1, x2)`` of rotated features
    (``x1 = x[j], x2 = x[j + r/2]`` half-split, or ``x1 = x[2j], x2 = x[2j + 1]`` interleaved),
    with ``c = cos[p, j]`` and ``s = sin[p, j]``::

        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s

    Features ``rotary_dim:`` pass through unchanged. The arithmetic runs in fp32 (float64 for float64
    inputs) and the result is rounded once to the input dtype.

    Args:
        q: ``(batch, seq, heads_q, head_dim)`` for ``layout="bshd"`` or
            ``(batch, heads_q, seq, head_dim)`` for ``"bhsd"``.
        k: same layout, ``heads_k`` heads (may differ from ``heads_q``).
        cos, sin: ``(cache_len, rotary_dim // 2)`` tables (see :func:`build_rope_cache`).
        position_ids: ``(batch, seq)``, ``(1, seq)`` or ``(seq,)`` integer positions; default
            ``offset + arange(seq)``.
        offset: first position when ``position_ids`` is ``None``.
        layout: ``"bshd"`` or ``"bhsd"``.
        interleaved: rotate pairs ``(2j, 2j+1)`` (GPT-J) instead of ``(j, j + r/2)`` (Llama/NeoX).
        rotary_dim: number of rotated features; default ``2 * cos.shape[-1]``.

    Returns:
        ``(q_rot, k_rot)`` with the shapes and dtypes of ``q`` and ``k``.
    """
    if rotary_dim is None:
        rotary_dim = 2 * cos.shape[-1]
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    batch, seq = q.shape[0], q.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos = resolve_positions(position_ids, offset, batch, seq, cos.device)
    c = cos.to(compute)[pos].unsqueeze(2)  # (batch, seq, 1, rotary_dim // 2)
    s = sin.to(compute)[pos].unsqueeze(2)
    q_rot = _rotate(q.to(compute), c, s, rotary_dim, interleaved).to(q.dtype)
    k_rot = _rotate(k.to(compute), c, s, rotary_dim, interleaved).to(k.dtype)
    if layout == "bhsd":
        # back to (batch, heads, seq, dim), laid out as such (as the kernel's results are)
        q_rot, k_rot = q_rot.transpose(1, 2).contiguous(), k_rot.transpose(1, 2).contiguous()
    return q_rot, k_rot
