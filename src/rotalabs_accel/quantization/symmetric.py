r"""Symmetric INT8 quantization: functions, ``QuantizedLinear`` and whole-model conversion.

Symmetric quantization of a slice ``v`` (one output channel of a weight, one token of an activation,
one group of ``group_size`` elements, or a whole tensor):

.. math::

    a = \max(\max_i |v_i|, 2^{-64}), \qquad s = \frac{a}{127}, \qquad
    q_i = \operatorname{clamp}\!\Big(\operatorname{round}\big(v_i \cdot \tfrac{127}{a}\big), -127, 127\Big),
    \qquad v_i \approx q_i\, s

``q`` is int8 (``-128`` is never used, so the grid is symmetric) and ``s`` fp32. Rounding is to the
nearest integer, ties to even (``torch.round``). An all-zero slice gets a tiny scale and quantizes to
zeros (no NaN). The round-trip error of each element is at most ``s / 2``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..kernels.gemm import Int8Linear
from ..reference.int8 import (
    dequantize_reference,
    quantize_symmetric_reference,
    quantize_weight_reference,
)

__all__ = [
    "quantize_symmetric",
    "dequantize",
    "quantize_weight_per_channel",
    "QuantizedLinear",
    "quantize_model",
]


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
        group_size: the group size used when quantizing; inferred when ``dim``'s size is a multiple of
            the number of groups.
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
        if groups == 0 or size % groups:
            raise ValueError(
                f"{fn}: cannot infer group_size: dim {dim} has {size} elements and scale has {groups} "
                "groups; pass group_size"
            )
        group_size = size // groups
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
            mode: ``"auto"``, ``"w8a16"`` or ``"w8a8"``.

        Returns:
            A new ``QuantizedLinear`` in ``linear``'s training mode.

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


def _skipped(name: str, skip: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(s == name or s in parts for s in skip)


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] | str = ("lm_head",),
    *,
    group_size: int | None = None,
    mode: str = "auto",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` by :class:`QuantizedLinear`, in place, one at a time.

    Each layer is quantized on its own device and swapped in before the next is touched, and the model
    keeps no reference to the float layer afterwards, so a model on the GPU never holds the float and
    the int8 copies of more than one layer at once (nor more than ~32 MiB of temporaries). A layer
    shared by several parents is converted once and stays shared.

    Only modules whose type is exactly ``nn.Linear`` are converted: subclasses may carry behavior of
    their own (``nn.MultiheadAttention``'s ``out_proj`` reads ``.weight`` directly, for instance).

    Args:
        model: the model (or a single ``nn.Linear``, for which the converted layer is returned).
        skip: layer names to leave in floating point; a layer is skipped when its full dotted name or
            any component of it equals an entry (the default keeps ``lm_head``, often tied to the
            embedding and the most sensitive layer).
        group_size: per-group scales (e.g. 128) instead of per-channel.
        mode: ``"auto"``, ``"w8a16"`` or ``"w8a8"`` for every converted layer.
        filter_fn: ``filter_fn(module, name) -> bool``; only layers for which it returns ``True``
            are converted.

    Returns:
        ``model`` itself (converted in place).

    Example:
        >>> import torch
        >>> from rotalabs_accel import QuantizedLinear, quantize_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> model = quantize_model(model)
        >>> [type(m).__name__ for m in model]
        ['QuantizedLinear', 'ReLU', 'QuantizedLinear']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be a torch.nn.Module, got {type(model).__name__}")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    _check_group_size(group_size, "quantize_model")
    if type(model) is nn.Linear:
        return QuantizedLinear.from_linear(model, group_size=group_size, mode=mode)

    # names and ids only: holding the modules themselves would keep every float weight alive
    todo: list[tuple[str, int]] = [
        (name, id(module))
        for name, module in model.named_modules(remove_duplicate=False)
        if type(module) is nn.Linear
        and name
        and not _skipped(name, skip)
        and (filter_fn is None or filter_fn(module, name))
    ]
    converted: dict[int, QuantizedLinear] = {}
    for name, key in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if key not in converted:
            linear = getattr(parent, child)
            converted[key] = QuantizedLinear.from_linear(linear, group_size=group_size, mode=mode)
            del linear
        setattr(parent, child, converted[key])
    return model
