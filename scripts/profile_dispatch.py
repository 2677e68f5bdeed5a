"""Profile the host-side cost of one call of each op at a launch-bound shape (CUDA only).

Prints wall-clock microseconds per call and the top functions by cumulative time under cProfile, so
Python overhead between the call and the kernel launch can be found and removed.

Modes: (none) the launch-bound calls above; ``--host`` host enqueue time vs GPU time of forward+backward
steps (``--host --after-compile`` again after a torch.compile function has run in the process);
``--bwdthread`` a step's host time cut at the op's backward on the autograd thread; ``--kernels``
per-kernel GPU times of a step; ``--fwdbwd`` the pieces of one step; ``--launch`` the host cost of one
launch through each door (Triton's JIT path, its runner, our launch site, the launcher's C entry) and
of the allocation calls.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

import rotalabs_accel as ra


class Floor(torch.autograd.Function):
    """The cheapest autograd.Function: what any custom op's forward + backward costs at least."""

    @staticmethod
    def forward(ctx, a, b):
        return torch.empty_like(a)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(grad), None


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def kernel_table():
    """Per-kernel GPU times of forward+backward at the benchmark shapes (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    dev, bf = "cuda", torch.bfloat16
    cases = {}
    x = torch.randn(16384, 4096, device=dev, dtype=bf, requires_grad=True)
    w = torch.randn(4096, device=dev, dtype=bf, requires_grad=True)
    gy = torch.randn(16384, 4096, device=dev, dtype=bf)
    cases["rmsnorm fwd+bwd 16384x4096"] = lambda: torch.autograd.grad(ra.rmsnorm(x, w), (x, w), gy)
    g = torch.randn(4096, 11008, device=dev, dtype=bf, requires_grad=True)
    u = torch.randn(4096, 11008, device=dev, dtype=bf, requires_grad=True)
    gs = torch.randn(4096, 11008, device=dev, dtype=bf)
    cases["swiglu fwd+bwd 4096x11008"] = lambda: torch.autograd.grad(ra.swiglu_fused(g, u), (g, u), gs)
    q = torch.randn(4, 4096, 32, 128, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(4, 4096, 8, 128, device=dev, dtype=bf, requires_grad=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = ra.build_rope_cache(4096, 128, device=dev)
    cases["rope fwd+bwd bshd"] = lambda: torch.autograd.grad(ra.apply_rope(q, k, cos, sin), (q, k), (gq, gk))
    for name, fn in cases.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        print(f"== {name} (10 iterations)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))


def fwdbwd_pieces():
    """Where a small RMSNorm training step's host time goes (CUDA only): each piece on its own.

    The autograd engine runs a CUDA backward on its own thread, out of cProfile's sight, so the
    backward launcher is also timed and profiled when called directly from this thread.
    """
    for rows in (1, 4096):
        _fwdbwd_rows(rows)


def _fwdbwd_rows(rows: int) -> None:
    from rotalabs_accel.triton_kernels import rmsnorm as kernels

    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(rows, 4096, device=dev, dtype=bf, requires_grad=True)
    w = torch.randn(4096, device=dev, dtype=bf, requires_grad=True)
    gy = torch.randn(rows, 4096, device=dev, dtype=bf)
    y, _, rstd = kernels.rmsnorm_forward(x.detach(), w.detach(), 1e-6, 0.0, "llama", out_dtype=bf)

    cases = {
        "ours fwd (recording autograd)": lambda: ra.rmsnorm(x, w, 1e-6),
        "F.rms_norm fwd (recording autograd)": lambda: torch.nn.functional.rms_norm(x, (4096,), w, 1e-6),
        "ours fwd+bwd": lambda: torch.autograd.grad(ra.rmsnorm(x, w, 1e-6), (x, w), gy),
        "F.rms_norm fwd+bwd": lambda: torch.autograd.grad(
            torch.nn.functional.rms_norm(x, (4096,), w, 1e-6), (x, w), gy),
        "floor autograd.Function fwd+bwd": lambda: torch.autograd.grad(Floor.apply(x, w), (x,), gy),
        "our backward launcher, direct": lambda: kernels.rmsnorm_backward(
            gy, x.detach(), w.detach(), rstd, 0.0, "llama"),
        "our forward launcher, direct": lambda: kernels.rmsnorm_forward(
            x.detach(), w.detach(), 1e-6, 0.0, "llama", out_dtype=bf),
    }
    for name, fn in cases.items():
        print(f"== {rows}x4096 {name}: {per_call_us(fn, 500):.1f} us/call")
    pr = cProfile.Profile()
    fn = cases["our backward launcher, direct"]
    pr.enable()
    for _ in range(300):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)


def host_us(fn, n=200):
    """Host microseconds per call with the GPU held busy (a long sleep kernel queued first), so the time
    is the enqueue cost alone, not the GPU's."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time: the calls below only enqueue
    t = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def host_vs_gpu():
    """Per forward+backward step at the benchmark shapes: host enqueue time, GPU time (do_bench) and
    wall time back to back. Where host >= GPU the benchmark measures the host."""
    from triton.testing import do_bench

    dev, bf = "cuda", torch.bfloat16
    cases = {}
    for rows in (4096, 16384):
        x = torch.randn(rows, 4096, device=dev, dtype=bf, requires_grad=True)
        w = torch.randn(4096, device=dev, dtype=bf, requires_grad=True)
        gy = torch.randn(rows, 4096, device=dev, dtype=bf)
        cases[f"rmsnorm fwd+bwd {rows}x4096"] = (
            lambda x=x, w=w, gy=gy: torch.autograd.grad(ra.rmsnorm(x, w, 1e-6), (x, w), gy))
        cases[f"F.rms_norm fwd+bwd {rows}x4096"] = (
            lambda x=x, w=w, gy=gy: torch.autograd.grad(torch.nn.functional.rms_norm(x, (4096,), w, 1e-6),
                                                        (x, w), gy))
        r = torch.randn_like(x).requires_grad_()
        cases[f"add_rmsnorm fwd+bwd {rows}x4096"] = (
            lambda x=x, r=r, w=w, gy=gy: torch.autograd.grad(
                ra.rmsnorm_residual_fused(x, r, w, 1e-6), (x, r, w), (gy, gy)))
    q = torch.randn(4, 4096, 32, 128, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(4, 4096, 8, 128, device=dev, dtype=bf, requires_grad=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = ra.build_rope_cache(4096, 128, device=dev)
    cases["rope fwd+bwd bshd"] = lambda: torch.autograd.grad(ra.apply_rope(q, k, cos, sin), (q, k), (gq, gk))
    cases["rope fwd bshd"] = lambda: ra.apply_rope(q.detach(), k.detach(), cos, sin)
    g = torch.randn(4096, 11008, device=dev, dtype=bf, requires_grad=True)
    u = torch.randn(4096, 11008, device=dev, dtype=bf, requires_grad=True)
    gs = torch.randn(4096, 11008, device=dev, dtype=bf)
    cases["swiglu fwd+bwd 4096x11008"] = lambda: torch.autograd.grad(ra.swiglu_fused(g, u), (g, u), gs)
    xs = torch.randn(4096, 4096, device=dev, dtype=bf, requires_grad=True)
    cases["floor autograd.Function fwd+bwd"] = lambda: torch.autograd.grad(Floor.apply(xs, None), (xs,), xs)
    for name, fn in cases.items():
        host = host_us(fn)
        gpu = do_bench(fn, warmup=25, rep=200) * 1e3
        wall = per_call_us(fn, 200)
        print(f"== {name}: host {host:.1f} us, GPU (do_bench) {gpu:.1f} us, wall back to back {wall:.1f} us")


def backward_thread():
    """Where the host time of a forward+backward step goes, the autograd worker thread included.

    With the GPU held busy by a sleep kernel (so only enqueue cost is timed), each step is cut into:
    the forward call; from ``autograd.grad``'s entry to the op's backward starting on the engine's
    device thread; the backward itself; and from the backward's return to ``autograd.grad`` returning.
    A second pass runs cProfile inside the backward (on the worker thread, where it is enabled).
    """
    from rotalabs_accel.ops import rmsnorm as ops_rmsnorm
    from rotalabs_accel.ops import rope as ops_rope
    from rotalabs_accel.ops import swiglu as ops_swiglu

    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(4096, 4096, device=dev, dtype=bf, requires_grad=True)
    w = torch.randn(4096, device=dev, dtype=bf, requires_grad=True)
    gy = torch.randn(4096, 4096, device=dev, dtype=bf)
    q = torch.randn(4, 512, 32, 128, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(4, 512, 8, 128, device=dev, dtype=bf, requires_grad=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = ra.build_rope_cache(4096, 128, device=dev)
    g = torch.randn(1024, 11008, device=dev, dtype=bf, requires_grad=True)
    u = torch.randn(1024, 11008, device=dev, dtype=bf, requires_grad=True)
    gs = torch.randn(1024, 11008, device=dev, dtype=bf)

    cases = [
        ("rmsnorm 4096x4096", ops_rmsnorm._RMSNormFunction, lambda: ra.rmsnorm(x, w, 1e-6), (x, w), gy),
        ("F.rms_norm 4096x4096", None, lambda: torch.nn.functional.rms_norm(x, (4096,), w, 1e-6), (x, w), gy),
        ("floor autograd.Function", Floor, lambda: Floor.apply(x, w), (x,), gy),
        ("rope bshd 4x512", ops_rope._RopeFunction, lambda: ra.apply_rope(q, k, cos, sin), (q, k), (gq, gk)),
        ("swiglu 1024x11008", ops_swiglu.SwiGLUFunction, lambda: ra.swiglu_fused(g, u), (g, u), gs),
    ]
    for name, cls, fwd, inputs, grads in cases:
        marks: dict = {}
        prof = {"on": None}
        if cls is not None:
            original = cls.__dict__["backward"]

            def timed(ctx, *grad_outputs, _inner=original.__func__, _marks=marks, _prof=prof):
                _marks["enter"] = time.perf_counter()
                if _prof["on"] is not None:
                    _prof["on"].enable()
                try:
                    return _inner(ctx, *grad_outputs)
                finally:
                    if _prof["on"] is not None:
                        _prof["on"].disable()
                    _marks["exit"] = time.perf_counter()

            cls.backward = staticmethod(timed)
        try:
            for _ in range(20):
                torch.autograd.grad(fwd(), inputs, grads)
            torch.cuda.synchronize()
            sums = {"forward": 0.0, "to backward": 0.0, "backward": 0.0, "after backward": 0.0, "step": 0.0}
            n = 100
            torch.cuda._sleep(2_000_000_000)
            for _ in range(n):
                t0 = time.perf_counter()
                out = fwd()
                t1 = time.perf_counter()
                torch.autograd.grad(out, inputs, grads)
                t2 = time.perf_counter()
                sums["forward"] += t1 - t0
                sums["step"] += t2 - t0
                if "enter" in marks:
                    sums["to backward"] += marks["enter"] - t1
                    sums["backward"] += marks["exit"] - marks["enter"]
                    sums["after backward"] += t2 - marks["exit"]
            torch.cuda.synchronize()
            print(f"== {name}: " + ", ".join(f"{k} {v / n * 1e6:.1f} us" for k, v in sums.items()))
            if cls is not None:
                prof["on"] = cProfile.Profile()
                for _ in range(200):
                    torch.autograd.grad(fwd(), inputs, grads)
                torch.cuda.synchronize()
                print(f"-- cProfile of {name}'s backward on the autograd thread (200 calls)")
                pstats.Stats(prof["on"]).sort_stats("tottime").print_stats(12)
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(200):
                    fwd()
                pr.disable()
                torch.cuda.synchronize()
                print(f"-- cProfile of {name}'s forward, recording autograd (200 calls)")
                pstats.Stats(pr).sort_stats("tottime").print_stats(12)
        finally:
            if cls is not None:
                cls.backward = original


def launch_costs():
    """Host microseconds of one launch of a trivial kernel through each door, and of the allocations
    an op makes: what every forward and backward pays per kernel."""
    import triton
    import triton.language as tl

    from rotalabs_accel.triton_kernels import _launch

    @triton.jit
    def touch(X, n, BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(X + cols, 1.0, mask=cols < n)

    x = torch.zeros(256, device="cuda")
    compiled = touch[(1,)](x, 256, BLOCK=256)
    runner = compiled[(1, 1, 1)]
    stream = torch.cuda.current_stream().cuda_stream
    site = _launch.KernelLaunch(touch, (1,), 4, device=0, BLOCK=256)
    site((x, 256))
    direct = _launch._c_launcher(compiled, (1, 1, 1), (256,))
    cases = {
        "kernel[grid](...) (Triton's JIT path)": lambda: touch[(1,)](x, 256, BLOCK=256),
        "compiled[grid](..., stream=) (Triton's runner)": lambda: runner(x, 256, 256, stream=stream),
        "KernelLaunch site (ours)": lambda: site((x, 256)),
        "torch.empty((4096,), device=cuda)": lambda: torch.empty((4096,), device="cuda"),
        "torch.empty_like(x)": lambda: torch.empty_like(x),
        "x.new_empty((64,), dtype=float32)": lambda: x.new_empty((64,), dtype=torch.float32),
        "torch.cuda.current_device()": torch.cuda.current_device,
        "_launch.current_device()": _launch.current_device,
        "x + x (one ATen launch)": lambda: x + x,
    }
    if direct is not None:
        cases["compiled launcher's C entry (ours, direct)"] = lambda: direct(stream, (x, 256))
    print(f"C entry in use: {_launch._c_launch_ok}, triton {triton.__version__}")
    for name, fn in cases.items():
        print(f"== {name}: {per_call_us(fn, 5000):.2f} us/call")


def main():
    if sys.argv[1:2] == ["--launch"]:
        launch_costs()
        return
    if sys.argv[1:] == ["--host", "--after-compile"]:
        # Host-bound timings in a process that has also compiled and run a torch.compile function
        # (as the benchmark processes do for their peers): does that change our host cost?
        host_vs_gpu()
        f = torch.compile(lambda a, b: (a.float() * torch.rsqrt(a.float().pow(2).mean(-1, keepdim=True)
                                                                 + 1e-6)).to(a.dtype) * b)
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3):
            f(a, b).sum().backward()
        torch.cuda.synchronize()
        print("-- after torch.compile of an RMSNorm function (forward + backward run):")
        host_vs_gpu()
        return
    if sys.argv[1:] == ["--bwdthread"]:
        backward_thread()
        return
    if sys.argv[1:] == ["--host"]:
        host_vs_gpu()
        return
    if sys.argv[1:] == ["--kernels"]:
        kernel_table()
        return
    if sys.argv[1:] == ["--fwdbwd"]:
        fwdbwd_pieces()
        return
    dev = "cuda"
    x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, device=dev, dtype=torch.bfloat16)
    g = torch.randn(1, 14336, device=dev, dtype=torch.bfloat16)
    q = torch.randn(64, 1, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(64, 1, 8, 128, device=dev, dtype=torch.bfloat16)
    cos, sin = ra.build_rope_cache(4096, 128, device=dev)
    pos = torch.randint(0, 4096, (64, 1), device=dev)
    cases = {
        "F.rms_norm": lambda: torch.nn.functional.rms_norm(x, (4096,), w, 1e-6),
        "rmsnorm": lambda: ra.rmsnorm(x, w, 1e-6),
        "swiglu_fused": lambda: ra.swiglu_fused(g, g),
        "apply_rope decode": lambda: ra.apply_rope(q, k, cos, sin, position_ids=pos),
        "torch add (1 launch)": lambda: x + x,
    }
    which = sys.argv[1:] or list(cases)
    for name in which:
        fn = cases[name]
        try:
            us = per_call_us(fn)
        except Exception as e:  # report and go on
            print(f"{name}: failed {type(e).__name__}: {e}")
            continue
        print(f"== {name}: {us:.1f} us/call")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(500):
            fn()
        pr.disable()
        torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
