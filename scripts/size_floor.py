"""What a memory-bound kernel can reach at a given size: copies and same-traffic elementwise ops.

The benchmarks' "copy ceiling" is a 2 GiB copy. At the issues' smaller shapes (a few hundred MB moved
per call) part of every call's time does not scale with its bytes, so a fixed fraction of that ceiling
asks more of a small call than of a large one. This script measures, on one device in one run:

* ``torch.Tensor.copy_`` moving 32 MB to 2 GiB (bytes read + written), timed as the benchmarks time
  everything (``triton.testing.do_bench``: before each call it zeroes a 256 MB buffer, which leaves
  L2 full of dirty lines that the timed call must write back), and again with a flush that reads a
  256 MB buffer instead (L2 left holding clean lines): the difference is the flush's write-back;
* INT8 decode (M = 1): the W8A16 GEMV and bf16 cuBLAS at the benchmark's weight shapes, under both
  flushes (their ratio is what the INT8 target counts);
* at each benchmark shape of RMSNorm and SwiGLU, an elementwise torch op with the same traffic as the
  kernel (RMSNorm forward: ``copy_`` of x; SwiGLU forward: ``torch.add(gate, up, out=)``; fused
  add+RMSNorm forward: ``torch.add`` of x and r into s plus a copy, i.e. read 2 write 2), beside our
  kernel, under both flushes.

Usage (GPU): ``python3 scripts/size_floor.py --out DIR`` writes ``size_floor-<gpu>-<date>.json`` and
prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_ms, write_records  # noqa: E402

FLUSH_BYTES = 256 << 20


def read_flush_ms(fn, flush: torch.Tensor, reps: int = 200, warmup: int = 20) -> float:
    """Median CUDA-event time of ``fn`` after a flush that reads ``flush`` (no dirty lines left)."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.sum()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    from rotalabs_accel import rmsnorm, rmsnorm_residual_fused, swiglu_fused

    dev = "cuda"
    bf16 = torch.bfloat16
    flush = torch.ones(FLUSH_BYTES // 8, device=dev, dtype=torch.int64)
    records = []

    def measure(kind, label, fn, nbytes):
        ms_zero = bench_ms(fn)
        ms_read = read_flush_ms(fn, flush)
        rec = {"kind": kind, "label": label, "bytes": nbytes, "ms_zero_flush": ms_zero,
               "ms_read_flush": ms_read, "gbps_zero_flush": nbytes / ms_zero / 1e6,
               "gbps_read_flush": nbytes / ms_read / 1e6}
        records.append(rec)
        print(f"{kind:14s} {label:34s} {nbytes / 1e6:9.1f} MB  zero-flush {ms_zero * 1e3:8.1f} us "
              f"{rec['gbps_zero_flush']:6.0f} GB/s   read-flush {ms_read * 1e3:8.1f} us "
              f"{rec['gbps_read_flush']:6.0f} GB/s", flush=True)

    for total_mb in (32, 64, 128, 256, 512, 1024, 2048):
        n = (total_mb << 20) // 4  # bf16 elements per side: read n*2 + write n*2 bytes
        src = torch.randn(n, device=dev, dtype=bf16)
        dst = torch.empty_like(src)
        measure("copy", f"copy_ {total_mb} MiB moved", lambda d=dst, s=src: d.copy_(s), 4 * n)

    with torch.no_grad():
        for m, n in ((16384, 4096), (16384, 8192), (4096, 4096), (4096, 65536), (1024, 262144)):
            x = torch.randn(m, n, device=dev, dtype=bf16)
            w = (torch.randn(n, device=dev) * 0.1 + 1).to(bf16)
            y = torch.empty_like(x)
            nbytes = 4 * m * n
            measure("rmsnorm_fwd", f"ours {m}x{n}", lambda x=x, w=w: rmsnorm(x, w, 1e-6), nbytes)
            measure("rmsnorm_fwd", f"copy_ same bytes {m}x{n}", lambda x=x, y=y: y.copy_(x), nbytes)
            torch.cuda.empty_cache()
        for m, n in ((16384, 4096), (16384, 8192)):
            x = torch.randn(m, n, device=dev, dtype=bf16)
            r = torch.randn(m, n, device=dev, dtype=bf16)
            w = (torch.randn(n, device=dev) * 0.1 + 1).to(bf16)
            nbytes = 8 * m * n
            fused = lambda x=x, r=r, w=w: rmsnorm_residual_fused(x, r, w, 1e-6)  # noqa: E731
            measure("add_rmsnorm_fwd", f"ours {m}x{n}", fused, nbytes)
            both = torch.cat([x, r])
            both_out = torch.empty_like(both)
            measure("add_rmsnorm_fwd", f"copy_ same bytes {m}x{n}", lambda a=both, o=both_out: o.copy_(a),
                    nbytes)
            torch.cuda.empty_cache()
        for m, n in ((16384, 14336), (4096, 11008)):
            gate = torch.randn(m, n, device=dev, dtype=bf16)
            up = torch.randn(m, n, device=dev, dtype=bf16)
            out = torch.empty_like(gate)
            nbytes = 6 * m * n
            measure("swiglu_fwd", f"ours {m}x{n}", lambda g=gate, u=up: swiglu_fused(g, u), nbytes)
            measure("swiglu_fwd", f"torch.add same bytes {m}x{n}",
                    lambda g=gate, u=up, o=out: torch.add(g, u, out=o), nbytes)
            torch.cuda.empty_cache()

        # INT8 decode (M = 1): the W8A16 GEMV beside bf16 cuBLAS; weight bytes only (int8 N K vs bf16 2 N K).
        from rotalabs_accel import int8_gemm
        from rotalabs_accel.quantization.symmetric import quantize_weight_per_channel

        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
            wf = torch.randn(n, k, device=dev, dtype=bf16) * 0.02
            q, sc = quantize_weight_per_channel(wf)
            x1 = torch.randn(1, k, device=dev, dtype=bf16)
            measure("int8_m1", f"ours w8a16 1x{n}x{k}", lambda x=x1, q=q, sc=sc: int8_gemm(x, q, sc), n * k)
            measure("int8_m1", f"cublas bf16 1x{n}x{k}",
                    lambda x=x1, wf=wf: torch.nn.functional.linear(x, wf), 2 * n * k)
            torch.cuda.empty_cache()

    write_records(args.out, "size_floor", "scripts/size_floor.py", argv, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
