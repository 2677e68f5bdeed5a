"""Time a TMA-fed W8A16 tensor-core kernel against the library's W8A16 kernels and cuBLAS bf16 (CUDA).

The library's tensor-core W8A16 kernel (``triton_kernels/int8_gemm.py``) loads its tiles with pointer
loads that Triton pipelines through ``cp.async``; at M = 16 and M = 128 every tile configuration its
sweeps tried plateaus at about the same time, which points at the kernel's structure. This script
times, in one process and at the INT8 benchmark's weight shapes:

* ``tma``: the same product (int8 weight converted to bf16 in registers, fp32 accumulation, per-channel
  scale in the epilogue) with both operands loaded through host-side tensor descriptors (Hopper's bulk
  tensor copy engine), ``swap`` putting the weight on the MMA's left (register) side; split-K programs
  add their partial sums with fp32 atomics into a zeroed fp32 output (a cost upper bound: the zeroing is
  timed too; the library's split-K reduction is deterministic and does not need it);
* ``library``: ``w8a16_linear`` with the dispatcher's choice (``auto``);
* ``cublas``: bf16 ``F.linear`` on the dequantized bf16 weight.

Each time is the median of ``triton.testing.do_bench`` (L2 flushed before each run); every variant's
output is checked against a float64 product first. Prints a table per shape, best first, and writes
``int8-tma-variants-<gpu>-<date>.json`` to ``--out``.

    python scripts/int8_tma_variants.py --out results/ [--m 16,128,4096]
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

from common import environment, write_diagnostic  # noqa: E402
from rotalabs_accel.triton_kernels.int8_gemm import _grouped_tile, w8a16_linear  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)


@triton.jit
def _tma_kernel(x_desc, w_desc, s_ptr, out_ptr, M, N, K, k_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT_K: tl.constexpr, SWAP: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    k_start = pid_k * k_per_split
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in tl.range(0, k_per_split, BLOCK_K, num_stages=STAGES):
        x = x_desc.load([off_m, k_start + kk])
        w = w_desc.load([off_n, k_start + kk]).to(x.dtype)  # exact: |q| <= 127
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    if SWAP:
        om = offs_m[None, :]
        on = offs_n[:, None]
        acc = acc * s[:, None]
    else:
        om = offs_m[:, None]
        on = offs_n[None, :]
        acc = acc * s[None, :]
    mask = (om < M) & (on < N)
    ptrs = out_ptr + om.to(tl.int64) * N + on
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def configs(m: int, n: int, k: int, sms: int):
    """(block_m, block_n, block_k, split_k, swap, warps, stages) candidates for one problem: the split
    that first gives every SM a program, and twice that."""
    if m <= 16:
        tiles = [(16, bn, bk, True, 4, st) for bn in (64, 128) for bk in (128, 256) for st in (4, 6)]
    elif m <= 128:
        tiles = [(bm, bn, 128, sw, nw, 4) for bm, bn, nw in ((128, 64, 4), (64, 128, 4), (128, 128, 8))
                 for sw in (True, False)]
    else:
        tiles = [(bm, bn, 64, sw, 8, st) for bm, bn in ((128, 256), (256, 128)) for sw in (True, False)
                 for st in (3, 4)]
    out = []
    for bm, bn, bk, sw, nw, stages in tiles:
        programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        split = 1
        while programs * split < sms and k // (2 * split) >= 2 * bk:
            split *= 2
        for s in sorted({split, split * 2} if m <= 128 else {1}):
            if k // s >= 2 * bk:
                out.append((bm, bn, bk, s, sw, nw, stages))
    return out


def time_problem(m: int, n: int, k: int, dev) -> list[dict]:
    from triton.tools.tensor_descriptor import TensorDescriptor

    torch.manual_seed(0)
    w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    s = torch.rand(n, device=dev, dtype=torch.float32) * 1e-2 + 1e-3
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    wb = (w.float() * s[:, None]).to(torch.bfloat16)
    ref = (x.double() @ (w.double() * s[:, None].double()).T).float()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = [{"impl": "cublas bf16", "ms": bench(lambda: torch.nn.functional.linear(x, wb))},
            {"impl": "library auto", "ms": bench(lambda: w8a16_linear(x, w, s, None))}]
    for bm, bn, bk, split, sw, nw, stages in configs(m, n, k, sms):
        name = f"tma bm={bm} bn={bn} bk={bk} split={split} swap={int(sw)} w={nw} st={stages}"
        k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
        x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
        w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
        out = torch.empty(m, n, device=dev, dtype=torch.bfloat16 if split == 1 else torch.float32)
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)

        def run(out=out, x_desc=x_desc, w_desc=w_desc, grid=grid, kps=k_per_split, split=split, bm=bm,
                bn=bn, bk=bk, sw=sw, nw=nw, st=stages):
            if split > 1:
                out.zero_()
            _tma_kernel[grid](x_desc, w_desc, s, out, m, n, k, kps, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                              SPLIT_K=split, SWAP=sw, GROUP_M=8, STAGES=st, num_warps=nw)

        try:
            out.fill_(float("nan"))
            run()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                raise AssertionError(f"relative error {err:.2e}")
            rows.append({"impl": name, "ms": bench(run), "rel_err": err})
        except Exception as exc:  # a configuration that does not compile is a result too
            print(f"  {m}x{n}x{k} {name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    return sorted(rows, key=lambda r: r["ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--m", default="16,128,4096")
    args = parser.parse_args()
    dev = torch.device("cuda")
    print(environment(), flush=True)
    records = []
    for m in (int(v) for v in args.m.split(",")):
        for n, k in SHAPES:
            rows = time_problem(m, n, k, dev)
            t_cublas = next(r["ms"] for r in rows if r["impl"] == "cublas bf16")
            t_lib = next(r["ms"] for r in rows if r["impl"] == "library auto")
            print(f"\n== M={m} N={n} K={k}  (cuBLAS bf16 {t_cublas * 1e3:.1f} us, "
                  f"library {t_lib * 1e3:.1f} us = {t_cublas / t_lib:.2f}x)", flush=True)
            for r in rows[:12]:
                print(f"  {r['ms'] * 1e3:8.2f} us {t_cublas / r['ms']:5.2f}x cuBLAS  {r['impl']}", flush=True)
            for r in rows:
                records.append({"m": m, "n": n, "k": k, **r, "x_cublas": t_cublas / r["ms"]})
    print(f"wrote {write_diagnostic('int8-tma-variants', records, args.out)}")


if __name__ == "__main__":
    main()
