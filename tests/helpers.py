"""Shared test helpers: devices, random inputs and the tolerance rule.

Tolerance rule (used by every numerical test):

    err(ours)  <= FACTOR * err(torch in the same dtype) + FLOOR[dtype]

where ``err(a) = ||a - ref64|| / ||ref64||`` (relative Frobenius error against the float64 reference
computed from the same inputs), "torch in the same dtype" is the PyTorch reference run on the
low-precision inputs (what a user gets without this library), FACTOR = 2 (our kernels accumulate in
fp32 like PyTorch; a different but correct reduction order changes the error by well under 2x), and
FLOOR is half the dtype's unit roundoff (one final rounding of the output, which PyTorch may not need
when it keeps fp32 intermediates). A scalar that sums ``n`` terms (a loss averaged over tokens) has no
elements to average its rounding over: PyTorch's own result may land exactly on the rounded true value
by luck, while another correct summation order is off by up to about ``n`` roundings (the bound of a
recursive sum); such checks pass ``terms=n``, which scales the floor by ``n``.
A wrong index, a dropped term or a missing scale produces relative
errors of order 1e-1..1, orders of magnitude above the bound.
"""

from __future__ import annotations

import os

import pytest
import torch

from rotalabs_accel.utils import is_triton_available

FACTOR = 2.0
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def floor(dtype: torch.dtype) -> float:
    return 0.5 * UNIT_ROUNDOFF[dtype]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert a.shape == ref.shape, (a.shape, ref.shape)
    if ref.numel() == 0:
        return 0.0
    assert torch.isfinite(a).all(), "output has NaN/Inf"
    denom = ref.norm().item()
    return (a - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_within_torch_error(
    ours: torch.Tensor,
    baseline: torch.Tensor,
    ref64: torch.Tensor,
    dtype: torch.dtype,
    what: str = "output",
    factor: float = FACTOR,
    terms: int = 1,
) -> None:
    """Assert ``ours`` is no further from ``ref64`` than ``factor`` x ``baseline``'s error + floor
    (the floor times ``terms`` for a scalar summed over that many terms; module docstring)."""
    e_ours = rel_err(ours, ref64)
    e_base = rel_err(baseline, ref64)
    low = floor(dtype) * max(1, terms)
    bound = factor * e_base + low
    assert e_ours <= bound, (
        f"{what}: relative error {e_ours:.3e} exceeds bound {bound:.3e} "
        f"(torch in {dtype}: {e_base:.3e}, factor {factor}, floor {low:.1e})"
    )


def cuda_available() -> bool:
    return torch.cuda.is_available()


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_devices() -> list:
    """Devices on which Triton kernels can be exercised in this process."""
    if not is_triton_available():
        return [pytest.param("none", marks=pytest.mark.skip(reason="triton is not installed"))]
    if cuda_available():
        return ["cuda"]
    if interpreter_enabled():
        return ["cpu"]
    return [pytest.param("none", marks=pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET is not set"))]


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, generator=None) -> torch.Tensor:
    """Fresh random normal data (never zeros), generated in fp32 then cast."""
    return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)


# A tiny decoder configuration (Hugging Face config keyword arguments) the model-integration tests share.
TINY_DECODER_VOCAB = 96


def tiny_decoder_config(**overrides) -> dict:
    """Keyword arguments of a 2-layer, hidden-64, GQA decoder config; ``overrides`` replace any of them."""
    config = dict(
        vocab_size=TINY_DECODER_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    config.update(overrides)
    return config
