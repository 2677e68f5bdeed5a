"""Time W8A16 GEMV (M = 1) kernel structures against the memory floor, on a CUDA GPU.

The library's GEMV (``triton_kernels/int8_gemm.py``) plateaus near the same time for every tile
configuration its sweep tried, which points at the kernel's structure rather than its tiles. This
script times, at the decode shapes of the INT8 benchmark, in one process:

* ``floor``: a kernel that only reads the int8 weight (sums its bytes) with the same tiling: what a
  GEMV could reach if its arithmetic were free;
* ``library``: the library's GEMV through ``w8a16_linear(kernel="gemv")`` with its tuned tiles;
* ``variant``: one GEMV kernel with switches for the structure: the loop pipelined through shared
  memory (``stages >= 2``, cp.async) or plain register loads (``stages = 1``), cache hints (weight
  ``evict_first``, activation ``evict_last``), and a whole row block per step (``block_k = K``: every
  load of the program issued before the first multiply);
* ``unrolled``: the K loop unrolled at compile time (``K / block_k`` blocks, every weight load free to
  be issued before the first multiply), each block's products summed at once or accumulated
  elementwise;
* ``floor flat read``: ``benchmarks/read_floor.py``'s read-only kernel (contiguous runs of words);
* ``cublas``: bf16 ``F.linear`` on the bf16 weight, for the ratio the issue asks about.

Each time is the median of ``triton.testing.do_bench`` (L2 flushed before each run). Prints a table
per shape, best first, and writes ``gemv-variants-<gpu>-<date>.json`` to ``--out``.

    python scripts/gemv_variants.py --out results/
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
from rotalabs_accel.triton_kernels.int8_gemm import _int8_to_f32, w8a16_linear  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


@triton.jit
def _floor_kernel(w_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  STAGES: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.minimum(pid * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for _ in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        acc += tl.load(ptrs, eviction_policy="evict_first").to(tl.int32)
        ptrs += BLOCK_K
    tl.store(out_ptr + rows, tl.sum(acc, axis=1))


@triton.jit
def _gemv_variant(x_ptr, w_ptr, s_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, STAGES: tl.constexpr, HINTS: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_k
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for _ in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        if HINTS:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptrs, eviction_policy="evict_last")
        else:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        acc += _int8_to_f32(w) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1) * tl.load(s_ptr + rows)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _gemv_unrolled(x_ptr, w_ptr, s_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr, PER_STEP_SUM: tl.constexpr):
    # The K loop unrolled (K_STEPS blocks, no loop-carried pointer): every weight load of the program
    # can be in flight before the first multiply, without one fp32 accumulator per weight element of a
    # whole-K tile. PER_STEP_SUM reduces each block's products over K at once (one cross-thread sum per
    # block); otherwise they accumulate elementwise and are summed once at the end.
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    if PER_STEP_SUM:
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for i in tl.static_range(K_STEPS):
        w = tl.load(w_ptrs + i * BLOCK_K, eviction_policy="evict_first")
        x = tl.load(x_ptr + i * BLOCK_K + offs_k, eviction_policy="evict_last")
        prod = _int8_to_f32(w) * x.to(tl.float32)[None, :]
        if PER_STEP_SUM:
            total += tl.sum(prod, axis=1)
        else:
            acc += prod
    if not PER_STEP_SUM:
        total = tl.sum(acc, axis=1)
    out = total * tl.load(s_ptr + rows)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def unrolled_configs(k: int):
    for block_n in (1, 2, 4, 8):
        for block_k in (512, 1024, 2048):
            if k % block_k or k // block_k > 16:
                continue
            for warps in (2, 4, 8):
                if block_n * block_k < 16 * 32 * warps:  # fewer than 16 bytes per thread per block
                    continue
                for per_step in (0, 1):
                    if not per_step and block_n * block_k > 64 * 32 * warps:
                        continue  # more than 64 fp32 accumulators per thread
                    yield block_n, block_k, warps, per_step


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def variant_configs(k: int):
    for block_n in (1, 2, 4, 8):
        for block_k in (512, 1024, 2048, 4096):
            if block_k > k or not 2048 <= block_n * block_k <= 16384:
                continue
            for warps in (2, 4):
                if block_n * block_k < 16 * 32 * warps:  # fewer than 16 bytes per thread
                    continue
                for stages in (1, 3):
                    if stages > 1 and block_k == k:
                        continue  # one step: nothing to pipeline
                    for hints in (0, 1):
                        yield block_n, block_k, warps, stages, hints


FLOOR_CONFIGS = ((4, 512, 4, 3), (8, 256, 2, 3), (2, 4096, 4, 1), (4, 2048, 4, 1))


def time_shape(n: int, k: int, dev: torch.device,
               unrolled_only: bool = False) -> list[tuple[str, float, int]]:
    """(name, ms, bytes counted) for every implementation at one weight shape, fastest first."""
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    s = torch.rand(n, device=dev, dtype=torch.float32) * 1e-2 + 1e-3
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    wb = (w.float() * s[:, None]).to(torch.bfloat16)
    ref = (x.double() @ (w.double() * s[:, None].double()).T).float()
    out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    floor_out = torch.empty(n, device=dev, dtype=torch.int32)
    rows = [("cublas bf16", bench(lambda: torch.nn.functional.linear(x, wb)), 2 * n * k),
            ("library gemv (tuned)", bench(lambda: w8a16_linear(x, w, s, None, kernel="gemv")), n * k)]
    for block_n, block_k, warps, stages in FLOOR_CONFIGS:
        if block_k > k:
            continue

        def run_floor(bn=block_n, bk=block_k, nw=warps, st=stages):
            _floor_kernel[(triton.cdiv(n, bn),)](w, floor_out, n, k, w.stride(0), BLOCK_N=bn, BLOCK_K=bk,
                                                 STAGES=st, num_warps=nw)

        name = f"floor read-only bn={block_n} bk={block_k} w={warps} st={stages}"
        rows.append((name, bench(run_floor), n * k))
    from read_floor import read_floor_ms

    floor_ms, floor_cfg = read_floor_ms(w, bench)
    rows.append((f"floor flat read (benchmarks/read_floor.py, best {floor_cfg})", floor_ms, n * k))
    for block_n, block_k, warps, per_step in unrolled_configs(k):
        def run_unrolled(bn=block_n, bk=block_k, nw=warps, ps=per_step):
            _gemv_unrolled[(triton.cdiv(n, bn),)](x, w, s, out, n, k, w.stride(0), BLOCK_N=bn, BLOCK_K=bk,
                                                  K_STEPS=k // bk, PER_STEP_SUM=ps, num_warps=nw)

        name = f"unrolled bn={block_n} bk={block_k} w={warps} per_step_sum={per_step}"
        try:
            run_unrolled()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            if err > 1e-2:
                raise AssertionError(f"relative error {err:.2e}")
            rows.append((name, bench(run_unrolled), n * k))
        except Exception as exc:
            print(f"  {n}x{k} {name}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    if unrolled_only:
        return sorted(rows, key=lambda r: r[1])
    for block_n, block_k, warps, stages, hints in variant_configs(k):
        if k % block_k:
            continue

        def run(bn=block_n, bk=block_k, nw=warps, st=stages, h=hints):
            _gemv_variant[(triton.cdiv(n, bn),)](x, w, s, out, n, k, w.stride(0), BLOCK_N=bn, BLOCK_K=bk,
                                                 STAGES=st, HINTS=h, num_warps=nw)

        name = f"variant bn={block_n} bk={block_k} w={warps} st={stages} hints={hints}"
        try:
            run()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            if err > 1e-2:
                raise AssertionError(f"relative error {err:.2e}")
            rows.append((name, bench(run), n * k))
        except Exception as exc:  # a configuration that does not compile is a result too
            print(f"  {n}x{k} {name}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    return sorted(rows, key=lambda r: r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--shapes", default=None, help="NxK,NxK,... (default: the decode shapes)")
    parser.add_argument("--unrolled-only", action="store_true",
                        help="time the unrolled variants (and the references) but not the looped ones")
    args = parser.parse_args()
    shapes = SHAPES
    if args.shapes is not None:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dev = torch.device("cuda")
    print(environment(), flush=True)
    records = []
    for n, k in shapes:
        rows = time_shape(n, k, dev, args.unrolled_only)
        t_cublas = next(ms for name, ms, _ in rows if name == "cublas bf16")
        t_lib = next(ms for name, ms, _ in rows if name.startswith("library"))
        print(f"\n== N={n} K={k}  (cuBLAS bf16 {t_cublas * 1e3:.1f} us, library GEMV {t_lib * 1e3:.1f} us = "
              f"{t_cublas / t_lib:.2f}x)", flush=True)
        for name, ms, nbytes in rows[:25]:
            print(f"  {ms * 1e3:7.2f} us {nbytes / ms / 1e6:7.0f} GB/s {t_cublas / ms:5.2f}x cuBLAS  {name}",
                  flush=True)
        for name, ms, nbytes in rows:
            records.append({"n": n, "k": k, "impl": name, "ms": ms, "GBps": nbytes / ms / 1e6,
                            "x_cublas": t_cublas / ms})
    print(f"wrote {write_diagnostic('gemv-variants', records, args.out)}")


if __name__ == "__main__":
    main()
