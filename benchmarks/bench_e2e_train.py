"""End-to-end benchmark: forward + backward of a 2-layer Llama-3-8B-shaped model, eager / Liger / ours.

Run on a CUDA machine from the repository root::

    python benchmarks/bench_e2e_train.py              # vocabularies 128256 and 32000, every implementation
    python benchmarks/bench_e2e_train.py --quick      # vocabulary 128256 only, fewer steps
    python benchmarks/bench_e2e_train.py --cpu-smoke  # a tiny model on the CPU: checks the whole script

The model: ``LlamaForCausalLM`` built from a config with random weights (no download), hidden 4096,
intermediate 14336, 32 query / 8 key-value heads of 128, RoPE theta 500000, 2 decoder layers, bf16
parameters, attention through SDPA. One step: ``model(input_ids, labels=labels).loss.backward()`` on a
batch of 2 x 4096 random tokens with random labels (gradients set to ``None`` before each step; no
optimizer). Implementations, each in its own process (Liger-Kernel patches Hugging Face's modeling module
for the whole process) on weights built from the same seed (checked by a fingerprint):

* ``hf eager``: the model as built.
* ``liger``: ``apply_liger_kernel_to_llama(model=model)`` with its defaults (RoPE, RMSNorm, SwiGLU and the
  fused linear cross entropy, which never materialises the logits).
* ``liger (no FLCE)``: the same without the fused linear cross entropy (Hugging Face's loss on logits).
* ``liger (CE kernel)``: without the fused linear cross entropy, with Liger's cross-entropy kernel.
* ``rotalabs (HF loss)``: ``optimize_model(model, cross_entropy=False)`` (RMSNorm, SwiGLU, RoPE, fused
  residual add + RMSNorm; the loss is Hugging Face's).
* ``rotalabs``: ``optimize_model(model)``, which also sets the model's loss function to the library's
  Triton cross entropy (logits read in bf16, never upcast or overwritten), makes the input embedding a
  ``TritonEmbedding`` (the table's gradient by one deterministic kernel) and skips transformers'
  packed-sequence check, a GPU-to-host sync at the start of every forward without positions or mask.

Per row: median step time over the timed steps (CUDA events per step), model TFLOP/s (``6 x tokens x
linear parameters`` plus causal attention), peak memory during the timed steps (weights and gradients
included), the loss and its difference from ``hf eager``, and the relative error of sampled gradients
against ``hf eager``. With vocabulary 128256 the ``lm_head`` GEMMs alone are 26 of the step's 49 TFLOP
and the fp32 logits of the loss take 4 GB; the vocabulary-32000 rows (``LlamaConfig``'s default) show the
decoder layers' share more clearly, and are the shape of the anchors (eager 50.0 ms, Liger 40.2 ms: 29.5
TFLOP, 590 TFLOP/s; the same times with vocabulary 128256 would need 980 TFLOP/s, the H100's dense peak).
``--profile`` adds the top GPU kernels of one step per implementation.

Writes ``e2e_train-<gpu>-<date>.json`` and ``.md`` (see ``common.write_results``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
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

from common import LLAMA3_8B, RESULTS_DIR, Row, gemm_ceiling_tflops, gpu_slug, write_results  # noqa: E402

OP = "llama3_8b_2L_fwdbwd"

LLAMA3_8B_2L = dict(LLAMA3_8B, num_hidden_layers=2)
TINY = dict(LLAMA3_8B_2L, hidden_size=128, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)

# key -> (label, description)
IMPLS = {
    "eager": ("hf eager", "Hugging Face LlamaForCausalLM, SDPA attention"),
    "liger": ("liger", "apply_liger_kernel_to_llama(model=model): RoPE, RMSNorm, SwiGLU, fused linear CE"),
    "liger_noflce": ("liger (no FLCE)", "apply_liger_kernel_to_llama(fused_linear_cross_entropy=False)"),
    "liger_ce": ("liger (CE kernel)",
                 "apply_liger_kernel_to_llama(fused_linear_cross_entropy=False, cross_entropy=True)"),
    "rotalabs_hfloss": ("rotalabs (HF loss)",
                        "optimize_model(model, cross_entropy=False): Hugging Face's loss"),
    "rotalabs": ("rotalabs", "optimize_model(model): also the Triton cross-entropy loss, the embedding "
                 "gradient kernel and no packed-sequence sync"),
}

# The target (H100): this library >= 1.3x eager and faster than Liger-Kernel in the same run.
TARGET_SPEEDUP_VS_EAGER = 1.3
# Anchors (shared/anchors, Liger-Kernel 0.8.5): their FLOP rate only fits vocabulary 32000 (see above).
ANCHOR_VOCAB = 32000
ANCHOR = {"hf eager": 49.98, "liger": 40.20}

# Gradients compared against hf eager (a fixed sample of each).
GRAD_NAMES = (
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)
GRAD_SAMPLES = 4096
# Loss agreement with hf eager: a mean over 8k tokens of bf16-rounded logits; correct implementations
# differ by far less than one bf16 unit of the loss (~4e-3 relative).
LOSS_RTOL = 2e-3


def log(msg: str) -> None:
    print(msg, flush=True)


def model_flops(config: dict, batch: int, seq: int) -> float:
    """Forward + backward FLOPs: 6 x tokens x linear parameters + causal attention (3 x forward)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    linear = layers * (h * (q + 2 * kv) + q * h + 3 * h * inter) + h * config["vocab_size"]
    tokens = batch * seq
    attention_fwd = layers * 2 * batch * seq * seq * q  # QK^T and PV, half of the square (causal)
    return 6 * tokens * linear + 3 * attention_fwd


