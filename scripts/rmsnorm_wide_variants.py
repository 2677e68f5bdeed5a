"""Time structural variants of the wide-row RMSNorm forward (the ``chunked`` strategy) on a CUDA GPU.

The chunked forward reads each row twice: pass 1 sums the squares, pass 2 reads the row again (from
L2: at 4096x65536 Nsight Compute counts 1.02x the input's bytes read from DRAM) and writes the output.
Its time still trails a copy of the same bytes by about 8% there, with no traffic to blame; what is
left is the wait at each row's reduction, between its last pass-1 load and its first pass-2 load.
This script times, beside the library's kernel and a ``copy_`` of the same bytes, in one process:

* ``early``: the first pass-2 chunk's load issued before the reduction (it does not depend on the
  result), so its latency overlaps the reduction's;
* ``pipelined``: each step of the loop does one pass-2 chunk of the current row and one pass-1 chunk
  of the next row, so the reduction that ends a row's pass 1 meets loads already in flight and every
  step both reads from memory and writes to it.

bf16, ``llama`` casting, a weight, no residual; the outputs are checked against the library's.

    python3 scripts/rmsnorm_wide_variants.py --out DIR [--shapes 4096x65536,2048x65536]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import bench_ms, environment, write_diagnostic  # noqa: E402
from rotalabs_accel.triton_kernels.rmsnorm import (  # noqa: E402
    RMSNormConfig,
    _load_scale,
    _normalized,
    _rstd,
    rmsnorm_forward,
)


@triton.jit
def _early_kernel(X, stride_x, W, Y, stride_y, M, N, eps, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    x_ty = X.dtype.element_ty
    offs = tl.arange(0, BLOCK_N)
    num_chunks = tl.cdiv(N, BLOCK_N)
    last = (num_chunks - 1) * BLOCK_N + offs
    for row in range(pid, M, num_programs):
        row64 = tl.cast(row, tl.int64)
        x_row = X + row64 * stride_x
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        x_next = tl.load(x_row + offs, mask=offs < N, other=0.0, eviction_policy="evict_last")
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            x = x_next
            x_next = tl.load(x_row + cols + BLOCK_N, mask=cols + BLOCK_N < N, other=0.0,
                             eviction_policy="evict_last")
            xf = x.to(tl.float32)
            acc += xf * xf
        # pass 2's first chunk is on its way while the row's sum is reduced
        x_next = tl.load(x_row + last, mask=last < N, other=0.0, eviction_policy="evict_first")
        rstd = _rstd(tl.sum(acc, axis=0), N, eps)
        for i in range(0, num_chunks):
            cols = last - i * BLOCK_N
            mask = cols < N
            xf = x_next.to(tl.float32)
            prev = cols - BLOCK_N
            x_next = tl.load(x_row + prev, mask=(prev >= 0) & (prev < N), other=0.0,
                             eviction_policy="evict_first")
            y = _normalized(xf, rstd, x_ty, 0) * _load_scale(W, cols, mask, 0.0, 0)
            tl.store(Y + row64 * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask,
                     eviction_policy="evict_first")


@triton.jit
def _pipelined_kernel(X, stride_x, W, Y, stride_y, M, N, eps, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    x_ty = X.dtype.element_ty
    offs = tl.arange(0, BLOCK_N)
    num_chunks = tl.cdiv(N, BLOCK_N)
    last = (num_chunks - 1) * BLOCK_N + offs
    # pass 1 of this program's first row
    row = pid
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if row < M:
        x_row = X + tl.cast(row, tl.int64) * stride_x
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            xf = tl.load(x_row + cols, mask=cols < N, other=0.0, eviction_policy="evict_last")
            xf = xf.to(tl.float32)
            acc += xf * xf
    rstd = _rstd(tl.sum(acc, axis=0), N, eps)
    for row in range(pid, M, num_programs):
        row64 = tl.cast(row, tl.int64)
        x_row = X + row64 * stride_x
        nxt = row + num_programs
        n_row = X + tl.cast(nxt, tl.int64) * stride_x
        n_cols = tl.where(nxt < M, N, 0)  # the next row's columns to read (none past the last row)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, num_chunks):
            # one chunk of the next row's pass 1 ...
            c1 = i * BLOCK_N + offs
            xn = tl.load(n_row + c1, mask=c1 < n_cols, other=0.0, eviction_policy="evict_last")
            # ... and one of this row's pass 2, last chunks first (the likeliest still in L2)
            c2 = last - i * BLOCK_N
            m2 = c2 < N
            xf = tl.load(x_row + c2, mask=m2, other=0.0, eviction_policy="evict_first").to(tl.float32)
            y = _normalized(xf, rstd, x_ty, 0) * _load_scale(W, c2, m2, 0.0, 0)
            tl.store(Y + row64 * stride_y + c2, y.to(Y.dtype.element_ty), mask=m2,
                     eviction_policy="evict_first")
            xnf = xn.to(tl.float32)
            acc += xnf * xnf
        rstd = _rstd(tl.sum(acc, axis=0), N, eps)


def time_shape(m: int, n: int, sms: int) -> list[dict]:
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * 2 + n * 2

    def library(cfg=None):
        return rmsnorm_forward(x, w, 1e-6, 0.0, "llama", store_rstd=False, config=cfg)[0]

    ref = library()
    cases = [("copy_ (same bytes)", lambda: y.copy_(x), False), ("library (heuristic)", library, False)]
    for bn in (4096, 8192, 16384):
        for warps in (16, 32):
            cfg = RMSNormConfig("chunked", block_n=bn, num_warps=warps, programs_per_sm=1, prefetch=True)
            cases.append((f"library chunked bn={bn} w={warps} pps=1 prefetch", lambda c=cfg: library(c),
                          False))
            for pps in (1, 2):
                for name, kern in (("early", _early_kernel), ("pipelined", _pipelined_kernel)):
                    def run(k=kern, b=bn, nw=warps, p=pps):
                        k[(min(m, p * sms),)](x, x.stride(0), w, y, y.stride(0), m, n, 1e-6, BLOCK_N=b,
                                              num_warps=nw)
                    cases.append((f"{name} bn={bn} w={warps} pps={pps}", run, True))
    rows, records = [], []
    for name, fn, check in cases:
        try:
            fn()
            if check:
                torch.cuda.synchronize()
                if not torch.equal(y, ref):
                    err = (y.float() - ref.float()).abs().max().item()
                    raise AssertionError(f"differs from the library: max {err:.3g}")
            ms = bench_ms(fn)
        except Exception as exc:
            print(f"  {m}x{n} {name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        rows.append((name, ms))
        records.append({"shape": [m, n], "impl": name, "ms": ms, "GBps": nbytes / ms / 1e6})
    print(f"\n== {m}x{n}", flush=True)
    for name, ms in sorted(rows, key=lambda r: r[1]):
        print(f"  {ms * 1e3:8.1f} us {nbytes / ms / 1e6:7.0f} GB/s  {name}", flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--shapes", default="4096x65536,16384x16384,2048x131072")
    args = parser.parse_args()
    print(environment(), flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    records = []
    for spec in args.shapes.split(","):
        m, n = (int(v) for v in spec.split("x"))
        records += time_shape(m, n, sms)
        torch.cuda.empty_cache()
    print(f"wrote {write_diagnostic('rmsnorm-wide-variants', records, args.out)}")


if __name__ == "__main__":
    main()
