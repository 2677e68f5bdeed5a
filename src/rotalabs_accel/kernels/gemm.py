"""INT8 linear layer (``Int8Linear``) and the functional ``int8_gemm`` it runs on."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..functional.gemm import MODES, int8_gemm, int8_gemm_group
from ..reference.int8 import dequantize_weight_reference, infer_group_size, quantize_weight_reference
from ..utils import module_tensor

__all__ = ["Int8Linear", "int8_gemm", "linears_of_one_input"]


def _check_group_size(group_size) -> None:
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0
    ):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")


def check_mode(mode, group_size, fn: str) -> None:
    """``ValueError`` unless ``mode`` is one of :data:`MODES` and fits ``group_size``.

    W8A8 needs per-channel weight scales (its int32 accumulator is scaled once per output), so
    ``mode="w8a8"`` with a ``group_size`` is refused where a layer is built, not at its first forward.
    """
    if mode not in MODES:
        raise ValueError(f"{fn}: mode must be one of {MODES}, got {mode!r}")
    if mode == "w8a8" and group_size is not None:
        raise ValueError(
            f"{fn}: mode='w8a8' needs per-channel weight scales (group_size=None), "
            f"got group_size={group_size}"
        )


class Int8Linear(nn.Module):
    r"""Linear layer with symmetric int8 weights: ``y = x @ (q * s)^T + b``, output in ``x``'s dtype.

    The weight is stored once, as int8 ``[out_features, in_features]`` (the ``nn.Linear`` layout; no
    transposed or floating copy), with fp32 scales per output channel (or per group of ``group_size``
    input features):

    .. math::

        s_n = \frac{\max_k |W_{nk}|}{127}, \qquad q_{nk} = \operatorname{round}\!\Big(W_{nk}\,
        \frac{127}{\max_k |W_{nk}|}\Big) \in [-127, 127]

    so the weight takes about half the memory of bf16 (``N K + 4 N`` bytes). On CUDA with Triton the
    forward runs the library's W8A16 / W8A8 kernels; elsewhere the PyTorch reference.

    ``state_dict`` holds plain tensors: ``weight_int8`` (int8), ``scale`` (fp32) and ``bias`` when
    present, so it saves with ``torch.save`` or ``safetensors`` and loads into a fresh layer (a
    group-scaled checkpoint also loads into a per-channel layer: the scale's shape says which it is).
    ``.to()`` / ``.cuda()`` move everything; ``.half()`` / ``.to(dtype)`` convert the bias but keep the
    scales in fp32.

    Args:
        in_features: K, the size of each input row.
        out_features: N, the size of each output row.
        bias: add a learnable bias ``[out_features]``.
        group_size: one scale per this many input features (a multiple of 16 for the kernels, e.g.
            128), for accuracy-sensitive layers; ``None`` for one scale per output channel. A
            ``state_dict`` whose scale has another shape still loads: an ``[out_features]`` scale
            makes the layer per channel; for an ``[out_features, G]`` scale the group size is this
            one when given (it must give ``G`` groups), else inferred from the shape (see
            :meth:`_group_size_for_scale`).
        mode: ``"auto"``, ``"w8a16"`` or ``"w8a8"``; see :func:`rotalabs_accel.int8_gemm`. ``"w8a8"``
            needs per-channel scales (``group_size=None``).
        device: where the buffers live.
        dtype: dtype of the bias (the activations may be fp16, bf16 or fp32 whatever it is).

    Example:
        >>> import torch
        >>> from rotalabs_accel import Int8Linear
        >>> layer = Int8Linear(64, 32)
        >>> w = torch.randn(32, 64)
        >>> _ = layer.quantize_weights(w)
        >>> x = torch.randn(4, 64)
        >>> layer(x).shape
        torch.Size([4, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        group_size: int | None = None,
        mode: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        _check_group_size(group_size)
        check_mode(mode, group_size, type(self).__name__)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        # the group size asked for at construction (None: inferred from a loaded scale's shape)
        self._declared_group_size = group_size
        self.mode = mode
        self.register_buffer(
            "weight_int8", torch.zeros((out_features, in_features), dtype=torch.int8, device=device)
        )
        scale = torch.ones(self._scale_shape(group_size), dtype=torch.float32, device=device)
        self.register_buffer("scale", scale)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._quantized = False

    def _scale_shape(self, group_size: int | None) -> tuple[int, ...]:
        if group_size is None:
            return (self.out_features,)
        return (self.out_features, math.ceil(self.in_features / group_size))

    @property
    def is_quantized(self) -> bool:
        """Whether weights were set (by :meth:`quantize_weights` or by loading a ``state_dict``)."""
        return self._quantized

    @torch.no_grad()
    def quantize_weights(self, weight: torch.Tensor) -> Int8Linear:
        """Quantize a floating weight ``[out_features, in_features]`` into this layer.

        Quantization runs on ``weight``'s device a bounded chunk of rows at a time; the int8 weight and
        the scales then live on the layer's device (on ``weight``'s device when the layer was built on
        ``meta``). The floating weight is not kept.

        Args:
            weight: floating tensor of shape ``[out_features, in_features]`` with finite values.

        Returns:
            ``self``.

        Raises:
            TypeError: ``weight`` is not a floating-point tensor.
            ValueError: wrong shape, or non-finite values.
        """
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise TypeError(f"quantize_weights: weight must be a floating-point tensor, got {got}")
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"quantize_weights: weight must have shape [out_features, in_features] = {list(expected)}, "
                f"got {list(weight.shape)}"
            )
        q, s = quantize_weight_reference(weight.detach(), self.group_size)
        # a NaN or Inf anywhere in a row (or group) makes its absolute maximum, hence its scale, non-finite
        if s.device.type != "meta" and not bool(torch.isfinite(s).all()):
            raise ValueError("quantize_weights: weight has NaN or Inf values (no int8 representation)")
        target = self.weight_int8.device if self.weight_int8.device.type != "meta" else weight.device
        # assign rather than copy into the existing buffers: no second int8 copy of the weight
        self.weight_int8 = q.to(target)
        self.scale = s.to(target)
        self._quantized = True
        return self

    @torch.no_grad()
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, ``q * s`` as a ``[out_features, in_features]`` tensor."""
        return dequantize_weight_reference(self.weight_int8, self.scale, self.group_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., in_features] -> [..., out_features]`` in ``x``'s dtype.

        Raises:
            RuntimeError: the layer holds no weights yet (call :meth:`quantize_weights` or load a
                ``state_dict`` first).
        """
        if not self._quantized:
            raise RuntimeError(
                f"{type(self).__name__}: no weights yet; call quantize_weights(weight) or load a "
                "state_dict before forward"
            )
        return int8_gemm(
            x, module_tensor(self, "weight_int8"), module_tensor(self, "scale"), module_tensor(self, "bias"),
            group_size=self.group_size, mode=self.mode,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, mode={self.mode!r}"
        )

    # ----------------------------------------------------------------------------------------------
    # state_dict and device/dtype moves
    # ----------------------------------------------------------------------------------------------

    def _group_size_for_scale(self, shape: torch.Size) -> int | None:
        """The group size a checkpoint's scale of ``shape`` implies.

        ``[out_features]`` is per channel (``None``). For ``[out_features, G]`` the rule is
        :func:`rotalabs_accel.reference.int8.infer_group_size` over ``K = in_features``: the
        ``group_size`` the layer was constructed with when it gives ``ceil(K / group_size) == G``;
        without one, the power of two ``g >= 16`` with ``ceil(K / g) == G`` (so K = 130 in 2 groups is
        128, not 65), else ``K // G`` when it divides exactly.

        Raises:
            ValueError: the shape fits no group size, not the declared one, or several (construct the
                layer with ``group_size=`` to say which).
        """
        n, k = self.out_features, self.in_features
        name = type(self).__name__
        if tuple(shape) == (n,):
            return None
        if len(shape) != 2 or shape[0] != n:
            raise ValueError(
                f"{name}: a scale of shape {list(shape)} does not fit a [{n}, {k}] weight "
                f"(expected [{n}] or [{n}, ceil({k} / group_size)])"
            )
        try:
            # getattr: a layer pickled before the attribute existed declared none
            declared = getattr(self, "_declared_group_size", None)
            return infer_group_size(
                k, int(shape[1]), declared, what=f"a scale of shape {list(shape)}",
                hint="construct the layer with group_size=",
            )
        except ValueError as e:
            raise ValueError(f"{name}: {e} (for a [{n}, {k}] weight)") from None

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        scale_key = prefix + "scale"
        incoming = state_dict.get(scale_key)
        if isinstance(incoming, torch.Tensor) and incoming.shape != self.scale.shape:
            group_size = self._group_size_for_scale(incoming.shape)
            check_mode(self.mode, group_size, f"{type(self).__name__}.load_state_dict")
            self.group_size = group_size
            shape = self._scale_shape(group_size)
            self.scale = torch.ones(shape, dtype=torch.float32, device=self.scale.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "weight_int8" in state_dict and scale_key in state_dict:
            self._quantized = True
        if self.scale.dtype != torch.float32:  # load_state_dict(assign=True) of a converted checkpoint
            self.scale = self.scale.float()

    def _apply(self, fn, recurse=True):
        scale = self._buffers.get("scale")
        result = super()._apply(fn, recurse)
        keep_scale_fp32(self, scale)
        return result


def keep_scale_fp32(module: nn.Module, before: torch.Tensor | None) -> None:
    """After ``module._apply``: put back an fp32 ``scale`` buffer that ``fn`` converted to another dtype.

    ``Module.half()`` / ``.to(dtype)`` convert every floating buffer; int8 scales must stay fp32 (a bf16
    scale would add a rounding of 2^-9 to every output). The buffer follows ``fn``'s device, not its
    dtype. ``before`` is the buffer as it was before ``_apply``.
    """
    moved = module._buffers.get("scale")
    if before is None or moved is None or moved.dtype == torch.float32:
        return
    if before.device == moved.device:
        module._buffers["scale"] = before
    elif before.device.type == "meta":
        module._buffers["scale"] = moved.float()
    else:
        module._buffers["scale"] = before.to(moved.device)


def _plain_int8(layer: nn.Module) -> bool:
    # Subclasses that override forward, and hooks, need the module call itself.
    return (
        isinstance(layer, Int8Linear)
        and type(layer).forward in _PLAIN_FORWARDS
        and layer._quantized
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
    )


_PLAIN_FORWARDS: set = {Int8Linear.forward}


def linears_of_one_input(x: torch.Tensor, layers, *, concat: bool = False):
    """``tuple(layer(x) for layer in layers)``, fused into one launch for int8 layers where it pays.

    When every layer is an :class:`Int8Linear` (or ``QuantizedLinear``) with per-channel scales and the
    same ``mode``, the weights go through :func:`~rotalabs_accel.functional.gemm.int8_gemm_group`,
    which streams them in one GEMV launch for a single row of ``x`` (decode) and otherwise runs them one
    by one. Any other layer (``nn.Linear``, LoRA, hooks) is simply called.

    Args:
        x: ``[..., in_features]``, the input every layer reads.
        layers: the layers (e.g. ``(q_proj, k_proj, v_proj)`` or ``(gate_proj, up_proj)``).
        concat: return the fused launch's packed ``[..., sum out_features_i]`` output itself, or
            ``None`` when the layers would not share a launch (the caller then calls them).

    Returns:
        One output per layer, ``[..., out_features_i]`` (column views of one buffer when fused); with
        ``concat``, the packed tensor or ``None``.

    Example:
        >>> import torch
        >>> from rotalabs_accel import QuantizedLinear
        >>> from rotalabs_accel.kernels.gemm import linears_of_one_input
        >>> q = QuantizedLinear.from_linear(torch.nn.Linear(64, 64, bias=False))
        >>> k = QuantizedLinear.from_linear(torch.nn.Linear(64, 16, bias=False))
        >>> x = torch.randn(1, 1, 64)
        >>> a, b = linears_of_one_input(x, (q, k))
        >>> torch.equal(a, q(x)) and torch.equal(b, k(x))
        True
    """
    first = layers[0]
    if (
        len(layers) > 1
        and all(_plain_int8(layer) for layer in layers)
        and all(layer.group_size is None and layer.mode == first.mode for layer in layers)
    ):
        biases = [layer.bias for layer in layers]
        return int8_gemm_group(
            x,
            [layer.weight_int8 for layer in layers],
            [layer.scale for layer in layers],
            None if all(b is None for b in biases) else biases,
            mode=first.mode,
            concat=concat,
        )
    return None if concat else tuple(layer(x) for layer in layers)
