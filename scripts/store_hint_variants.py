"""Time cache hints on the loads and stores of the memory-bound forwards (RMSNorm, SwiGLU), CUDA only.

The forwards read each input once and write each output once; at the benchmark's sizes (128 MB and
up) nothing they touch is read again by the same kernel. This script asks whether telling the caches
so (loads ``evict_first``; stores ``.cs``, streaming, or ``evict_first``) moves the time, with one
minimal kernel per op (the library's math: RMSNorm in the Llama casting mode with a bf16 weight;
``silu(gate) * up``), timed beside the library's own call in the same process:

* ``rmsnorm``: ``BLOCK_M`` rows per program, the whole row in registers, rstd stored as the library
  does for backward;
* ``swiglu``: contiguous ``gate``/``up`` as one flat range, ``BLOCK`` elements per program.

Each time is the median of ``triton.testing.do_bench`` (L2 flushed before each run); every variant is
checked against the library's output first (bit-identical expected: the same operations in the same
order). Writes ``store-hint-variants-<gpu>-<date>.json`` to ``--out``.

    python scripts/store_hint_variants.py --out results/
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import rotalabs_accel as ra  # noqa: E402
from common import environment, write_diagnostic  # noqa: E402

RMS_SHAPES = [(16384, 4096), (16384, 8192), (4096, 4096)]
SWIGLU_SHAPES = [(4096, 11008), (16384, 14336)]
EPS = 1e-6


@triton.jit
def _store(ptrs, value, mask, STORE_HINT: tl.constexpr):
    if STORE_HINT == 1:
        tl.store(ptrs, value, mask=mask, cache_modifier=".cs")
    elif STORE_HINT == 2:
        tl.store(ptrs, value, mask=mask, eviction_policy="evict_first")
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def _rmsnorm_kernel(X, W, Y, RSTD, M, N, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    LOAD_POLICY: tl.constexpr, STORE_HINT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0, eviction_policy=LOAD_POLICY)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(xf * xf, axis=1) / N + eps))
    tl.store(RSTD + rows, rstd, mask=rows < M)
    y = (xf * rstd[:, None]).to(x.dtype).to(tl.float32) * w
    _store(Y + offs, y.to(Y.dtype.element_ty), mask, STORE_HINT)


@triton.jit
def _swiglu_kernel(G, U, H, numel, BLOCK: tl.constexpr, LOAD_POLICY: tl.constexpr,
                   STORE_HINT: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, eviction_policy=LOAD_POLICY).to(tl.float32)
    u = tl.load(U + offs, mask=mask, eviction_policy=LOAD_POLICY).to(tl.float32)
    _store(H + offs, (g * tl.sigmoid(g) * u).to(H.dtype.element_ty), mask, STORE_HINT)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


HINTS = {0: "plain", 1: ".cs", 2: "evict_first"}


def time_variant(rows: list[dict], label: str, name: str, run, out: torch.Tensor,
                 expected: torch.Tensor) -> None:
    """Run once into a NaN-poisoned ``out``, record its largest difference from the library's output,
    then time it; a variant that fails to compile or run is printed and skipped."""
    try:
        out.fill_(float("nan"))
        run()
        diff = (out.float() - expected.float()).abs().max().item()
        rows.append({"impl": name, "ms": bench(run), "max_abs_diff_vs_library": diff})
    except Exception as exc:
        print(f"  {label} {name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)


def rms_rows(m: int, n: int, dev) -> list[dict]:
    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, device=dev, dtype=torch.bfloat16)
    expected = ra.rmsnorm(x, w, eps=EPS)
    nbytes = 2 * m * n * 2
    rows = [{"impl": "library rmsnorm", "ms": bench(lambda: ra.rmsnorm(x, w, eps=EPS))}]
    y = torch.empty_like(x)
    rstd = torch.empty(m, device=dev, dtype=torch.float32)
    block_n = triton.next_power_of_2(n)
    for block_m, warps, load, store in itertools.product((1, 2), (4, 8, 16), ("", "evict_first"), (0, 1, 2)):
        if block_m * block_n // (32 * warps) > 64 or block_m * block_n // (32 * warps) < 8:
            continue
        name = f"tile bm={block_m} w={warps} load={load or 'plain'} store={HINTS[store]}"

        def run(bm=block_m, nw=warps, lp=load, sh=store):
            _rmsnorm_kernel[(triton.cdiv(m, bm),)](x, w, y, rstd, m, n, EPS, BLOCK_M=bm, BLOCK_N=block_n,
                                                  LOAD_POLICY=lp, STORE_HINT=sh, num_warps=nw)

        time_variant(rows, f"rmsnorm {m}x{n}", name, run, y, expected)
    for r in rows:
        r["GBps"] = nbytes / r["ms"] / 1e6
    return sorted(rows, key=lambda r: r["ms"])


def swiglu_rows(m: int, n: int, dev) -> list[dict]:
    g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    u = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    expected = ra.swiglu_fused(g, u)
    nbytes = 3 * m * n * 2
    rows = [{"impl": "library swiglu_fused", "ms": bench(lambda: ra.swiglu_fused(g, u))}]
    h = torch.empty_like(g)
    numel = g.numel()
    grid = itertools.product((2048, 4096, 8192), (4, 8), ("", "evict_first"), (0, 1, 2))
    for block, warps, load, store in grid:
        if not 8 <= block // (32 * warps) <= 32:
            continue
        name = f"flat block={block} w={warps} load={load or 'plain'} store={HINTS[store]}"

        def run(b=block, nw=warps, lp=load, sh=store):
            _swiglu_kernel[(triton.cdiv(numel, b),)](g, u, h, numel, BLOCK=b, LOAD_POLICY=lp, STORE_HINT=sh,
                                                    num_warps=nw)

        time_variant(rows, f"swiglu {m}x{n}", name, run, h, expected)
    for r in rows:
        r["GBps"] = nbytes / r["ms"] / 1e6
    return sorted(rows, key=lambda r: r["ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    dev = torch.device("cuda")
    print(environment(), flush=True)
    records = []
    for op, shapes, fn in (("rmsnorm_fwd", RMS_SHAPES, rms_rows), ("swiglu_fwd", SWIGLU_SHAPES, swiglu_rows)):
        for m, n in shapes:
            rows = fn(m, n, dev)
            print(f"\n== {op} {m}x{n}", flush=True)
            for r in rows[:10]:
                print(f"  {r['ms'] * 1e3:8.2f} us {r['GBps']:7.0f} GB/s  {r['impl']}"
                      f"  (max diff vs library {r.get('max_abs_diff_vs_library', 0):.1e})", flush=True)
            lib = next(r for r in rows if r["impl"].startswith("library"))
            print(f"  library: {lib['ms'] * 1e3:.2f} us {lib['GBps']:.0f} GB/s", flush=True)
            records += [{"op": op, "m": m, "n": n, **r} for r in rows]
    print(f"wrote {write_diagnostic('store-hint-variants', records, args.out)}")


if __name__ == "__main__":
    main()
