"""Benchmark SwiGLU: the activation (forward, forward+backward) and the whole feed-forward block.

Run on a CUDA machine from the repository root::

    python benchmarks/bench_swiglu.py                 # everything below, results in benchmarks/results/
    python benchmarks/bench_swiglu.py --sweep         # ... plus a launch-configuration sweep of our kernels
    python benchmarks/bench_swiglu.py --quick         # small shapes, short timings (a smoke test)
    python benchmarks/bench_swiglu.py --only sweep    # one part only: act, ffn or sweep (comma-separated)

Activation rows (bf16): ``silu(gate) * up`` at 16384x14336 and 4096x11008 for this library (separate
``gate``/``up``, and one packed ``[M, 2N]`` tensor), PyTorch eager ``F.silu(g) * u``, ``torch.compile`` of
it and Liger-Kernel's ``LigerSiLUMulFunction``. Bytes counted: forward 3 passes over ``M x N`` (read gate
and up, write out), forward+backward 8 (forward, then read grad, gate, up and write two gradients).

Decode-sized rows (bf16, 1x14336, forward): do_bench time and the wall time of back-to-back calls, where
the host path (Python, launch) rather than the kernel is the cost.

Feed-forward rows (bf16, 8192 tokens, hidden 4096, intermediate 14336): forward+backward time and peak
memory above the inputs (``x``, ``grad_y`` and the weights exist before the peak counter is reset; the
output and all gradients count) for Hugging Face ``LlamaMLP``, its ``torch.compile``, Liger-Kernel's
``LigerSwiGLUMLP`` and this library's ``SwiGLU`` with ``fused_gate_up`` off and on.

Writes ``swiglu-<gpu>-<date>.json`` and ``.md`` (see ``common.write_results``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import rotalabs_accel  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import (  # noqa: E402
    CLOSE_CALL,
    GRAPH_NOTE,
    RECHECK_ROUNDS,
    Row,
    bench_ms,
    copy_ceiling_gbps,
    gbps,
    gpu_slug,
    graph_replay_ms,
    recheck_close_call,
    write_results,
)
from rotalabs_accel import SwiGLU, swiglu_fused  # noqa: E402

ACT_SHAPES = [(16384, 14336), (4096, 11008)]
FFN_SHAPE = (8192, 4096, 14336)  # tokens, hidden, intermediate
SMALL_SHAPE = (1, 14336)  # one decode token: launch-bound
QUICK_ACT_SHAPES = [(2048, 4096)]
QUICK_FFN_SHAPE = (2048, 1024, 2816)
DTYPE = torch.bfloat16
SAME_BYTES = "add (same bytes)"
DEVICE = "cuda"
ELT = 2

# The targets (H100, bf16).
TARGET_FWD_GBPS = 2900
TARGET_FWDBWD_GBPS = 2500
TARGET_FFN_SPEEDUP_VS_HF = 1.05


def log(msg: str) -> None:
    print(msg, flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------------
# Activation
# --------------------------------------------------------------------------------------------------


def _eager(gate, up):
    return F.silu(gate) * up


def activation_impls(notes: list[str]) -> dict:
    """name -> function; "... packed" ones take one [M, 2N] tensor, the others (gate, up)."""
    impls = {"rotalabs": swiglu_fused, "rotalabs packed": swiglu_fused, "eager": _eager}
    # A fresh static-shape compile per shape: a reused one would recompile with dynamic shapes.
    impls["torch.compile"] = torch.compile(_eager, dynamic=False)
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        impls["liger"] = lambda g, u: LigerSiLUMulFunction.apply(g, u)
    except Exception as exc:  # not installed or broken
        notes.append(f"Liger-Kernel activation skipped: {type(exc).__name__}: {exc}")
    return impls


def _is_peer(impl: str) -> bool:
    return not impl.startswith("rotalabs") and impl != SAME_BYTES


def bench_activation(shapes, rows: list[Row], notes: list[str], ceiling: float, warmup: int,
                     rep: int, rechecks: dict | None = None, rounds: int = RECHECK_ROUNDS) -> None:
    """Forward and forward+backward rows per shape; where ours and the fastest peer come within
    ``CLOSE_CALL`` of each other, both are timed again in ``rounds`` alternating rounds and the
    verdict goes to ``rechecks[(op, (m, n))]``."""
    for m, n in shapes:
        impls = activation_impls(notes if (m, n) == shapes[0] else [])
        gate = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
        up = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
        gate_up = torch.cat([gate, up], dim=1)
        grad = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
        expected = _eager(gate.float(), up.float())
        fwd_bytes, fwdbwd_bytes = 3 * m * n * ELT, 8 * m * n * ELT
        timed: dict[str, dict[str, object]] = {"swiglu_fwd": {}, "swiglu_fwdbwd": {}}
        for name, fn in impls.items():
            packed = name.endswith("packed")
            args = (gate_up,) if packed else (gate, up)
            with torch.no_grad():
                err = rel_err(fn(*args), expected)
            # Forward only, inputs without grad.
            def forward(fn=fn, args=args):
                with torch.no_grad():
                    return fn(*args)

            ms = bench_ms(forward, warmup=warmup, rep=rep)
            timed["swiglu_fwd"][name] = forward
            rows.append(Row("swiglu_fwd", name, [m, n], ms, gbps(fwd_bytes, ms),
                            pct_of_ceiling=100 * gbps(fwd_bytes, ms) / ceiling, note=f"rel err {err:.1e}"))
            log(f"  fwd     {m}x{n} {name:16s} {ms:8.4f} ms {gbps(fwd_bytes, ms):7.0f} GB/s")
            # Forward + backward: fresh gradients each call (autograd.grad: no accumulation pass).
            leaves = tuple(t.detach().clone().requires_grad_() for t in args)

            def step(fn=fn, leaves=leaves, grad=grad):
                out = fn(*leaves)
                return torch.autograd.grad(out, leaves, grad)

            ms = bench_ms(step, warmup=warmup, rep=rep)
            timed["swiglu_fwdbwd"][name] = step
            note = "writes gradients over its inputs" if name == "liger" else ""
            rows.append(Row("swiglu_fwdbwd", name, [m, n], ms, gbps(fwdbwd_bytes, ms),
                            pct_of_ceiling=100 * gbps(fwdbwd_bytes, ms) / ceiling, note=note))
            log(f"  fwd+bwd {m}x{n} {name:16s} {ms:8.4f} ms {gbps(fwdbwd_bytes, ms):7.0f} GB/s")
            if name != "eager":
                # The same step replayed from a CUDA graph: its GPU time alone, without the host's cost.
                g_ms = graph_replay_ms(step, warmup=warmup, rep=rep)
                if g_ms is None:
                    notes.append(f"swiglu_fwdbwd {name} {m}x{n}: not capturable in a CUDA graph")
                else:
                    rate = gbps(fwdbwd_bytes, g_ms)
                    rows.append(Row("swiglu_fwdbwd_graph", name, [m, n], g_ms, rate,
                                    pct_of_ceiling=100 * rate / ceiling, note=GRAPH_NOTE))
                    log(f"  fwd+bwd {m}x{n} {name:16s} {g_ms:8.4f} ms {rate:7.0f} GB/s (CUDA-graph replay)")
            del leaves
        # Not a peer: an elementwise torch op with the forward's traffic (read two, write one),
        # what a kernel with no arithmetic reaches at this size (the copy ceiling is a 2 GiB copy).
        out = torch.empty_like(gate)
        with torch.no_grad():
            ms = bench_ms(lambda g=gate, u=up, o=out: torch.add(g, u, out=o), warmup=warmup, rep=rep)
        rows.append(Row("swiglu_fwd", SAME_BYTES, [m, n], ms, gbps(fwd_bytes, ms),
                        pct_of_ceiling=100 * gbps(fwd_bytes, ms) / ceiling,
                        note="torch.add(gate, up, out=): the forward's bytes, no arithmetic; not a peer"))
        log(f"  fwd     {m}x{n} {SAME_BYTES:16s} {ms:8.4f} ms {gbps(fwd_bytes, ms):7.0f} GB/s")
        if rechecks is not None:
            for op, fns in timed.items():
                rates = {r.impl: r.GBps for r in rows if r.op == op and tuple(r.shape) == (m, n)}
                note = recheck_close_call(
                    rates, fns, "rotalabs", _is_peer, rounds, lambda f: bench_ms(f, warmup=warmup, rep=rep),
                    fwd_bytes if op == "swiglu_fwd" else fwdbwd_bytes)
                if note is not None:
                    rechecks[(op, (m, n))] = note
                    log(f"  {op} {m}x{n}: {note}")
        del gate, up, gate_up, grad, expected, out, timed
        torch.cuda.empty_cache()


def bench_small(shape, rows: list[Row], notes: list[str], warmup: int, rep: int, calls: int) -> None:
    """A decode-sized activation, where the host path (Python, launch) is the cost.

    Two numbers per implementation: do_bench's CUDA-event time (the host time not hidden behind the
    benchmark's cache flush shows up here) and the wall time of back-to-back calls (host-inclusive).
    """
    m, n = shape
    impls = activation_impls([])
    gate = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    up = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    gate_up = torch.cat([gate, up], dim=1)
    fwd_bytes = 3 * m * n * ELT
    for name, fn in impls.items():
        args = (gate_up,) if name.endswith("packed") else (gate, up)
        with torch.no_grad():
            ms = bench_ms(lambda fn=fn, args=args: fn(*args), warmup=warmup, rep=rep)
            for _ in range(20):
                fn(*args)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0) * 1e3 / calls
        rows.append(Row("swiglu_fwd_small", name, [m, n], ms, gbps(fwd_bytes, ms),
                        note="GPU time (do_bench)"))
        rows.append(Row("swiglu_fwd_small_wall", name, [m, n], wall_ms, gbps(fwd_bytes, wall_ms),
                        note="host-inclusive, back-to-back calls"))
        log(f"  fwd     {m}x{n} {name:16s} {ms * 1e3:8.1f} us (do_bench) {wall_ms * 1e3:8.1f} us (wall)")


# --------------------------------------------------------------------------------------------------
# Feed-forward block
# --------------------------------------------------------------------------------------------------


class EagerSwiGLUMLP(torch.nn.Module):
    """The Hugging Face ``LlamaMLP`` computation, for machines without transformers."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def ffn_modules(hidden: int, inter: int, notes: list[str]) -> dict[str, torch.nn.Module]:
    config = None
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        heads = max(1, hidden // 128)
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu", mlp_bias=False,
                             num_attention_heads=heads, num_key_value_heads=heads)
        hf = LlamaMLP(config)
        hf_name = "hf LlamaMLP"
    except Exception as exc:
        notes.append(f"transformers unavailable ({type(exc).__name__}); 'hf LlamaMLP' is an equivalent "
                     "module")
        hf = EagerSwiGLUMLP(hidden, inter)
        hf_name = "hf LlamaMLP"
    hf = hf.to(device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    modules = {hf_name: hf, "hf LlamaMLP + torch.compile": torch.compile(copy.deepcopy(hf), dynamic=False)}
    if config is not None:
        try:
            from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

            liger = LigerSwiGLUMLP(config).to(device=DEVICE, dtype=DTYPE)
            liger.load_state_dict(hf.state_dict())
            modules["liger LigerSwiGLUMLP"] = liger
        except Exception as exc:
            notes.append(f"Liger-Kernel LigerSwiGLUMLP skipped: {type(exc).__name__}: {exc}")
    modules["rotalabs SwiGLU"] = SwiGLU.from_module(copy.deepcopy(hf))
    modules["rotalabs SwiGLU fused_gate_up"] = SwiGLU.from_module(copy.deepcopy(hf), fused_gate_up=True)
    return modules


FFN_ROUNDS = 3


def ffn_step(module: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor):
    """One forward+backward step of ``module`` on ``x`` with fresh gradients, as a closure to time."""
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(grad_y)

    return step


GEMM_KERNEL_MARKS = ("nvjet", "gemm", "xmma", "cutlass", "splitkreduce")


def kernel_times(step) -> tuple[list[tuple[str, float, int]], float]:
    """GPU time of each kernel of one ``step()`` (``torch.profiler``), as ``(name, us, calls)`` largest
    first, and their sum in us. The step runs once before, and the profiled one starts from a synced GPU."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    total: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            count[ev.name] += 1
    kernels = sorted(((name, us, count[name]) for name, us in total.items()), key=lambda r: -r[1])
    return kernels, sum(total.values())


def gemm_split(kernels) -> tuple[float, float]:
    """``(GEMM us, other us)`` of :func:`kernel_times`'s list (cuBLAS kernels by name)."""
    gemm = sum(us for name, us, _ in kernels if any(m in name.lower() for m in GEMM_KERNEL_MARKS))
    return gemm, sum(us for _, us, _ in kernels) - gemm


def bench_ffn(shape, rows: list[Row], notes: list[str], warmup: int, rep: int,
              rounds: int = FFN_ROUNDS, copy_gbps: float | None = None) -> None:
    """Each implementation's step is timed in ``rounds`` interleaved rounds (A, B, C, ..., then again)
    and the median round counts: the block runs its GEMMs at the card's power limit for seconds on end,
    and timing each implementation once, one after the other, would hand any clock drift to whichever
    comes last."""
    tokens, hidden, inter = shape
    modules = ffn_modules(hidden, inter, notes)
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=DTYPE).requires_grad_()
    grad_y = torch.randn(tokens, hidden, device=DEVICE, dtype=DTYPE)
    flops = 18 * tokens * hidden * inter  # 3 GEMMs forward, 6 backward, 2*M*N*K each
    expected = None
    steps, checks = {}, {}
    for name, module in modules.items():
        params = list(module.parameters())
        step = ffn_step(module, x, grad_y)
        step()
        step()
        out = module(x).detach()
        if expected is None:
            expected = out.float()
        err = rel_err(out, expected)
        del out
        for p in params:
            p.grad = None
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        module(x).backward(grad_y)
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        for p in params:
            p.grad = None
        x.grad = None
        torch.cuda.empty_cache()
        steps[name] = step
        checks[name] = (peak_mib, err)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(bench_ms(step, warmup=warmup, rep=rep))
    split = {name: gemm_split(kernel_times(step)[0]) for name, step in steps.items()}
    for name in steps:
        ms = sorted(times[name])[len(times[name]) // 2]
        peak_mib, err = checks[name]
        spread = ", ".join(f"{t:.3f}" for t in times[name])
        gemm_us, other_us = split[name]
        rows.append(Row("swiglu_ffn_fwdbwd", name, [tokens, hidden, inter], ms, TFLOPs=flops / ms / 1e9,
                        note=f"peak {peak_mib:,.0f} MiB above inputs; out rel err vs hf {err:.1e}; "
                             f"rounds {spread} ms; one profiled step: GEMMs {gemm_us / 1e3:.3f} ms, "
                             f"other kernels {other_us:,.0f} us",
                        extra={"peak_MiB_over_base": round(peak_mib, 1), "rounds_ms": times[name],
                               "profiled_gemm_us": round(gemm_us, 1),
                               "profiled_other_us": round(other_us, 1)}))
        log(f"  ffn {name:32s} {ms:8.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s  peak {peak_mib:7.0f} MiB  "
            f"err {err:.1e}  rounds {spread}")
    notes.append(f"FFN rows: median of {rounds} interleaved rounds (every implementation once per round, in "
                 "table order), each round a do_bench median. GEMM / other kernel times: one step under "
                 "torch.profiler from a synced GPU (cooler clocks than the sustained timed rounds).")
    hf, ours = split.get("hf LlamaMLP"), split.get("rotalabs SwiGLU")
    if hf and ours and copy_gbps:
        # the activation's least traffic: forward 3 passes, backward 6 (3 reads, 2 gradients and the
        # recomputed activation), at the measured copy rate; the nine GEMMs are the same cuBLAS calls
        # in both, so hf's own GEMM time is the fair one (one profiled step each: a few % of clock noise)
        floor_us = 9 * tokens * inter * ELT / copy_gbps / 1e3
        bound = sum(hf) / (hf[0] + floor_us)
        notes.append(
            f"FFN bound: in one profiled step hf LlamaMLP's kernels take {sum(hf) / 1e3:.3f} ms (GEMMs "
            f"{hf[0] / 1e3:.3f}, the rest {hf[1]:,.0f} us), rotalabs SwiGLU's {sum(ours) / 1e3:.3f} ms "
            f"(GEMMs {ours[0] / 1e3:.3f}, activation and the rest {ours[1]:,.0f} us). The activation's 9 "
            f"passes at the copy ceiling take {floor_us:,.0f} us, so with hf's GEMM time the block can be "
            f"at most {bound:.3f}x faster than hf in GPU time, whatever the activation kernels do")


# --------------------------------------------------------------------------------------------------
# Launch-configuration sweep
# --------------------------------------------------------------------------------------------------


def sweep_candidates(n_cols: int):
    from rotalabs_accel.triton_kernels.swiglu import SwiGLULaunchConfig

    widest = 1 << max(0, (n_cols - 1).bit_length())
    out = []
    for block_n in (256, 512, 1024, 2048, 4096):
        if block_n > max(widest, 256):
            continue
        for elements in (2048, 4096, 8192, 16384):
            if elements < block_n:
                continue
            for warps in (2, 4, 8, 16):
                if 8 <= elements // (32 * warps) <= 64:
                    out.append(SwiGLULaunchConfig(elements // block_n, block_n, warps))
    # Contiguous operands tiled as one long row (no partial column tiles), as a flat pointwise kernel.
    for elements in (1024, 2048, 4096, 8192, 16384):
        for warps in (2, 4, 8, 16):
            if 8 <= elements // (32 * warps) <= 32:
                out.append(SwiGLULaunchConfig(1, elements, warps, flat=True))
    return out


SWEEP_KINDS = ("fwd", "bwd", "bwd_h", "bwd_h_packed")


def parse_configs(text: str):
    """``BMxBNxW`` (2-D tiles) or ``flatNxW`` (contiguous operands as one row of N-element tiles) items,
    comma-separated, as launch configurations."""
    from rotalabs_accel.triton_kernels.swiglu import SwiGLULaunchConfig

    out = []
    for item in text.split(","):
        if item.startswith("flat"):
            elements, warps = (int(v) for v in item[4:].split("x"))
            out.append(SwiGLULaunchConfig(1, elements, warps, flat=True))
        else:
            bm, bn, warps = (int(v) for v in item.split("x"))
            out.append(SwiGLULaunchConfig(bm, bn, warps))
    return out


def bench_sweep(shapes, rows: list[Row], ceiling: float, warmup: int, rep: int,
                configs: list | None = None) -> list[str]:
    """Sweep launch configurations; ``shapes`` is a list of ``((m, n), kinds)``.

    Kinds: ``fwd`` / ``bwd`` (the activation's kernels, separate contiguous operands), ``bwd_h`` (the
    feed-forward block's backward: in place over ``gate``, ``up`` and ``grad_out``, also storing the
    recomputed activation: 3 reads, 3 writes) and ``bwd_h_packed`` (the same over one ``[m, 2n]``
    gate|up buffer, as with fused_gate_up). In-place kinds rewrite their inputs on every run; the
    values drift, the traffic does not. ``configs``: time these (and the table's choice) only, instead
    of the candidate grid and its second stage.
    """
    from dataclasses import replace

    from rotalabs_accel.triton_kernels import swiglu as k

    summary = []
    for (m, n), wanted in shapes:
        gate = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
        up = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
        grad = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
        out, dgate, dup = torch.empty_like(gate), torch.empty_like(gate), torch.empty_like(gate)
        packed = torch.randn(m, 2 * n, device=DEVICE, dtype=DTYPE) if "bwd_h_packed" in wanted else None

        def forward(config, gate=gate, up=up, out=out):
            k.swiglu_forward(gate, up, out, config=config)

        def backward(config, grad=grad, gate=gate, up=up, dgate=dgate, dup=dup):
            k.swiglu_backward(grad, gate, up, dgate, dup, config=config)

        def backward_h(config, grad=grad, gate=gate, up=up):
            k.swiglu_backward(grad, gate, up, gate, up, grad, store_h=True, config=config)

        def backward_h_packed(config, grad=grad, gu=packed, m=m, n=n):
            k.swiglu_backward_rows(grad, gu, gu, gu, gu, grad, m, n, n, 2 * n, 2 * n, 2 * n, 2 * n, n,
                                   up_col=n, grad_up_col=n, store_h=True, config=config)

        kinds = {
            "fwd": (3, k.forward_config(m, n), forward),
            "bwd": (5, k.backward_config(m, n, store_h=False), backward),
            "bwd_h": (6, k.backward_config(m, n, store_h=True), backward_h),
            "bwd_h_packed": (6, k.backward_config(m, n, store_h=True), backward_h_packed),
        }
        for kind, (passes, default, launch) in kinds.items():
            if kind not in wanted:
                continue
            nbytes = passes * m * n * ELT
            results: dict = {}

            def measure(config, launch=launch, results=results, nbytes=nbytes, kind=kind, shape=(m, n)):
                if config not in results:
                    ms = bench_ms(lambda: launch(config), warmup=warmup, rep=rep)
                    results[config] = ms
                    rows.append(Row(f"sweep_{kind}", "rotalabs", list(shape), ms, gbps(nbytes, ms),
                                    pct_of_ceiling=100 * gbps(nbytes, ms) / ceiling, note=str(config)))
                return results[config]

            t0 = time.time()
            measure(default)
            for config in configs or sweep_candidates(n):
                if kind == "bwd_h_packed" and config.flat:
                    continue  # strided halves: a flat config would run as its 2-D tile anyway
                measure(config)
            top = [] if configs else sorted(results, key=results.get)[:3]
            for config in top:  # second stage: cache hint, flat tiling, persistent grids around the best
                measure(replace(config, evict_first=not config.evict_first))
                measure(replace(config, flat=not config.flat))
                for per_sm in (2, 4, 8):
                    measure(replace(config, programs_per_sm=per_sm))
            ranked = sorted(results, key=results.get)
            log(f"  sweep {kind} {m}x{n}: {len(results)} configs in {time.time() - t0:.0f} s")
            for config in ranked[:5]:
                ms = results[config]
                log(f"    {ms:8.4f} ms {gbps(nbytes, ms):7.0f} GB/s  {config}")
            best, d_ms = ranked[0], results[default]
            line = (f"sweep {kind} {m}x{n}: best {gbps(nbytes, results[best]):,.0f} GB/s with {best}; "
                    f"default {gbps(nbytes, d_ms):,.0f} GB/s with {default}")
            log("  " + line)
            summary.append(line)
        del gate, up, grad, out, dgate, dup, packed
        torch.cuda.empty_cache()
    return summary


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------


def target_notes(rows: list[Row], rechecks: dict | None = None) -> list[str]:
    """The targets' verdicts; close calls carry their alternating rounds' verdict (``rechecks``)."""
    notes = []
    by = {(r.op, r.impl, tuple(r.shape)): r for r in rows}
    for (op, impl, shape), r in sorted(by.items()):
        if impl != "rotalabs" or op not in ("swiglu_fwd", "swiglu_fwdbwd"):
            continue
        target = TARGET_FWD_GBPS if op == "swiglu_fwd" else TARGET_FWDBWD_GBPS
        peers = {i: by[(op, i, shape)].GBps for (o, i, s) in by if o == op and s == shape and _is_peer(i)}
        best_peer = max(peers.items(), key=lambda kv: kv[1]) if peers else None
        status = "met" if r.GBps >= target else f"MISSED by {100 * (1 - r.GBps / target):.1f}%"
        ahead = ""
        if best_peer:
            lead = 100 * (r.GBps / best_peer[1] - 1)
            ahead = (f"; best peer {best_peer[0]} {best_peer[1]:,.0f} GB/s "
                     f"({'ahead' if lead > 0 else 'BEHIND'} by {lead:+.1f}%)")
        floor = by.get((op, SAME_BYTES, shape))
        if floor is not None:
            ahead += (f"; torch.add moving the same bytes {floor.GBps:,.0f} GB/s "
                      f"(ours {100 * r.GBps / floor.GBps:.1f}% of it)")
        if rechecks and (op, shape) in rechecks:
            ahead += f"; re-timed in {rechecks[(op, shape)]}"
        notes.append(f"target {op} {shape[0]}x{shape[1]}: {r.GBps:,.0f} GB/s vs {target:,} -> "
                     f"{status}{ahead}")
    ffn = {r.impl: r for r in rows if r.op == "swiglu_ffn_fwdbwd"}
    hf = ffn.get("hf LlamaMLP")
    liger = ffn.get("liger LigerSwiGLUMLP")
    for name in ("rotalabs SwiGLU", "rotalabs SwiGLU fused_gate_up"):
        ours = ffn.get(name)
        if ours is None or hf is None:
            continue
        speedup = hf.ms / ours.ms
        line = (f"target FFN {name}: {ours.ms:.3f} ms, {speedup:.3f}x vs hf LlamaMLP "
                f"({'met' if speedup >= TARGET_FFN_SPEEDUP_VS_HF else 'MISSED'} {TARGET_FFN_SPEEDUP_VS_HF}x)")
        compiled = ffn.get("hf LlamaMLP + torch.compile")
        if compiled is not None:
            line += (f"; vs hf LlamaMLP + torch.compile {compiled.ms / ours.ms:.3f}x "
                     f"({'faster' if ours.ms < compiled.ms else 'SLOWER'})")
        if liger is not None:
            mem_ours, mem_liger = ours.extra["peak_MiB_over_base"], liger.extra["peak_MiB_over_base"]
            faster = "faster" if ours.ms < liger.ms else "SLOWER"
            line += (f"; vs Liger {liger.ms / ours.ms:.3f}x ({faster}), "
                     f"peak {mem_ours:,.0f} vs {mem_liger:,.0f} MiB "
                     f"({'met' if mem_ours <= mem_liger else 'MISSED'})")
        notes.append(line)
    return notes


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_swiglu.py needs a CUDA GPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="directory for the result files")
    parser.add_argument("--quick", action="store_true", help="small shapes and short timings")
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep launch configurations of our kernels")
    parser.add_argument("--only", default=None, help="comma-separated parts to run: act, ffn, sweep")
    parser.add_argument("--sweep-shapes", default=None,
                        help="sweep these MxN shapes only (comma-separated, e.g. 8192x14336), every kind "
                             "of --sweep-kinds; default: the activation shapes (fwd, bwd) and the FFN "
                             "block's activation (bwd_h, bwd_h_packed)")
    parser.add_argument("--sweep-kinds", default=",".join(SWEEP_KINDS),
                        help=f"kinds swept with --sweep-shapes (of {', '.join(SWEEP_KINDS)})")
    parser.add_argument("--sweep-configs", default=None,
                        help="time only these configurations, e.g. 4x4096x16,2x4096x16,flat8192x16 "
                             "(BMxBNxWARPS or flatELEMENTSxWARPS)")
    args = parser.parse_args()
    require_cuda()
    parts = set(args.only.split(",")) if args.only else {"act", "ffn"} | ({"sweep"} if args.sweep else set())
    unknown = parts - {"act", "ffn", "sweep"}
    if unknown:
        sys.exit(f"--only: unknown parts {sorted(unknown)} (use act, ffn, sweep)")
    act_shapes = QUICK_ACT_SHAPES if args.quick else ACT_SHAPES
    ffn_shape = QUICK_FFN_SHAPE if args.quick else FFN_SHAPE
    warmup, rep = (10, 30) if args.quick else (50, 200)

    torch.manual_seed(0)
    rows: list[Row] = []
    notes = [
        "Bytes: activation forward 3 x M x N x 2 B, forward+backward 8 x M x N x 2 B (minimum traffic).",
        "Forward+backward calls torch.autograd.grad (fresh gradients, no accumulation into .grad).",
        "FFN peak memory: max_memory_allocated after reset minus memory_allocated before the step; x, grad_y "
        "and weights pre-exist; the output and every gradient count. TFLOP/s counts 9 GEMMs of 2*M*H*I.",
    ]
    t0 = time.time()
    copy_gbps, copy_ms = copy_ceiling_gbps()
    ceilings = {"copy_GBps": copy_gbps}
    log(f"{torch.cuda.get_device_name()}: copy ceiling {copy_gbps:,.0f} GB/s")
    rechecks: dict = {}
    if "act" in parts:
        log("activation:")
        bench_activation(act_shapes, rows, notes, copy_gbps, warmup, rep, rechecks,
                         rounds=3 if args.quick else RECHECK_ROUNDS)
        notes.append(f"Close calls: where ours and the fastest peer came within {100 * CLOSE_CALL:.0f}% of "
                     "each other, the two were timed again in alternating rounds (the order reversed every "
                     "other round), each a do_bench median; the table keeps the first timing.")
        bench_small(SMALL_SHAPE, rows, notes, warmup, rep, 200 if args.quick else 2000)
    if "ffn" in parts:
        log("feed-forward block:")
        bench_ffn(ffn_shape, rows, notes, warmup, rep, copy_gbps=copy_gbps)
    if "sweep" in parts:
        log("sweep:")
        if args.sweep_shapes:
            kinds = tuple(args.sweep_kinds.split(","))
            if set(kinds) - set(SWEEP_KINDS):
                sys.exit(f"--sweep-kinds: unknown kinds {sorted(set(kinds) - set(SWEEP_KINDS))}")
            plan = [(tuple(int(v) for v in shape.split("x")), kinds)
                    for shape in args.sweep_shapes.split(",")]
        else:
            plan = [(shape, ("fwd", "bwd")) for shape in act_shapes]
            plan.append(((ffn_shape[0], ffn_shape[2]), ("bwd_h", "bwd_h_packed")))
        configs = parse_configs(args.sweep_configs) if args.sweep_configs else None
        notes += bench_sweep(plan, rows, copy_gbps, 10, 50, configs)
    notes += target_notes(rows, rechecks)
    for line in notes:
        log("  " + line)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    name = f"swiglu-{gpu_slug()}-{date}" + ("-quick" if args.quick else "")
    if args.only:
        name += "-" + "-".join(sorted(parts))
    path = write_results(name, rows, ceilings, notes, out_dir=args.out)
    log(f"wrote {path} and {path.with_suffix('.md')} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
