"""Embedding lookup forward + backward (the table's gradient): this library beside PyTorch, one process.

Usage (on a CUDA machine)::

    python benchmarks/bench_embedding.py             # every shape
    python benchmarks/bench_embedding.py --cpu-smoke # tiny shapes on the CPU: checks the script
    python benchmarks/bench_embedding.py --out DIR   # where the .json / .md go (benchmarks/results)

Problem: a bf16 table ``[vocab, 4096]`` (vocab 32000 and 128256, Llama's), 2 x 4096 token ids, either
uniform over the vocabulary or Zipf-distributed (frequency ~ 1 / rank^1.1, like text: a few ids repeat
hundreds of times), a random bf16 output gradient. One step: ``out = lookup(ids)``, then the gradient
of the table through ``torch.autograd.grad``. Implementations:

* ``ours``: :func:`rotalabs_accel.functional.embedding` (what ``TritonEmbedding`` and ``optimize_model``
  use): ``F.embedding`` forward, the deterministic Triton table-gradient kernel backward.
* ``eager``: ``F.embedding`` and PyTorch's CUDA backward (sort, segment sums; deterministic).
* ``compile``: ``torch.compile`` of ``F.embedding`` (Inductor's backward: a zero fill and an atomic
  scatter-add, so not deterministic).

Each row also notes the GPU time of the call's kernels alone (``torch.profiler``): where the CUDA-event
time is well above it, the host issuing the step (sort, search, allocation, launches) is the limit.

Bytes counted (the minimum): forward reads and writes ``tokens x H``; backward reads the gradient
``tokens x H`` and writes the whole table ``vocab x H`` (zeros included): ``(3 * tokens + vocab) * H``
elements of 2 bytes. Every implementation's gradient is checked against an fp32 ``index_add`` of the
same gradient.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "src"))
import rotalabs_accel  # noqa: E402
from common import Row, bench_ms, copy_ceiling_gbps, gbps, gpu_slug, write_results  # noqa: E402
from rotalabs_accel.functional.embedding import embedding  # noqa: E402

DTYPE = torch.bfloat16
SHAPES = [(8192, 32000, 4096), (8192, 128256, 4096)]
SMOKE_SHAPES = [(64, 300, 96)]


def make_ids(tokens: int, vocab: int, dist: str, device: str) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    if dist == "uniform":
        ids = torch.randint(0, vocab, (tokens,), generator=gen)
    else:
        weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
        ids = torch.multinomial(weights, tokens, replacement=True, generator=gen)
        ids = torch.randperm(vocab, generator=gen)[ids]  # frequent ids anywhere in the table
    return ids.view(2, tokens // 2).to(device)


def cpu_ms(fn) -> float:
    """Wall-clock milliseconds of one call (the CPU smoke run checks the script, not speed)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def kernel_us(fn, steps: int = 10) -> float:
    """GPU microseconds per call summed over its kernels (torch.profiler): the time without host gaps.
    Where it is well below the CUDA-event time, the call is bound by the host issuing it."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total
                for e in prof.key_averages())
    return total / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device, shapes = "cpu", SMOKE_SHAPES
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="bench_embedding_"))
        rotalabs_accel.set_backend("triton")
        copy = None
    else:
        if not torch.cuda.is_available():
            print("bench_embedding: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
            return 2
        device, shapes, out_dir = "cuda", SHAPES, args.out
        copy, _ = copy_ceiling_gbps()
        print(f"copy ceiling: {copy:,.0f} GB/s on {torch.cuda.get_device_name()}")
    compiled = torch.compile(F.embedding, dynamic=False)
    impls = {"ours": embedding, "eager": F.embedding}
    if device == "cuda":
        impls["compile"] = compiled
    rows, notes = [], []
    for tokens, vocab, hidden in shapes:
        table = (torch.randn(vocab, hidden, device=device) * 0.02).to(DTYPE).requires_grad_()
        grad = torch.randn(2, tokens // 2, hidden, device=device).to(DTYPE)
        nbytes = (3 * tokens + vocab) * hidden * 2
        for dist in ("uniform", "zipf"):
            ids = make_ids(tokens, vocab, dist, device)
            want = torch.zeros(vocab, hidden, device=device).index_add_(
                0, ids.reshape(-1), grad.reshape(-1, hidden).float())
            repeats = int(torch.bincount(ids.reshape(-1)).max())
            for name, fn in impls.items():
                def step(fn=fn, ids=ids, table=table, grad=grad):
                    return torch.autograd.grad(fn(ids, table), table, grad)[0]

                got = step()
                err = ((got.float() - want).norm() / want.norm()).item()
                ok = err < 1e-2
                ms = cpu_ms(step) if args.cpu_smoke else bench_ms(step, warmup=25, rep=200)
                rate = gbps(nbytes, ms)
                note = f"{dist} ids (max {repeats} of one id); rel. err {err:.1e}"
                if not args.cpu_smoke:
                    note += f"; kernels alone {kernel_us(step):.0f} us"
                if not ok:
                    note += " MISMATCH"
                rows.append(Row(f"embedding_fwdbwd ({dist})", name, [tokens, vocab, hidden], ms, GBps=rate,
                                pct_of_ceiling=100 * rate / copy if copy else None, note=note))
                shape = f"{tokens}x{vocab}x{hidden}"
                print(f"{dist:8s} {shape} {name:8s} {ms * 1e3:8.1f} us {rate:7,.0f} GB/s  {note}")
            by = {r.impl: r.ms for r in rows[-len(impls):]}
            best = min((v, k) for k, v in by.items() if k != "ours")
            notes.append(f"{dist} {tokens}x{vocab}x{hidden}: ours {by['ours'] * 1e3:.1f} us, best peer "
                         f"{best[1]} {best[0] * 1e3:.1f} us ({best[0] / by['ours']:.2f}x)")
    notes.append("bf16 table and gradient; GB/s counts (3 x tokens + vocab) x H x 2 bytes (see the script)")
    print("\n".join(notes))
    slug = gpu_slug() if device == "cuda" else "cpu-smoke"
    path = write_results(f"embedding-{slug}-{dt.date.today().isoformat()}", rows,
                         {"copy_GBps": copy} if copy else {}, notes=notes, out_dir=out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
