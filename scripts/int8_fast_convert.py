"""fp16 activations: the W8A16 tensor-core kernels with the inline-PTX int8 -> fp16 conversion
(``DotConfig.fast_convert``, the default) against Triton's own conversion, on a CUDA GPU.

For each M and benchmark weight shape, the tiles the dispatcher picks (the tuned GEMM's at M >= 1536,
where "auto" runs the dequant variant) run with ``fast_convert`` on and off; the outputs are compared
bit for bit and both are timed with ``triton.testing.do_bench`` (median), beside bf16 cuBLAS of the same
problem in fp16. bf16 activations are timed too, as the control: their conversion does not change.

    PYTHONPATH=src python scripts/int8_fast_convert.py
"""

import dataclasses
import datetime
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rotalabs_accel.triton_kernels import int8_gemm as K  # noqa: E402
from rotalabs_accel.triton_kernels.int8_config import select_w8a16  # noqa: E402


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def main() -> None:
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# {torch.cuda.get_device_name()} · torch {torch.__version__} · Triton {triton.__version__} · "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}")
    print("# command: PYTHONPATH=src python scripts/int8_fast_convert.py")
    print("| dtype | M | N x K | kernel | fast_convert us | plain us | plain / fast | equal bits "
          "| F.linear us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in (16, 128, 4096):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
            q = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
            s = torch.rand(n, device="cuda") * 1e-3
            for dtype in (torch.float16, torch.bfloat16):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                kernel = "gemm" if m >= 1536 else "auto"
                variant, cfg = select_w8a16(m, n, k, None, kernel, sms, False)
                off = dataclasses.replace(cfg, fast_convert=False)
                def run(c, x=x, q=q, s=s, variant=variant):
                    return K.w8a16_linear(x, q, s, None, None, variant, c)

                y_fast, y_plain = run(cfg), run(off)
                fast = bench(lambda: run(cfg))  # noqa: B023 (timed before the loop moves on)
                plain = bench(lambda: run(off))  # noqa: B023
                w = q.to(dtype) * s[:, None].to(dtype)
                ref = bench(lambda: torch.nn.functional.linear(x, w))  # noqa: B023
                print(f"| {str(dtype)[6:]} | {m} | {n}x{k} | {variant} | {fast:.1f} | {plain:.1f} | "
                      f"{plain / fast:.3f} | {torch.equal(y_fast, y_plain)} | {ref:.1f} |", flush=True)


if __name__ == "__main__":
    main()
