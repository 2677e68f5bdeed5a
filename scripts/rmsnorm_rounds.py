"""RMSNorm forward: ours, Liger-Kernel and a same-bytes copy in interleaved rounds, under two flushes.

One benchmark run times each implementation once per shape, in a fixed order; at the smaller shapes
(tens of microseconds) runs differ by several percent. This script times, per shape, every
implementation once per round for ``--rounds`` rounds, each time with ``triton.testing.do_bench``
(it zeroes a 256 MB buffer before each call, so L2 starts full of dirty lines, as in the benchmarks)
and with a flush that reads a 256 MB buffer (L2 starts clean, see ``scripts/size_floor.py``), and
prints each round and the median. CUDA only.

    python3 scripts/rmsnorm_rounds.py --out DIR [--shapes 4096x4096,4096x65536] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from size_floor import FLUSH_BYTES, read_flush_ms  # noqa: E402

from common import bench_ms, write_records  # noqa: E402

EPS = 1e-6


def liger_rmsnorm_class():
    """Liger-Kernel's ``LigerRMSNorm``, or ``None`` (with a line saying why) when it cannot be imported."""
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except Exception as exc:  # not installed: the scripts run without it
        print(f"liger-kernel unavailable: {exc}")
        return None
    return LigerRMSNorm


def forward_impls(m: int, n: int, liger_cls) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fresh bf16 ``x`` ``(m, n)`` and weight, and the forwards to time on them: ours, a same-bytes
    ``copy_`` and (when ``liger_cls`` is given) Liger, built as ``bench_rmsnorm.py`` builds it."""
    from rotalabs_accel import rmsnorm

    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, device="cuda") * 0.1 + 1).to(torch.bfloat16)
    y = torch.empty_like(x)
    impls = {"ours": lambda: rmsnorm(x, w, EPS), "copy_ (same bytes)": lambda: y.copy_(x)}
    if liger_cls is not None:
        liger = liger_cls(n, eps=EPS).to("cuda", torch.bfloat16)
        liger.weight.data.copy_(w)
        impls["liger"] = lambda: liger(x)
    return x, w, impls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--shapes", default="4096x4096,16384x4096,4096x65536")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    liger_cls = liger_rmsnorm_class()
    flush = torch.ones(FLUSH_BYTES // 8, device="cuda", dtype=torch.int64)
    records = []
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        _, _, impls = forward_impls(m, n, liger_cls)
        nbytes = 4 * m * n
        times = {name: {"zero": [], "read": []} for name in impls}
        with torch.no_grad():
            for fn in impls.values():
                fn()
            for rnd in range(args.rounds):
                line = []
                for name, fn in impls.items():
                    z = bench_ms(fn)
                    r = read_flush_ms(fn, flush)
                    times[name]["zero"].append(z)
                    times[name]["read"].append(r)
                    line.append(f"{name} {nbytes / z / 1e6:6.0f}/{nbytes / r / 1e6:6.0f}")
                print(f"{m}x{n} round {rnd}: " + "  ".join(line) + "  (GB/s, zero/read flush)", flush=True)
        for name, t in times.items():
            z, r = statistics.median(t["zero"]), statistics.median(t["read"])
            rec = {"shape": [m, n], "impl": name, "bytes": nbytes, "ms_zero_flush": t["zero"],
                   "ms_read_flush": t["read"], "median_gbps_zero_flush": nbytes / z / 1e6,
                   "median_gbps_read_flush": nbytes / r / 1e6}
            records.append(rec)
            print(f"{m}x{n} median {name:20s} zero-flush {rec['median_gbps_zero_flush']:6.0f} GB/s"
                  f"  read-flush {rec['median_gbps_read_flush']:6.0f} GB/s", flush=True)
        torch.cuda.empty_cache()
    write_records(args.out, "rmsnorm-rounds", "scripts/rmsnorm_rounds.py", argv, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
