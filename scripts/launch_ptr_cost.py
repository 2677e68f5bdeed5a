"""Host cost of one launch through the library's direct launcher, with pointer arguments as tensors or ints.

Triton's compiled launcher reads each pointer argument from a tensor by calling its ``data_ptr()``
and asking the driver whether the address is a device pointer; an ``int`` argument skips both. This
probe launches one small kernel with six pointer arguments through
:class:`rotalabs_accel.triton_kernels._launch.KernelLaunch` (the C entry, as the op layers do) and
times the host side of 3000 calls per case, three rounds: tensors, precomputed ints, ints from
``data_ptr()`` in Python on every call, and, for scale, six ``data_ptr()`` calls, one
``torch.empty_like`` and one torch elementwise launch. The int launch's result is checked against
the tensor launch's.

    python3 scripts/launch_ptr_cost.py        # on a CUDA machine
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rotalabs_accel.triton_kernels._launch import KernelLaunch  # noqa: E402


@triton.jit
def _sum5(a, b, c, d, e, f, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    v = tl.load(a + i, mask=m) + tl.load(b + i, mask=m) + tl.load(c + i, mask=m)
    v += tl.load(d + i, mask=m) + tl.load(e + i, mask=m)
    tl.store(f + i, v, mask=m)


def main() -> None:
    ts = [torch.randn(1024, device="cuda") for _ in range(6)]
    site = KernelLaunch(_sum5, (1,), 4, device=0, BLOCK=1024)
    for _ in range(2):  # the first call compiles through Triton's ordinary path; the second is direct
        site(tuple(ts) + (1024,), 0)
    torch.cuda.synchronize()
    ref = ts[5].clone()
    ptrs = tuple(t.data_ptr() for t in ts)
    cases = {
        "tensors": lambda: site(tuple(ts) + (1024,), 0),
        "ints precomputed": lambda: site(ptrs + (1024,), 0),
        "ints data_ptr() per call": lambda: site(tuple(t.data_ptr() for t in ts) + (1024,), 0),
        "6 x data_ptr() alone": lambda: [t.data_ptr() for t in ts],
        "torch.empty_like": lambda: torch.empty_like(ts[0]),
        "x + x (one torch launch)": lambda: ts[0] + ts[0],
    }
    for rnd in range(3):
        for name, fn in cases.items():
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            n = 3000
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            host = (time.perf_counter() - t0) / n * 1e6
            torch.cuda.synchronize()
            print(f"round {rnd} {name:28s} {host:6.2f} us/call (host)", flush=True)
    ts[5].zero_()
    site(ptrs + (1024,), 0)
    torch.cuda.synchronize()
    print("int-pointer launch result matches:", torch.equal(ts[5], ref))


if __name__ == "__main__":
    main()
