"""PyTorch reference for RMSNorm and fused residual-add RMSNorm.

These functions are the CPU fallback and the test oracle: the Triton kernels compute the same
function (up to floating-point rounding order). Called with float64 tensors they compute the exact
math in float64, which is how the tests obtain their oracle.

Math, for one row ``x`` of length ``N`` with weight ``w`` and offset ``o``::

    rstd = 1 / sqrt(mean(x ** 2) + eps)
    y    = x * rstd * (o + w)

The casting modes say where the low-precision roundings happen, mirroring the modules people load
checkpoints into:

=========  ===============================================================  ==========================
mode       computation                                                      output dtype
=========  ===============================================================  ==========================
``llama``  ``(o + w) * (x.float() * rstd).to(x.dtype)`` (Hugging Face        ``promote(x.dtype,
           ``LlamaRMSNorm``, Mistral, Qwen2/3, T5): normalize in fp32, cast     w.dtype)``
           to the input dtype, then multiply by the weight
``gemma``  ``(x.float() * rstd * (o + w.float())).to(x.dtype)`` (Hugging      ``x.dtype``
           Face ``GemmaRMSNorm`` with ``o = 1``; also ``torch.nn.RMSNorm`` /
           ``F.rms_norm`` with ``o = 0``): everything in fp32, one final cast
``none``   ``x * rsqrt(mean(x ** 2) + eps) * (o + w)`` with no casts: the mean      ``promote(x.dtype,
           square is accumulated in fp32, then every value (``rstd``, the      w.dtype)``
           products) rounds to the input dtype (least accurate)
=========  ===============================================================  ==========================

"fp32" above means "at least fp32": a float64 input stays float64.
"""

from __future__ import annotations

import torch

__all__ = [
    "CASTING_MODES",
    "rmsnorm_output_dtype",
    "rmsnorm_reference",
    "add_rmsnorm_reference",
]

CASTING_MODES = ("llama", "gemma", "none")


def rmsnorm_output_dtype(
    x_dtype: torch.dtype, weight_dtype: torch.dtype | None, casting_mode: str
) -> torch.dtype:
    """The dtype of the normalized output for an input dtype, a weight dtype and a casting mode.

    ``gemma`` returns the input dtype; ``llama`` and ``none`` return
    ``torch.promote_types(x_dtype, weight_dtype)`` (the input dtype when there is no weight).

    Example:
        >>> import torch
        >>> rmsnorm_output_dtype(torch.bfloat16, torch.float32, "llama")
        torch.float32
        >>> rmsnorm_output_dtype(torch.bfloat16, torch.float32, "gemma")
        torch.bfloat16
    """
    if casting_mode == "gemma" or weight_dtype is None:
        return x_dtype
    return torch.promote_types(x_dtype, weight_dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rmsnorm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> torch.Tensor:
    """RMSNorm over the last dimension, in plain PyTorch (differentiable).

    Args:
        x: ``(..., N)`` floating tensor.
        weight: ``(N,)`` scale, or ``None`` for no scale.
        eps: added to the mean square before the reciprocal square root.
        offset: added to the weight before scaling (Gemma stores ``w`` and scales by ``1 + w``).
        casting_mode: ``"llama"``, ``"gemma"`` or ``"none"`` (see the module docstring).

    Returns:
        ``(..., N)`` tensor of dtype :func:`rmsnorm_output_dtype`.

    Example:
        >>> import torch
        >>> y = rmsnorm_reference(torch.randn(2, 8), torch.ones(8))
        >>> y.shape
        torch.Size([2, 8])
    """
    if casting_mode == "llama":
        xf = x.to(_compute_dtype(x.dtype))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(x.dtype)
        if weight is None:
            return normed
        return (offset + weight) * normed
    if casting_mode == "gemma":
        xf = x.to(_compute_dtype(x.dtype))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = xf * rstd
        if weight is not None:
            y = y * (offset + weight.to(_compute_dtype(weight.dtype)))
        return y.to(x.dtype)
    if casting_mode == "none":
        # The mean square is accumulated in fp32 (as in every mode: squares of fp16 inputs above 256
        # would overflow in fp16); rstd is then rounded to the input dtype like every other value.
        mean_sq = x.to(_compute_dtype(x.dtype)).pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(mean_sq + eps).to(x.dtype)
        if weight is None:
            return y
        return y * (offset + weight)
    raise ValueError(f"casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")


def add_rmsnorm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by RMSNorm, as in a pre-norm decoder layer.

    ``new_residual = x + residual`` (dtype ``promote(x.dtype, residual.dtype)``), then
    ``normed = rmsnorm_reference(new_residual, weight, eps, ...)``.

    Returns:
        ``(normed, new_residual)``.

    Example:
        >>> import torch
        >>> normed, new_residual = add_rmsnorm_reference(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8))
    """
    new_residual = x + residual
    normed = rmsnorm_reference(new_residual, weight, eps, offset=offset, casting_mode=casting_mode)
    return normed, new_residual
