"""How fast can a Triton ``tl.dot`` GEMM on this GPU and Triton be at the W8A16 prefill size (M = 4096)?

The W8A16 tensor-core GEMM converts each int8 weight tile to bf16 in registers and then runs the
same ``tl.dot`` main loop as any Triton GEMM, so a plain bf16 x bf16 Triton GEMM of the same tiles,
with no conversion at all, bounds what it can reach. For each benchmark weight shape (N x K) this
times, with ``triton.testing.do_bench`` (median, L2 flushed before each run):

* bf16 cuBLAS (``F.linear``), the reference of the issue's ratio;
* the library's W8A16 GEMM variant with its tuned tiles (``int8_gemm(..., kernel="gemm")``'s
  launcher);
* a minimal Triton GEMM defined here, over a handful of tiles, fed (a) the bf16 weight and (b) the
  int8 weight converted with ``.to(bf16)`` and scaled per channel in the epilogue; each with pointer
  loads and with host-side TMA descriptors.

Outputs are checked against cuBLAS's (max relative error) before timing. Writes a JSON record file
``int8-gemm-ceiling-<gpu>-<date>.json`` to ``--out`` and prints a table.

    PYTHONPATH=src python scripts/int8_gemm_ceiling.py --out results/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import environment, write_records  # noqa: E402
from rotalabs_accel.triton_kernels import int8_gemm as K  # noqa: E402
from rotalabs_accel.triton_kernels.int8_config import select_w8a16  # noqa: E402

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # N x K
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the usual Hopper GEMM tiles, and the library's
# tuned M = 4096 W8A16 tile (256 x 128 x 64 on 8 warps)
TILES = ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4), (128, 128, 64, 4, 4),
         (128, 128, 64, 8, 4), (128, 256, 64, 8, 4), (128, 128, 128, 8, 3))


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INT8: tl.constexpr, TMA: tl.constexpr,
                 SWAP: tl.constexpr):
    # y[M, N] = x[M, K] @ w[N, K]^T (times s[N] when the weight is int8); shapes divide the tiles.
    # SWAP: compute y^T = w @ x^T, the (converted) weight as the MMA's first operand, which Hopper's
    # wgmma can take from registers, so the converted tile need not go back to shared memory.
    pid = tl.program_id(0)
    num_m, num_n = M // BLOCK_M, N // BLOCK_N
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if not TMA:
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if TMA:
            x = x_ptr.load([pid_m * BLOCK_M, k0])
            w = w_ptr.load([pid_n * BLOCK_N, k0])
        else:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if INT8:
            w = w.to(x.dtype)  # exact: every int8 value is a bf16 / fp16 value
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if SWAP:
        if INT8:
            acc = acc * tl.load(s_ptr + offs_n)[:, None]
        y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
    else:
        if INT8:
            acc = acc * tl.load(s_ptr + offs_n)[None, :]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty))


def _variants(which: str):
    """``(tile, tma, swap)`` triples to time."""
    if which == "all":
        return [(tile, tma, False) for tile in TILES for tma in (False, True)]
    return [(tile, True, swap) for tile in TILES for swap in (False, True)]


def minimal_gemm(x, w, s, y, tile, tma, swap=False):
    bm, bn, bk, warps, stages = tile
    m, k = x.shape
    n = w.shape[0]
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        xa = TensorDescriptor.from_tensor(x, [bm, bk])
        wa = TensorDescriptor.from_tensor(w, [bn, bk])
    else:
        xa, wa = x, w
    grid = ((m // bm) * (n // bn),)
    _gemm_kernel[grid](xa, wa, s, y, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                       INT8=w.dtype == torch.int8, TMA=tma, SWAP=swap, num_warps=warps, num_stages=stages)
    return y


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--variants", choices=("all", "swap"), default="all",
                        help="all: every tile with pointer loads and TMA, unswapped; swap: TMA tiles only, "
                             "the int8 weight also as the first (register) operand")
    args = parser.parse_args()
    torch.manual_seed(0)
    m = args.m
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    records = []
    env = environment()
    print(f"# {env.get('gpu')} · torch {torch.__version__} · Triton {triton.__version__} · {env.get('date')}")
    print("# command: PYTHONPATH=src python scripts/int8_gemm_ceiling.py " + " ".join(sys.argv[1:]))
    for n, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        s = torch.rand(n, device="cuda") * 2e-3 + 1e-3
        wb = (q.float() * s[:, None]).to(torch.bfloat16)
        flops = 2 * m * n * k
        ref = torch.nn.functional.linear(x, wb)
        base = bench(lambda: torch.nn.functional.linear(x, wb))  # noqa: B023
        rows = [("cublas_bf16", "F.linear", base, 0.0)]
        variant, cfg = select_w8a16(m, n, k, None, "gemm", sms, False)
        out = K.w8a16_linear(x, q, s, None, None, variant, cfg)
        lib = bench(lambda: K.w8a16_linear(x, q, s, None, None, variant, cfg))  # noqa: B023
        rows.append(("library_w8a16_gemm", str(cfg), lib, rel_err(out, ref)))
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        for weight, tag in ((wb, "triton_bf16"), (q, "triton_w8a16")):
            for tile, tma, swap in _variants(args.variants):
                if weight is wb and swap:
                    continue
                name = f"{tag}{'_tma' if tma else ''}{'_swap' if swap else ''}"
                try:
                    minimal_gemm(x, weight, s, y, tile, tma, swap)
                    err = rel_err(y, ref)
                    ms = bench(lambda: minimal_gemm(x, weight, s, y, tile, tma, swap))  # noqa: B023
                except Exception as exc:  # a tile that does not fit shared memory, say
                    print(f"  {n}x{k} {name} {tile}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                rows.append((name, str(tile), ms, err))
        print(f"== M={m} N={n} K={k}: cuBLAS {base * 1e3:.1f} us ({flops / base / 1e9:.0f} TFLOP/s)")
        best = {}
        for name, tile, ms, err in rows:
            records.append(dict(m=m, n=n, k=k, impl=name, tile=tile, ms=ms, tflops=flops / ms / 1e9,
                                vs_cublas=base / ms, rel_err=err))
            if name not in best or ms < best[name][1]:
                best[name] = (tile, ms, err)
        for name, (tile, ms, err) in best.items():
            print(f"  best {name:24s} {ms * 1e3:8.1f} us {flops / ms / 1e9:6.0f} TFLOP/s "
                  f"{base / ms:.3f}x cuBLAS  rel err {err:.1e}  {tile}")
    write_records(args.out, "int8-gemm-ceiling", "scripts/int8_gemm_ceiling.py", sys.argv[1:], records)


if __name__ == "__main__":
    main()
