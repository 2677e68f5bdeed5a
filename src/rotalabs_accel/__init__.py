"""rotalabs-accel: Triton GPU kernels for LLM building blocks as drop-in ``torch.nn.Module``s.

On a CUDA tensor with Triton installed the modules and functions run Triton kernels; otherwise they
run the PyTorch reference implementations, which compute the same function. Importing this package
never touches a GPU driver.
"""

from ._backend import get_backend, set_backend, use_backend
from .functional import (
    apply_rope,
    build_rope_cache,
    causal_lm_loss,
    cross_entropy,
    embedding,
    int8_gemm,
    rmsnorm,
    rmsnorm_residual_fused,
    swiglu_fused,
)
from .integration import optimize_model
from .kernels.activations import SwiGLU
from .kernels.embedding import TritonEmbedding
from .kernels.gemm import Int8Linear
from .kernels.normalization import TritonRMSNorm
from .kernels.rope import RotaryEmbedding
from .quantization.symmetric import (
    Int8Embedding,
    QuantizationReport,
    QuantizedLinear,
    dequantize,
    quantize_model,
    quantize_symmetric,
    quantize_weight_per_channel,
)
from .utils import get_device, get_device_properties, is_cuda_available, is_triton_available

__version__ = "0.1.0"

__all__ = [
    "TritonRMSNorm",
    "SwiGLU",
    "TritonEmbedding",
    "RotaryEmbedding",
    "Int8Linear",
    "QuantizedLinear",
    "Int8Embedding",
    "QuantizationReport",
    "rmsnorm",
    "rmsnorm_residual_fused",
    "swiglu_fused",
    "apply_rope",
    "build_rope_cache",
    "int8_gemm",
    "cross_entropy",
    "causal_lm_loss",
    "embedding",
    "quantize_symmetric",
    "dequantize",
    "quantize_weight_per_channel",
    "quantize_model",
    "optimize_model",
    "get_device",
    "is_cuda_available",
    "is_triton_available",
    "get_device_properties",
    "get_backend",
    "set_backend",
    "use_backend",
    "__version__",
]
