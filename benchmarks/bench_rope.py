"""Benchmark rotary position embeddings: ours beside Hugging Face eager, torch.compile and Liger-Kernel.

Shapes (the issue's): q (4, 4096, 32, 128) and k (4, 4096, 8, 128) in bf16, in both layouts
("bshd" = (batch, seq, heads, head_dim) contiguous; "bhsd" = (batch, heads, seq, head_dim) contiguous),
forward and forward+backward; and decode: batch 64, one token each, 32 q / 8 k heads, head_dim 128,
scattered positions.

Bytes counted (the minimum an implementation must move): forward reads and writes q and k once
(2 x (q + k) bytes); forward+backward does that twice (4 x). cos/sin traffic is not counted.

Peers get their favourable setup: the Hugging Face style cos/sin (full width, bf16, already gathered for
the positions) are built outside the timed region, as a model builds them once per forward and shares
them across layers; our kernel reads the fp32 half-width cache and gathers positions inside the launch.
Liger-Kernel rotates in place (its inputs are overwritten on every call; rotation keeps their norm).

Usage (on a CUDA machine, from the repository root):

    python benchmarks/bench_rope.py [--out DIR] [--quick]      # the comparison, one results file
    python benchmarks/bench_rope.py --sweep [--out DIR]       # the comparison, then a launch-config sweep
    python benchmarks/bench_rope.py --sweep-only [--out DIR]  # the sweep alone
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import (  # noqa: E402
    GRAPH_NOTE,
    Row,
    bench_ms,
    copy_ceiling_gbps,
    gbps,
    gpu_slug,
    graph_replay_ms,
    write_results,
)
from rotalabs_accel import apply_rope, build_rope_cache  # noqa: E402

BATCH, SEQ, HEADS_Q, HEADS_K, HEAD_DIM = 4, 4096, 32, 8, 128
DECODE_BATCH = 64
DECODE_CACHE = 8192
DEVICE = "cuda"
DTYPE = torch.bfloat16
# Issue targets (H100, bf16)
TARGET_FWD_GBPS = 2700.0
TARGET_FWDBWD_GBPS = 2400.0


# ---------------------------------------------------------------------------------------------------
# Implementations


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_rope(q, k, cos, sin):
    """Hugging Face's apply_rotary_pos_emb; cos/sin already broadcastable against q and k."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def hf_tables(cos_half: torch.Tensor, sin_half: torch.Tensor, positions, layout: str):
    """Full-width bf16 tables as a Hugging Face model builds them, shaped to broadcast."""
    cos = torch.cat((cos_half, cos_half), -1).to(DTYPE)[positions]  # (batch or 1, seq, dim)
    sin = torch.cat((sin_half, sin_half), -1).to(DTYPE)[positions]
    dim = 2 if layout == "bshd" else 1
    return cos.unsqueeze(dim), sin.unsqueeze(dim)


def load_liger():
    try:
        from liger_kernel.ops.rope import LigerRopeFunction

        return LigerRopeFunction, None
    except Exception as exc:  # not installed or incompatible
        return None, f"Liger-Kernel unavailable ({type(exc).__name__}: {exc})"


def make_inputs(batch, seq, layout, requires_grad=False):
    def one(heads):
        shape = (batch, seq, heads, HEAD_DIM) if layout == "bshd" else (batch, heads, seq, HEAD_DIM)
        return torch.randn(shape, device=DEVICE, dtype=DTYPE).requires_grad_(requires_grad)

    return one(HEADS_Q), one(HEADS_K)


def as_hf_layout(x, layout):
    """Liger takes Hugging Face's logical (batch, heads, seq, dim); a bshd tensor is viewed that way."""
    return x.transpose(1, 2) if layout == "bshd" else x


# ---------------------------------------------------------------------------------------------------
# Benchmark


class Recorder:
    """Collects rows and notes; prints each row as it is measured."""

    def __init__(self, copy_gbps: float):
        self.copy_gbps = copy_gbps
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def time(self, op, impl, fn, moved, shape, warmup, rep, note="", layout="", graph=False):
        """Time ``fn``; with ``graph`` also its CUDA-graph replay (GPU time alone, op ``op + "_graph"``)."""
        try:
            ms = bench_ms(fn, warmup, rep)
        except Exception as exc:
            self.notes.append(f"{op} {layout} {impl} failed: {type(exc).__name__}: {exc}")
            print(self.notes[-1], flush=True)
            return
        self.add(op, impl, ms, moved, shape, note, layout)
        if graph:
            graph_ms = graph_replay_ms(fn, warmup, rep)
            if graph_ms is None:
                self.notes.append(f"{op} {layout} {impl}: the step could not be captured in a CUDA graph")
            else:
                self.add(op + "_graph", impl, graph_ms, moved, shape, GRAPH_NOTE, layout)

    def add(self, op, impl, ms, moved, shape, note="", layout=""):
        rate = gbps(moved, ms)
        self.rows.append(
            Row(
                op=f"{op} ({layout})" if layout else op,
                impl=impl,
                shape=shape,
                ms=ms,
                GBps=rate,
                pct_of_ceiling=100 * rate / self.copy_gbps,
                note=note,
                extra={"layout": layout, "op": op},
            )
        )
        print(f"{op:22s} {layout:5s} {impl:10s} {ms * 1e3:9.1f} us {rate:8,.0f} GB/s  {note}", flush=True)


