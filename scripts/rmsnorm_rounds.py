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
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from size_floor import FLUSH_BYTES, read_flush_ms  # noqa: E402

from common import bench_ms, environment, gpu_slug  # noqa: E402

EPS = 1e-6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--shapes", default="4096x4096,16384x4096,4096x65536")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from rotalabs_accel import rmsnorm

    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except Exception as exc:  # not installed: the rounds run without it
        print(f"liger-kernel unavailable: {exc}")
        LigerRMSNorm = None
    flush = torch.ones(FLUSH_BYTES // 8, device="cuda", dtype=torch.int64)
    records = []
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(n, device="cuda") * 0.1 + 1).to(torch.bfloat16)
        y = torch.empty_like(x)
        impls = {"ours": lambda x=x, w=w: rmsnorm(x, w, EPS),
                 "copy_ (same bytes)": lambda x=x, y=y: y.copy_(x)}
        if LigerRMSNorm is not None:
            liger = LigerRMSNorm(n, eps=EPS).to("cuda", torch.bfloat16)
            liger.weight.data.copy_(w)
            impls["liger"] = lambda x=x, liger=liger: liger(x)
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
    env = environment()
    given = argv if argv is not None else sys.argv[1:]
    env["command"] = "python3 scripts/rmsnorm_rounds.py " + " ".join(given)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"rmsnorm-rounds-{gpu_slug()}-{env['date'][:10]}.json"
    path.write_text(json.dumps({"env": env, "records": records}, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
