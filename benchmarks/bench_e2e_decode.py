"""End-to-end benchmark: batch-1 greedy decoding of a Llama-3-8B-shaped model, bf16 against our int8.

Run on a CUDA machine from the repository root::

    python benchmarks/bench_e2e_decode.py             # 32 layers, 16-token prompt, 128 new tokens
    python benchmarks/bench_e2e_decode.py --quick     # 4 layers, 32 new tokens (a smoke test on the GPU)
    python benchmarks/bench_e2e_decode.py --cpu-smoke # a tiny model on the CPU: checks the whole script

The model is built from a ``LlamaConfig`` with random weights (no download): hidden 4096, intermediate
14336, 32 query / 8 key-value heads of 128, vocabulary 128256, RoPE theta 500000, bf16. One process, one
model, converted in place stage by stage (every stage is guarded: a failure becomes a row saying why and the
next stage runs; results are rewritten after each stage):

1. ``hf eager``: ``model.generate(do_sample=False)`` with Hugging Face's dynamic cache.
2. ``bf16 graph`` / ``bf16 compile+graph``: the same modules driven by
   :class:`rotalabs_accel.generation.StaticCacheDecoder` (static KV cache, the decode step captured as
   one CUDA graph; the second also compiles the per-layer step with ``torch.compile``).
3. ``rotalabs bf16 ...``: after ``optimize_model(model)`` (Triton RMSNorm, SwiGLU, RoPE, fused
   residual-add + RMSNorm), same harness.
4. ``rotalabs int8 ...``: after ``optimize_model(model, quantize="int8")`` (every linear layer but
   ``lm_head`` as INT8 weights), same harness.
5. ``rotalabs int8+lm_head ...``: ``lm_head`` quantized as well.
6. ``rotalabs int8+lm_head+embed ...``: the embedding table too
   (``quantize_model(model, skip=(), embeddings=True)``: an INT8 table with per-row fp32 scales, rows
   dequantized as they are gathered). The bf16 table is 1.05 GB of the 16.06 GB: without this stage the
   weight memory stays above 0.52x of bf16.

Reported per row: ms per generated token (decode steps only; prefill reported apart), tokens/s, weights
read per token and the achieved GB/s, the model's weight memory (bytes of its parameters and buffers) and
its ratio to bf16, peak memory, compile and capture time, and agreement with the ``hf eager`` tokens:
the longest common prefix and the share of equal tokens when decoding freely, and the share of positions
whose greedy token matches when fed the reference sequence (teacher forcing), with the logits' relative
error there. Writes ``e2e_decode-<gpu>-<date>.json`` and ``.md`` (see ``common.write_results``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

try:
    import rotalabs_accel  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import LLAMA3_8B, RESULTS_DIR, Row, copy_ceiling_gbps, gpu_slug, write_results  # noqa: E402
from rotalabs_accel import optimize_model  # noqa: E402
from rotalabs_accel.generation import StaticCacheDecoder  # noqa: E402
from rotalabs_accel.quantization.symmetric import quantize_model  # noqa: E402

OP = "decode_llama3_8b"

TINY = dict(LLAMA3_8B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32)

# The issue's targets (H100): int8 in the compiled + CUDA-graph harness against bf16 in the same harness.
TARGET_INT8_SPEEDUP = 1.7
TARGET_INT8_TOK_S = 210.0
TARGET_WEIGHT_RATIO = 0.52
ANCHOR_HF_EAGER_MS = 9.518  # shared/anchors: HF eager bf16, same shape, transformers 5.17


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def allocated_gb(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else None


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def bytes_read_per_token(model: torch.nn.Module) -> int:
    """Weights a decode step reads: everything but the embedding table, of which it reads one row.

    The table's bytes are those of the embedding module's own tensors (a float ``weight``, or an INT8
    table and its per-row scales); an embedding tied to ``lm_head`` owns none (``lm_head`` reads the
    whole table anyway).
    """
    embed = model.model.embed_tokens
    table = tensor_bytes(embed)
    return tensor_bytes(model) - table + table // max(embed.num_embeddings, 1)


def build_model(config_kwargs: dict, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` with Hugging Face's random initialisation, created directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs, attn_implementation="sdpa", bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") != config_kwargs["rope_theta"]:
        params["rope_theta"] = config_kwargs["rope_theta"]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in bf16: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Agreement with the reference tokens
# --------------------------------------------------------------------------------------------------


class Reference:
    """Tokens of the first successful run (``hf eager``) and the bf16 model's logits on them."""

    def __init__(self, tokens: torch.Tensor, prompt_len: int, logits: torch.Tensor | None, source: str):
        self.tokens = tokens
        self.prompt_len = prompt_len
        self.logits = logits  # [new_tokens, vocab] fp32: predictions for positions prompt_len..end
        self.source = source