def liger_agrees(liger, q, k, cos_l, sin_l, layout, cos_hf, sin_hf, rec) -> bool:
    """Run Liger once on copies and compare with the Hugging Face formula; note and skip it if wrong."""
    try:
        got = liger.apply(as_hf_layout(q.clone(), layout), as_hf_layout(k.clone(), layout), cos_l, sin_l)
        want = hf_rope(q.float(), k.float(), cos_hf.float(), sin_hf.float())
        check_close([as_hf_layout(g, layout) for g in got], want)
        return True
    except Exception as exc:
        rec.notes.append(f"Liger-Kernel skipped ({layout}): {type(exc).__name__}: {str(exc)[:200]}")
        print(rec.notes[-1], flush=True)
        return False


def check_close(ours, want) -> None:
    # correctness first: a fast wrong kernel is worth nothing
    for got, ref in zip(ours, want):
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


def bench_prefill(rec: Recorder, layout: str, liger, compiled_hf, warmup: int, rep: int) -> None:
    """Forward and forward+backward at the issue's prefill shape in one layout."""
    shape = [BATCH, SEQ, HEADS_Q, HEADS_K, HEAD_DIM]
    cos, sin = build_rope_cache(SEQ, HEAD_DIM, device=DEVICE)
    cos_hf, sin_hf = hf_tables(cos, sin, torch.arange(SEQ, device=DEVICE)[None], layout)
    q, k = make_inputs(BATCH, SEQ, layout)
    nbytes = (q.numel() + k.numel()) * q.element_size()
    check_close(
        apply_rope(q, k, cos, sin, layout=layout),
        hf_rope(q.float(), k.float(), cos_hf.float(), sin_hf.float()),
    )
    seq_dim = 2 if layout == "bshd" else 1
    cos_l, sin_l = cos_hf.squeeze(seq_dim), sin_hf.squeeze(seq_dim)  # (1, seq, dim) for Liger

    impls = {
        "ours": lambda: apply_rope(q, k, cos, sin, layout=layout),
        "eager_hf": lambda: hf_rope(q, k, cos_hf, sin_hf),
        "compile": lambda: compiled_hf(q, k, cos_hf, sin_hf),
    }
    liger_ok = liger is not None and liger_agrees(liger, q, k, cos_l, sin_l, layout, cos_hf, sin_hf, rec)
    if liger_ok:
        ql, kl = as_hf_layout(q.clone(), layout), as_hf_layout(k.clone(), layout)
        impls["liger"] = lambda: liger.apply(ql, kl, cos_l, sin_l)
    for impl, fn in impls.items():
        rec.time("rope_fwd", impl, fn, 2 * nbytes, shape, warmup, rep, layout=layout)

    # forward + backward; gradients through autograd.grad (no accumulation into .grad)
    qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def fwd_bwd(f):
        def step():
            return torch.autograd.grad(f(qg, kg), (qg, kg), (gq, gk))

        return step

    impls = {
        "ours": fwd_bwd(lambda a, b: apply_rope(a, b, cos, sin, layout=layout)),
        "eager_hf": fwd_bwd(lambda a, b: hf_rope(a, b, cos_hf, sin_hf)),
        "compile": fwd_bwd(lambda a, b: compiled_hf(a, b, cos_hf, sin_hf)),
    }
    if liger_ok:
        # Liger writes into its inputs, so it rotates a copy (a non-leaf, as after a projection)
        def liger_step():
            qa, ka = qg * 1, kg * 1
            out = liger.apply(as_hf_layout(qa, layout), as_hf_layout(ka, layout), cos_l, sin_l)
            return torch.autograd.grad(out, (qg, kg), (as_hf_layout(gq, layout), as_hf_layout(gk, layout)))

        impls["liger"] = liger_step
    for impl, fn in impls.items():
        note = "includes a copy of q and k (it rotates in place)" if impl == "liger" else ""
        rec.time("rope_fwdbwd", impl, fn, 4 * nbytes, shape, warmup, rep, note=note, layout=layout,
                 graph=impl != "eager_hf")


