"""Host time of a W8A16 split-K call with TMA-fed tiles against pointer loads, on a CUDA GPU.

A TMA launch hands the kernel one encoded tensor map per descriptor; this prints, per problem and
load kind, the CPU time to issue one call (2000 calls of a tiny problem, 200 of a benchmark one,
without synchronizing: the host's own cost when it is the bottleneck) and the wall time per call
(the GPU's when it is), then the ``triton.testing.do_bench`` median of both at 128 x 4096 x 14336.

    PYTHONPATH=src python scripts/int8_tma_host_cost.py
"""

import sys
import time
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rotalabs_accel.triton_kernels import int8_gemm as K  # noqa: E402
from rotalabs_accel.triton_kernels.int8_config import DotConfig  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    for m, n, k in [(128, 256, 256), (128, 4096, 14336)]:
        q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        s = torch.rand(n, device="cuda") * 1e-2
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for tma in (False, True):
            cfg = DotConfig(128, 128, 128, split_k=4, num_warps=8, num_stages=4, swap_ab=True, tma=tma)
            for _ in range(20):
                K.w8a16_linear(x, q, s, None, None, "splitk", cfg)
            torch.cuda.synchronize()
            reps = 2000 if n == 256 else 200
            t0 = time.perf_counter()
            for _ in range(reps):
                K.w8a16_linear(x, q, s, None, None, "splitk", cfg)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            print(f"m={m} n={n} k={k} tma={tma}: host {1e6 * (t1 - t0) / reps:.1f} us/call, "
                  f"wall {1e6 * (t2 - t0) / reps:.1f} us/call", flush=True)
    m, n, k = 128, 4096, 14336
    q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    s = torch.rand(n, device="cuda") * 1e-2
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for tma in (False, True):
        cfg = DotConfig(128, 128, 128, split_k=8, num_warps=8, num_stages=4, swap_ab=True, tma=tma)
        ms = triton.testing.do_bench(lambda cfg=cfg: K.w8a16_linear(x, q, s, None, None, "splitk", cfg),
                                     warmup=20, rep=200, return_mode="median")
        print("do_bench 128x4096x14336 split8 swap tma", tma, ms * 1e3, "us", flush=True)


if __name__ == "__main__":
    main()
