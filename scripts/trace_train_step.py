"""Chrome trace of the end-to-end training step (CUDA only), to find where the GPU waits.

Builds the model of ``benchmarks/bench_e2e_train.py`` (2 Llama-3-8B-shaped layers, random weights),
applies ``optimize_model`` (or nothing with ``--impl eager``), runs warm-up steps, then:

* times steps with CUDA events (as the benchmark does) and the host time of each ``step()`` call;
* records two steps under ``torch.profiler`` and writes the trace (gzip) to ``--out``;
* prints the GPU's busy time in the traced steps and its idle gaps longer than 20 us, with the CPU
  op that was running on the main thread when each gap began.

    python scripts/trace_train_step.py --out /tmp/trace --vocab 32000
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

import bench_e2e_train as bench  # noqa: E402


def gaps(trace_path: Path, top: int = 25) -> None:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
        key=lambda e: e["ts"],
    )
    cpu_ops = sorted((e for e in events if e.get("cat") == "cpu_op" and "dur" in e), key=lambda e: e["ts"])
    if not kernels:
        print("no kernels in the trace")
        return
    busy = sum(e["dur"] for e in kernels)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    found = []
    end = kernels[0]["ts"] + kernels[0]["dur"]
    for e in kernels[1:]:
        if e["ts"] - end > 20:
            found.append((e["ts"] - end, end, e["name"]))
        end = max(end, e["ts"] + e["dur"])
    print(f"traced GPU span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, "
          f"gaps > 20 us: {len(found)} totalling {sum(g for g, _, _ in found) / 1e3:.2f} ms")
    for length, start, after in sorted(found, reverse=True)[:top]:
        running = [c["name"] for c in cpu_ops if c["ts"] <= start <= c["ts"] + c["dur"]]
        print(f"  {length:8.0f} us before {after[:60]!r}; CPU in {running[-3:]}")


def sample_clocks(out: list, stop: threading.Event) -> None:
    """nvidia-smi's SM clock and power every 50 ms until ``stop`` is set."""
    while not stop.is_set():
        try:
            line = subprocess.run(
                ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5).stdout.strip()
        except Exception as exc:  # no nvidia-smi: say so once
            out.append(f"unavailable: {exc}")
            return
        out.append(line)
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--impl", default="rotalabs", choices=["rotalabs", "eager"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-trace", action="store_true", help="time only")
    parser.add_argument("--no-packed-check", action="store_true",
                        help="experiment: skip transformers' packed-sequence check (a host sync in every "
                             "forward without an attention mask)")
    args = parser.parse_args()
    if args.no_packed_check:
        import transformers.masking_utils as masking

        masking.find_packed_sequence_indices = lambda position_ids: None
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    model = bench.build_model(dict(bench.LLAMA3_8B_2L, vocab_size=args.vocab), device, torch.bfloat16, seed=0)
    model, _ = bench.apply_impl(args.impl, model)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, args.vocab, (2, 4096), generator=gen).to(device)
    labels = torch.randint(0, args.vocab, (2, 4096), generator=gen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        out = model(input_ids=ids, labels=labels, use_cache=False)
        out.loss.backward()
        return out.loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    host, events = [], []
    clocks: list[str] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_clocks, args=(clocks, stop), daemon=True)
    sampler.start()
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t = time.perf_counter()
        step()
        host.append((time.perf_counter() - t) * 1e3)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    stop.set()
    sampler.join()
    gpu = [s.elapsed_time(e) for s, e in events]
    print(f"{args.impl} vocab {args.vocab}: step (CUDA events) {sorted(gpu)[len(gpu) // 2]:.2f} ms; "
          f"host time of step() {sorted(host)[len(host) // 2]:.2f} ms (all: {[round(h, 1) for h in host]})")
    print(f"SM clock MHz, power W while timing: {clocks[:40]}")
    if args.no_trace:
        return
    torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    first = (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    print(f"host time of one step() from an idle GPU: {first:.2f} ms (a sync inside shows as ~ the GPU time)")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    raw = args.out / f"trace-{args.impl}-{args.vocab}.json"
    prof.export_chrome_trace(str(raw))
    gaps(raw)
    with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


if __name__ == "__main__":
    main()
