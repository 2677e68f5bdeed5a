"""Time PyTorch's SDPA backends at the end-to-end training shape (CUDA only).

Batch 2 x 4096 tokens, 32 query / 8 key-value heads of 128, causal, bf16, laid out as Hugging Face's
Llama attention passes them (``(batch, heads, seq, dim)`` views of ``(batch, seq, heads, dim)``
projections). For each backend: forward and forward+backward median time (``triton.testing.do_bench``),
TFLOP/s of the causal attention (forward ``2 * 2 * b * h * s^2 * d / 2``, backward 2.5x that), and the
largest difference from the flash backend's output and gradients; with the key/value heads shared
through ``enable_gqa=True`` and with them repeated first (what Hugging Face does when ``enable_gqa`` is
not used).

    python scripts/attention_backends.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

B, S, HQ, HK, D = 2, 4096, 32, 8, 128


def main() -> None:
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    q0 = torch.randn(B, S, HQ, D, device=dev, dtype=bf).transpose(1, 2)
    k0 = torch.randn(B, S, HK, D, device=dev, dtype=bf).transpose(1, 2)
    v0 = torch.randn(B, S, HK, D, device=dev, dtype=bf).transpose(1, 2)
    go = torch.randn(B, HQ, S, D, device=dev, dtype=bf)
    fwd_flop = 4 * B * HQ * S * S * D / 2
    print(f"torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name()}")

    def run(backend, gqa, grad):
        q, k, v = (t.detach().requires_grad_(grad) for t in (q0, k0, v0))
        with sdpa_kernel(backend):
            if gqa:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                kr = k.repeat_interleave(HQ // HK, dim=1)
                vr = v.repeat_interleave(HQ // HK, dim=1)
                out = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        if not grad:
            return out, None
        return out, torch.autograd.grad(out, (q, k, v), go)

    ref_out, ref_grads = run(SDPBackend.FLASH_ATTENTION, True, True)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for gqa in (True, False):
            name = f"{backend.name:20s} {'enable_gqa' if gqa else 'repeat_kv '}"
            try:
                out, grads = run(backend, gqa, True)
                err = max([(out - ref_out).abs().max().item()]
                          + [(g - r).abs().max().item() for g, r in zip(grads, ref_grads)])
                t_f = do_bench(lambda b=backend, g=gqa: run(b, g, False), warmup=25, rep=200)
                t_fb = do_bench(lambda b=backend, g=gqa: run(b, g, True), warmup=25, rep=200)
            except Exception as e:  # a backend that refuses the inputs: say so and go on
                print(f"{name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                continue
            print(f"{name}: fwd {t_f:.3f} ms ({fwd_flop / t_f / 1e9:.0f} TFLOP/s), "
                  f"fwd+bwd {t_fb:.3f} ms ({3.5 * fwd_flop / t_fb / 1e9:.0f} TFLOP/s), "
                  f"max |diff| vs flash {err:.3g}")


if __name__ == "__main__":
    main()