def bench_decode(rec: Recorder, liger, quick: bool, warmup: int, rep: int) -> None:
    """One token per sequence at scattered positions; (batch, 1, heads, dim) (both layouts coincide)."""
    shape = [DECODE_BATCH, 1, HEADS_Q, HEADS_K, HEAD_DIM]
    cos, sin = build_rope_cache(DECODE_CACHE, HEAD_DIM, device=DEVICE)
    q, k = make_inputs(DECODE_BATCH, 1, "bshd")
    pos = torch.randint(0, DECODE_CACHE, (DECODE_BATCH, 1), device=DEVICE)
    cos_hf, sin_hf = hf_tables(cos, sin, pos, "bshd")  # (64, 1, 1, 128), gathered outside the timing
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
    check_close(
        apply_rope(q, k, cos, sin, position_ids=pos),
        hf_rope(q.float(), k.float(), cos_hf.float(), sin_hf.float()),
    )
    compiled = torch.compile(hf_rope, dynamic=False)
    impls = {
        "ours": lambda: apply_rope(q, k, cos, sin, position_ids=pos),
        "eager_hf": lambda: hf_rope(q, k, cos_hf, sin_hf),
        "compile": lambda: compiled(q, k, cos_hf, sin_hf),
    }
    cos_l, sin_l = cos_hf.squeeze(2), sin_hf.squeeze(2)  # (64, 1, 128) for Liger
    if liger is not None and liger_agrees(liger, q, k, cos_l, sin_l, "bshd", cos_hf, sin_hf, rec):
        ql, kl = q.clone().transpose(1, 2), k.clone().transpose(1, 2)
        impls["liger"] = lambda: liger.apply(ql, kl, cos_l, sin_l)
    n = 200 if quick else 2000
    for impl, fn in impls.items():
        rec.time("rope_decode_fwd", impl, fn, nbytes, shape, warmup, rep, note="GPU time (do_bench)")
        try:
            # host-inclusive: back-to-back calls, so Python and launch overhead show when they dominate
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0) * 1e3 / n
            rec.add(
                "rope_decode_fwd_wall",
                impl,
                wall_ms,
                nbytes,
                shape,
                note="host-inclusive, back-to-back calls",
            )
        except Exception as exc:
            rec.notes.append(f"rope_decode_fwd_wall {impl} failed: {type(exc).__name__}: {exc}")


def run_main(args) -> None:
    warmup, rep = (10, 40) if args.quick else (50, 200)
    liger, liger_note = load_liger()
    copy_gbps, _ = copy_ceiling_gbps()
    print(f"copy ceiling {copy_gbps:,.0f} GB/s", flush=True)
    rec = Recorder(copy_gbps)
    if liger_note:
        rec.notes.append(liger_note)
    compiled_hf = torch.compile(hf_rope, dynamic=False)
    for layout in ("bshd", "bhsd"):
        bench_prefill(rec, layout, liger, compiled_hf, warmup, rep)
        torch.cuda.empty_cache()
    bench_decode(rec, liger, args.quick, warmup, rep)
    rec.notes += target_notes(rec.rows)
    for n in rec.notes:
        print("note:", n)
    name = f"rope-{gpu_slug()}-{_dt.date.today().isoformat()}"
    path = write_results(name, rec.rows, {"copy_GBps": copy_gbps}, rec.notes, out_dir=args.out)
    print(f"wrote {path} and {path.with_suffix('.md')}")


def target_notes(rows: list[Row]) -> list[str]:
    """Compare our rows with the issue's targets and with every peer on the same row."""
    notes = []
    by = {(r.extra["op"], r.extra["layout"], r.impl): r for r in rows}
    for (op, layout, impl), r in sorted(by.items()):
        if impl != "ours":
            continue
        target = {"rope_fwd": TARGET_FWD_GBPS, "rope_fwdbwd": TARGET_FWDBWD_GBPS}.get(op)
        if target is not None:
            verdict = "met" if r.GBps >= target else f"missed by {100 * (1 - r.GBps / target):.1f}%"
            notes.append(f"target {op} {layout}: {r.GBps:,.0f} GB/s vs {target:,.0f} GB/s: {verdict}")
        if op == "rope_decode_fwd":
            comp = by.get((op, layout, "compile"))
            if comp is not None:
                verdict = "met" if r.ms < comp.ms else f"missed by {100 * (r.ms / comp.ms - 1):.1f}%"
                notes.append(
                    f"target decode: {r.ms * 1e3:.1f} us vs torch.compile {comp.ms * 1e3:.1f} us "
                    f"(same run): {verdict}"
                )
        for (op2, layout2, impl2), peer in by.items():
            if op2 == op and layout2 == layout and impl2 != "ours" and peer.ms <= r.ms:
                notes.append(
                    f"behind a peer: {op} {layout} {impl2} {peer.ms * 1e3:.1f} us vs ours {r.ms * 1e3:.1f} us"
                )
    return notes


