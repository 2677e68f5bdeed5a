"""SwiGLU kernels on a 2-D grid (tile coordinates from the grid) against a 1-D grid (a linear tile
index divided into row and column tiles in every program), on a CUDA GPU.

At the benchmark's shapes and the feed-forward block's, in one process and in alternating rounds:

* forward: the launch table's tiles with ``grid_2d`` on and off; 2048-element flat tiles on 8 warps
  (one long row, 2-D grid of one row); a minimal 1-D kernel of that tiling
  (``scripts/store_hint_variants.py``'s); ``torch.add`` moving the same bytes; ``torch.compile`` of
  ``silu(gate) * up``;
* backward (with and without the stored activation): the table's tiles with ``grid_2d`` on and off.

The library's default is the 1-D grid (the run behind
``benchmarks/results/logs/swiglu_grid_variants-h100-2026-12-07.txt`` found no gain from the 2-D one).
Each variant's output is compared bit for bit with the library's default first. Times are
``triton.testing.do_bench`` medians (L2 flushed before each run), GB/s counted as the benchmark
counts them (3 passes forward, 5 backward, 6 backward with the activation stored). Writes
``swiglu-grid-variants-<gpu>-<date>.json`` to ``--out``.

    PYTHONPATH=src python scripts/swiglu_grid_variants.py --out results/
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

from store_hint_variants import _swiglu_kernel  # noqa: E402

from common import write_diagnostic  # noqa: E402
from rotalabs_accel.triton_kernels import swiglu as k  # noqa: E402

SHAPES = [(4096, 11008), (16384, 14336), (8192, 14336)]


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def forward_variants(m: int, n: int, g, u, h, compiled) -> dict:
    two_d = dataclasses.replace(k.forward_config(m, n), grid_2d=True)
    one_d = dataclasses.replace(k.forward_config(m, n), grid_2d=False)
    flat = k.SwiGLULaunchConfig(1, 2048, 8, flat=True, grid_2d=True)
    programs = triton.cdiv(m * n, 2048)
    return {
        "table tiles, 2-D grid": lambda: k.swiglu_forward(g, u, config=two_d),
        "table tiles, 1-D grid (the library default)": lambda: k.swiglu_forward(g, u, config=one_d),
        "flat 2048 x 8 warps, 2-D grid": lambda: k.swiglu_forward(g, u, config=flat),
        "minimal 1-D kernel 2048 x 8 warps": lambda: _swiglu_kernel[(programs,)](
            g, u, h, m * n, BLOCK=2048, LOAD_POLICY="", STORE_HINT=0, num_warps=8),
        "torch.add (same bytes, not a peer)": lambda: torch.add(g, u, out=h),
        "torch.compile": lambda: compiled(g, u),
    }


def backward_variants(m: int, n: int, dy, g, u, store_h: bool) -> dict:
    tag = "bwd+h" if store_h else "bwd"
    two_d = dataclasses.replace(k.backward_config(m, n, store_h), grid_2d=True)
    one_d = dataclasses.replace(k.backward_config(m, n, store_h), grid_2d=False)
    return {
        f"{tag} table tiles, 2-D grid": lambda: k.swiglu_backward(dy, g, u, store_h=store_h, config=two_d),
        f"{tag} table tiles, 1-D grid (the library default)": lambda: k.swiglu_backward(
            dy, g, u, store_h=store_h, config=one_d),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    records = []
    compiled = torch.compile(lambda g, u: torch.nn.functional.silu(g) * u)
    for m, n in SHAPES:
        g, u, dy = (torch.randn(m, n, device=dev, dtype=torch.bfloat16) for _ in range(3))
        h = torch.empty_like(g)
        fwd = forward_variants(m, n, g, u, h, compiled)
        expected = k.swiglu_forward(g, u)
        for name, fn in fwd.items():
            out = fn()
            if name.startswith("minimal"):
                out = h
            if not name.startswith("torch"):
                assert torch.equal(out, expected), name
        bwd = {}
        for store_h in (False, True):
            pair = backward_variants(m, n, dy, g, u, store_h)
            a, b = (fn() for fn in pair.values())
            assert all(torch.equal(x, y) for x, y in zip(a, b) if x is not None), pair
            bwd.update(pair)
        times: dict[str, list[float]] = {name: [] for name in (*fwd, *bwd)}
        for _ in range(args.rounds):
            for name, fn in (*fwd.items(), *bwd.items()):
                times[name].append(ms(fn))
        elt = m * n * 2
        print(f"== {m}x{n} bf16 (forward table tiles {k.forward_config(m, n)}; medians of {args.rounds} "
              "rounds)", flush=True)
        for name, t in times.items():
            med = statistics.median(t)
            passes = 6 if name.startswith("bwd+h") else 5 if name.startswith("bwd") else 3
            gbps = passes * elt / med / 1e6
            records.append(dict(m=m, n=n, impl=name, ms_rounds=t, ms=med, GBps=gbps, passes=passes))
            print(f"  {name:48s} {med * 1e3:8.1f} us  {gbps:7,.0f} GB/s   rounds: "
                  + ", ".join(f"{x * 1e3:.1f}" for x in t), flush=True)
    path = write_diagnostic("swiglu-grid-variants", records, args.out)
    print(f"written {path}")


if __name__ == "__main__":
    main()