def agreement(tokens: torch.Tensor, ref: Reference | None, tf_logits: torch.Tensor | None) -> dict:
    if ref is None:
        return {}
    p = ref.prompt_len
    gen, ref_gen = tokens[0, p:].cpu(), ref.tokens[0, p:].cpu()
    equal = gen == ref_gen
    prefix = int(equal.long().cumprod(0).sum())
    out = {
        "ref": ref.source,
        "match_prefix": prefix,
        "agree_free": float(equal.float().mean()),
        "distinct_tokens": int(gen.unique().numel()),
    }
    if tf_logits is not None:
        pred = tf_logits.argmax(-1).cpu()
        out["agree_teacher_forced"] = float((pred == ref_gen).float().mean())
        if ref.logits is not None:
            diff = (tf_logits.float() - ref.logits).norm() / ref.logits.norm()
            out["logits_rel_err"] = float(diff)
    return out


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        self.args = args
        self.device = device
        self.dtype = dtype
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.ceilings: dict = {}
        self.ref: Reference | None = None
        self.bf16_weight_bytes: int | None = None
        self.bf16_read_bytes: int | None = None
        self.name = ""
        self.out_dir: Path | None = None
        self.prompt: torch.Tensor | None = None

    @property
    def shape(self) -> list:
        return [1, self.args.prompt_len, self.args.new_tokens]

    def save(self) -> Path:
        return write_results(self.name, self.rows, self.ceilings, self.notes, out_dir=self.out_dir)

    def fail(self, impl: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
        log(f"  {impl}: FAILED {msg}")
        traceback.print_exc()
        self.rows.append(Row(OP, impl, self.shape, float("nan"), note=f"failed: {msg}"))
        free_memory(self.device)

    def add_row(self, impl: str, ms_tok: float, model: torch.nn.Module, extra: dict, note: str = "") -> None:
        read = bytes_read_per_token(model)
        weights = tensor_bytes(model)
        gbps = read / ms_tok / 1e6 if ms_tok > 0 else None
        extra = {
            "tok_s": 1e3 / ms_tok if ms_tok > 0 else None,
            "weight_GB": weights / 1e9,
            "weight_ratio_vs_bf16": weights / self.bf16_weight_bytes if self.bf16_weight_bytes else None,
            "read_GB_per_token": read / 1e9,
            "read_ratio_vs_bf16": read / self.bf16_read_bytes if self.bf16_read_bytes else None,
            **extra,
        }
        ceiling = self.ceilings.get("copy_GBps")
        pct = 100 * gbps / ceiling if gbps and ceiling else None
        bits = [f"{extra['tok_s']:.1f} tok/s", f"weights {weights / 1e9:.2f} GB"]
        if extra["weight_ratio_vs_bf16"] is not None:
            bits[-1] += f" ({extra['weight_ratio_vs_bf16']:.3f}x)"
        if extra.get("peak_GB") is not None:
            bits.append(f"peak {extra['peak_GB']:.2f} GB")
        if extra.get("compile_s") is not None:
            bits.append(f"compile {extra['compile_s']:.0f} s")
        if "agree_teacher_forced" in extra:
            bits.append(f"vs {extra['ref']}: teacher-forced {extra['agree_teacher_forced']:.3f}, "
                        f"free-running prefix {extra['match_prefix']}/{self.args.new_tokens}")
        if note:
            bits.append(note)
        note = "; ".join(bits)
        self.rows.append(Row(OP, impl, self.shape, ms_tok, GBps=gbps, pct_of_ceiling=pct, note=note,
                             extra=extra))
        log(f"  {impl:32s} {ms_tok:8.3f} ms/token {gbps or 0:7.0f} GB/s  {note}")
        self.save()

    # ---- stage 1: Hugging Face eager -------------------------------------------------------------

    def hf_eager(self, model: torch.nn.Module) -> None:
        impl = "hf eager"
        try:
            prompt = self.prompt
            mask = torch.ones_like(prompt)
            n = self.args.new_tokens

            def run(new: int) -> tuple[torch.Tensor, float]:
                sync(self.device)
                t0 = time.perf_counter()
                # no end-of-sequence token in the config: exactly `new` tokens, like the harness
                out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new,
                                     do_sample=False)
                sync(self.device)
                return out, 1e3 * (time.perf_counter() - t0)

            run(4)  # first-call set-up (cuBLAS handles, SDPA selection)
            reset_peak(self.device)
            totals, firsts = [], []
            for _ in range(self.args.repeats):
                out, total = run(n)
                _, first = run(1)
                totals.append(total)
                firsts.append(first)
            total, first = statistics.median(totals), statistics.median(firsts)
            ms_tok = (total - first) / max(n - 1, 1)
            peak = peak_gb(self.device)
            with torch.no_grad():
                logits = model(input_ids=out[:, :-1]).logits[0, self.args.prompt_len - 1:].float()
            self.ref = Reference(out, self.args.prompt_len, logits, impl)
            extra = agreement(out, self.ref, logits)
            extra.update({"peak_GB": peak, "prefill_ms": first, "e2e_ms_per_token": total / n,
                          "method": "(t(generate n) - t(generate 1)) / (n - 1), medians of repeats"})
            self.add_row(impl, ms_tok, model, extra,
                         note=f"anchor {ANCHOR_HF_EAGER_MS} ms/token (transformers 5.17)")
        except Exception as exc:
            self.fail(impl, exc)

    # ---- stages 2-6: the static-cache harness ----------------------------------------------------

    def harness(self, model: torch.nn.Module, label: str, compile_mode: str | None) -> None:
        impl = f"{label} {'compile+graph' if compile_mode else 'graph'}"
        if self.device.type != "cuda":
            impl = f"{label} {'compile' if compile_mode else 'eager'}"
        decoder = None
        try:
            n = self.args.new_tokens
            if compile_mode:
                torch._dynamo.reset()
            free_memory(self.device)
            reset_peak(self.device)
            decoder = StaticCacheDecoder(model, self.args.prompt_len + n, compile=compile_mode or False)
            t0 = time.perf_counter()
            decoder.warmup()
            setup_s = time.perf_counter() - t0
            if compile_mode:
                log(f"  {impl}: compile {decoder.compile_seconds:.1f} s, "
                    f"capture {decoder.capture_seconds or 0:.1f} s")
            decoder.generate(self.prompt, n)  # first run: lazy initialisation outside the timing
            timings, out = [], None
            for _ in range(self.args.repeats):
                out = decoder.generate(self.prompt, n)
                timings.append(dict(decoder.last_timing))
            decode = statistics.median(t["decode_ms"] for t in timings)
            prefill = statistics.median(t["prefill_ms"] for t in timings)
            steps = timings[0]["decode_steps"]
            ms_tok = decode / steps
            peak = peak_gb(self.device)
            tf_logits = None
            if self.ref is not None:
                # through the decode step itself (compiled and captured), fed the reference tokens
                seq = self.ref.tokens[:, :-1]
                tf_logits = decoder.decode_logits(seq, self.args.prompt_len)[0].float()
            elif out is not None:
                self.ref = Reference(out, self.args.prompt_len, None, impl)
            extra = agreement(out, self.ref, tf_logits)
            extra.update({
                "peak_GB": peak,
                "prefill_ms": prefill,
                "e2e_ms_per_token": (prefill + decode) / n,
                "compile_s": decoder.compile_seconds,
                "capture_s": decoder.capture_seconds,
                "setup_s": setup_s,
                "compile_mode": compile_mode,
            })
            self.add_row(impl, ms_tok, model, extra)
        except Exception as exc:
            self.fail(impl, exc)
        finally:
            del decoder
            if compile_mode:
                torch._dynamo.reset()  # compiled code must not keep this model state's tensors alive
            free_memory(self.device)

    def harness_rows(self, model: torch.nn.Module, label: str) -> None:
        for mode in self.args.harness:
            self.harness(model, label, None if mode == "graph" else self.args.compile_mode)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


