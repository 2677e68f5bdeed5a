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

    python scripts/int8_dequant_crossover.py --out results/ [--experiments]

``--experiments`` times instead the dequantization kernel's tiles and, at M = 4096, transient buffers
smaller than ``DEQUANT_MAX_BUFFER_BYTES`` (``int8-dequant-experiments-<gpu>-<date>.json``).
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


DEQUANT_TILES = [(8, 1024, 4), (16, 1024, 8), (4, 2048, 4), (32, 512, 8), (16, 2048, 8), (8, 512, 2)]
BUFFER_MIB = [8, 16, 32, 64]


def dequant_experiments(n: int, k: int, dev, records: list) -> None:
    """The dequantization's tiles, and the dequant variant at M = 4096 with smaller transient buffers
    (column chunks whose dequantized weight may stay in L2 for the GEMM that reads it)."""
    from rotalabs_accel.triton_kernels import int8_config
    from rotalabs_accel.triton_kernels.int8_config import DequantConfig

    torch.manual_seed(0)
    q = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    s = torch.rand(n, device=dev, dtype=torch.float32) * 1e-2 + 1e-3
    wb = dequantize_weight(q, s, None, torch.bfloat16)
    for bn, bk, warps in DEQUANT_TILES:
        cfg = DequantConfig(bn, bk, warps)
        assert torch.equal(dequantize_weight(q, s, None, torch.bfloat16, config=cfg), wb)
        ms = bench(lambda cfg=cfg: dequantize_weight(q, s, None, torch.bfloat16, out=wb, config=cfg))
        records.append({"n": n, "k": k, "m": 0, "impl": f"dequantize_weight {cfg}", "ms": ms,
                        "GBps": 3 * n * k / ms / 1e6})
        print(f"  dequantize {bn}x{bk} w{warps}: {ms * 1e3:6.1f} us ({3 * n * k / ms / 1e6:,.0f} GB/s)",
              flush=True)
    x = torch.randn(4096, k, device=dev, dtype=torch.bfloat16)
    cb = bench(lambda: torch.nn.functional.linear(x, wb))
    default = int8_config.DEQUANT_MAX_BUFFER_BYTES
    try:
        for mib in BUFFER_MIB + [default >> 20]:
            int8_config.DEQUANT_MAX_BUFFER_BYTES = mib << 20
            ms = bench(lambda: w8a16_linear(x, q, s, None, None, "dequant"))
            records.append({"n": n, "k": k, "m": 4096, "impl": f"dequant buffer {mib} MiB", "ms": ms,
                            "cublas_ms": cb})
            print(f"  M=4096 dequant, buffer {mib:4d} MiB: {ms * 1e3:7.1f} us ({cb / ms:.3f}x cuBLAS "
                  f"{cb * 1e3:.1f} us)", flush=True)
    finally:
        int8_config.DEQUANT_MAX_BUFFER_BYTES = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--experiments", action="store_true",
                        help="instead: the dequantization's tiles and smaller transient buffers at M = 4096")
    args = parser.parse_args()
    dev = torch.device("cuda")
    print(environment(), flush=True)
    records: list = []
    for n, k in SHAPES:
        if args.experiments:
            print(f"== N={n} K={k}", flush=True)
            dequant_experiments(n, k, dev, records)
        else:
            time_shape(n, k, dev, records)
        torch.cuda.empty_cache()
    stem = "int8-dequant-experiments" if args.experiments else "int8-dequant-crossover"
    print(f"wrote {write_diagnostic(stem, records, args.out)}")


if __name__ == "__main__":
    main()
