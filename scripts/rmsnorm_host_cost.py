"""Host (Python) cost of the RMSNorm call paths, measured on the CPU with the compiled kernels stubbed.

No GPU is needed: every launch takes the direct path of ``triton_kernels/_launch.py`` into a compiled
kernel that does nothing, so what is timed is everything the host does between the user's call and
Triton's own launcher: validation, dispatch, autograd, output allocation, launch plans and the
direct-launch cache. Not included: Triton's launcher itself and the CUDA driver (a few microseconds per
launch on a GPU host), and ``torch.cuda`` device queries. On a GPU the same Python runs before every
launch, so these numbers are the part of a small call's latency, and of the gap between the forward
and the backward kernels of a training step, that this library controls.

Repeated inference calls of one layout take the functional layer's repeat path (a remembered launch
plan after a handful of checks); the rows marked "full checks" switch it off, which is what the first
call of a layout pays.

For scale the run also times an autograd.Function that does nothing but allocate its output (the
floor any custom op pays for autograd) and a one-element PyTorch add.

Usage::

    python scripts/rmsnorm_host_cost.py            # best-of-5 microseconds per call
    python scripts/rmsnorm_host_cost.py --profile  # plus a cProfile listing of the fwd+bwd step
"""

from __future__ import annotations

import os
import sys
import timeit
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # lets the forced "triton" backend accept CPU tensors
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

import rotalabs_accel  # noqa: E402
from rotalabs_accel import TritonRMSNorm, rmsnorm, rmsnorm_residual_fused  # noqa: E402
from rotalabs_accel.functional import normalization  # noqa: E402
from rotalabs_accel.triton_kernels import _launch  # noqa: E402
from rotalabs_accel.triton_kernels import rmsnorm as kernels  # noqa: E402


def us_per_call(fn, number: int = 2000, repeat: int = 5) -> float:
    """Best of ``repeat`` rounds: the least disturbed by other work on the machine."""
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


class _Compiled:
    """Stand-in for Triton's compiled kernel: indexing by a grid gives a launcher that does nothing."""

    def __getitem__(self, grid):
        return self._run

    def _run(self, *args, stream=None):
        return None


class _Kernel:
    """Stand-in for a @triton.jit function (only the launch-cache microbenchmarks call it)."""

    def __init__(self, arg_names):
        self.arg_names = arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _Compiled()


