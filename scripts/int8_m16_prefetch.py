"""W8A16 tensor-core kernel at M = 16: does an evict_first hint on the weight stream pay off once the
loads are pipelined?

Triton 3.6 drops a load's ``eviction_policy`` when its software pipeliner turns the load into
``cp.async`` copies (``num_stages >= 2``): the weight then fills L2 at normal priority and, after the
benchmarks' zeroing flush, evicts (writes back) the flush's dirty lines. This script builds a variant of
``int8_gemm._w8a16_dot_kernel`` (from its source, not the library's kernel) whose K loop keeps pointer
loads (``num_stages=1``, so the hints survive) and prefetches the next K block into registers before
the current block's MMA, and times at M = 16, per weight shape, with ``triton.testing.do_bench``
(medians, L2 zero-flushed before each call):

* the library's own choice (``int8_gemm.w8a16_linear``, tuned entry) and cuBLAS bf16 ``F.linear``;
* the variant: register loads with the hint and no prefetch, with the prefetch and no hint, with both.

Each variant's output is compared with the library's first (the same K order, so the same bits).
Writes ``int8-m16-prefetch-<gpu>-<date>.json`` to ``--out``. CUDA only.

    PYTHONPATH=src python scripts/int8_m16_prefetch.py --out results/
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import bench_ms, write_diagnostic  # noqa: E402
from rotalabs_accel.triton_kernels import int8_gemm  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)
TILES = [(16, 16, 256, 2), (16, 32, 256, 4), (16, 64, 256, 4), (16, 32, 512, 4), (16, 16, 512, 2)]


def variant_module():
    """``int8_gemm`` with a K loop that can prefetch into registers and hint the loads."""
    src = (ROOT / "src/rotalabs_accel/triton_kernels/int8_gemm.py").read_text()
    edits = [
        ("    FAST_CVT: tl.constexpr,\n):\n    # USE_TMA",
         "    FAST_CVT: tl.constexpr,\n    PREFETCH: tl.constexpr = False,\n"
         "    EVICT_W: tl.constexpr = \"\",\n    EVICT_X: tl.constexpr = \"\",\n):\n    # USE_TMA"),
        ("    for k0 in range(0, k_per_split, BLOCK_K):\n        if USE_TMA:",
         "    if PREFETCH:\n        w_nx = tl.load(w_ptrs, eviction_policy=EVICT_W)\n"
         "        x_nx = tl.load(x_ptrs, eviction_policy=EVICT_X)\n"
         "    for k0 in range(0, k_per_split, BLOCK_K):\n        if USE_TMA:"),
        ("        elif EVEN_K:\n            x = tl.load(x_ptrs)\n            w = tl.load(w_ptrs)\n",
         "        elif PREFETCH:\n            x = x_nx\n            w = w_nx\n"
         # the last step re-reads its own block (an L2 hit) instead of a masked load past the split
         "            step = BLOCK_K if k0 + BLOCK_K < k_per_split else 0\n"
         "            w_nx = tl.load(w_ptrs + step, eviction_policy=EVICT_W)\n"
         "            x_nx = tl.load(x_ptrs + step, eviction_policy=EVICT_X)\n"
         "        elif EVEN_K:\n            x = tl.load(x_ptrs, eviction_policy=EVICT_X)\n"
         "            w = tl.load(w_ptrs, eviction_policy=EVICT_W)\n"),
        ("from ..", "from rotalabs_accel."),
        ("from . import", "from rotalabs_accel.triton_kernels import"),
        ("from .", "from rotalabs_accel.triton_kernels."),
    ]
    for old, new in edits:
        if old not in src:
            raise RuntimeError(f"int8_gemm.py changed: {old[:60]!r} not found")
        src = src.replace(old, new)
    path = Path(tempfile.mkdtemp()) / "int8_gemm_prefetch.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("int8_gemm_prefetch", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["int8_gemm_prefetch"] = module
    spec.loader.exec_module(module)
    return module


def launch(mod, x, w, s, out, tile, swap, prefetch, evict, fast_cvt=True):
    bm, bn, bk, warps = tile
    m, k = x.shape
    n = w.shape[0]
    grid = (triton_cdiv(m, bm) * triton_cdiv(n, bn), 1)
    mod._w8a16_dot_kernel[grid](
        x, w, s, s, out, out, out, m, n, k, k, x.stride(0), w.stride(0), 1, 0,
        GROUP_SIZE=0, HAS_BIAS=False, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, GROUP_M=8,
        SWAP_AB=swap, DOT_FP32=False, BLOCKED_SUM=False, USE_TMA=False, FAST_CVT=fast_cvt, PREFETCH=prefetch,
        EVICT_W="evict_first" if evict else "", EVICT_X="evict_last" if evict else "",
        num_warps=warps, num_stages=1,
    )
    return out


def triton_cdiv(a, b):
    return -(-a // b)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--m", type=int, default=16)
    args = parser.parse_args(argv)
    mod = variant_module()
    torch.manual_seed(0)
    records = []
    for n, k in SHAPES:
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        s = torch.rand(n, device="cuda") * 0.01 + 0.001
        wb = (w.float() * s[:, None]).to(torch.bfloat16)
        ref = int8_gemm.w8a16_linear(x, w, s)
        rows = {"library auto": bench_ms(lambda x=x, w=w, s=s: int8_gemm.w8a16_linear(x, w, s)),
                "cuBLAS bf16": bench_ms(lambda x=x, wb=wb: F.linear(x, wb))}
        for tile in TILES:
            for swap, prefetch, evict in ((False, False, True), (False, True, False), (False, True, True),
                                          (True, True, True)):
                name = (f"{tile[0]}x{tile[1]}x{tile[2]} w{tile[3]} swap={int(swap)} "
                        f"prefetch={int(prefetch)} evict_first={int(evict)}")
                out = torch.empty_like(ref)
                try:
                    got = launch(mod, x, w, s, out, tile, swap, prefetch, evict)
                    torch.cuda.synchronize()
                except Exception as exc:  # a tile that does not compile is a result
                    print(f"{n}x{k} {name}: failed {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                    continue
                diff = (got.float() - ref.float()).abs().max().item()
                args_ = (mod, x, w, s, out, tile, swap, prefetch, evict)
                rows[name] = bench_ms(lambda a=args_: launch(*a))
                records.append({"n": n, "k": k, "m": args.m, "impl": name, "ms": rows[name],
                                "max_abs_diff_vs_library": diff})
        for name in ("library auto", "cuBLAS bf16"):
            records.append({"n": n, "k": k, "m": args.m, "impl": name, "ms": rows[name]})
        cublas = rows["cuBLAS bf16"]
        print(f"== M={args.m} N={n} K={k}", flush=True)
        for name, ms in sorted(rows.items(), key=lambda kv: kv[1]):
            diff = next((r.get("max_abs_diff_vs_library") for r in records
                         if r["impl"] == name and r["n"] == n and r["k"] == k), None)
            print(f"  {name:52s} {ms * 1e3:7.1f} us  {cublas / ms:5.2f}x cuBLAS"
                  + (f"  max diff {diff:.3g}" if diff is not None else ""), flush=True)
        torch.cuda.empty_cache()
    print("wrote", write_diagnostic("int8-m16-prefetch", records, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
