"""Rotary position embeddings as an ``nn.Module`` with a self-managing cos/sin cache.

:class:`RotaryEmbedding` keeps the cache as non-persistent buffers (its ``state_dict`` is empty, so it
loads into and from any model that stores no RoPE state), grows the cache when a longer sequence
arrives, and rotates q and k through :func:`rotalabs_accel.functional.apply_rope`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..functional.rope import apply_rope, build_rope_cache
from ..reference import rope as _ref
from ..utils import module_tensor

__all__ = ["RotaryEmbedding", "apply_rope", "build_rope_cache"]


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (RoPE) for queries and keys, with a cached cos/sin table.

    Each head's first ``rotary_dim`` features are rotated pairwise by the angle
    ``p * inv_freq[j]`` of the token's position ``p`` (see
    :func:`rotalabs_accel.functional.apply_rope` for the math); the remaining ``dim - rotary_dim``
    features pass through. ``inv_freq`` follows the chosen scaling scheme (plain, ``linear``,
    ``dynamic``, ``llama3``, ``yarn``; Hugging Face formulas and parameter names, see
    :func:`rotalabs_accel.functional.build_rope_cache`).

    The cache (``cos_cached``, ``sin_cached``: ``(cache_len, rotary_dim // 2)``, fp32) is stored as
    non-persistent buffers: it follows ``.to(device)`` and is absent from the ``state_dict`` (a
    ``.to(dtype)`` cast of the module is undone on the next call: the cache is recomputed in fp32).
    It is built for ``max_seq_len`` positions and grows (at least doubling) when a call needs more;
    it is rebuilt on the inputs' device if they live elsewhere. With ``dynamic`` scaling the
    frequencies depend on the sequence length exactly as in Hugging Face's dynamic NTK rotary
    embedding: recomputed for a longer sequence than any seen so far, and reset to the original
    frequencies when a sequence shorter than ``max_position_embeddings`` follows a longer one.

    Args:
        dim: head dimension of q and k.
        max_seq_len: positions to cache up front (the cache grows past it when needed). For
            ``dynamic`` scaling it is also the original context length unless the scaling dict gives
            ``max_position_embeddings`` / ``original_max_position_embeddings``.
        base: RoPE base ``theta`` (a ``rope_theta`` key in ``scaling`` replaces the default).
        layout: ``"bshd"`` (``(batch, seq, heads, head_dim)``, default) or ``"bhsd"`` (Hugging Face).
        interleaved: rotate pairs ``(2j, 2j+1)`` (GPT-J) instead of ``(j, j + rotary_dim/2)``.
        rotary_dim: rotated features (even, ``<= dim``); default ``dim``, or
            ``int(dim * scaling["partial_rotary_factor"])`` when the scaling dict has that key.
        scaling: ``None`` or a Hugging Face style dict such as
            ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}``.
        device: device of the initial cache.

    Example:
        >>> import torch
        >>> from rotalabs_accel import RotaryEmbedding
        >>> rope = RotaryEmbedding(dim=128, max_seq_len=8192, base=10000.0)
        >>> q = torch.randn(2, 512, 32, 128)
        >>> k = torch.randn(2, 512, 32, 128)
        >>> q_rot, k_rot = rope(q, k, seq_len=512)
        >>> q_rot.shape
        torch.Size([2, 512, 32, 128])
    """

    cos_cached: torch.Tensor
    sin_cached: torch.Tensor

    def __init__(
        self,
        dim: int,
        max_seq_len: int = 8192,
        base: float = 10000.0,
        *,
        layout: str = "bshd",
        interleaved: bool = False,
        rotary_dim: int | None = None,
        scaling: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"RotaryEmbedding: dim must be a positive int, got {dim!r}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ValueError(f"RotaryEmbedding: max_seq_len must be a positive int, got {max_seq_len!r}")
        if layout not in _ref.LAYOUTS:
            raise ValueError(f"RotaryEmbedding: layout must be one of {_ref.LAYOUTS}, got {layout!r}")
        scaling = dict(scaling) if scaling is not None else None
        partial = scaling.pop("partial_rotary_factor", None) if scaling is not None else None
        if rotary_dim is None:
            rotary_dim = int(dim * partial) if partial is not None else dim
        if (
            isinstance(rotary_dim, bool)
            or not isinstance(rotary_dim, int)
            or rotary_dim <= 0
            or rotary_dim % 2
        ):
            raise ValueError(f"RotaryEmbedding: rotary_dim must be a positive even int, got {rotary_dim!r}")
        if rotary_dim > dim:
            raise ValueError(f"RotaryEmbedding: rotary_dim ({rotary_dim}) exceeds dim ({dim})")
        self.dim = dim
        self.rotary_dim = rotary_dim
        self.max_seq_len = max_seq_len
        self.layout = layout
        self.interleaved = bool(interleaved)
        self.scaling = scaling
        self.rope_type = _ref.rope_type_of(scaling)
        self.base = _ref.resolve_base(base, scaling)
        if self.rope_type == "dynamic":
            original = scaling.get("max_position_embeddings") or scaling.get(
                "original_max_position_embeddings"
            )
            self.original_max_seq_len = int(original) if original is not None else max_seq_len
            self._freq_scaling = {"max_position_embeddings": self.original_max_seq_len, **scaling}
            # the sequence length the current frequencies were computed for (Hugging Face's
            # max_seq_len_cached)
            self.freq_seq_len = self.original_max_seq_len
        else:
            self._freq_scaling = scaling
            self.freq_seq_len = None
        cos, sin = self._compute(max_seq_len, self.freq_seq_len, device)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def _compute(self, rows: int, freq_seq_len: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, attention_factor = _ref.rope_inv_freq(
            self.rotary_dim, self.base, self._freq_scaling, seq_len=freq_seq_len
        )
        return _ref.rope_cos_sin(inv_freq, rows, attention_factor, dtype=torch.float32, device=device)

    @property
    def cache_len(self) -> int:
        """Number of positions currently cached."""
        return self.cos_cached.shape[0]

    def _rebuild(self, rows: int, device: torch.device) -> None:
        self.cos_cached, self.sin_cached = self._compute(rows, self.freq_seq_len, device)

    def _update_cache(self, needed: int, device: torch.device) -> None:
        rows = self.cache_len
        if self.rope_type == "dynamic":
            if needed > self.freq_seq_len:
                self.freq_seq_len = needed
                self._rebuild(max(rows, needed), device)
                return
            if needed < self.original_max_seq_len < self.freq_seq_len:
                self.freq_seq_len = self.original_max_seq_len
                self._rebuild(max(rows, needed), device)
                return
        if needed > rows:
            self._rebuild(max(needed, 2 * rows), device)
        elif self.cos_cached.device != device or self.cos_cached.dtype != torch.float32:
            # moved elsewhere, or cast by module.to(dtype): recompute in fp32 rather than upcast
            # values already rounded to a low-precision dtype
            self._rebuild(rows, device)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        seq_len: int | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        offset: int = 0,
        inplace: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k``.

        Args:
            q: ``(batch, seq, heads_q, dim)`` (``layout="bshd"``) or ``(batch, heads_q, seq, dim)``
                (``"bhsd"``); fp32, fp16 or bf16.
            k: same layout with ``heads_k`` heads (GQA allowed).
            seq_len: number of positions the cache must cover (at least the largest position + 1).
                Default: ``offset + seq``, or ``max(position_ids) + 1`` when ``position_ids`` is
                given (on a GPU that read costs a device sync; pass ``seq_len`` in decode loops to
                avoid it). For ``dynamic`` scaling it is the sequence length the frequencies are
                computed for, as in Hugging Face. Under ``torch.compile`` with ``position_ids`` and
                no ``seq_len`` the cache is used as it is (``max_seq_len`` rows, or more once an
                eager call grew it): positions must lie below its length, and ``dynamic`` scaling
                raises there (pass ``seq_len``).
            position_ids: integer positions ``(batch, seq)``, ``(1, seq)`` or ``(seq,)``.
            offset: first position when ``position_ids`` is ``None`` (KV-cache decoding).
            inplace: write into ``q`` and ``k`` (opt-in).

        Returns:
            ``(q_rot, k_rot)`` with the shapes and dtypes of ``q`` and ``k``.
        """
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
            raise TypeError(
                f"RotaryEmbedding: q and k must be tensors, got {type(q).__name__}, {type(k).__name__}"
            )
        if q.dim() != 4:
            raise ValueError(
                f"RotaryEmbedding: q must be 4-D (layout {self.layout!r}), got shape {tuple(q.shape)}"
            )
        if q.shape[-1] != self.dim:
            raise ValueError(f"RotaryEmbedding: q's last dimension must be dim={self.dim}, got {q.shape[-1]}")
        seq = q.shape[1] if self.layout == "bshd" else q.shape[2]
        if seq_len is not None:
            if isinstance(seq_len, bool) or not isinstance(seq_len, int):
                raise TypeError(f"RotaryEmbedding: seq_len must be an int or None, got {seq_len!r}")
            if position_ids is None and seq_len < offset + seq:
                raise ValueError(
                    f"RotaryEmbedding: seq_len={seq_len} is shorter than offset + seq = {offset + seq}"
                )
            needed = seq_len
        elif position_ids is not None and not isinstance(position_ids, torch.Tensor):
            raise TypeError(
                f"RotaryEmbedding: position_ids must be an integer tensor, got {type(position_ids).__name__}"
            )
        elif position_ids is not None and position_ids.numel() > 0:
            if torch.compiler.is_compiling():
                # the largest position cannot be read while tracing: the cache is used as it is
                # (positions must lie below its length), and dynamic frequencies, which depend on it,
                # need seq_len
                if self.rope_type == "dynamic":
                    raise ValueError(
                        "RotaryEmbedding: under torch.compile, dynamic scaling with position_ids needs "
                        "seq_len= (the frequencies depend on the largest position, which is not read "
                        "while tracing)"
                    )
                needed = module_tensor(self, "cos_cached").shape[0]
            else:  # reading the largest position is a host sync
                needed = int(position_ids.max()) + 1
        else:
            needed = offset + seq
        cache = module_tensor(self, "cos_cached")
        if (
            needed > cache.shape[0]
            or self.rope_type == "dynamic"
            or cache.device != q.device
            or cache.dtype != torch.float32
        ):
            self._update_cache(max(needed, 1), q.device)
            cache = module_tensor(self, "cos_cached")
        return apply_rope(
            q,
            k,
            cache,
            module_tensor(self, "sin_cached"),
            position_ids=position_ids,
            offset=offset,
            layout=self.layout,
            interleaved=self.interleaved,
            rotary_dim=self.rotary_dim,
            inplace=inplace,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, rotary_dim={self.rotary_dim}, max_seq_len={self.max_seq_len}, "
            f"base={self.base}, layout={self.layout!r}, interleaved={self.interleaved}, "
            f"rope_type={self.rope_type!r}"
        )
