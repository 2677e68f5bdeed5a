"""A/B timing of RMSNorm forward launch configurations at one shape (CUDA only).

Sweeps time each configuration once; at shapes of a few tens of microseconds two configurations a few
percent apart can trade places between runs. This alternates the candidates for several rounds in
one process and reports each one's median over the rounds (each round itself a ``do_bench`` median).

    python scripts/rmsnorm_ab.py --shape 4096x4096 --rounds 7

Where ``liger_kernel`` is importable, Liger-Kernel's ``LigerRMSNorm`` joins the rounds, and a
``torch.Tensor.copy_`` of the same bytes (read x, write y) gives the machine's ceiling at this size.
``torch.compile`` of the Hugging Face-style eager norm (the benchmark's ``compile`` peer) joins too; run
with ``TORCH_LOGS=output_code`` to see the kernel it generates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import rotalabs_accel as ra  # noqa: E402
from bench_rmsnorm import eager_hf  # noqa: E402  (the benchmark's compile peer, compiled the same way)
from rotalabs_accel.triton_kernels import rmsnorm as k  # noqa: E402
from rotalabs_accel.triton_kernels.rmsnorm import RMSNormConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="4096x4096", help="rows x hidden (bf16)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    m, n = (int(v) for v in args.shape.lower().split("x"))
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    candidates = {
        "table": k.forward_config(m, n, 2, sms),
        "one row per program, 8 warps": RMSNormConfig("tile", triton.next_power_of_2(n), 8),
        "persistent 2 rows, 4/SM, prefetch": RMSNormConfig("tile", triton.next_power_of_2(n), 8, 2, 4, True),
        "persistent 1 row, 4/SM, prefetch": RMSNormConfig("tile", triton.next_power_of_2(n), 8, 1, 4, True),
        "one row per program, 4 warps": RMSNormConfig("tile", triton.next_power_of_2(n), 4),
        "one row per program, 16 warps": RMSNormConfig("tile", triton.next_power_of_2(n), 16),
    }
    fns = {name: (lambda cfg=cfg: k.rmsnorm_forward(x, w, 1e-6, 0.0, "llama", config=cfg))
           for name, cfg in candidates.items()}
    fns["public rotalabs_accel.rmsnorm (table pick)"] = lambda: ra.rmsnorm(x, w)
    y = torch.empty_like(x)
    fns["copy of the same bytes (x -> y)"] = lambda: y.copy_(x)
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except ImportError:
        print("liger_kernel not importable: Liger-Kernel left out")
    else:
        liger = LigerRMSNorm(n, eps=1e-6).to("cuda", torch.bfloat16)
        liger.weight.data.copy_(w)
        fns["Liger-Kernel LigerRMSNorm"] = lambda: liger(x)
    compiled = torch.compile(eager_hf, dynamic=False)
    fns["torch.compile of the eager HF norm"] = lambda: compiled(x, w)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    nbytes = 2 * m * n * 2
    print(f"{torch.cuda.get_device_name()} bf16 {m}x{n}, {args.rounds} rounds")
    print(f"  table pick: {candidates['table']}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:44s} median {med * 1e3:7.2f} us ({nbytes / med / 1e6:,.0f} GB/s); "
              f"rounds {min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f} us")


if __name__ == "__main__":
    main()