# --------------------------------------------------------------------------------------------------
# Worker: one implementation in a fresh process
# --------------------------------------------------------------------------------------------------


def build_model(config_kwargs: dict, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs, attn_implementation="sdpa", use_cache=False)
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") != config_kwargs["rope_theta"]:
        params["rope_theta"] = config_kwargs["rope_theta"]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in bf16 directly
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.train()


def _sample_index(flat: torch.Tensor, samples: int) -> torch.Tensor:
    """Evenly spaced indices into ``flat`` (integer arithmetic: a float32 linspace overshoots the last
    index of a 500M-element embedding table)."""
    count = min(flat.numel(), samples)
    steps = torch.arange(count, device=flat.device, dtype=torch.int64)
    return steps * (flat.numel() - 1) // max(count - 1, 1)


def fingerprint(model: torch.nn.Module) -> float:
    """A number that changes with any difference in the initial weights (same seed -> same value)."""
    total = 0.0
    for i, (_, p) in enumerate(sorted(model.named_parameters())):
        flat = p.detach().flatten()
        idx = _sample_index(flat, 65536)
        total += (i + 1) * float(flat[idx].double().sum())
    return total


def apply_impl(key: str, model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    if key == "eager":
        return model, ""
    if key.startswith("liger"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            fused_linear_cross_entropy=key == "liger", cross_entropy=key == "liger_ce", model=model
        )
        return model, ""
    if key in ("rotalabs", "rotalabs_hfloss"):
        from rotalabs_accel import optimize_model

        model, report = optimize_model(model, cross_entropy=key == "rotalabs", report=True)
        return model, report.summary()
    raise ValueError(f"unknown implementation {key!r}")


def grad_samples(model: torch.nn.Module) -> dict[str, list[float]]:
    params = dict(model.named_parameters())
    out = {}
    for name in GRAD_NAMES:
        p = params.get(name)
        if p is None or p.grad is None:
            continue
        flat = p.grad.detach().flatten()
        idx = _sample_index(flat, GRAD_SAMPLES)
        out[name] = flat[idx].float().cpu().tolist()
    return out


def profile_step(step, device: torch.device, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    if device.type == "cuda":
        keys = ("self_device_time_total", "self_cuda_time_total")  # the name changed across versions
    else:
        keys = ("self_cpu_time_total",)
    for key in keys:
        try:
            return averages.table(sort_by=key, row_limit=rows, max_name_column_width=80)
        except Exception:
            continue
    return averages.table(row_limit=rows)


def run_worker(args) -> dict:
    key = args.worker
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.bfloat16
    config = dict(TINY if args.cpu_smoke else LLAMA3_8B_2L, vocab_size=args.vocab)
    result: dict = {"impl": key, "vocab": args.vocab}
    t0 = time.perf_counter()
    model = build_model(config, device, dtype, seed=0)
    result["fingerprint"] = fingerprint(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["weights_GB"] = torch.cuda.memory_allocated(device) / 1e9
    model, note = apply_impl(key, model)
    result["note"] = note
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []

    def step():
        for p in params:
            p.grad = None
        out = model(input_ids=ids, labels=labels, use_cache=False)
        out.loss.backward()
        return out.loss

    for _ in range(args.warmup):
        losses.append(float(step().detach()))
    result["setup_s"] = time.perf_counter() - t0
    for p in params:
        p.grad = None
    gc.collect()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        events = []
        for _ in range(args.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            events.append((start, end, loss))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e, _ in events]
        losses += [float(loss.detach()) for _, _, loss in events]
        result["peak_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        for _ in range(args.steps):
            t = time.perf_counter()
            losses.append(float(step().detach()))
            times.append(1e3 * (time.perf_counter() - t))
    result["step_ms"] = times
    result["ms"] = statistics.median(times)
    result["loss"] = losses[-1]
    result["loss_spread"] = max(losses) - min(losses)  # same inputs and weights every step
    result["grads"] = grad_samples(model)
    if args.profile:
        result["profile"] = profile_step(step, device)
    result["ok"] = True
    return result


# --------------------------------------------------------------------------------------------------
# Parent: one worker per (vocabulary, implementation), rows, checks
# --------------------------------------------------------------------------------------------------


def rel_err(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    denom = tb.norm().item()
    return (ta - tb).norm().item() / denom if denom > 0 else (ta - tb).norm().item()


def spawn(args, key: str, vocab: int, result_path: Path) -> tuple[dict | None, str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", key, "--vocab", str(vocab),
           "--result", str(result_path), "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    if args.profile:
        cmd.append("--profile")
    env = dict(os.environ)
    if args.cpu_smoke and key.startswith("liger"):
        env.setdefault("TRITON_INTERPRET", "1")  # Liger's Triton kernels on CPU tensors
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        return None, f"timed out after {exc.timeout:.0f} s"
    output = (proc.stdout or "") + (proc.stderr or "")
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result.get("ok") or result.get("skipped") or result.get("error"):
            return result, output
    tail = " | ".join(line for line in output.strip().splitlines()[-3:])
    return None, f"exit code {proc.returncode}: {tail[-500:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {RESULTS_DIR})")
    parser.add_argument("--quick", action="store_true",
                        help="vocabulary 128256 only, 2 warm-up + 5 timed steps")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a tiny model on the CPU: runs every implementation and check of the script")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {list(IMPLS)}")
    parser.add_argument("--vocab", default=None,
                        help="vocabulary sizes, comma-separated (default 128256,32000; --quick 128256)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    parser.add_argument("--profile", action="store_true", help="also profile one step per implementation")
    parser.add_argument("--worker-timeout", type=float, default=600.0, help="seconds per implementation")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.vocab = int(args.vocab)
        try:
            try:
                result = run_worker(args)
            except ImportError as exc:
                result = {"impl": args.worker, "vocab": args.vocab, "skipped": f"{type(exc).__name__}: {exc}"}
        except BaseException as exc:
            traceback.print_exc()
            msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
            result = {"impl": args.worker, "vocab": args.vocab, "error": msg}
        args.result.write_text(json.dumps(result))
        return 0 if result.get("ok") or result.get("skipped") else 1

    if args.cpu_smoke:
        vocabs = [int(v) for v in (args.vocab or "512").split(",")]
        args.batch, args.seq = args.batch or 2, args.seq or 64
        args.steps, args.warmup = args.steps or 2, args.warmup or 1
    else:
        if not torch.cuda.is_available():
            log("no CUDA device: run with --cpu-smoke to check the script on the CPU")
            return 2
        vocabs = [int(v) for v in (args.vocab or ("128256" if args.quick else "128256,32000")).split(",")]
        args.batch, args.seq = args.batch or 2, args.seq or 4096
        args.steps = args.steps or (5 if args.quick else 10)
        args.warmup = args.warmup or (2 if args.quick else 3)
    keys = [k for k in args.impls.split(",") if k]
    unknown = [k for k in keys if k not in IMPLS]
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}; choose from {list(IMPLS)}")
    if "eager" in keys:  # the reference runs first
        keys.remove("eager")
        keys.insert(0, "eager")
    args.vocab = None

    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    if args.cpu_smoke:
        name = f"e2e_train-cpu-smoke-{date}"
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="e2e_train_smoke_"))
    else:
        name = f"e2e_train-{gpu_slug()}-{date}" + ("-quick" if args.quick else "")
        out_dir = args.out
    base = TINY if args.cpu_smoke else LLAMA3_8B_2L
    rows: list[Row] = []
    notes = [
        f"LlamaForCausalLM with random weights: {base['num_hidden_layers']} layers, hidden "
        f"{base['hidden_size']}, intermediate {base['intermediate_size']}, heads "
        f"{base['num_attention_heads']}/{base['num_key_value_heads']}x{base['head_dim']}, bf16 parameters, "
        "SDPA attention; batch "
        f"{args.batch} x {args.seq} tokens, random labels; step = forward (loss) + backward, no optimizer; "
        f"median of {args.steps} steps after {args.warmup} warm-up steps, CUDA events per step; each "
        "implementation in its own process on the same seeded weights.",
        "TFLOP/s: model FLOPs (6 x tokens x linear parameters, lm_head included, + causal attention) per "
        "step time. peak_GB: peak allocated memory during the timed steps (weights and gradients included).",
    ]
    notes += [f"{IMPLS[k][0]}: {IMPLS[k][1]}" for k in keys]
    profiles: list[str] = []
    t_start = time.perf_counter()
    ceilings: dict = {}
    if not args.cpu_smoke:
        try:
            ceilings["gemm_bf16_TFLOPs"] = gemm_ceiling_tflops(8192)
            torch.cuda.empty_cache()
            log(f"bf16 GEMM ceiling {ceilings['gemm_bf16_TFLOPs']:.0f} TFLOP/s")
        except Exception as exc:
            notes.append(f"GEMM ceiling failed: {type(exc).__name__}: {exc}")
    ceiling = ceilings.get("gemm_bf16_TFLOPs")
    work = Path(tempfile.mkdtemp(prefix="e2e_train_"))

    for vocab in vocabs:
        config = dict(base, vocab_size=vocab)
        flops = model_flops(config, args.batch, args.seq)
        op = f"{OP}_v{vocab}"
        shape = [args.batch, args.seq]
        results: dict[str, dict] = {}
        for key in keys:
            label = IMPLS[key][0]
            t0 = time.perf_counter()
            result, output = spawn(args, key, vocab, work / f"{key}-{vocab}.json")
            wall = time.perf_counter() - t0
            if result is None or result.get("error") or result.get("skipped"):
                why = output if result is None else result.get("error") or f"skipped: {result['skipped']}"
                status = "skipped" if result is not None and result.get("skipped") else "FAILED"
                log(f"  vocab {vocab} {label:18s} {status} ({wall:.0f} s): {why}")
                if result is not None and result.get("error"):
                    log(output[-3000:])
                prefix = "" if status == "skipped" else "failed: "
                rows.append(Row(op, label, shape, float("nan"), note=f"{prefix}{why}"[:500]))
                write_results(name, rows, ceilings, notes, out_dir=out_dir)
                continue
            results[key] = result
            ref = results.get("eager")
            extra = {k: result.get(k) for k in ("peak_GB", "weights_GB", "loss", "loss_spread", "setup_s",
                                                "step_ms", "fingerprint")}
            extra["worker_s"] = wall
            bits = []
            if ref is not None and key != "eager":
                extra["speedup_vs_eager"] = ref["ms"] / result["ms"]
                extra["loss_diff_vs_eager"] = result["loss"] - ref["loss"]
                extra["same_weights_as_eager"] = result["fingerprint"] == ref["fingerprint"]
                extra["grad_rel_err_vs_eager"] = {
                    n: rel_err(g, ref["grads"][n]) for n, g in result["grads"].items() if n in ref["grads"]
                }
                loss_ok = abs(extra["loss_diff_vs_eager"]) <= LOSS_RTOL * abs(ref["loss"])
                extra["loss_agrees"] = loss_ok
                worst = max(extra["grad_rel_err_vs_eager"].values(), default=float("nan"))
                extra["grad_rel_err_max"] = worst
                bits.append(f"{extra['speedup_vs_eager']:.2f}x eager")
                bits.append(f"loss {result['loss']:.4f} ({extra['loss_diff_vs_eager']:+.1e}, "
                            f"{'agrees' if loss_ok else 'DIFFERS'})")
                bits.append(f"grad rel err <= {worst:.1e}")
                if not extra["same_weights_as_eager"]:
                    bits.append("WEIGHTS DIFFER from eager's")
            else:
                bits.append(f"loss {result['loss']:.4f}")
            if result.get("peak_GB") is not None:
                bits.append(f"peak {result['peak_GB']:.1f} GB")
            if vocab == ANCHOR_VOCAB and label in ANCHOR and not args.cpu_smoke:
                bits.append(f"anchor {ANCHOR[label]} ms")
            if result.get("note"):
                extra["report"] = result["note"]
            tflops = flops / result["ms"] / 1e9
            pct = 100 * tflops / ceiling if ceiling else None
            rows.append(Row(op, label, shape, result["ms"], TFLOPs=tflops, pct_of_ceiling=pct,
                            note="; ".join(bits), extra=extra))
            log(f"  vocab {vocab} {label:18s} {result['ms']:9.2f} ms {tflops:6.1f} TFLOP/s  "
                + "; ".join(bits) + f"  ({wall:.0f} s)")
            if result.get("profile"):
                profiles.append(f"## vocab {vocab}, {label}\n\n```\n{result['profile']}\n```\n")
            write_results(name, rows, ceilings, notes, out_dir=out_dir)

        ours = results.get("rotalabs")
        if ours is not None:
            parts = [f"vocab {vocab}: rotalabs {ours['ms']:.2f} ms"]
            if "eager" in results:
                speedup = results["eager"]["ms"] / ours["ms"]
                parts.append(f"{speedup:.2f}x hf eager (target >= {TARGET_SPEEDUP_VS_EAGER}: "
                             f"{'met' if speedup >= TARGET_SPEEDUP_VS_EAGER else 'NOT met'})")
            for key in ("liger", "liger_noflce", "liger_ce"):
                if key in results:
                    r = results[key]["ms"] / ours["ms"]
                    parts.append(f"{r:.2f}x {IMPLS[key][0]} ({'faster' if r > 1 else 'NOT faster'})")
            line = "; ".join(parts)
            notes.append(line)
            log(line)

    notes.append(f"total run time {time.perf_counter() - t_start:.0f} s")
    path = write_results(name, rows, ceilings, notes, out_dir=out_dir)
    if profiles:
        prof_path = path.with_name(f"{name}-profile.md")
        prof_path.write_text("\n".join(profiles))
        log(f"profiles: {prof_path}")
    log(f"total {time.perf_counter() - t_start:.0f} s; wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