# ---------------------------------------------------------------------------------------------------
# Sweep of launch configurations


def sweep_case(kernels, case, candidates, qv, kv, cos, sin, pos, backward, nbytes, deadline, rows):
    """Time the candidate configurations on one problem; returns [(ms, config)] fastest first."""
    n_tokens = qv.shape[0] * qv.shape[1]
    default = kernels.rope_config(n_tokens, qv.shape[2] + kv.shape[2], qv.stride(2) <= qv.stride(1))

    def launch(config):
        return kernels.rope_forward(
            qv, kv, cos, sin, pos, 0, False, HEAD_DIM, backward=backward, config=config
        )

    want = launch(default)
    results = []
    for config in dict.fromkeys((default, *candidates)):
        if time.perf_counter() > deadline:
            print("sweep time budget reached; stopping early", flush=True)
            break
        try:
            got = launch(config)
            if not all(torch.allclose(g.float(), w.float(), rtol=1e-2, atol=1e-2) for g, w in zip(got, want)):
                print(f"{case} {config}: WRONG RESULT", flush=True)
                continue
            ms = bench_ms(lambda config=config: launch(config), 5, 25)
        except Exception as exc:
            print(f"{case} {config}: failed ({type(exc).__name__}: {exc})", flush=True)
            continue
        results.append((ms, config))
        rows.append(
            Row(
                op=f"sweep_{case}",
                impl=repr(config),
                shape=[*qv.shape, kv.shape[2]],
                ms=ms,
                GBps=gbps(nbytes, ms),
                note="default" if config == default else "",
            )
        )
    results.sort(key=lambda x: x[0])
    default_ms = next((ms for ms, cfg in results if cfg == default), float("nan"))
    print(f"\n== {case}: default {default} {default_ms * 1e3:.2f} us ({gbps(nbytes, default_ms):,.0f} GB/s)")
    for ms, config in results[:5]:
        print(f"   {ms * 1e3:8.2f} us {gbps(nbytes, ms):8,.0f} GB/s  {config}")
    return results, default, default_ms


def run_sweep(args) -> None:
    from rotalabs_accel.triton_kernels import rope as kernels

    deadline = time.perf_counter() + 300.0  # stay inside the GPU job's time limit
    cos, sin = build_rope_cache(SEQ, HEAD_DIM, device=DEVICE)
    rows: list[Row] = []
    cases = []
    for layout in args.sweep_layouts:
        if layout == "decode":
            continue
        q, k = make_inputs(BATCH, SEQ, layout)
        qv, kv = (q, k) if layout == "bshd" else (q.transpose(1, 2), k.transpose(1, 2))
        nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
        # (the backward pass is this kernel with sin negated: the same configuration wins)
        candidates = kernels.SWEEP_TOKEN_MAJOR if layout == "bshd" else kernels.SWEEP_HEAD_MAJOR
        cases.append((f"fwd_{layout}", candidates, qv, kv, cos, sin, None, False, nbytes))
    if "decode" in args.sweep_layouts:
        dcos, dsin = build_rope_cache(DECODE_CACHE, HEAD_DIM, device=DEVICE)
        qd, kd = make_inputs(DECODE_BATCH, 1, "bshd")
        pos = torch.randint(0, DECODE_CACHE, (DECODE_BATCH, 1), device=DEVICE)
        nbytes = 2 * (qd.numel() + kd.numel()) * qd.element_size()
        cases.append(("decode", kernels.SWEEP_DECODE, qd, kd, dcos, dsin, pos, False, nbytes))

    summary = []
    for case in cases:
        results, default, default_ms = sweep_case(kernels, *case, deadline, rows)
        if results:
            best_ms, best = results[0]
            summary.append(
                f"{case[0]}: fastest {best} {best_ms * 1e3:.2f} us; "
                f"default {default} {default_ms * 1e3:.2f} us"
            )
        if time.perf_counter() > deadline:
            break
    print("\nSWEEP SUMMARY")
    for line in summary:
        print(" ", line)
    name = f"rope-sweep-{gpu_slug()}-{_dt.date.today().isoformat()}"
    path = write_results(name, rows, {}, summary, out_dir=args.out)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON/Markdown results")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument(
        "--sweep", action="store_true", help="after the comparison, time launch configurations of our kernel"
    )
    parser.add_argument("--sweep-only", action="store_true", help="time launch configurations only")
    parser.add_argument("--sweep-layouts", nargs="+", choices=("bshd", "bhsd", "decode"),
                        default=["bshd", "bhsd", "decode"], help="problems the sweep times (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_rope.py needs a CUDA device")
    torch.manual_seed(0)
    if not args.sweep_only:
        run_main(args)
    if args.sweep or args.sweep_only:
        run_sweep(args)


if __name__ == "__main__":
    main()
