"""RMSNorm forward at one shape: what the GPU spends per kernel, beside the benchmark's do_bench time.

For ours, a same-bytes ``copy_`` and Liger-Kernel's ``LigerRMSNorm`` (built as ``bench_rmsnorm.py``
builds it), prints: the ``triton.testing.do_bench`` median (as the benchmark reports it), the kernels
each call launches with their median GPU duration from ``torch.profiler`` (each call preceded by the
same 256 MB zeroing flush do_bench uses), and the output's largest error against a float64 reference.
A do_bench time shorter than the kernels' own durations, or a large error, flags a measurement to
distrust. CUDA only.

    python3 scripts/rmsnorm_kernel_times.py --out DIR [--shapes 16384x4096,4096x4096] [--calls 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rmsnorm_rounds import EPS, forward_impls, liger_rmsnorm_class  # noqa: E402
from size_floor import FLUSH_BYTES  # noqa: E402

from common import bench_ms, write_records  # noqa: E402


def kernel_times(fn, calls: int) -> dict[str, float]:
    """Median GPU microseconds per kernel name over ``calls`` calls, each after a zeroing flush."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and "fill" not in ev.name.lower():
            per_name[ev.name[:80]].append(ev.device_time)
    return {name: statistics.median(t) for name, t in per_name.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--shapes", default="16384x4096,4096x4096")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    from rotalabs_accel.reference.rmsnorm import rmsnorm_reference

    liger_cls = liger_rmsnorm_class()
    records = []
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        x, w, impls = forward_impls(m, n, liger_cls)
        ref = rmsnorm_reference(x.double(), w.double(), EPS)
        with torch.no_grad():
            for name, fn in impls.items():
                ms = bench_ms(fn)
                kernels = kernel_times(fn, args.calls)
                err = None if name.startswith("copy") else (fn().double() - ref).abs().max().item()
                gbps = 4 * m * n / ms / 1e6
                rec = {"shape": [m, n], "impl": name, "do_bench_ms": ms, "do_bench_gbps": gbps,
                       "kernel_us": kernels, "max_abs_err_vs_fp64": err}
                records.append(rec)
                ks = ", ".join(f"{k} {v:.1f} us" for k, v in kernels.items())
                print(f"{m}x{n} {name:20s} do_bench {ms * 1000:7.1f} us ({gbps:5.0f} GB/s); kernels: {ks}; "
                      f"max err {err}", flush=True)
        torch.cuda.empty_cache()
    write_records(args.out, "rmsnorm-kernel-times", "scripts/rmsnorm_kernel_times.py", argv, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
