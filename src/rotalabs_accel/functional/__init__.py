"""Functional API: validate once, flatten, dispatch to a Triton kernel or the PyTorch reference."""

from .activations import swiglu_fused
from .embedding import embedding
from .gemm import int8_gemm
from .loss import causal_lm_loss, cross_entropy
from .normalization import rmsnorm, rmsnorm_residual_fused
from .rope import apply_rope, build_rope_cache

__all__ = [
    "rmsnorm",
    "rmsnorm_residual_fused",
    "swiglu_fused",
    "apply_rope",
    "build_rope_cache",
    "int8_gemm",
    "cross_entropy",
    "causal_lm_loss",
    "embedding",
]
