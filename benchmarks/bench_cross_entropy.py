"""Cross-entropy over class logits (the language-model loss): this library beside its peers, one process.

Usage (on a CUDA machine)::

    python benchmarks/bench_cross_entropy.py             # every shape, forward and forward + backward
    python benchmarks/bench_cross_entropy.py --quick     # one shape, short timings (a smoke run)
    python benchmarks/bench_cross_entropy.py --sweep     # time launch configurations of our kernels
    python benchmarks/bench_cross_entropy.py --cpu-smoke # tiny shapes on the CPU: checks the script
    python benchmarks/bench_cross_entropy.py --out DIR   # where the .json / .md go (benchmarks/results)

Problem: bf16 logits ``[tokens, vocab]`` (8192 x 128256, 8192 x 32000, 4096 x 151936), random targets
(none ignored: ignored rows would let our kernels skip their logits), mean reduction. Implementations:

* ``ours``: :func:`rotalabs_accel.functional.loss.cross_entropy` (the public API with its dispatch).
* ``eager_hf``: what Hugging Face's ``ForCausalLMLoss`` computes after shifting the labels,
  ``F.cross_entropy(logits.float(), target)``: an fp32 copy of the logits, ``log_softmax`` and
  ``nll_loss`` on it, and the same in backward.
* ``compile``: ``torch.compile`` of ``eager_hf``.
* ``liger``: Liger-Kernel's ``LigerCrossEntropyLoss`` when ``liger_kernel`` is importable. It computes the
  gradient during the forward and writes it into its input: after the call the logits hold
  gradients. Timed as called (no copy of the input is made for it).
* ``ours causal_lm_loss`` / ``hf ForCausalLMLoss``: the whole Hugging Face loss function (label shift
  included) on ``[1, tokens, vocab]`` logits, ours being what ``optimize_model`` installs.

Bytes counted (the minimum each op must move; targets and per-row values are negligible):

* forward: read the logits once = ``tokens * vocab * elt`` (2 bytes per logit in bf16);
* forward + backward: forward, then read the logits again and write their gradient
  = ``3 * tokens * vocab * elt`` (6 bytes per logit in bf16).

Each forward + backward row also notes the peak memory the step allocates beyond its inputs, and every
row checks the loss (and, for forward + backward, a sample of the gradient) against an fp32 reference.

``--sweep`` times the candidate launch configurations (``candidate_configs`` in
``rotalabs_accel/triton_kernels/cross_entropy.py``) of both kernels at every shape, then the fastest few
at other pipelining depths, prints the fastest per shape beside the heuristic's pick and ends with the
winning entries in the format of ``FORWARD_TABLE`` / ``BACKWARD_TABLE`` (ready to paste), and writes
``cross_entropy-sweep-<gpu>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    # Triton's interpreter runs the kernels on CPU tensors; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The checkout's package, whether or not it is installed.
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "src"))
import rotalabs_accel  # noqa: E402
from common import Row, bench_ms, copy_ceiling_gbps, gbps, gpu_slug, try_liger, write_results  # noqa: E402
from rotalabs_accel.functional.loss import causal_lm_loss, cross_entropy  # noqa: E402

DTYPE = torch.bfloat16
SHAPES = [(8192, 128256), (8192, 32000), (4096, 151936)]
SMOKE_SHAPES = [(8, 300), (5, 1000)]


def eager_hf(logits, target):
    """The core of Hugging Face's ForCausalLMLoss: upcast to fp32, then PyTorch's cross-entropy."""
    return F.cross_entropy(logits.float(), target, ignore_index=-100)


def _hf_causal_lm_loss():
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except Exception:
        return None
    return ForCausalLMLoss


def _liger_loss():
    if try_liger() is None:
        return None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception:
        return None
    return LigerCrossEntropyLoss()


class Bench:
    def __init__(self, device: str, quick: bool):
        self.device = device
        self.quick = quick
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.copy = float("nan")

    def time(self, fn) -> float:
        if self.device != "cuda":
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        return bench_ms(fn, warmup=10, rep=40) if self.quick else bench_ms(fn)

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def peak_gb(self, fn) -> float | None:
        """Memory ``fn`` allocates at its peak beyond what is allocated before it (GB)."""
        if self.device != "cuda":
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - before) / 1e9

    def add(self, op, impl, shape, fn, nbytes, note=""):
        try:
            fn()
            self.sync()
            ms = self.time(fn)
        except Exception as exc:  # a peer that cannot run a shape is a result, not a crash
            msg = f"{op} {impl} {shape}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
            print(msg, flush=True)
            self.notes.append(msg)
            if self.device == "cuda":
                torch.cuda.empty_cache()
            return None
        rate = gbps(nbytes, ms)
        pct = 100 * rate / self.copy if self.copy == self.copy else None
        self.rows.append(Row(op, impl, list(shape), ms, GBps=rate, pct_of_ceiling=pct, note=note))
        pct_text = f"{pct:5.1f}%" if pct is not None else ""
        print(f"{op:16s} {impl:22s} {str(shape):16s} {ms:9.4f} ms {rate:8.0f} GB/s {pct_text} {note}",
              flush=True)
        return ms


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_shape(b: Bench, tokens: int, vocab: int, compiled, liger, hf_loss):
    device = b.device
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(tokens, vocab, device=device, generator=gen) * 2).to(DTYPE)
    target = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    elt = logits.element_size()
    shape = (tokens, vocab)
    with torch.no_grad(), torch.autocast(device, dtype=DTYPE):
        expected = eager_hf(logits, target).item()
        loss_ours = cross_entropy(logits, target).item()  # float32 under autocast, as PyTorch
    b.notes.append(f"{tokens}x{vocab}: loss {expected:.6f} (fp32 eager); ours {loss_ours:.6f} "
                   f"(rel diff {abs(loss_ours - expected) / abs(expected):.1e})")

    # --- forward only (no gradient: what evaluation runs)
    fwd = {
        "ours": lambda: cross_entropy(logits, target),
        "eager_hf": lambda: eager_hf(logits, target),
        "compile": lambda: compiled(logits, target),
    }
    if liger is not None:
        liger_in = logits.clone()
        fwd["liger"] = lambda: liger(liger_in, target)
    with torch.no_grad():
        for impl, fn in fwd.items():
            b.add("ce_fwd", impl, shape, fn, tokens * vocab * elt)

    # --- forward + backward (a training step's loss)
    x = logits.clone().requires_grad_()
    checksum = logits.float().sum().item()
    stride = max(1, logits.numel() // 1_000_000)  # a sample of the gradient for the checks

    def step(fn, leaf):
        def run():
            leaf.grad = None
            fn(leaf).backward()

        return run

    step(lambda t: eager_hf(t, target), x)()
    ref_grad = x.grad.detach().flatten()[::stride].clone()
    x.grad = None
    impls = {
        "ours": lambda t: cross_entropy(t, target),
        "eager_hf": lambda t: eager_hf(t, target),
        "compile": lambda t: compiled(t, target),
    }
    if liger is not None:
        impls["liger"] = lambda t: liger(t, target)
    for impl, fn in impls.items():
        # liger overwrites its input: it gets its own copy, checked on its first call
        leaf = logits.clone().requires_grad_() if impl == "liger" else x
        run = step(fn, leaf)
        notes = []
        try:
            run()
            notes.append(f"grad rel diff {_rel(leaf.grad.flatten()[::stride], ref_grad):.1e} vs eager_hf")
            peak = b.peak_gb(run)
        except Exception as exc:
            b.notes.append(f"ce_fwdbwd {impl} {shape}: failed ({type(exc).__name__})")
            continue
        if peak is not None:
            notes.append(f"peak +{peak:.2f} GB")
        if impl == "liger":
            notes.append("overwrites its input with the gradient")
        b.add("ce_fwdbwd", impl, shape, run, 3 * tokens * vocab * elt, "; ".join(notes))
        leaf.grad = None
    intact = logits.float().sum().item() == checksum and torch.equal(x.detach(), logits)
    b.notes.append(f"{tokens}x{vocab}: ours leaves its input intact: {'yes' if intact else 'NO'}")

    # --- the whole Hugging Face loss function ([1, tokens, vocab] logits, labels shifted inside)
    if hf_loss is not None:
        logits3 = x.detach().view(1, tokens, vocab).requires_grad_()
        labels = target.view(1, tokens)
        for impl, fn in (("ours causal_lm_loss", causal_lm_loss), ("hf ForCausalLMLoss", hf_loss)):
            run = step(lambda t, fn=fn: fn(t, labels, vocab), logits3)
            b.add("causal_lm_fwdbwd", impl, shape, run, 3 * tokens * vocab * elt)
            logits3.grad = None


def summary_notes(rows: list[Row]) -> list[str]:
    by_key: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_key.setdefault((r.op, tuple(r.shape)), {})[r.impl] = r.ms
    lines = []
    for (op, shape), ms in by_key.items():
        ours = ms.get("ours", ms.get("ours causal_lm_loss"))
        if ours is None:
            continue
        peers = {k: v for k, v in ms.items() if not k.startswith("ours")}
        if not peers:
            continue
        parts = [f"{k} {v / ours:.2f}x" for k, v in sorted(peers.items(), key=lambda kv: kv[1])]
        lines.append(f"{op} {shape[0]}x{shape[1]}: ours {ours:.3f} ms; speedup over " + ", ".join(parts))
    return lines


# ---------------------------------------------------------------------------------------------
# --sweep
# ---------------------------------------------------------------------------------------------


def _cfg_name(c) -> str:
    stages = "" if c.num_stages is None else f" stages={c.num_stages}"
    return f"block_v={c.block_v} warps={c.num_warps}{stages}"


def _table_entry(vocab: int, c) -> str:
    fields = [str(vocab), str(c.block_v), str(c.num_warps)]
    if c.num_stages is not None:
        fields.append(str(c.num_stages))
    return f"({', '.join(fields)})"


def _sweep_direction(b: Bench, k, direction: str, logits, target, lse, grad_loss):
    """Time the candidates of one kernel at one shape; returns ``(summary line, paste line)`` or None."""
    from dataclasses import replace

    tokens, vocab = logits.shape
    passes = 1 if direction == "fwd" else 2
    nbytes = passes * tokens * vocab * logits.element_size()
    results = []

    def time_cfg(cfg, label):
        if direction == "fwd":
            fn = lambda: k.cross_entropy_forward(logits, target, config=cfg)  # noqa: E731
        else:
            fn = lambda: k.cross_entropy_backward(grad_loss, logits, target, lse, config=cfg)  # noqa: E731
        try:
            fn()
            b.sync()
            ms = b.time(fn)
        except Exception as exc:
            print(f"  {direction} {vocab} {_cfg_name(cfg)}: failed ({type(exc).__name__})", flush=True)
            return
        rate = gbps(nbytes, ms)
        results.append((ms, label + _cfg_name(cfg), cfg))
        pct = 100 * rate / b.copy if b.copy == b.copy else None
        b.rows.append(Row(f"sweep_{direction}", label + _cfg_name(cfg), [tokens, vocab], ms, GBps=rate,
                          pct_of_ceiling=pct))

    candidates = k.candidate_configs(direction, vocab)
    if b.device != "cuda":
        candidates = candidates[:3]  # the interpreter: the plumbing only
    for i, cfg in enumerate(candidates):
        time_cfg(cfg, "heuristic: " if i == 0 else "")
    # Pipelining depth, for the fastest few chunkings.
    for _, _, cfg in sorted(results, key=lambda r: r[0])[:3]:
        for stages in (1, 2, 3, 4):
            if stages != cfg.num_stages:
                time_cfg(replace(cfg, num_stages=stages), "")
    if not results:
        return None
    results.sort(key=lambda r: r[0])
    heuristic = next((r for r in results if r[1].startswith("heuristic")), (float("nan"), "", None))
    print(f"\n{direction} {tokens}x{vocab}: {len(results)} configs", flush=True)
    for ms, name, _ in results[:5]:
        print(f"  {gbps(nbytes, ms):8.0f} GB/s {ms:9.4f} ms  {name}")
    print(f"  heuristic: {gbps(nbytes, heuristic[0]):8.0f} GB/s", flush=True)
    best_ms, best_name, best_cfg = results[0]
    gain = heuristic[0] / best_ms
    line = (f"{direction} {tokens}x{vocab}: best {best_name} at {gbps(nbytes, best_ms):,.0f} GB/s; "
            f"heuristic {gbps(nbytes, heuristic[0]):,.0f} GB/s")
    table = "FORWARD_TABLE" if direction == "fwd" else "BACKWARD_TABLE"
    verdict = "already the heuristic's pick" if gain <= 1.01 else f"{100 * (gain - 1):.1f}% faster"
    return line, f"{table}: {_table_entry(vocab, best_cfg)}    # {tokens}x{vocab}: {verdict}"


def run_sweep(out_dir, quick: bool, device: str, shapes):
    from rotalabs_accel.triton_kernels import cross_entropy as k

    b = Bench(device, quick=True)
    if device == "cuda":
        b.copy, _ = copy_ceiling_gbps()
    summary, paste = [], []
    for tokens, vocab in shapes[:1] if quick else shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        logits = (torch.randn(tokens, vocab, device=device, generator=gen) * 2).to(DTYPE)
        target = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
        _, lse = k.cross_entropy_forward(logits, target)
        grad_loss = torch.full((tokens,), 1.0 / tokens, device=device)
        for direction in ("fwd", "bwd"):
            result = _sweep_direction(b, k, direction, logits, target, lse, grad_loss)
            if result is not None:
                summary.append(result[0])
                paste.append(result[1])
        logits = None
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\nSummary (copy ceiling {b.copy:,.0f} GB/s):")
    for line in summary:
        print("  " + line)
    print("\nWinning entries for rotalabs_accel/triton_kernels/cross_entropy.py (rows ordered by vocabulary;")
    print("the largest becomes the None row):")
    for line in paste:
        print("  " + line)
    slug = gpu_slug() if device == "cuda" else "cpu-smoke"
    name = f"cross_entropy-sweep-{slug}-{dt.date.today().isoformat()}"
    path = write_results(name, b.rows, {"copy": b.copy}, notes=summary + paste, out_dir=out_dir)
    print(f"\nwrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--quick", action="store_true", help="one shape with short timings")
    parser.add_argument("--sweep", action="store_true", help="time launch configurations of our kernels")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU, kernels through Triton's interpreter")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device, shapes = "cpu", SMOKE_SHAPES
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="bench_cross_entropy_"))
        # the kernels themselves, through the interpreter, not the CPU fallback
        rotalabs_accel.set_backend("triton")
    else:
        if not torch.cuda.is_available():
            print("bench_cross_entropy: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
            return 2
        device, shapes, out_dir = "cuda", SHAPES, args.out
        rotalabs_accel.set_backend("auto")
    if args.sweep:
        run_sweep(out_dir, args.quick, device, shapes)
        return 0
    b = Bench(device, args.quick)
    if device == "cuda":
        b.copy, _ = copy_ceiling_gbps()
        print(f"copy ceiling: {b.copy:,.0f} GB/s on {torch.cuda.get_device_name()}")
    compiled = torch.compile(eager_hf, dynamic=False)
    liger = _liger_loss() if device == "cuda" else None
    if liger is None and device == "cuda":
        b.notes.append("liger_kernel not importable: no liger rows")
    hf_loss = _hf_causal_lm_loss()
    for tokens, vocab in shapes[:1] if args.quick else shapes:
        run_shape(b, tokens, vocab, compiled, liger, hf_loss)
    b.notes.append(
        "bf16 logits, random targets (none ignored), mean reduction; GB/s counts 2 bytes per logit forward "
        "and 6 forward + backward (see bench_cross_entropy.py); liger's forward writes the gradient into "
        "its input (the logits are overwritten), ours and eager leave them intact"
    )
    b.notes.extend(summary_notes(b.rows))
    print("\n" + "\n".join(b.notes))
    slug = gpu_slug() if device == "cuda" else "cpu-smoke"
    name = f"cross_entropy-{slug}-{dt.date.today().isoformat()}"
    path = write_results(name, b.rows, {"copy": b.copy}, notes=b.notes, out_dir=out_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
