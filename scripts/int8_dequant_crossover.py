"""Where the W8A16 ``dequant`` variant overtakes the tensor-core ``gemm`` kernel (CUDA only).

``dequant`` writes the weight in the activation dtype (1 byte read, 2 written per weight element) and
hands the product to cuBLAS; ``gemm`` converts the int8 tiles in registers. The first pays a fixed
memory-bound cost per call and then runs at cuBLAS's speed, so it wins from some row count on. This
script times, at the INT8 benchmark's weight shapes and M = 256 ... 4096 (bf16):

* ``cublas bf16``: ``F.linear`` on a bf16 weight (the peer);
* ``gemm`` and ``dequant``: ``w8a16_linear`` with the variant forced;
* ``dequantize_weight``: the dequantization alone (its GB/s against the copy ceiling).

Each time is the median of ``triton.testing.do_bench`` (L2 flushed before each run); outputs are checked
against a float64 product first. Writes ``int8-dequant-crossover-<gpu>-<date>.json`` to ``--out``;
``int8_config.DEQUANT_MIN_ROWS`` is read off it.

    python scripts/int8_dequant_crossover.py --out results/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import environment, write_diagnostic  # noqa: E402
from rotalabs_accel.triton_kernels.int8_gemm import dequantize_weight, w8a16_linear  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)
ROWS = [256, 512, 1024, 1536, 2048, 3072, 4096]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def time_shape(n: int, k: int, dev, records: list) -> None:
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    s = torch.rand(n, device=dev, dtype=torch.float32) * 1e-2 + 1e-3
    wb = dequantize_weight(q, s, None, torch.bfloat16)
    ms = bench(lambda: dequantize_weight(q, s, None, torch.bfloat16, out=wb))
    gbps = 3 * n * k / ms / 1e6
    records.append({"n": n, "k": k, "m": 0, "impl": "dequantize_weight", "ms": ms, "GBps": gbps})
    print(f"== N={n} K={k}: dequantize_weight {ms * 1e3:.1f} us ({gbps:,.0f} GB/s)", flush=True)
    for m in ROWS:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ (q.double() * s[:, None].double()).T
        row = {"cublas bf16": bench(lambda x=x: torch.nn.functional.linear(x, wb))}
        for variant in ("gemm", "dequant"):
            out = w8a16_linear(x, q, s, None, None, variant)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (variant, m, n, k, err)
            row[variant] = bench(lambda v=variant, x=x: w8a16_linear(x, q, s, None, None, v))
            records.append({"n": n, "k": k, "m": m, "impl": variant, "ms": row[variant], "rel_err": err})
        records.append({"n": n, "k": k, "m": m, "impl": "cublas bf16", "ms": row["cublas bf16"]})
        cb = row["cublas bf16"]
        print(f"  M={m:5d}: cuBLAS {cb * 1e3:7.1f} us | gemm {row['gemm'] * 1e3:7.1f} us "
              f"({cb / row['gemm']:.2f}x) | dequant {row['dequant'] * 1e3:7.1f} us "
              f"({cb / row['dequant']:.2f}x) -> {'dequant' if row['dequant'] < row['gemm'] else 'gemm'}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    dev = torch.device("cuda")
    print(environment(), flush=True)
    records: list = []
    for n, k in SHAPES:
        time_shape(n, k, dev, records)
        torch.cuda.empty_cache()
    print(f"wrote {write_diagnostic('int8-dequant-crossover', records, args.out)}")


if __name__ == "__main__":
    main()
