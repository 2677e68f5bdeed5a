"""W8A16 tensor-core kernel at M = 16: does an evict_first hint on the weight stream pay off once the
loads are prefetched?

Triton 3.6 drops a load's ``eviction_policy`` when its software pipeliner turns the load into
``cp.async`` copies (``num_stages >= 2``, checked in the sm_90 PTX): the weight then fills L2 at normal
priority and, after the benchmarks' zeroing flush, evicts (writes back) the flush's dirty lines.
``DotConfig.prefetch`` keeps pointer loads (``num_stages=1``, so the hints survive) and loads each next K
block into registers before the current block's MMA. Per weight shape, at M = 16, with
``triton.testing.do_bench`` (medians, L2 zero-flushed before each call), this times:

* the library's own choice (``w8a16_linear``, tuned entry) and cuBLAS bf16 ``F.linear``;
* per tile: the pipelined kernel (the tile's ``num_stages``, no hints), ``prefetch`` with the hints, and
  ``prefetch`` with the hints removed (a copy of the kernel built from its source), so the hints' share
  shows separately (plain register loads with hints: sweep 2308996, no faster than the pipelined tiles).

Each output is compared with the library's own choice. Writes ``int8-m16-prefetch-<gpu>-<date>.json``
to ``--out``. CUDA only.

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
from rotalabs_accel.triton_kernels.int8_config import DotConfig  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)
# (block_m, block_n, block_k, warps, pipelined stages, swap_ab)
TILES = [(16, 16, 256, 2, 6, False), (16, 32, 256, 4, 4, False), (16, 64, 256, 4, 4, False),
         (16, 16, 256, 2, 6, True)]


def unhinted_module():
    """``int8_gemm`` with the prefetching loads' L2 hints removed (built from its source)."""
    src = (ROOT / "src/rotalabs_accel/triton_kernels/int8_gemm.py").read_text()
    start = src.index("def _hinted_tiles(")
    end = src.index("@triton.jit", start)
    helper = src[start:end].replace(', eviction_policy="evict_last"', "").replace(
        ', eviction_policy="evict_first"', "")
    if "eviction_policy" in helper or helper == src[start:end]:
        raise RuntimeError("int8_gemm._hinted_tiles changed: cannot strip its hints")
    src = src[:start] + helper + src[end:]
    for old, new in (("from ..", "from rotalabs_accel."),
                     ("from . import", "from rotalabs_accel.triton_kernels import"),
                     ("from .", "from rotalabs_accel.triton_kernels.")):
        src = src.replace(old, new)
    path = Path(tempfile.mkdtemp()) / "int8_gemm_unhinted.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("int8_gemm_unhinted", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["int8_gemm_unhinted"] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--m", type=int, default=16)
    args = parser.parse_args(argv)
    unhinted = unhinted_module()
    torch.manual_seed(0)
    records = []
    for n, k in SHAPES:
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        s = torch.rand(n, device="cuda") * 0.01 + 0.001
        wb = (w.float() * s[:, None]).to(torch.bfloat16)
        ref = int8_gemm.w8a16_linear(x, w, s)
        calls = {"library auto": lambda x=x, w=w, s=s: int8_gemm.w8a16_linear(x, w, s),
                 "cuBLAS bf16": lambda x=x, wb=wb: F.linear(x, wb)}
        for bm, bn, bk, warps, stages, swap in TILES:
            tile = f"{bm}x{bn}x{bk} w{warps} swap={int(swap)}"
            base = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, swap_ab=swap)
            for label, mod, cfg in (
                (f"pipelined {stages} stages", int8_gemm, DotConfig(**base, num_stages=stages)),
                ("prefetch + hints", int8_gemm, DotConfig(**base, prefetch=True)),
                ("prefetch, no hints", unhinted, DotConfig(**base, prefetch=True)),
            ):
                calls[f"{tile} {label}"] = lambda x=x, w=w, s=s, mod=mod, cfg=cfg: mod.w8a16_linear(
                    x, w, s, None, None, "gemm", cfg)
        rows = {}
        for name, fn in calls.items():
            try:
                got = fn()
                torch.cuda.synchronize()
            except Exception as exc:  # a tile that does not compile is a result
                print(f"{n}x{k} {name}: failed {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                continue
            diff = (got.float() - ref.float()).abs().max().item()
            rows[name] = (bench_ms(fn), diff)
            records.append({"n": n, "k": k, "m": args.m, "impl": name, "ms": rows[name][0],
                            "max_abs_diff_vs_library": diff})
        cublas = rows["cuBLAS bf16"][0]
        print(f"== M={args.m} N={n} K={k}", flush=True)
        for name, (ms, diff) in sorted(rows.items(), key=lambda kv: kv[1][0]):
            print(f"  {name:48s} {ms * 1e3:7.1f} us  {cublas / ms:5.2f}x cuBLAS  max diff {diff:.3g}",
                  flush=True)
        torch.cuda.empty_cache()
    print("wrote", write_diagnostic("int8-m16-prefetch", records, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
