r"""Symmetric INT8 quantization: functions, ``QuantizedLinear``, ``Int8Embedding``, whole-model conversion.

Symmetric quantization of a slice ``v`` (one output channel of a weight, one token of an activation,
one group of ``group_size`` elements, or a whole tensor):

.. math::

    a = \max(\max_i |v_i|, 2^{-64}), \qquad s = \frac{a}{127}, \qquad
    q_i = \operatorname{clamp}\!\Big(\operatorname{round}\big(v_i \cdot \tfrac{127}{a}\big), -127, 127\Big),
    \qquad v_i \approx q_i\, s

``q`` is int8 (``-128`` is never used, so the grid is symmetric) and ``s`` fp32. Rounding is to the
nearest integer, ties to even (``torch.round``). An all-zero (or empty) slice gets a tiny scale and
quantizes to zeros (no NaN); a slice holding a NaN or an infinity gets a NaN scale (and zeros), so it
dequantizes to NaN. The round-trip error of each element of a finite slice is at most ``s / 2``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.embedding import TritonEmbedding
from ..kernels.gemm import _PLAIN_FORWARDS, Int8Linear, check_mode, keep_scale_fp32
from ..reference.int8 import (
    dequantize_reference,
    dequantize_weight_reference,
    infer_group_size,
    quantize_symmetric_reference,
    quantize_weight_reference,
)

__all__ = [
    "quantize_symmetric",
    "dequantize",
    "quantize_weight_per_channel",
    "QuantizedLinear",
    "Int8Embedding",
    "QuantizationEntry",
    "QuantizationReport",
    "quantize_model",
]

logger = logging.getLogger(__name__)


def _check_floating(name: str, t, fn: str) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {got}")


def _check_group_size(group_size, fn: str) -> None:
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0
    ):
        raise ValueError(f"{fn}: group_size must be a positive int or None, got {group_size!r}")


def _check_dim(dim, ndim: int, fn: str) -> None:
    if dim is None:
        return
    if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim:
        raise ValueError(f"{fn}: dim must be None or an int in [{-ndim}, {ndim - 1}], got {dim!r}")


def quantize_symmetric(
    x: torch.Tensor, dim: int | None = -1, *, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to int8 with symmetric scales along ``dim`` (see the module docstring for the math).

    Args:
        x: floating tensor (at least 1-D unless ``dim`` is ``None``).
        dim: the dimension each scale covers (its absolute maximum is taken along it): ``-1`` gives one
            scale per row (per output channel of a ``[N, K]`` weight, per token of ``[M, K]``
            activations); ``None`` one scale for the whole tensor.
        group_size: split ``dim`` into groups of this many elements (the last may be shorter), one scale
            per group.

    Returns:
        ``(q, scale)``: ``q`` int8 with ``x``'s shape; ``scale`` fp32 shaped like ``x`` without ``dim``
        (one per slice), with ``dim`` reduced to ``ceil(size / group_size)`` (per group), or 0-d (per
        tensor).

    Example:
        >>> import torch
        >>> from rotalabs_accel import quantize_symmetric, dequantize
        >>> x = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5]])
        >>> q, s = quantize_symmetric(x)
        >>> q
        tensor([[  64, -127,   32],
                [ 127,    0,  -32]], dtype=torch.int8)
        >>> bool((dequantize(q, s) - x).abs().max() <= s.max() / 2)
        True
    """
    fn = "quantize_symmetric"
    _check_floating("x", x, fn)
    if dim is not None and x.dim() == 0:
        raise ValueError(f"{fn}: a 0-d tensor has no dimension {dim}; use dim=None")
    _check_dim(dim, max(x.dim(), 1), fn)
    _check_group_size(group_size, fn)
    if group_size is not None and dim is None:
        raise ValueError(f"{fn}: group_size needs a dim to group along, got dim=None")
    return quantize_symmetric_reference(x, dim=dim, group_size=group_size)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    dim: int | None = -1,
    *,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_symmetric`: ``q * scale`` with the scale broadcast back over ``dim``.

    Args:
        q: int8 tensor.
        scale: fp32 scales as returned by :func:`quantize_symmetric` with the same ``dim`` and
            ``group_size``.
        dim: the dimension the scales were taken along (``None``: per-tensor scale).
        group_size: the group size used when quantizing. When omitted it is inferred from the number
            of groups ``G`` along ``dim`` (size ``K``) by
            :func:`rotalabs_accel.reference.int8.infer_group_size`: the power of two ``g >= 16`` with
            ``ceil(K / g) == G`` (130 elements in 2 groups: 128), else ``K // G`` when it divides
            exactly; any other shape raises and needs ``group_size``.
        dtype: floating dtype of the result (the product is formed in fp32 and rounded once).

    Returns:
        A tensor of ``q``'s shape in ``dtype``.

    Example:
        >>> import torch
        >>> from rotalabs_accel import dequantize
        >>> dequantize(torch.tensor([[127, -64]], dtype=torch.int8), torch.tensor([0.5]))
        tensor([[ 63.5000, -32.0000]])
    """
    fn = "dequantize"
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"{fn}: q must be an int8 tensor, got {got}")
    _check_floating("scale", scale, fn)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{fn}: dtype must be a floating-point torch.dtype, got {dtype!r}")
    _check_group_size(group_size, fn)
    if dim is None or scale.dim() == 0:
        if scale.numel() != 1:
            raise ValueError(f"{fn}: with dim=None scale must hold one value, got shape {list(scale.shape)}")
        return dequantize_reference(q, scale.reshape(()), None, dtype=dtype)
    _check_dim(dim, q.dim(), fn)
    d = dim % q.dim()
    per_slice = q.shape[:d] + q.shape[d + 1 :]
    if scale.dim() == q.dim() - 1 and group_size is None:
        if scale.shape != per_slice:
            raise ValueError(
                f"{fn}: scale must have shape {list(per_slice)} (q's shape without dim {dim}), "
                f"got {list(scale.shape)}"
            )
        return dequantize_reference(q, scale, d, dtype=dtype)
    if scale.dim() != q.dim():
        raise ValueError(
            f"{fn}: scale of shape {list(scale.shape)} fits neither per-slice scales {list(per_slice)} "
            f"nor per-group scales along dim {dim} of q {list(q.shape)}"
        )
    size, groups = q.shape[d], scale.shape[d]
    if group_size is None:
        try:
            group_size = infer_group_size(size, groups, what=f"scale along dim {dim}")
        except ValueError as e:
            raise ValueError(f"{fn}: {e}") from None
    expected = list(q.shape)
    expected[d] = -(-size // group_size)
    if list(scale.shape) != expected:
        raise ValueError(
            f"{fn}: scale must have shape {expected} for group_size={group_size}, got {list(scale.shape)}"
        )
    return dequantize_reference(q, scale, d, group_size=group_size, dtype=dtype)


def quantize_weight_per_channel(
    weight: torch.Tensor, *, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a linear weight ``[out_features, in_features]`` with one scale per output channel.

    The computation runs on ``weight``'s device a bounded chunk of rows at a time (about 32 MiB of
    fp32 temporaries whatever the weight's size).

    Args:
        weight: floating ``[N, K]``.
        group_size: one scale per ``group_size`` input features instead (e.g. 128).

    Returns:
        ``(weight_int8, scale)``: int8 ``[N, K]`` and fp32 ``[N]`` (or ``[N, ceil(K / group_size)]``),
        ready for :func:`rotalabs_accel.int8_gemm`.

    Example:
        >>> import torch
        >>> from rotalabs_accel import quantize_weight_per_channel
        >>> q, s = quantize_weight_per_channel(torch.randn(8, 256), group_size=128)
        >>> q.dtype, tuple(s.shape)
        (torch.int8, (8, 2))
    """
    fn = "quantize_weight_per_channel"
    _check_floating("weight", weight, fn)
    if weight.dim() != 2:
        raise ValueError(
            f"{fn}: weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}"
        )
    _check_group_size(group_size, fn)
    return quantize_weight_reference(weight.detach(), group_size)


class QuantizedLinear(Int8Linear):
    """Drop-in int8 replacement for ``nn.Linear``, built with :meth:`from_linear` or by hand.

    Same computation and storage as :class:`rotalabs_accel.kernels.gemm.Int8Linear` (int8 weight
    ``[out_features, in_features]`` stored once, fp32 per-channel or per-group scales, optional bias,
    output in the input's dtype), with ``nn.Linear``'s default of a bias and a constructor from an
    existing layer. The ``state_dict`` (``weight_int8``, ``scale``, ``bias``) holds plain tensors that
    ``safetensors`` saves and a fresh ``QuantizedLinear`` loads.

    Args:
        in_features: K.
        out_features: N.
        bias: add a learnable bias (default ``True``, like ``nn.Linear``).
        group_size: one scale per this many input features (e.g. 128), or ``None`` for per channel.
        mode: ``"auto"``, ``"w8a16"`` (weight-only) or ``"w8a8"`` (dynamic activation quantization
            too); see :func:`rotalabs_accel.int8_gemm`.
        device: where the buffers live.
        dtype: dtype of the bias.

    Example:
        >>> import torch
        >>> from rotalabs_accel import QuantizedLinear
        >>> linear = torch.nn.Linear(64, 32)
        >>> qlinear = QuantizedLinear.from_linear(linear)
        >>> x = torch.randn(4, 64)
        >>> bool(((qlinear(x) - linear(x)).norm() / linear(x).norm()) < 0.02)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group_size: int | None = None,
        mode: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, bias, group_size=group_size, mode=mode, device=device, dtype=dtype
        )

    def quantize_weights(self, weight: torch.Tensor) -> QuantizedLinear:
        """Quantize a floating weight ``[out_features, in_features]`` into this layer; returns ``self``.

        See :meth:`rotalabs_accel.kernels.gemm.Int8Linear.quantize_weights`.
        """
        return super().quantize_weights(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., in_features] -> [..., out_features]`` in ``x``'s dtype.

        Raises:
            RuntimeError: no weights yet (before :meth:`quantize_weights` or loading a ``state_dict``).
        """
        return super().forward(x)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, group_size: int | None = None, mode: str = "auto"
    ) -> QuantizedLinear:
        """A quantized copy of ``linear`` on its device, keeping its bias (values, dtype, ``requires_grad``).

        Only the int8 weight and the scales are allocated: the layer is first built on the ``meta``
        device, so no zero-filled buffers precede the quantized ones.

        Args:
            linear: an ``nn.Linear`` (its weight is read, not modified).
            group_size: per-group scales (e.g. 128) instead of per-channel.
            mode: ``"auto"``, ``"w8a16"`` or ``"w8a8"`` (per-channel scales only).

        Returns:
            A new ``QuantizedLinear`` in ``linear``'s training mode.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
            ValueError: a bad ``group_size`` or ``mode``, ``mode="w8a8"`` with a ``group_size``, or a
                weight with NaN or Inf values.

        Example:
            >>> import torch
            >>> from rotalabs_accel import QuantizedLinear
            >>> q = QuantizedLinear.from_linear(torch.nn.Linear(16, 8, bias=False), group_size=16)
            >>> q.bias is None, tuple(q.scale.shape)
            (True, (8, 1))
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        bias = linear.bias
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            group_size=group_size,
            mode=mode,
            device="meta",
            dtype=bias.dtype if bias is not None else weight.dtype,
        )
        layer.quantize_weights(weight)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        layer.train(linear.training)
        return layer


# Rows of a table dequantized at once by Int8Embedding.dequantize_weight, as fp32 bytes: the temporaries
# stay near 32 MiB beside the result whatever the vocabulary.
_DEQUANT_CHUNK_BYTES = 16 * 1024**2


def _check_index(name: str, value, size: int, fn: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -size <= value < size:
        raise ValueError(f"{fn}: {name} must be None or an int in [{-size}, {size - 1}], got {value!r}")
    return value + size if value < 0 else value


def _int8_embedding_lookup(
    indices: torch.Tensor,
    weight_int8: torch.Tensor,
    scale: torch.Tensor,
    group_size: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(weight_int8[indices] * scale[indices])`` in ``dtype``: the product formed in fp32, rounded once."""
    # F.embedding validates the indices exactly as nn.Embedding does (integer dtype, range)
    rows = F.embedding(indices, weight_int8)
    per_row = scale if scale.dim() == 2 else scale.unsqueeze(1)
    scales = F.embedding(indices, per_row)
    if scales.shape[-1] > 1:
        # the group of each column, by indexing: Inductor (torch 2.13) miscompiles repeat_interleave
        # + slice fused with the gather when the last group is partial
        groups = torch.arange(weight_int8.shape[1], device=scales.device) // group_size
        scales = scales[..., groups]
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    return (rows.to(ct) * scales.to(ct)).to(dtype)


# QuantizedLinear computes what Int8Linear does: layers of one input may share a launch.
_PLAIN_FORWARDS.add(QuantizedLinear.forward)


class Int8Embedding(nn.Module):
    r"""Drop-in int8 replacement for ``nn.Embedding``: a lookup that dequantizes the rows it gathers.

    The table is stored as int8 ``[num_embeddings, embedding_dim]`` with one fp32 scale per row (or per
    group of ``group_size`` columns of a row), quantized as in the module docstring:

    .. math::

        s_v = \frac{\max_d |E_{vd}|}{127}, \qquad q_{vd} = \operatorname{round}\!\Big(E_{vd}\,
        \frac{127}{\max_d |E_{vd}|}\Big) \in [-127, 127], \qquad
        \operatorname{out}[\ldots, d] = q_{i d}\, s_i \ \text{ for index } i

    The product is formed in fp32 (fp64 for an fp64 output) and rounded once to the output dtype, the
    dtype of the embedding it replaces. The table takes ``V D + 4 V`` bytes instead of ``2 V D`` in
    bf16 (a Llama-3 vocabulary of 128256 x 4096: 0.53 GB instead of 1.05 GB). A lookup reads one row
    per token, so it is a plain PyTorch gather and multiply on every device.

    Scales are fp32 rather than the output dtype: they cost 4 bytes per row (0.1% of a 4096-wide int8
    row), a bf16 scale would multiply a whole row by a rounding error of up to 2^-8 (0.4%, the size of
    the int8 step itself relative to the row's largest element), and fp32 is what
    :class:`QuantizedLinear` uses, so a tied output layer can share the very same ``(q, s)`` pair.

    ``state_dict`` holds plain tensors, ``weight_int8`` (int8) and ``scale`` (fp32), which
    ``safetensors`` saves and a fresh ``Int8Embedding`` loads. ``.to()`` / ``.cuda()`` move them;
    ``.half()`` / ``.to(dtype)`` change the output dtype (as they would convert ``nn.Embedding``'s
    weight) and keep the scales in fp32. Only lookups are supported: the table takes no gradient.

    Tied weights: :meth:`tied_to` builds an embedding that owns no table and looks up the rows of an
    :class:`~rotalabs_accel.kernels.gemm.Int8Linear` (an output layer ``[vocab, hidden]`` whose float
    weight was the embedding's) or of another ``Int8Embedding``: one int8 copy serves both, it moves
    with its owner, and only the owner's ``state_dict`` carries it (like a tied ``lm_head`` in float).
    :func:`quantize_model` with ``embeddings=True`` does this for tied models.

    Args:
        num_embeddings: V, the number of rows.
        embedding_dim: D, the size of each row.
        padding_idx: kept as ``nn.Embedding`` keeps it (negative values count from the end); the lookup
            returns that row like any other (zero when the float row was zero: zeros quantize exactly).
        group_size: one scale per this many columns of a row, or ``None`` for one scale per row.
        device: where the table and the scales live.
        dtype: floating dtype of the output (default: ``torch.get_default_dtype()``).

    Example:
        >>> import torch
        >>> from rotalabs_accel.quantization.symmetric import Int8Embedding
        >>> emb = torch.nn.Embedding(100, 16, padding_idx=0, dtype=torch.bfloat16)
        >>> qemb = Int8Embedding.from_embedding(emb)
        >>> tokens = torch.tensor([[0, 5, 99]])
        >>> out = qemb(tokens)
        >>> out.shape, out.dtype, qemb.weight_int8.dtype, qemb.scale.shape
        (torch.Size([1, 3, 16]), torch.bfloat16, torch.int8, torch.Size([100]))
        >>> bool((out[0, 0] == 0).all()), bool(((out - emb(tokens)).abs() <= qemb.scale.max()).all())
        (True, True)
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        group_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fn = "Int8Embedding"
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{fn}: {name} must be a non-negative int, got {value!r}")
        _check_group_size(group_size, fn)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{fn}: dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = _check_index("padding_idx", padding_idx, num_embeddings, fn)
        self.group_size = group_size
        self.dtype = dtype
        self.register_buffer(
            "weight_int8", torch.zeros((num_embeddings, embedding_dim), dtype=torch.int8, device=device)
        )
        groups = None if group_size is None else math.ceil(embedding_dim / group_size)
        scale_shape = (num_embeddings,) if groups is None else (num_embeddings, groups)
        self.register_buffer("scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self._quantized = False
        # set through object.__setattr__ in tied_to: a registered submodule would put the owner's table
        # in this module's state_dict and parameters a second time
        self._source: nn.Module | None = None

    # ----------------------------------------------------------------------------------------------
    # construction
    # ----------------------------------------------------------------------------------------------

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, group_size: int | None = None) -> Int8Embedding:
        """A quantized copy of ``embedding`` on its device, with its ``padding_idx`` and output dtype.

        Only the int8 table and the scales are allocated (the module is first built on ``meta``), and
        the quantization runs a bounded chunk of rows at a time, so converting a table on the GPU holds
        the float table, its int8 copy and about 32 MiB of temporaries, never two float copies.

        Args:
            embedding: an ``nn.Embedding`` (read, not modified). A subclass is accepted only when it
                keeps ``nn.Embedding.forward`` (one that scales or offsets its output is not a lookup).
            group_size: one scale per this many columns (e.g. 128) instead of one per row.

        Returns:
            A new ``Int8Embedding`` in ``embedding``'s training mode.

        Raises:
            TypeError: not an ``nn.Embedding``, or a subclass with its own ``forward``.
            ValueError: ``max_norm`` is set (it renormalizes the float rows in place at each lookup),
                or ``scale_grad_by_freq`` / ``sparse`` (gradient options: the int8 table takes none).

        Example:
            >>> import torch
            >>> from rotalabs_accel.quantization.symmetric import Int8Embedding
            >>> Int8Embedding.from_embedding(torch.nn.Embedding(10, 256), group_size=128).scale.shape
            torch.Size([10, 2])
        """
        fn = "Int8Embedding.from_embedding"
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"{fn}: expected a torch.nn.Embedding, got {type(embedding).__name__}")
        if type(embedding).forward not in (nn.Embedding.forward, TritonEmbedding.forward):
            raise TypeError(
                f"{fn}: {type(embedding).__name__} overrides nn.Embedding.forward (it may scale or "
                "offset the rows), so a plain int8 lookup would not compute the same function"
            )
        unsupported = _unsupported_embedding_options(embedding)
        if unsupported:
            raise ValueError(f"{fn}: {unsupported}")
        weight = embedding.weight
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            embedding.padding_idx,
            group_size=group_size,
            device="meta",
            dtype=weight.dtype,
        )
        layer.quantize_weights(weight)
        layer.train(embedding.training)
        return layer

    @classmethod
    def tied_to(
        cls,
        source: nn.Module,
        *,
        padding_idx: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> Int8Embedding:
        """An embedding that looks up the rows of ``source``'s int8 table instead of owning one.

        For tied weights (an output layer whose weight is the embedding table): quantize the output
        layer, then build the embedding on top of it. Row ``v`` of ``source.weight_int8`` (``[V, D]``)
        with its scales is the embedding of token ``v``. The embedding holds no tensors of its own: it
        follows ``source`` when the model is moved or converted (move the model, or ``source``, rather
        than the embedding alone), and ``source``'s ``state_dict`` is the only one that carries the table.

        Args:
            source: an :class:`~rotalabs_accel.kernels.gemm.Int8Linear` (e.g. a quantized ``lm_head``)
                or another ``Int8Embedding`` (a tied one is followed to its own source).
            padding_idx: as in ``nn.Embedding``.
            dtype: floating dtype of the output (default: ``torch.get_default_dtype()``).

        Returns:
            A new ``Int8Embedding`` with ``weight_int8`` and ``scale`` set to ``None``.

        Example:
            >>> import torch
            >>> from rotalabs_accel import QuantizedLinear
            >>> from rotalabs_accel.quantization.symmetric import Int8Embedding
            >>> head = QuantizedLinear.from_linear(torch.nn.Linear(16, 50, bias=False))
            >>> emb = Int8Embedding.tied_to(head)
            >>> emb.tied_to_module is head, emb.state_dict() == {}
            (True, True)
            >>> torch.equal(emb(torch.tensor([7])), head.dequantize_weight()[7:8])
            True
        """
        fn = "Int8Embedding.tied_to"
        if isinstance(source, Int8Embedding) and source._source is not None:
            source = source._source
        if not isinstance(source, (Int8Linear, Int8Embedding)):
            raise TypeError(
                f"{fn}: source must be an Int8Linear or an Int8Embedding, got {type(source).__name__}"
            )
        table = source.weight_int8
        n, d = table.shape
        layer = cls(n, d, padding_idx, group_size=source.group_size, device="meta", dtype=dtype)
        layer.weight_int8 = None
        layer.scale = None
        object.__setattr__(layer, "_source", source)
        layer.train(source.training)
        return layer

    # ----------------------------------------------------------------------------------------------
    # state
    # ----------------------------------------------------------------------------------------------

    @property
    def tied_to_module(self) -> nn.Module | None:
        """The module whose table this embedding reads (see :meth:`tied_to`), or ``None`` if it owns one."""
        return self._source

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, int | None, bool]:
        src = self._source
        if src is None:
            return self.weight_int8, self.scale, self.group_size, self._quantized
        return src.weight_int8, src.scale, src.group_size, src.is_quantized

    @property
    def is_quantized(self) -> bool:
        """Whether the table is set (by :meth:`quantize_weights`, a ``state_dict``, or the tied source)."""
        return self._tables()[3]

    @torch.no_grad()
    def quantize_weights(self, weight: torch.Tensor) -> Int8Embedding:
        """Quantize a floating table ``[num_embeddings, embedding_dim]`` into this module; returns ``self``.

        Quantization runs on ``weight``'s device a bounded chunk of rows at a time; the int8 table and
        the scales then live on the module's device (on ``weight``'s device when it was built on
        ``meta``). The floating table is not kept, and neither is the output dtype changed.

        Raises:
            TypeError: ``weight`` is not a floating-point tensor.
            ValueError: wrong shape, or non-finite values.
            RuntimeError: the embedding is tied to another module's table (quantize that module).
        """
        fn = "Int8Embedding.quantize_weights"
        if self._source is not None:
            raise RuntimeError(
                f"{fn}: this embedding reads the table of a {type(self._source).__name__} (tied_to); "
                "quantize that module instead"
            )
        _check_floating("weight", weight, fn)
        expected = (self.num_embeddings, self.embedding_dim)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"{fn}: weight must have shape [num_embeddings, embedding_dim] = {list(expected)}, "
                f"got {list(weight.shape)}"
            )
        q, s = quantize_weight_reference(weight.detach(), self.group_size)
        if s.device.type != "meta" and not bool(torch.isfinite(s).all()):
            raise ValueError(f"{fn}: weight has NaN or Inf values (no int8 representation)")
        target = self.weight_int8.device if self.weight_int8.device.type != "meta" else weight.device
        # assign rather than copy into the zero-filled buffers: no second int8 table
        self.weight_int8 = q.to(target)
        self.scale = s.to(target)
        self._quantized = True
        return self

    @torch.no_grad()
    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The table the lookups return, ``q * s`` as ``[num_embeddings, embedding_dim]``.

        Formed a bounded chunk of rows at a time (about 32 MiB of fp32 temporaries beside the result).

        Args:
            dtype: dtype of the result (default: the output dtype).
        """
        q, s, group_size, _ = self._tables()
        dtype = self.dtype if dtype is None else dtype
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        rows = max(1, _DEQUANT_CHUNK_BYTES // max(1, 4 * q.shape[1]))
        for r0 in range(0, q.shape[0], rows):
            out[r0 : r0 + rows] = dequantize_weight_reference(
                q[r0 : r0 + rows], s[r0 : r0 + rows], group_size, dtype=dtype
            )
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table in the output dtype, for code that reads ``embedding.weight``.

        Not a parameter and not saved: each access allocates a fresh ``[num_embeddings,
        embedding_dim]`` tensor (see :meth:`dequantize_weight`). Read ``weight_int8`` / ``scale`` or
        :attr:`dtype` instead where the values are not needed.
        """
        return self.dequantize_weight()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``input[...]`` (int64 or int32 indices) ``-> [..., embedding_dim]`` in :attr:`dtype`.

        Raises:
            IndexError: an index outside ``[0, num_embeddings)`` (as ``nn.Embedding``; on CUDA a
                device-side assertion, as ``nn.Embedding``).
            RuntimeError: indices of a non-integer dtype, or no table yet (before
                :meth:`quantize_weights` or loading a ``state_dict``).
        """
        q, s, group_size, quantized = self._tables()
        if not quantized:
            raise RuntimeError(
                "Int8Embedding: no table yet; call quantize_weights(weight) or load a state_dict before "
                "forward"
            )
        return _int8_embedding_lookup(input, q, s, group_size, self.dtype)

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        group_size = self._tables()[2]
        if group_size is not None:
            text += f", group_size={group_size}"
        text += f", dtype={self.dtype}"
        if self._source is not None:
            text += f", tied_to={type(self._source).__name__}"
        return text

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self._source is None and prefix + "weight_int8" in state_dict and prefix + "scale" in state_dict:
            self._quantized = True
        scale = self._buffers.get("scale")
        if scale is not None and scale.dtype != torch.float32:  # load_state_dict(assign=True)
            self.scale = scale.float()

    def _apply(self, fn, recurse=True):
        # The output dtype follows what fn does to a floating tensor (.half(), .to(torch.bfloat16), ...),
        # as nn.Embedding's weight would; the scales stay fp32 (see the class docstring).
        q = self._tables()[0]
        probe = torch.empty(0, dtype=self.dtype, device=q.device if q.device.type != "meta" else "cpu")
        scale = self._buffers.get("scale")
        result = super()._apply(fn, recurse)
        keep_scale_fp32(self, scale)
        converted = fn(probe)
        if isinstance(converted, torch.Tensor) and converted.dtype.is_floating_point:
            self.dtype = converted.dtype
        return result


def _unsupported_embedding_options(embedding: nn.Embedding) -> str | None:
    """Why ``embedding`` has no int8 equivalent, or ``None``."""
    if embedding.max_norm is not None:
        return (
            f"max_norm={embedding.max_norm} is not supported: it renormalizes the float rows in place "
            "at each lookup, which an int8 table cannot do"
        )
    if embedding.scale_grad_by_freq or embedding.sparse:
        return (
            f"scale_grad_by_freq={embedding.scale_grad_by_freq}, sparse={embedding.sparse} are not "
            "supported: they configure the table's gradient, and the int8 table takes none"
        )
    return None


_ACTIONS = ("quantized", "shared", "left")


@dataclass(frozen=True)
class QuantizationEntry:
    """One line of a :class:`QuantizationReport`.

    Attributes:
        name: the module's dotted name in the model.
        kind: ``"linear"`` or ``"embedding"``.
        action: ``"quantized"`` (an int8 copy of its own), ``"shared"`` (an embedding reading a tied
            layer's int8 table) or ``"left"`` (kept in floating point).
        detail: what it became, or why it was left.
    """

    name: str
    kind: str
    action: str
    detail: str


@dataclass
class QuantizationReport:
    """What :func:`quantize_model` converted and what it left in floating point, with the reasons.

    Example:
        >>> import torch
        >>> from rotalabs_accel import quantize_model
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
        >>> model, report = quantize_model(model, skip=(), embeddings=True, report=True)
        >>> report.summary()
        'quantize_model: linear: 1 quantized; embedding: 1 quantized'
    """

    entries: list[QuantizationEntry] = field(default_factory=list)

    def add(self, name: str, kind: str, action: str, detail: str) -> None:
        self.entries.append(QuantizationEntry(name, kind, action, detail))

    def summary(self) -> str:
        """One line: counts per kind and action."""
        parts = []
        for kind in ("linear", "embedding"):
            counts = {a: sum(e.kind == kind and e.action == a for e in self.entries) for a in _ACTIONS}
            if any(counts.values()):
                parts.append(f"{kind}: " + ", ".join(f"{n} {a}" for a, n in counts.items() if n))
        return "quantize_model: " + ("; ".join(parts) if parts else "nothing to convert")

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += [f"  {e.action:9s} {e.kind:9s} {e.name}: {e.detail}" for e in self.entries]
        return "\n".join(lines)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(s == name or s in parts for s in skip)


def _storage_key(t: torch.Tensor) -> tuple:
    # tensors tied by sharing one Parameter, or views of one storage; meta tensors have no storage
    # address, and every empty tensor has address 0
    if t.device.type == "meta" or t.numel() == 0:
        return ("id", id(t))
    return (str(t.device), t.untyped_storage().data_ptr())


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] | str = ("lm_head",),
    *,
    group_size: int | None = None,
    mode: str = "auto",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    embeddings: bool = False,
    report: bool = False,
) -> nn.Module | tuple[nn.Module, QuantizationReport]:
    """Replace the ``nn.Linear`` (and, with ``embeddings=True``, ``nn.Embedding``) layers of ``model``.

    Linear layers become :class:`QuantizedLinear`, embeddings :class:`Int8Embedding`, in place, one
    at a time: each is quantized on its own device and swapped in before the next is touched, and the
    model keeps no reference to the float layer afterwards, so a model on the GPU never holds the float
    and the int8 copies of more than one layer at once (nor more than ~32 MiB of temporaries). A layer
    shared by several parents is converted once and stays shared; two ``nn.Linear`` layers that share
    one weight ``Parameter`` are not: each gets its own int8 copy (the report says so).

    Only modules whose type is exactly ``nn.Linear`` / ``nn.Embedding`` are converted: subclasses may
    carry behavior of their own (``nn.MultiheadAttention``'s ``out_proj`` reads ``.weight`` directly,
    Gemma's embedding scales its output); the report lists them.

    Tied weights (an embedding whose ``weight`` is also an output layer's, as with
    ``tie_word_embeddings``): when both are selected, the linear layer is quantized and the embedding
    becomes :meth:`Int8Embedding.tied_to` it, so one int8 table serves both (the ``state_dict`` carries
    it under the linear layer's name). When the linear layer is not selected (``skip`` keeps
    ``lm_head`` by default), the embedding is left in floating point with a warning: quantizing it
    alone would untie the two and keep the float table alive for the output layer. When only the
    linear layer is selected (``embeddings=False``), it gets its own int8 copy and the embedding keeps
    the float table, as noted in the report.

    Args:
        model: the model (or a single ``nn.Linear``, or ``nn.Embedding`` with ``embeddings=True``, for
            which the converted layer is returned).
        skip: layer names to leave in floating point; a layer is skipped when its full dotted name or
            any component of it equals an entry (the default keeps ``lm_head``, often tied to the
            embedding and the most sensitive layer).
        group_size: per-group scales (e.g. 128) instead of per-channel (per row for embeddings).
        mode: ``"auto"``, ``"w8a16"`` or ``"w8a8"`` for every converted linear layer (``"w8a8"``
            needs per-channel scales: with a ``group_size`` it raises before anything is converted).
        filter_fn: ``filter_fn(module, name) -> bool``; only layers for which it returns ``True``
            are converted.
        embeddings: convert ``nn.Embedding`` layers too (their ``padding_idx`` and dtype are kept;
            ones with ``max_norm``, ``scale_grad_by_freq`` or ``sparse`` are left and reported).
        report: also return a :class:`QuantizationReport` (always logged: a summary at INFO level on
            the ``rotalabs_accel.quantization.symmetric`` logger, each entry at DEBUG, and a warning
            per embedding left because of a tie).

    Returns:
        ``model`` itself (converted in place), or ``(model, report)`` when ``report=True``.

    Example:
        >>> import torch
        >>> from rotalabs_accel import QuantizedLinear, quantize_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> model = quantize_model(model)
        >>> [type(m).__name__ for m in model]
        ['QuantizedLinear', 'ReLU', 'QuantizedLinear']
    """
    fn = "quantize_model"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    _check_group_size(group_size, fn)
    # before any layer is converted: a failure at the n-th layer would leave the model half converted
    check_mode(mode, group_size, fn)
    rep = QuantizationReport()

    def done(result: nn.Module):
        logger.info("%s", rep.summary())
        for e in rep.entries:
            logger.debug("%s %s %s: %s", e.action, e.kind, e.name, e.detail)
        return (result, rep) if report else result

    if type(model) is nn.Linear:
        layer = QuantizedLinear.from_linear(model, group_size=group_size, mode=mode)
        rep.add("<root>", "linear", "quantized", _linear_detail(layer))
        return done(layer)
    if embeddings and type(model) is nn.Embedding:
        emb = Int8Embedding.from_embedding(model, group_size=group_size)
        rep.add("<root>", "embedding", "quantized", _embedding_detail(emb))
        return done(emb)

    # The plan keeps names, ids and storage keys only: holding the modules themselves would keep every
    # float weight alive while the others are converted.
    names, users = _parameter_users(model)
    linears: list[tuple[str, int]] = []
    embeds: list[tuple[str, int]] = []
    weight_of: dict[int, tuple] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        key = id(module)
        if not name:
            continue
        if isinstance(module, nn.Linear):
            kind = "linear"
        elif embeddings and isinstance(module, nn.Embedding):
            kind = "embedding"
        else:
            continue
        # TritonEmbedding is a plain lookup (only its backward differs): quantized like nn.Embedding
        exact = type(module) in ((nn.Linear,) if kind == "linear" else (nn.Embedding, TritonEmbedding))
        if not exact:
            base = "nn.Linear" if kind == "linear" else "nn.Embedding"
            detail = f"{type(module).__name__} subclasses {base} (it may compute more than {base})"
            rep.add(name, kind, "left", detail)
            continue
        if _skipped(name, skip):
            rep.add(name, kind, "left", "in skip")
            continue
        if filter_fn is not None and not filter_fn(module, name):
            rep.add(name, kind, "left", "filter_fn returned False")
            continue
        if kind == "embedding":
            unsupported = _unsupported_embedding_options(module)
            if unsupported:
                rep.add(name, kind, "left", unsupported)
                logger.warning("%s: left %s in floating point: %s", fn, name, unsupported)
                continue
        (linears if kind == "linear" else embeds).append((name, key))
        weight_of[key] = _storage_key(module.weight)
    del module

    # Tied embeddings: the owner of each table that several selected layers share.
    linear_keys = {k for _, k in linears}
    embed_keys = {k for _, k in embeds}
    owner: dict[int, int] = {}  # embedding id -> id of the module that quantizes its table
    for name, key in embeds:
        others = [(k, p) for k, p in users.get(weight_of[key], []) if k != key]
        other_keys = {k for k, _ in others}
        blockers = sorted(
            {names[k] for k, p in others if not (p == "weight" and (k in linear_keys or k in embed_keys))}
        )
        if blockers:
            detail = (
                f"its weight is tied to {', '.join(blockers)} (left in floating point); quantize both "
                "(e.g. remove lm_head from skip) to share one int8 table"
            )
            rep.add(name, "embedding", "left", detail)
            logger.warning("%s: left %s in floating point: %s", fn, name, detail)
            continue
        # a linear layer owns a shared table (QuantizedLinear keeps its own buffers), else the first
        # embedding of the group that owns one
        tied_linears = [k for _, k in linears if k in other_keys]
        tied_embeds = [k for _, k in embeds if k in other_keys and owner.get(k) == k]
        owner[key] = tied_linears[0] if tied_linears else (tied_embeds[0] if tied_embeds else key)

    converted: dict[int, nn.Module] = {}
    for name, key in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if key not in converted:
            linear = getattr(parent, child)
            converted[key] = QuantizedLinear.from_linear(linear, group_size=group_size, mode=mode)
            del linear
        setattr(parent, child, converted[key])
        detail = _linear_detail(converted[key])
        shared_with = [
            names[k]
            for k, _ in users.get(weight_of[key], [])
            if k != key and k not in linear_keys and k not in owner
        ]
        if shared_with:
            detail += (
                f"; its float weight stays with {', '.join(sorted(set(shared_with)))} (tied), so the int8 "
                "copy adds memory (embeddings=True shares one int8 table)"
            )
        # two nn.Linear modules reading one weight (not one module used twice, which stays shared)
        tied_linears = sorted(
            {names[k] for k, p in users.get(weight_of[key], []) if k != key and k in linear_keys}
        )
        if tied_linears:
            detail += (
                f"; its float weight is shared with {', '.join(tied_linears)}, which gets an int8 copy "
                "of its own (the tie is not kept: two int8 copies)"
            )
        rep.add(name, "linear", "quantized", detail)
    for name, key in embeds:
        if key not in owner:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if key not in converted:
            emb = getattr(parent, child)
            if owner[key] == key:
                converted[key] = Int8Embedding.from_embedding(emb, group_size=group_size)
            else:
                converted[key] = Int8Embedding.tied_to(
                    converted[owner[key]], padding_idx=emb.padding_idx, dtype=emb.weight.dtype
                )
                converted[key].train(emb.training)
            del emb
        setattr(parent, child, converted[key])
        if owner[key] == key:
            rep.add(name, "embedding", "quantized", _embedding_detail(converted[key]))
        else:
            source = names[owner[key]]
            detail = f"nn.Embedding -> Int8Embedding reading the int8 table of {source} (tied: one copy)"
            rep.add(name, "embedding", "shared", detail)
    return done(model)


def _parameter_users(model: nn.Module) -> tuple[dict[int, str], dict[tuple, list[tuple[int, str]]]]:
    """Each module's first name, and for each parameter storage the ``(module id, name)`` pairs using it."""
    names: dict[int, str] = {}
    users: dict[tuple, list[tuple[int, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in names:
            continue
        names[id(module)] = name
        for pname, p in module.named_parameters(recurse=False):
            users.setdefault(_storage_key(p), []).append((id(module), pname))
    return names, users


def _linear_detail(layer: Int8Linear) -> str:
    scales = f"per-group ({layer.group_size})" if layer.group_size else "per-channel"
    return f"nn.Linear -> {type(layer).__name__} (INT8 weights, {scales} scales, mode {layer.mode!r})"


def _embedding_detail(emb: Int8Embedding) -> str:
    scales = f"per-group ({emb.group_size})" if emb.group_size else "per-row"
    return f"nn.Embedding -> Int8Embedding (INT8 table, {scales} scales, output {emb.dtype})"