class _OnGpu(torch.Tensor):
    """A CPU tensor that says it lives on CUDA device 0, so launch() takes its direct path."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def get_device(self):
        return 0


def stub_launches() -> None:
    """Every KernelLaunch takes its direct path, into a compiled kernel that does nothing."""
    init = _launch.KernelLaunch.__init__

    def direct_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.direct = True

    def c_entry(compiled, grid, tail):  # stands for Triton 3.6's C entry, which takes int pointers
        def run(stream, args):
            return None

        run.takes_int_pointers = True
        return run

    _launch.KernelLaunch.__init__ = direct_init
    _launch._first_launch = lambda kernel, grid, args, options, constexprs: (_Compiled(), ())
    _launch._c_launcher = c_entry
    # A CPU build has no CUDA stream query; on a GPU host it costs about as much as this call.
    _launch._current_stream = lambda device: 0


def launch_cache_costs() -> dict[str, float]:
    x = torch.empty(64, 4096, dtype=torch.bfloat16).as_subclass(_OnGpu)
    y = torch.empty(64, 4096, dtype=torch.bfloat16)
    w = torch.empty(4096, dtype=torch.bfloat16)
    rstd = torch.empty(64)
    args = (x, 4096, None, 0, w, y, 4096, None, 0, rstd, 64, 4096, 1e-6, 0.0)
    consts = dict(HAS_RESIDUAL=False, HAS_WEIGHT=True, CASTING=0, STORE_RSTD=True, BLOCK_M=1, BLOCK_N=4096,
                  PERSISTENT=False, PREFETCH=False)
    kernel = _Kernel([f"a{i}" for i in range(len(args))] + list(consts))
    site = _launch.KernelLaunch(kernel, (64,), 8, device=0, **consts)
    site_key = x.data_ptr() & 15 | (y.data_ptr() & 15) << 4
    generic = us_per_call(lambda: _launch.launch(kernel, (64,), args, 8, **consts))
    return {
        "launch(), cache hit, 14 arguments": generic,
        "KernelLaunch, cache hit, 14 arguments": us_per_call(lambda: site(args, site_key)),
    }


class _AllocOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, options):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return dy, None, None


def rmsnorm_costs(m: int, n: int) -> dict[str, float]:
    dt = torch.bfloat16
    x, r, w = torch.randn(m, n, dtype=dt), torch.randn(m, n, dtype=dt), torch.randn(n, dtype=dt)
    norm = TritonRMSNorm(n, dtype=dt)
    xg, rg, wg = (t.clone().requires_grad_() for t in (x, r, w))
    dy = torch.randn(m, n, dtype=dt)

    def step():
        xg.grad = wg.grad = None
        rmsnorm(xg, wg, 1e-6).backward(dy)

    def fused_step():
        xg.grad = rg.grad = wg.grad = None
        torch.autograd.backward(rmsnorm_residual_fused(xg, rg, wg, 1e-6), (dy, dy))

    def alloc_only_step():
        xg.grad = wg.grad = None
        _AllocOnly.apply(xg, wg, None).backward(dy)

    out = {}
    with torch.no_grad():
        out["functional rmsnorm, no grad"] = us_per_call(lambda: rmsnorm(x, w, 1e-6))
        out["TritonRMSNorm(x), no grad"] = us_per_call(lambda: norm(x))
        out["TritonRMSNorm(x, residual), no grad"] = us_per_call(lambda: norm(x, r))
        # the same calls without the repeat path: what a call of a layout not seen before pays
        repeat_call = normalization._repeat_call
        normalization._repeat_call = lambda *args: None
        try:
            out["functional rmsnorm, no grad, full checks"] = us_per_call(lambda: rmsnorm(x, w, 1e-6))
            out["TritonRMSNorm(x), no grad, full checks"] = us_per_call(lambda: norm(x))
            out["TritonRMSNorm(x, residual), no grad, full checks"] = us_per_call(lambda: norm(x, r))
        finally:
            normalization._repeat_call = repeat_call
        out["launcher rmsnorm_forward, no grad"] = us_per_call(
            lambda: kernels.rmsnorm_forward(x, w, 1e-6, 0.0, "llama", store_rstd=False))
    out["functional rmsnorm, recording autograd"] = us_per_call(lambda: rmsnorm(xg, wg, 1e-6))
    out["rmsnorm forward + backward"] = us_per_call(step, number=1000)
    out["fused add + rmsnorm forward + backward"] = us_per_call(fused_step, number=1000)
    out["(floor) autograd.Function, alloc only, fwd + bwd"] = us_per_call(alloc_only_step, number=1000)
    small = torch.randn(1, 8, dtype=dt)
    out["(unit) torch add, 1x8"] = us_per_call(lambda: small + small)
    return out


def main(argv) -> int:
    rotalabs_accel.set_backend("triton")
    stub_launches()
    for m, n in ((1, 4096), (64, 128)):
        for name, us in rmsnorm_costs(m, n).items():
            print(f"{name:50s} {m}x{n:<6d} {us:8.2f} us")
    for name, us in launch_cache_costs().items():
        print(f"{name:50s} {'':8s} {us:8.2f} us")
    if "--profile" in argv:
        import cProfile
        import pstats

        x = torch.randn(1, 4096, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(4096, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(1, 4096, dtype=torch.bfloat16)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(2000):
            x.grad = w.grad = None
            rmsnorm(x, w, 1e-6).backward(dy)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
