"""Where the SwiGLU feed-forward block's time goes, per implementation (CUDA only).

The block (8192 tokens, hidden 4096, intermediate 14336, forward+backward, bf16) is nine GEMMs and an
activation. For each implementation of ``benchmarks/bench_swiglu.py``'s FFN rows this prints:

* the step time in interleaved rounds (implementation A, B, C, ... then again), median over rounds, so
  that a clock or power drift during the run falls on every implementation alike rather than on
  whichever is timed last;
* the GPU time of each kernel of one step (``torch.profiler``), largest first, and their sum.

Writes ``ffn-profile-<gpu>-<date>.json`` to ``--out``.

    python scripts/profile_ffn.py --out results/ [--rounds 5]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_swiglu  # noqa: E402
from common import environment, write_diagnostic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dev = torch.device("cuda")
    print(environment(), flush=True)
    tokens, hidden, inter = bench_swiglu.FFN_SHAPE
    notes: list[str] = []
    modules = bench_swiglu.ffn_modules(hidden, inter, notes)
    modules.pop("hf LlamaMLP + torch.compile", None)  # its compile time would dominate the run
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16).requires_grad_()
    grad_y = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
    steps = {name: bench_swiglu.ffn_step(module, x, grad_y) for name, module in modules.items()}
    for step in steps.values():
        step()
    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(triton.testing.do_bench(step, warmup=25, rep=400, return_mode="median"))
    impls = {}
    for name, step in steps.items():
        kernels, gpu_us = bench_swiglu.kernel_times(step)
        med = statistics.median(times[name])
        impls[name] = {"rounds_ms": times[name], "median_ms": med, "kernel_sum_us": gpu_us,
                                 "kernels": [{"name": n, "us": us, "calls": c} for n, us, c in kernels]}
        print(f"\n== {name}: median {med:.3f} ms over rounds {[round(t, 3) for t in times[name]]}; "
              f"kernels sum {gpu_us / 1e3:.3f} ms", flush=True)
        for n, us, c in kernels[:14]:
            print(f"  {us:9.1f} us  x{c:<3d} {n[:110]}", flush=True)
    records = [{"impl": name, **v} for name, v in impls.items()]
    print(f"wrote {write_diagnostic('ffn-profile', records, args.out, notes=notes)}")


if __name__ == "__main__":
    main()