INT8_LABELS = ("rotalabs int8", "rotalabs int8+lm_head", "rotalabs int8+lm_head+embed")


def summarize(bench: Bench) -> None:
    by_impl = {r.impl: r for r in bench.rows if r.ms == r.ms}  # drop failed rows (NaN)
    suffix = "compile+graph" if bench.device.type == "cuda" else "compile"
    bf16 = by_impl.get(f"bf16 {suffix}")
    hf = by_impl.get("hf eager")
    lines = []
    # per target, the int8 rows that meet it: the issue's targets hold when one row meets all three
    meets: dict[str, set[str]] = {}
    for label in INT8_LABELS:
        row = by_impl.get(f"{label} {suffix}")
        if row is None:
            continue
        tok_s = row.extra["tok_s"]
        ratio = row.extra.get("weight_ratio_vs_bf16")
        read_ratio = row.extra.get("read_ratio_vs_bf16")
        met = set()
        if tok_s >= TARGET_INT8_TOK_S:
            met.add("tok_s")
        parts = [f"{label} {suffix}: {tok_s:.1f} tok/s (target >= {TARGET_INT8_TOK_S:.0f}: "
                 f"{'met' if tok_s >= TARGET_INT8_TOK_S else 'NOT met'})"]
        if bf16 is not None:
            speedup = tok_s / bf16.extra["tok_s"]
            if speedup >= TARGET_INT8_SPEEDUP:
                met.add("speedup")
            parts.append(f"{speedup:.2f}x bf16 {suffix} (target >= {TARGET_INT8_SPEEDUP}: "
                         f"{'met' if speedup >= TARGET_INT8_SPEEDUP else 'NOT met'})")
        if hf is not None:
            parts.append(f"{tok_s / hf.extra['tok_s']:.2f}x hf eager")
        if ratio is not None:
            if ratio <= TARGET_WEIGHT_RATIO:
                met.add("memory")
            table = "INT8 embedding table" if label.endswith("+embed") else "the bf16 embedding table counts"
            parts.append(f"weight memory {ratio:.3f}x bf16 (target <= {TARGET_WEIGHT_RATIO}: "
                         f"{'met' if ratio <= TARGET_WEIGHT_RATIO else 'NOT met'}; {table}) and "
                         f"weights read per token {read_ratio:.3f}x")
        if "agree_teacher_forced" in row.extra:
            parts.append(f"teacher-forced agreement with {row.extra['ref']} "
                         f"{row.extra['agree_teacher_forced']:.3f}, free-running prefix "
                         f"{row.extra['match_prefix']}/{bench.args.new_tokens}")
        lines.append("; ".join(parts))
        meets[label] = met
    if meets:
        wanted = {"tok_s", "speedup", "memory"} if bf16 is not None else {"tok_s", "memory"}
        complete = [label for label, met in meets.items() if wanted <= met]
        names = {"tok_s": f">= {TARGET_INT8_TOK_S:.0f} tok/s", "speedup": f">= {TARGET_INT8_SPEEDUP}x bf16",
                 "memory": f"weight memory <= {TARGET_WEIGHT_RATIO}x"}
        if complete:
            lines.append(f"decode targets ({', '.join(names[t] for t in sorted(wanted))}): all met by "
                         f"{', '.join(f'{c} {suffix}' for c in complete)}")
        else:
            by_target = []
            for t in sorted(wanted):
                rows = [label for label, met in meets.items() if t in met]
                by_target.append(f"{names[t]}: {', '.join(rows) or 'no row'}")
            lines.append("decode targets: no int8 row meets all of them; " + "; ".join(by_target))
    for line in lines:
        bench.notes.append(line)
        log(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {RESULTS_DIR})")
    parser.add_argument("--quick", action="store_true", help="4 layers, 32 new tokens, 2 repeats")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a tiny model on the CPU (no CUDA graphs): exercises every stage of the script")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --quick 4)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (--quick 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed generations per row (default 3)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the compiled rows (default 'default'; "
                             "'max-autotune-no-cudagraphs' autotunes the GEMMs, slower to compile)")
    parser.add_argument("--harness", default="graph,compile",
                        help="harness variants per model state: graph (eager modules in a CUDA graph), "
                             "compile (torch.compile + CUDA graph); comma-separated")
    parser.add_argument("--skip", default="",
                        help="stages to skip, comma-separated: hf, bf16, ours_bf16, int8, int8_lm_head, "
                             "int8_embed")
    args = parser.parse_args(argv)
    args.harness = [h for h in args.harness.split(",") if h]
    skip = {s for s in args.skip.split(",") if s}
    stages = {"hf", "bf16", "ours_bf16", "int8", "int8_lm_head", "int8_embed"}
    if set(args.harness) - {"graph", "compile"} or skip - stages:
        parser.error(f"--harness takes graph,compile and --skip a subset of {sorted(stages)}")

    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.bfloat16
        config = dict(TINY)
        args.new_tokens = args.new_tokens or 12
        args.prompt_len = min(args.prompt_len, 8)
        args.repeats = args.repeats or 1
    else:
        if not torch.cuda.is_available():
            log("no CUDA device: run with --cpu-smoke to check the script on the CPU")
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = dict(LLAMA3_8B)
        if args.quick:
            config["num_hidden_layers"] = 4
        args.new_tokens = args.new_tokens or (32 if args.quick else 128)
        args.repeats = args.repeats or (2 if args.quick else 3)
    if args.layers:
        config["num_hidden_layers"] = args.layers

    bench = Bench(args, device, dtype)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    if args.cpu_smoke:
        bench.name = f"e2e_decode-cpu-smoke-{date}"
        bench.out_dir = args.out or Path(tempfile.mkdtemp(prefix="e2e_decode_smoke_"))
    else:
        bench.name = f"e2e_decode-{gpu_slug()}-{date}" + ("-quick" if args.quick else "")
        bench.out_dir = args.out
    bench.notes.append(
        f"Llama-3-8B-shaped model with random weights: {config['num_hidden_layers']} layers, hidden "
        f"{config['hidden_size']}, intermediate {config['intermediate_size']}, heads "
        f"{config['num_attention_heads']}/{config['num_key_value_heads']}x{config['head_dim']}, vocab "
        f"{config['vocab_size']}, {str(dtype).replace('torch.', '')}; batch 1, prompt {args.prompt_len} "
        f"tokens, {args.new_tokens} new tokens, greedy; ms is per generated token (decode steps only)."
    )
    bench.notes.append(
        "Harness rows: rotalabs_accel.generation.StaticCacheDecoder (static KV cache, the decode step "
        f"captured as one CUDA graph; 'compile' rows also torch.compile the per-layer step, mode "
        f"{args.compile_mode!r}). weight_GB: bytes of the model's parameters and buffers; "
        "read_GB_per_token: all of them but the embedding table (one row of it)."
    )
    t_start = time.perf_counter()
    # one compiled region per model state (bf16, optimized, int8): well under the limit, but a
    # rerun of a stage must not fall back to eager silently
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 16))
            break

    if device.type == "cuda":
        try:
            gbps, _ = copy_ceiling_gbps(1024**3)
            bench.ceilings["copy_GBps"] = gbps
            log(f"copy ceiling {gbps:,.0f} GB/s")
        except Exception as exc:
            bench.notes.append(f"copy ceiling failed: {type(exc).__name__}: {exc}")

    log(f"building the model ({config['num_hidden_layers']} layers) on {device}")
    t0 = time.perf_counter()
    model = build_model(config, device, dtype, seed=0)
    sync(device)
    bench.bf16_weight_bytes = tensor_bytes(model)
    bench.bf16_read_bytes = bytes_read_per_token(model)
    log(f"  built in {time.perf_counter() - t0:.1f} s: {bench.bf16_weight_bytes / 1e9:.2f} GB of weights, "
        f"allocated {allocated_gb(device) or 0:.2f} GB")
    gen = torch.Generator().manual_seed(1234)
    bench.prompt = torch.randint(0, config["vocab_size"], (1, args.prompt_len), generator=gen).to(device)
    bench.save()

    if "hf" not in skip:
        log("stage: hf eager")
        bench.hf_eager(model)
    if "bf16" not in skip:
        log("stage: bf16 harness")
        bench.harness_rows(model, "bf16")
    if "ours_bf16" not in skip:
        log("stage: optimize_model(model)")
        try:
            model, report = optimize_model(model, report=True)
            log(f"  {report.summary()}")
            bench.notes.append(report.summary())
            bench.harness_rows(model, "rotalabs bf16")
        except Exception as exc:
            bench.fail("rotalabs bf16", exc)
    if "int8" not in skip:
        log("stage: optimize_model(model, quantize='int8')")
        try:
            t0 = time.perf_counter()
            model, report = optimize_model(model, quantize="int8", report=True)
            sync(device)
            log(f"  quantized in {time.perf_counter() - t0:.1f} s; {report.summary()}; "
                f"allocated {allocated_gb(device) or 0:.2f} GB")
            bench.notes.append(report.summary())
            bench.harness_rows(model, "rotalabs int8")
        except Exception as exc:
            bench.fail("rotalabs int8", exc)
    if "int8_lm_head" not in skip:
        log("stage: lm_head quantized too")
        try:
            model = optimize_model(model, quantize="int8", skip=())
            bench.harness_rows(model, "rotalabs int8+lm_head")
        except Exception as exc:
            bench.fail("rotalabs int8+lm_head", exc)
    if "int8_embed" not in skip:
        log("stage: embedding table quantized too")
        try:
            t0 = time.perf_counter()
            # quantize_model directly: every linear layer is INT8 already, and it converts what is left
            # (the embedding; lm_head too when the int8_lm_head stage was skipped)
            model, qreport = quantize_model(model, skip=(), embeddings=True, report=True)
            sync(device)
            log(f"  quantized in {time.perf_counter() - t0:.1f} s; {qreport.summary()}; "
                f"allocated {allocated_gb(device) or 0:.2f} GB")
            bench.notes.append(qreport.summary())
            bench.harness_rows(model, "rotalabs int8+lm_head+embed")
        except Exception as exc:
            bench.fail("rotalabs int8+lm_head+embed", exc)

    summarize(bench)
    bench.notes.append(f"total run time {time.perf_counter() - t_start:.0f} s")
    path = bench.save()
    log(f"total {time.perf_counter() - t_start:.0f} s; wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
