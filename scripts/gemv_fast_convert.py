"""The W8A16 GEMV with ``GemvConfig.fast_convert`` (one byte permute per int8 -> fp32 value) against
Triton's own byte extraction, at the INT8 benchmark's decode shapes, on a CUDA GPU.

For each weight shape at M = 1, in one process:

* the tuned tiles the dispatcher picks, with the conversion on and off, timed in alternating rounds
  (``--rounds``), outputs compared bit for bit;
* a neighbourhood of tiles (rows per program, K per step, warps; register loads) with the conversion on
  and off, once each, to see whether the faster conversion moves the best tile;
* the group GEMV (q/k/v and gate/up of one input in one launch) on and off;
* beside them the fastest read-only kernel of the int8 weight (``benchmarks/read_floor.py``) and bf16
  cuBLAS ``F.linear``, the ratio the INT8 issue asks about.

Times are ``triton.testing.do_bench`` medians (L2 flushed before each run). Prints a table per shape
and writes ``gemv-fast-convert-<gpu>-<date>.json`` to ``--out``.

    PYTHONPATH=src python scripts/gemv_fast_convert.py --out results/
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_diagnostic  # noqa: E402
from read_floor import read_floor_ms  # noqa: E402
from rotalabs_accel.triton_kernels import int8_gemm as kernels  # noqa: E402
from rotalabs_accel.triton_kernels.int8_config import GemvConfig, select_w8a16  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
GROUPS = {
    "qkv 4096->4096+1024+1024": (4096, [4096, 1024, 1024]),
    "gate/up 4096->2x14336": (4096, [14336, 14336]),
}


def us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def neighbourhood() -> list[GemvConfig]:
    configs = []
    for block_n in (1, 2, 4, 8):
        for block_k in (512, 1024, 2048):
            for warps in (1, 2, 4, 8):
                # 16-byte loads need block_n * block_k >= 16 * 32 * warps; more than 64 bytes a thread
                # per step spills the fp32 accumulator
                per_thread = block_n * block_k // (32 * warps)
                if 16 <= per_thread <= 64:
                    configs.append(GemvConfig(block_n, block_k, split_k=1, num_warps=warps, num_stages=1))
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-sweep", action="store_true", help="only the tuned tiles and the groups")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    records = []
    for n, k in SHAPES:
        q = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8)
        s = torch.rand(n, device=dev) * 1e-2 + 1e-3
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w16 = (q.float() * s[:, None]).to(torch.bfloat16)
        _, tuned = select_w8a16(1, n, k, None, "auto", sms, False)
        plain = dataclasses.replace(tuned, fast_convert=False)
        fast = dataclasses.replace(tuned, fast_convert=True)

        def run(cfg, x=x, q=q, s=s):
            return kernels.w8a16_linear(x, q, s, None, None, "gemv", cfg)

        equal = torch.equal(run(fast), run(plain))
        times = {"fast": [], "plain": []}
        for _ in range(args.rounds):
            times["fast"].append(us(lambda: run(fast)))  # noqa: B023
            times["plain"].append(us(lambda: run(plain)))  # noqa: B023
        floor_ms, floor_cfg = read_floor_ms(q, lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100,
                                                                                   return_mode="median"))
        cublas = us(lambda: torch.nn.functional.linear(x, w16))  # noqa: B023
        f_med, p_med = statistics.median(times["fast"]), statistics.median(times["plain"])
        rec = dict(kind="tuned", n=n, k=k, config=str(tuned), equal_bits=equal, fast_us=times["fast"],
                   plain_us=times["plain"], fast_median_us=f_med, plain_median_us=p_med,
                   read_floor_us=floor_ms * 1e3, read_floor_config=floor_cfg, cublas_us=cublas)
        records.append(rec)
        print(f"N={n} K={k} tuned {tuned}: fast {f_med:.2f} us, plain {p_med:.2f} us "
              f"(plain/fast {p_med / f_med:.3f}); bits equal {equal}; read floor {floor_ms * 1e3:.2f} us; "
              f"cuBLAS bf16 {cublas:.2f} us -> fast {cublas / f_med:.2f}x, plain {cublas / p_med:.2f}x",
              flush=True)
        if not args.no_sweep:
            rows = []
            for cfg in neighbourhood():
                for on in (True, False):
                    c = dataclasses.replace(cfg, fast_convert=on)
                    t = us(lambda c=c: run(c))
                    rows.append((t, c))
                    records.append(dict(kind="sweep", n=n, k=k, config=str(c), us=t))
            rows.sort(key=lambda r: r[0])
            for t, c in rows[:8]:
                print(f"    {t:7.2f} us  {c}")
            best_plain = min(t for t, c in rows if not c.fast_convert)
            best_fast = min(t for t, c in rows if c.fast_convert)
            print(f"    best with fast_convert {best_fast:.2f} us, without {best_plain:.2f} us", flush=True)
    for name, (k, ns) in GROUPS.items():
        qs = [torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8) for n in ns]
        ss = [torch.rand(n, device=dev) * 1e-2 + 1e-3 for n in ns]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        equal = torch.equal(kernels.w8a16_gemv_group(x, qs, ss, fast_convert=True),
                            kernels.w8a16_gemv_group(x, qs, ss, fast_convert=False))
        times = {"fast": [], "plain": []}
        for _ in range(args.rounds):
            for key, on in (("fast", True), ("plain", False)):
                times[key].append(us(lambda on=on: kernels.w8a16_gemv_group(x, qs, ss, fast_convert=on)))  # noqa: B023
        f_med, p_med = statistics.median(times["fast"]), statistics.median(times["plain"])
        records.append(dict(kind="group", name=name, equal_bits=equal, fast_us=times["fast"],
                            plain_us=times["plain"], fast_median_us=f_med, plain_median_us=p_med))
        print(f"group {name}: fast {f_med:.2f} us, plain {p_med:.2f} us (plain/fast {p_med / f_med:.3f}); "
              f"bits equal {equal}", flush=True)
    path = write_diagnostic("gemv-fast-convert", records, args.out)
    print(f"written {path}")


if __name__ == "__main__":
    main()
