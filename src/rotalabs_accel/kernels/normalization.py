"""RMSNorm as a drop-in ``nn.Module``: :class:`TritonRMSNorm`, plus the functional forms."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Sequence

import torch

from ..functional.normalization import rmsnorm, rmsnorm_residual_fused
from ..reference.rmsnorm import CASTING_MODES
from ..utils import module_tensor

__all__ = ["TritonRMSNorm", "rmsnorm", "rmsnorm_residual_fused"]

# `(1.0 + self.weight...)` or `(1 + self.weight...)` in a forward: the Gemma-style unit offset.
_UNIT_OFFSET = re.compile(r"\(\s*1(?:\.0*)?\s*\+\s*self\.weight")


def _forward_source(module: torch.nn.Module) -> str | None:
    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None


# Normalizations that are not RMSNorm although they have a 1-D weight and an eps.
_NOT_RMSNORM = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase,
                torch.nn.LocalResponseNorm)


def _forward_body(source: str) -> list[ast.stmt] | None:
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None
    func = tree.body[0] if tree.body else None
    return func.body if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _assignments(body: list[ast.stmt]) -> dict[str, ast.expr]:
    """The last expression assigned to each plain name at the top level of a function body."""
    last: dict[str, ast.expr] = {}
    for stmt in body:
        if isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    last[target.id] = stmt.value
    return last


def _is_mean_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "mean"


def _centers(body: list[ast.stmt]) -> bool:
    """Whether the forward subtracts a mean (``x - x.mean(...)``, ``x - mean``): LayerNorm, not RMSNorm."""
    means = {name for name, value in _assignments(body).items() if _is_mean_call(value)}
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub):
                for side in (node.left, node.right):
                    if _is_mean_call(side) or (isinstance(side, ast.Name) and side.id in means):
                        return True
    return False


def _casts_last(body: list[ast.stmt]) -> bool | None:
    """Whether the returned value is cast last (``(w * h).to(dtype)``, ``out.type_as(x)``: everything
    in fp32, one cast: the ``gemma`` casting mode) rather than multiplied by the weight after a cast
    (``w * h.to(dtype)``: ``llama``). ``None`` when there is no single return to read."""
    returns = [stmt for stmt in body if isinstance(stmt, ast.Return) and stmt.value is not None]
    if len(returns) != 1:
        return None
    value, names, seen = returns[0].value, _assignments(body), set()
    while isinstance(value, ast.Name) and value.id in names and value.id not in seen:
        seen.add(value.id)
        value = names[value.id]
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
            and value.func.attr in ("to", "type_as", "type"))


class TritonRMSNorm(torch.nn.RMSNorm):
    r"""RMSNorm over the last dimension, backed by Triton kernels on CUDA.

    .. math::

        y = \frac{x}{\sqrt{\operatorname{mean}(x^2) + \epsilon}} \odot (\text{offset} + w)

    A subclass of ``torch.nn.RMSNorm``: the parameter is ``weight`` (shape ``(hidden_size,)``) and
    the ``state_dict`` is the same as ``torch.nn.RMSNorm``'s and the Hugging Face ``*RMSNorm``
    modules', so a ``state_dict`` from any of them loads. On CPU tensors, or without Triton, the
    PyTorch reference runs instead and computes the same function.

    ``casting_mode`` picks where low-precision rounding happens (see
    :func:`rotalabs_accel.functional.normalization.rmsnorm`). The default ``"llama"`` matches Hugging
    Face ``LlamaRMSNorm``: with an fp32 weight and a bf16/fp16 input the output is fp32, as there.
    ``casting_mode="gemma"`` matches ``torch.nn.RMSNorm`` (output in the input dtype);
    :meth:`from_module` picks the mode of the module it converts.

    Args:
        hidden_size: size of the normalized (last) dimension.
        eps: added to the mean square; ``None`` takes the machine epsilon of the dtype the norm is
            computed in (``float32`` for fp16 / bf16 inputs), as ``torch.nn.RMSNorm`` does.
        offset: added to the weight before scaling (``1.0`` for Gemma-style checkpoints). The weight
            is initialized to ``1 - offset`` so that a fresh module scales by one.
        casting_mode: ``"llama"``, ``"gemma"`` or ``"none"``.
        elementwise_affine: ``False`` for no weight.
        device, dtype: of the weight.

    Example:
        >>> import torch
        >>> from rotalabs_accel import TritonRMSNorm
        >>> norm = TritonRMSNorm(64, eps=1e-6)
        >>> y = norm(torch.randn(2, 8, 64))
        >>> y.shape
        torch.Size([2, 8, 64])
        >>> norm.load_state_dict(torch.nn.RMSNorm(64).state_dict())
        <All keys matched successfully>
    """

    def __init__(
        self,
        hidden_size: int | Sequence[int],
        eps: float | None = 1e-6,
        *,
        offset: float = 0.0,
        casting_mode: str = "llama",
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(hidden_size, int):
            shape = tuple(hidden_size)
            if len(shape) != 1:
                raise ValueError(
                    f"TritonRMSNorm: hidden_size must be one int (the last dimension), got {shape}"
                )
            hidden_size = int(shape[0])
        if casting_mode not in CASTING_MODES:
            raise ValueError(
                f"TritonRMSNorm: casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}"
            )
        if offset != 0.0 and not elementwise_affine:
            raise ValueError(
                f"TritonRMSNorm: offset={offset} scales the weight, but elementwise_affine=False"
            )
        super().__init__(
            hidden_size, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype
        )
        self.offset = float(offset)
        self.casting_mode = casting_mode
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize the weight so that ``offset + weight`` is one."""
        if self.weight is not None:
            torch.nn.init.constant_(self.weight, 1.0 - getattr(self, "offset", 0.0))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalize ``x``, or add ``residual`` first and normalize the sum.

        Args:
            x: ``(..., hidden_size)`` tensor.
            residual: optional tensor of the shape of ``x``. When given, returns
                ``(rmsnorm(x + residual), x + residual)`` computed in one fused pass, what a pre-norm
                decoder layer needs (the second item is the new residual stream).

        Returns:
            The normalized tensor (shape of ``x``), or the pair ``(normed, new_residual)``.

        Example:
            >>> import torch
            >>> norm = TritonRMSNorm(64)
            >>> normed, residual = norm(torch.randn(4, 64), torch.randn(4, 64))
        """
        weight = module_tensor(self, "weight")
        if residual is None:
            return rmsnorm(x, weight, self.eps, offset=self.offset, casting_mode=self.casting_mode)
        return rmsnorm_residual_fused(
            x, residual, weight, self.eps, offset=self.offset, casting_mode=self.casting_mode
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offset={self.offset}, casting_mode={self.casting_mode!r}"

    @classmethod
    def from_module(
        cls,
        module: torch.nn.Module,
        *,
        offset: float | None = None,
        casting_mode: str | None = None,
    ) -> TritonRMSNorm:
        """Convert an RMSNorm module, keeping its weight values, eps, device and dtype.

        Accepts ``torch.nn.RMSNorm`` (converted with ``casting_mode="gemma"``, which is its math) and
        any Hugging Face-style RMSNorm: a module with a ``weight`` parameter of shape
        ``(hidden_size,)`` (or none) and ``variance_epsilon`` or ``eps``. For those:

        * ``offset`` (when not given) is ``1.0`` if the module's ``forward`` scales by
          ``(1 + self.weight)`` (Gemma, Gemma 2/3, Qwen3-Next, ...), else ``0.0``. When the source
          cannot be read, a class name containing ``"Gemma"`` without a ``with_scale`` attribute means
          ``1.0``.
        * ``casting_mode`` (when not given) is ``"gemma"`` when the value the forward returns is cast
          last (``output.type_as(x)``, ``(self.weight * h).to(input_dtype)``: everything in fp32, one
          cast; Gemma, OLMo 2), else ``"llama"`` (the weight multiplies an already cast value:
          ``self.weight * h.to(input_dtype)``; Llama, Mistral, Qwen, Llama 4). When the source
          cannot be read, a class name containing ``"Gemma"`` means ``"gemma"``.

        Modules that are not RMSNorm are refused: ``nn.LayerNorm``, ``nn.GroupNorm``, batch and
        instance norms, any module with a ``bias`` tensor, and forwards that subtract a mean.

        Args:
            module: the module to convert (left unchanged).
            offset: override the detected offset.
            casting_mode: override the detected casting mode.

        Returns:
            A new :class:`TritonRMSNorm` on the module's device, with its dtype, computing the same
            function.

        Raises:
            ValueError: the module is not an RMSNorm (see above), has no ``eps``/``variance_epsilon``,
                a weight that is not 1-D, or no weight and no way to tell the hidden size.

        Example:
            >>> import torch
            >>> m = torch.nn.RMSNorm(64, eps=1e-5)
            >>> norm = TritonRMSNorm.from_module(m)
            >>> norm.eps, norm.casting_mode
            (1e-05, 'gemma')
        """
        kind = type(module).__name__
        if isinstance(module, _NOT_RMSNORM):
            raise ValueError(f"from_module: {kind} is not an RMSNorm (it centers by the mean or normalizes "
                             "over other dimensions); convert only RMSNorm modules")
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            raise ValueError(f"from_module: {kind} has a bias, which RMSNorm does not; convert only "
                             "RMSNorm modules")
        if isinstance(module, torch.nn.RMSNorm) and len(module.normalized_shape) != 1:
            raise ValueError(
                "from_module: only normalization over the last dimension is supported, got "
                f"normalized_shape={tuple(module.normalized_shape)}"
            )
        weight = getattr(module, "weight", None)
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise ValueError(f"from_module: {kind}.weight must be a tensor, got {type(weight).__name__}")
        if weight is not None and weight.dim() != 1:
            raise ValueError(
                f"from_module: {kind}.weight must be 1-D (hidden_size,), got shape {tuple(weight.shape)}"
            )
        if isinstance(module, torch.nn.RMSNorm):
            hidden_size = module.normalized_shape[0]
            eps = module.eps
            if isinstance(module, TritonRMSNorm):
                detected_offset, detected_mode = module.offset, module.casting_mode
            else:
                detected_offset, detected_mode = 0.0, "gemma"
        else:
            name = type(module).__name__
            if hasattr(module, "variance_epsilon"):
                eps = module.variance_epsilon
            elif hasattr(module, "eps"):
                eps = module.eps
            else:
                raise ValueError(f"from_module: {name} has neither a variance_epsilon nor an eps attribute")
            if weight is not None:
                hidden_size = weight.shape[0]
            else:
                sizes = ("hidden_size", "dim", "normalized_shape")
                hidden_size = next((getattr(module, a) for a in sizes if hasattr(module, a)), None)
                if hidden_size is None:
                    raise ValueError(f"from_module: {name} has no weight and no hidden_size/dim attribute")
            source = _forward_source(module)
            body = None if source is None else _forward_body(source)
            if body is not None and _centers(body):
                raise ValueError(f"from_module: {name}.forward subtracts a mean: a LayerNorm, not an "
                                 "RMSNorm; convert only RMSNorm modules")
            casts_last = None if body is None else _casts_last(body)
            if source is not None:
                detected_offset = 1.0 if _UNIT_OFFSET.search(source) else 0.0
            else:
                detected_offset = 1.0 if ("Gemma" in name and not hasattr(module, "with_scale")) else 0.0
            if casts_last is None:  # no source, or no single return to read: go by the family name
                casts_last = "Gemma" in name
            detected_mode = "gemma" if casts_last else "llama"
        if weight is None:
            detected_offset = 0.0
        new = cls(
            hidden_size,
            eps=eps,
            offset=detected_offset if offset is None else offset,
            casting_mode=detected_mode if casting_mode is None else casting_mode,
            elementwise_affine=weight is not None,
            device=None if weight is None else weight.device,
            dtype=None if weight is None else weight.dtype,
        )
        if weight is not None:
            with torch.no_grad():
                new.weight.copy_(weight)
            new.weight.requires_grad_(weight.requires_grad)
        return new
