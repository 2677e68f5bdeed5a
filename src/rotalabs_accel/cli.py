"""The ``rotalabs-accel`` command (also ``python -m rotalabs_accel``).

Subcommands:

* ``info``: device, driver / CUDA, torch and Triton versions, and which backend each op will use
  and why.
* ``bench [OPS...]``: times this library beside PyTorch eager, ``torch.compile`` and Liger-Kernel
  (when installed), checks that their outputs agree, and prints time, achieved GB/s or TFLOP/s, the
  share of the measured copy bandwidth or matrix rate, and the speedup over eager.
* ``demo``: builds a small Llama-style decoder from plain PyTorch modules, converts a copy with
  :func:`~rotalabs_accel.optimize_model`, and shows that both compute the same outputs and gradients.

Triton is imported only when a measurement on a CUDA device needs it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["main", "build_parser"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
OPS = ("rmsnorm", "add_rmsnorm", "swiglu", "rope", "int8_linear")

# Unit roundoff per dtype: the floor of the agreement check (one final rounding of an output).
_UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


# --------------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _requested_backend() -> tuple[str, str]:
    from ._backend import ENV_VAR, get_backend

    try:
        name = get_backend()
    except ValueError as exc:
        return "invalid", str(exc)
    env = os.environ.get(ENV_VAR, "")
    return name, (f"{ENV_VAR}={env}" if env else "default")


# --------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------


def _op_probe_tensors(device: torch.device, dtype: torch.dtype) -> dict[str, tuple]:
    """Representative arguments for each op, as ``(select_backend name, tensors, what)``."""
    x = torch.empty(8, 4096, device=device, dtype=dtype)
    w = torch.empty(4096, device=device, dtype=dtype)
    q = torch.empty(1, 32, 16, 128, device=device, dtype=dtype)
    k = torch.empty(1, 8, 16, 128, device=device, dtype=dtype)
    cos = torch.empty(16, 64, device=device, dtype=torch.float32)
    wq = torch.empty(4096, 4096, device=device, dtype=torch.int8)
    scale = torch.empty(4096, device=device, dtype=torch.float32)
    logits = torch.empty(8, 32000, device=device, dtype=dtype)
    target = torch.empty(8, device=device, dtype=torch.int64)
    table = torch.empty(128, 64, device=device, dtype=dtype)
    return {
        "rmsnorm": ("rmsnorm", (x, w), "rmsnorm / TritonRMSNorm"),
        "add_rmsnorm": ("rmsnorm_residual_fused", (x, x, w), "rmsnorm_residual_fused"),
        "swiglu": ("swiglu_fused", (x, x), "swiglu_fused / SwiGLU"),
        "rope": ("apply_rope", (q, k, cos, cos), "apply_rope / RotaryEmbedding"),
        "int8_linear": ("int8_gemm", (x, wq, scale), "int8_gemm / Int8Linear / QuantizedLinear"),
        "cross_entropy": ("cross_entropy", (logits, target), "cross_entropy / causal_lm_loss"),
        "embedding": ("embedding", (target, table), "embedding / TritonEmbedding (table gradient)"),
    }


def _explain_backend(op: str, tensors: Sequence[torch.Tensor]) -> tuple[str, str]:
    """``(backend, why)`` for one call of ``op`` on ``tensors``, following the dispatch rules."""
    from ._backend import select_backend
    from .utils import is_triton_interpreter

    requested, source = _requested_backend()
    if requested == "invalid":
        return "error", source
    try:
        chosen = select_backend(op, *tensors)
    except Exception as exc:
        return "error", str(exc)
    on_cuda = all(t.is_cuda for t in tensors)
    if requested == "torch":
        return chosen, f"backend forced to 'torch' ({source})"
    if requested == "triton":
        where = "" if on_cuda else "; CPU tensors run through Triton's interpreter (TRITON_INTERPRET=1)"
        return chosen, f"backend forced to 'triton' ({source}){where}"
    if chosen == "triton":
        return chosen, "CUDA tensors and Triton importable"
    if not on_cuda:
        return chosen, "tensors on CPU; the Triton kernels need CUDA tensors"
    if is_triton_interpreter():
        return chosen, "TRITON_INTERPRET is set, so 'auto' keeps the PyTorch reference"
    return chosen, "Triton is not importable"


def cmd_info(args: argparse.Namespace) -> int:
    from . import __version__

    device = _default_device()
    triton_version = _package_version("triton")
    liger_version = _package_version("liger-kernel")
    requested, source = _requested_backend()
    out = sys.stdout
    print(f"rotalabs-accel {__version__}", file=out)
    print(f"  python        {platform.python_version()} ({sys.executable})", file=out)
    print(f"  torch         {torch.__version__}", file=out)
    print(f"  triton        {triton_version or 'not installed'}", file=out)
    print(f"  liger-kernel  {liger_version or 'not installed'} (benchmark peer)", file=out)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        print(f"  CUDA runtime  {torch.version.cuda}, driver {_nvidia_driver() or 'unknown'}", file=out)
        print(
            f"  device        {device}: {props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.multi_processor_count} SMs, {_fmt_bytes(props.total_memory)} "
            f"({torch.cuda.device_count()} CUDA device(s) visible)",
            file=out,
        )
    else:
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        print(f"  CUDA          not available ({why})", file=out)
        print(
            f"  device        cpu ({torch.get_num_threads()} threads): every op runs the PyTorch fallback",
            file=out,
        )
    print(
        f"  backend       {requested} ({source}); TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}",
        file=out,
    )
    print("", file=out)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"Backend per op (for representative {_DTYPE_NAMES[dtype]} tensors on {device}):", file=out)
    probes = _op_probe_tensors(device, dtype)
    width = max(len(v[2]) for v in probes.values())
    for name, tensors, what in probes.values():
        backend, why = _explain_backend(name, tensors)
        print(f"  {what:<{width}}  {backend:<6} {why}", file=out)
    return 0


# --------------------------------------------------------------------------------------------------
# bench: timing
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Median milliseconds of a callable on one device.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) when Triton is
    importable, else a CUDA-event loop. CPU: a ``time.perf_counter`` loop over a small time budget.
    """

    def __init__(self, device: torch.device, repeat: int, budget_ms: float) -> None:
        self.device = device
        self.repeat = max(1, repeat)
        self.budget_ms = budget_ms
        self._do_bench = None
        if device.type == "cuda":
            try:
                import triton.testing

                self._do_bench = triton.testing.do_bench
            except Exception:
                self._do_bench = None

    @property
    def method(self) -> str:
        if self._do_bench is not None:
            return "triton.testing.do_bench (median)"
        if self.device.type == "cuda":
            return "CUDA events (median)"
        return "time.perf_counter (median)"

    def __call__(self, fn: Callable[[], Any]) -> float:
        runs = [self._once(fn) for _ in range(self.repeat)]
        return statistics.median(runs)

    def _once(self, fn: Callable[[], Any]) -> float:
        if self._do_bench is not None:
            with torch.cuda.device(self.device):
                return float(self._do_bench(fn, warmup=25, rep=100, return_mode="median"))
        if self.device.type == "cuda":
            return self._cuda_events(fn)
        return self._perf_counter(fn)

    def _cuda_events(self, fn: Callable[[], Any]) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize(self.device)
        times = []
        deadline = time.perf_counter() + self.budget_ms / 1e3
        while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def _perf_counter(self, fn: Callable[[], Any]) -> float:
        fn()
        times = []
        deadline = time.perf_counter() + self.budget_ms / 1e3
        while len(times) < 7 or (time.perf_counter() < deadline and len(times) < 200):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def _copy_bandwidth_gbps(device: torch.device, timer: _Timer) -> float:
    """Device copy rate: bytes read plus bytes written per second (GB/s)."""
    n = (1 << 29) if device.type == "cuda" else (1 << 23)  # 1 GiB / 16 MiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n * 2 / ms / 1e6


def _matrix_rate_tflops(device: torch.device, dtype: torch.dtype, timer: _Timer) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = timer(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


# --------------------------------------------------------------------------------------------------
# bench: cases
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Impl:
    name: str
    run: Callable[[], Any]  # the timed call (forward, or forward + backward)
    output: Callable[[], Any]  # forward outputs, for the agreement check
    bytes_per_elt: float | None = None  # int8_linear: weight bytes read per weight element


@dataclasses.dataclass
class _Case:
    op: str
    shape: str
    nbytes: float  # bytes the op must move (memory-bound ops), or weight bytes (linear)
    flops: float | None  # matrix ops only
    impls: list[_Impl]
    reference: Callable[[], Any]  # float64 outputs
    bound: str  # "memory" or "compute": which ceiling the percentage uses
    note: str = ""


@dataclasses.dataclass
class _Row:
    op: str
    shape: str
    impl: str
    ms: float | None
    GBps: float | None
    TFLOPs: float | None
    pct_of_ceiling: float | None
    speedup: float | None
    check: str
    rel_err: float | None
    note: str = ""


_SHAPES = {
    "llm": {
        "rmsnorm": [(4096, 4096), (16384, 4096), (16384, 8192)],
        "add_rmsnorm": [(16384, 4096), (16384, 8192)],
        "swiglu": [(4096, 11008), (16384, 14336)],
        # (batch, q heads, kv heads, seq, head_dim, decode)
        "rope": [(4, 32, 8, 4096, 128, False), (64, 32, 8, 1, 128, True)],
        # (M, N, K)
        "int8_linear": [(1, 14336, 4096), (16, 14336, 4096), (128, 14336, 4096), (4096, 14336, 4096)],
    },
    "small": {
        "rmsnorm": [(256, 1024)],
        "add_rmsnorm": [(256, 1024)],
        "swiglu": [(256, 1024)],
        "rope": [(2, 8, 2, 128, 64, False)],
        "int8_linear": [(1, 1024, 512), (64, 1024, 512)],
    },
}


def _randn(shape, dtype, device, requires_grad=False, scale=1.0):
    t = (torch.randn(*shape, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def _grads(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _timed(fn: Callable, inputs: list, backward: bool, out_grads: list | None) -> Callable[[], Any]:
    if not backward:
        return fn

    def run():
        return _grads(_as_tuple(fn()), inputs, out_grads)

    return run


class _Peers:
    """Optional implementations: torch.compile and Liger-Kernel."""

    def __init__(self, device: torch.device, compile_: bool) -> None:
        self.compile = compile_
        self.liger = None
        if device.type == "cuda":
            try:
                import liger_kernel  # noqa: F401

                self.liger = True
            except Exception:
                self.liger = None

    def compiled(self, fn: Callable) -> Callable | None:
        if not self.compile:
            return None
        return torch.compile(fn, dynamic=False)


def _hf_rmsnorm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rmsnorm_ref(x, w, eps):
    x64 = x.double()
    return w.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


def _impls(candidates, inputs, backward, out_grads) -> list[_Impl]:
    return [
        _Impl(name, _timed(fn, inputs, backward, out_grads), fn) for name, fn in candidates if fn is not None
    ]


def _case_rmsnorm(m: int, n: int, dtype, device, backward: bool, peers: _Peers) -> _Case:
    from .functional import rmsnorm

    eps = 1e-6
    x = _randn((m, n), dtype, device, backward)
    w = (torch.randn(n, device=device) * 0.1 + 1.0).to(dtype).requires_grad_(backward)
    gy = _randn((m, n), dtype, device)

    def eager():
        return _hf_rmsnorm(x, w, eps)

    candidates = [
        ("eager (HF formula)", eager),
        ("F.rms_norm", lambda: F.rms_norm(x, (n,), w, eps)),
        ("torch.compile", peers.compiled(eager)),
    ]
    if peers.liger:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        candidates.append(
            ("liger-kernel", lambda: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False))
        )
    candidates.append(("rotalabs-accel", lambda: rmsnorm(x, w, eps)))

    def reference():
        return (_rmsnorm_ref(x.detach(), w.detach(), eps),)

    # forward: read x, write y; backward: read x, dy, write dx (dw is a small reduction).
    passes = 5 if backward else 2
    impls = _impls(candidates, [x, w], backward, [gy])
    return _Case("rmsnorm", f"{m}x{n}", passes * m * n * x.element_size(), None, impls, reference, "memory")


def _case_add_rmsnorm(m: int, n: int, dtype, device, backward: bool, peers: _Peers) -> _Case:
    from .functional import rmsnorm_residual_fused

    eps = 1e-6
    x = _randn((m, n), dtype, device, backward)
    r = _randn((m, n), dtype, device, backward)
    w = (torch.randn(n, device=device) * 0.1 + 1.0).to(dtype).requires_grad_(backward)
    gy = _randn((m, n), dtype, device)
    gs = _randn((m, n), dtype, device)

    def eager():
        s = x + r
        return _hf_rmsnorm(s, w, eps), s

    candidates = [("eager (HF formula)", eager), ("torch.compile", peers.compiled(eager))]
    if peers.liger:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        candidates.append(
            ("liger-kernel", lambda: LigerFusedAddRMSNormFunction.apply(x, r, w, eps, 0.0, "llama", False))
        )
    candidates.append(("rotalabs-accel", lambda: rmsnorm_residual_fused(x, r, w, eps)))

    def reference():
        s = x.detach().double() + r.detach().double()
        return _rmsnorm_ref(s, w.detach(), eps), s

    # forward: read x, r; write y, s. backward: read dy, ds, s; write one gradient shared by x and r.
    passes = 8 if backward else 4
    impls = _impls(candidates, [x, r, w], backward, [gy, gs])
    return _Case(
        "add_rmsnorm", f"{m}x{n}", passes * m * n * x.element_size(), None, impls, reference, "memory"
    )


def _case_swiglu(m: int, n: int, dtype, device, backward: bool, peers: _Peers) -> _Case:
    from .functional import swiglu_fused

    g = _randn((m, n), dtype, device, backward)
    u = _randn((m, n), dtype, device, backward)
    gy = _randn((m, n), dtype, device)

    def eager():
        return F.silu(g) * u

    candidates = [("eager", eager), ("torch.compile", peers.compiled(eager))]
    if peers.liger:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        candidates.append(("liger-kernel", lambda: LigerSiLUMulFunction.apply(g, u)))
    candidates.append(("rotalabs-accel", lambda: swiglu_fused(g, u)))

    def reference():
        return (F.silu(g.detach().double()) * u.detach().double(),)

    # forward: read g, u; write y. backward: read g, u, dy; write dg, du (and the forward again).
    passes = 8 if backward else 3
    impls = _impls(candidates, [g, u], backward, [gy])
    return _Case("swiglu", f"{m}x{n}", passes * m * n * g.element_size(), None, impls, reference, "memory")


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _hf_rope(q, k, cos, sin):
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _case_rope(b, hq, hk, s, d, decode, dtype, device, backward: bool, peers: _Peers) -> _Case:
    from .functional import apply_rope, build_rope_cache

    q = _randn((b, hq, s, d), dtype, device, backward)
    k = _randn((b, hk, s, d), dtype, device, backward)
    gq = _randn((b, hq, s, d), dtype, device)
    gk = _randn((b, hk, s, d), dtype, device)
    max_pos = 8192
    cos_t, sin_t = build_rope_cache(max_pos, d, device=device)
    if decode:
        # One token per sequence at scattered positions, as in batched KV-cache decoding.
        pos = torch.randint(0, max_pos, (b, 1), device=device)
    else:
        pos = torch.arange(s, device=device).unsqueeze(0)
    # Hugging Face's form: gathered per token, duplicated halves, in the activations' dtype.
    cos_hf = torch.cat((cos_t[pos], cos_t[pos]), dim=-1).to(dtype)
    sin_hf = torch.cat((sin_t[pos], sin_t[pos]), dim=-1).to(dtype)
    position_ids = pos if decode else None

    def eager():
        return _hf_rope(q, k, cos_hf, sin_hf)

    candidates = [("eager (HF formula)", eager), ("torch.compile", peers.compiled(eager))]
    liger_output = None
    if peers.liger and not backward:
        # Liger rotates q and k in place: timed forward only; its output is checked on copies.
        from liger_kernel.ops.rope import LigerRopeFunction

        candidates.append(("liger-kernel", lambda: LigerRopeFunction.apply(q, k, cos_hf, sin_hf)))

        def liger_output():
            return LigerRopeFunction.apply(q.detach().clone(), k.detach().clone(), cos_hf, sin_hf)

    candidates.append(
        ("rotalabs-accel", lambda: apply_rope(q, k, cos_t, sin_t, position_ids=position_ids, layout="bhsd"))
    )

    def reference():
        c = cos_t[pos].double()
        sn = sin_t[pos].double()
        return _hf_rope(
            q.detach().double(), k.detach().double(), torch.cat((c, c), -1), torch.cat((sn, sn), -1)
        )

    impls = _impls(candidates, [q, k], backward, [gq, gk])
    for impl in impls:
        if impl.name == "liger-kernel" and liger_output is not None:
            impl.output = liger_output
    passes = 4 if backward else 2
    nbytes = passes * (q.numel() + k.numel()) * q.element_size()
    label = f"q {b}x{hq}x{s}x{d}, k {hk} heads" + (" (decode, position_ids)" if decode else "")
    return _Case("rope", label, nbytes, None, impls, reference, "memory")


def _case_int8(m: int, n: int, k: int, dtype, device, backward: bool, peers: _Peers) -> _Case:
    from .kernels.gemm import Int8Linear

    w = _randn((n, k), dtype, device, scale=k**-0.5)
    x = _randn((m, k), dtype, device)
    layer = Int8Linear(k, n, bias=False).to(device)
    layer.quantize_weights(w)
    wq, scale = layer.weight_int8, layer.scale
    w_deq = wq.to(dtype) * scale.to(dtype)[:, None]

    def dequant():
        return F.linear(x, wq.to(x.dtype) * scale.to(x.dtype)[:, None])

    candidates = [
        (f"F.linear ({_DTYPE_NAMES[dtype]} weight)", lambda: F.linear(x, w), w.element_size()),
        ("eager dequant", dequant, 1),
        ("torch.compile dequant", peers.compiled(dequant), 1),
        ("rotalabs-accel", lambda: layer(x), 1),
    ]

    def reference():
        return (F.linear(x.double(), w_deq.double()),)

    impls = [_Impl(name, fn, fn, bytes_per_elt=bpe) for name, fn, bpe in candidates if fn is not None]
    return _Case(
        "int8_linear",
        f"M={m}, N={n}, K={k}",
        float(n * k),
        2.0 * m * n * k,
        impls,
        reference,
        "memory" if m <= 128 else "compute",
        "inference only: forward timed" if backward else "",
    )


def _rel_err(a, ref) -> float:
    a = a.detach().double()
    ref = ref.detach().double().to(a.device)
    if a.shape != ref.shape:
        return float("inf")
    if not torch.isfinite(a).all():
        return float("inf")
    d = ref.norm().item()
    return (a - ref).norm().item() / (d if d > 0 else 1.0)


def _check(case: _Case, dtype: torch.dtype) -> dict[str, tuple[str, float | None]]:
    """Compare every implementation's forward outputs with the float64 reference.

    An implementation agrees when its relative error is at most twice that of the first (eager)
    implementation plus half the dtype's unit roundoff: the project's test rule. For int8_linear the
    baseline is the eager dequantized product (the bf16-weight ``F.linear`` has no quantization error),
    with room for the activation quantization of the W8A8 path.
    """
    with torch.no_grad():
        ref = _as_tuple(case.reference())
        errs: dict[str, float | None] = {}
        for impl in case.impls:
            try:
                out = _as_tuple(impl.output())
                errs[impl.name] = max(_rel_err(o, r) for o, r in zip(out, ref))
            except Exception as exc:  # a peer that cannot run this case is reported, not fatal
                errs[impl.name] = None
                errs[impl.name + "#error"] = f"{type(exc).__name__}: {exc}"  # type: ignore[assignment]
    baseline_name = "eager dequant" if case.op == "int8_linear" else case.impls[0].name
    base = errs.get(baseline_name) or 0.0
    bound = 2.0 * base + 0.5 * _UNIT[dtype]
    if case.op == "int8_linear":
        # The W8A8 path (chosen automatically for many rows) also quantizes the activations: about
        # 0.5% relative error on top; a broken kernel is off by order one.
        bound += 2e-2
    result = {}
    for impl in case.impls:
        e = errs.get(impl.name)
        if e is None:
            result[impl.name] = (f"failed ({errs.get(impl.name + '#error')})", None)
        elif case.op == "int8_linear" and impl.name.startswith("F.linear"):
            result[impl.name] = ("n/a (unquantized)", e)
        else:
            result[impl.name] = ("ok" if e <= bound else f"MISMATCH (bound {bound:.1e})", e)
    return result


# --------------------------------------------------------------------------------------------------
# bench: driver and output
# --------------------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 24
        filled = int(width * self.done / max(1, self.total))
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label[:60]:<60}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def _build_cases(ops, shapes_key, dtype, device, backward, peers) -> list[_Case]:
    table = _SHAPES[shapes_key]
    builders = {
        "rmsnorm": _case_rmsnorm,
        "add_rmsnorm": _case_add_rmsnorm,
        "swiglu": _case_swiglu,
        "rope": _case_rope,
        "int8_linear": _case_int8,
    }
    cases: list[_Case] = []
    for op in ops:
        for shape in table[op]:
            cases.append(builders[op](*shape, dtype, device, backward, peers))
    return cases


def run_bench(
    ops: Sequence[str],
    *,
    dtype: torch.dtype,
    shapes: str,
    backward: bool,
    repeat: int,
    compile_: bool,
    device: torch.device,
    progress: bool,
) -> dict:
    """Measure every op and implementation; returns a JSON-ready dictionary."""
    timer = _Timer(device, repeat, budget_ms=60.0 if device.type == "cpu" else 300.0)
    peers = _Peers(device, compile_)
    notes: list[str] = []
    if device.type == "cpu":
        notes.append(
            "No CUDA device: this library runs its PyTorch fallback on CPU, timed here with small shapes. "
            "These numbers say nothing about GPU speed."
        )
    if not compile_:
        notes.append(
            "torch.compile not timed"
            + (
                " (CPU: compile time dominates; pass --compile)"
                if device.type == "cpu"
                else " (--no-compile)"
            )
        )
    if backward and "int8_linear" in ops:
        notes.append("int8_linear is inference only: its rows time the forward pass")
    if device.type == "cuda" and not peers.liger:
        notes.append("Liger-Kernel is not installed: no peer row for it")
    ceilings = {
        "copy_GBps": _copy_bandwidth_gbps(device, timer),
        "matrix_TFLOPs": _matrix_rate_tflops(device, dtype, timer),
    }
    torch.manual_seed(0)
    cases = _build_cases(ops, shapes, dtype, device, backward, peers)
    total = sum(len(c.impls) for c in cases)
    bar = _Progress(total, progress)
    rows: list[_Row] = []
    try:
        for case in cases:
            checks = _check(case, dtype)
            times: dict[str, float | None] = {}
            for impl in case.impls:
                bar.step(f"{case.op} {case.shape} · {impl.name}")
                if checks[impl.name][0].startswith("failed"):
                    times[impl.name] = None
                    continue
                try:
                    times[impl.name] = timer(impl.run)
                except Exception as exc:
                    times[impl.name] = None
                    checks[impl.name] = (f"failed while timing ({type(exc).__name__}: {exc})", None)
            baseline = times.get(case.impls[0].name)
            for impl in case.impls:
                ms = times[impl.name]
                gbps = tflops = pct = speedup = None
                if ms is not None:
                    nbytes = case.nbytes * (impl.bytes_per_elt or 1.0)
                    gbps = nbytes / ms / 1e6
                    if case.flops is not None:
                        tflops = case.flops / ms / 1e9
                    if case.bound == "memory":
                        pct = 100.0 * gbps / ceilings["copy_GBps"]
                    elif tflops is not None:
                        pct = 100.0 * tflops / ceilings["matrix_TFLOPs"]
                    speedup = baseline / ms if baseline else None
                status, err = checks[impl.name]
                rows.append(
                    _Row(
                        case.op, case.shape, impl.name, ms, gbps, tflops, pct, speedup, status, err, case.note
                    )
                )
    finally:
        bar.close()
    from . import __version__

    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": _DTYPE_NAMES[dtype],
        "pass": "forward+backward" if backward else "forward",
        "shapes": shapes,
        "timer": timer.method,
        "repeat": repeat,
        "rotalabs_accel": __version__,
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "liger_kernel": _package_version("liger-kernel"),
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {"env": env, "ceilings": ceilings, "rows": [dataclasses.asdict(r) for r in rows], "notes": notes}


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(result: dict) -> str:
    env, ceil = result["env"], result["ceilings"]
    lines = [
        f"rotalabs-accel bench · {env['device']} · {env['dtype']} · {env['pass']} · torch {env['torch']} · "
        f"triton {env['triton'] or '-'} · liger-kernel {env['liger_kernel'] or '-'}",
        f"ceilings measured in this run: copy {ceil['copy_GBps']:,.0f} GB/s (read + write), "
        f"matrix {ceil['matrix_TFLOPs']:,.1f} TFLOP/s ({env['dtype']}) · timer: {env['timer']}",
    ]
    for n in result["notes"]:
        lines.append(f"note: {n}")
    headers = ["op", "shape", "impl", "ms", "GB/s", "TFLOP/s", "% ceiling", "speedup", "check"]
    body = []
    for r in result["rows"]:
        body.append(
            [
                r["op"],
                r["shape"],
                r["impl"],
                _fmt(r["ms"], ".4f") if r["ms"] is not None else "-",
                _fmt(r["GBps"], ",.0f"),
                _fmt(r["TFLOPs"], ",.2f"),
                (_fmt(r["pct_of_ceiling"], ".0f") + "%") if r["pct_of_ceiling"] is not None else "",
                (_fmt(r["speedup"], ".2f") + "x") if r["speedup"] is not None else "",
                r["check"] + (f" ({r['rel_err']:.1e})" if r["rel_err"] is not None else ""),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(headers)]
    numeric = {3, 4, 5, 6, 7}

    def fmt_row(cells):
        return "  ".join(
            c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)
        )

    lines.append("")
    lines.append(fmt_row(headers))
    lines.append("  ".join("-" * w for w in widths))
    previous = None
    for row, r in zip(body, result["rows"]):
        key = (r["op"], r["shape"])
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        lines.append(fmt_row(row).rstrip())
    lines.append("")
    lines.append(
        "speedup: over the first row of each group (PyTorch eager; for int8_linear, F.linear with the "
        "unquantized weight).\n% ceiling: GB/s over the measured copy rate (memory-bound rows), or TFLOP/s "
        "over the measured matrix rate (int8_linear with M > 128).\ncheck: relative error against a float64 "
        "reference; ok = at most twice PyTorch eager's error plus half a unit of roundoff."
    )
    return "\n".join(lines)


def plot_results(result: dict, path: str) -> None:
    """Draw one panel per op: achieved GB/s per implementation (int8_linear: speedup)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    if not ops:
        raise ValueError("nothing to plot: no benchmark rows")
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 3.6 * len(ops)), squeeze=False)
    # One color per implementation across every panel; this library's always the same, first.
    palette = ["tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:gray"]
    colors: dict[str, str] = {"rotalabs-accel": palette[0]}
    env = result["env"]
    fig.suptitle(f"rotalabs-accel bench · {env['device']} · {env['dtype']} · {env['pass']}", fontsize=12)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r["op"] == op]
        shapes = list(dict.fromkeys(r["shape"] for r in op_rows))
        impls = list(dict.fromkeys(r["impl"] for r in op_rows))
        metric = "speedup" if op == "int8_linear" else "GBps"
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            # distinct until the palette runs out (then colors repeat, never this library's red)
            color = colors.setdefault(impl, palette[1 + (len(colors) - 1) % (len(palette) - 1)])
            values = []
            for s in shapes:
                match = [r for r in op_rows if r["shape"] == s and r["impl"] == impl]
                v = match[0][metric] if match and match[0][metric] is not None else 0.0
                values.append(v)
            xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(shapes))]
            bars = ax.bar(xs, values, width, label=impl, color=color)
            for b, v in zip(bars, values):
                if v:
                    label = f"{v:.2f}x" if metric == "speedup" else f"{v:,.0f}"
                    ax.annotate(
                        label, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7
                    )
        if metric == "GBps":
            ceiling = result["ceilings"]["copy_GBps"]
            ax.axhline(ceiling, color="grey", linestyle="--", linewidth=1, label=f"copy {ceiling:,.0f} GB/s")
            ax.set_ylabel("GB/s (higher is better)")
        else:
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
            ax.set_ylabel("speedup over F.linear")
        ax.set_title(op, loc="left", fontsize=11)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize=8)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_bench(args: argparse.Namespace) -> int:
    device = _default_device()
    ops = args.ops or list(OPS)
    shapes = args.shapes or ("llm" if device.type == "cuda" else "small")
    dtype = (
        _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    compile_ = args.compile if args.compile is not None else device.type == "cuda"
    if device.type == "cpu" and not args.json:
        print(
            "No CUDA device found: timing the PyTorch fallback on CPU"
            + (" with small shapes" if shapes == "small" else "")
            + ". Run on a CUDA GPU to time the Triton kernels.",
            file=sys.stderr,
        )
    result = run_bench(
        ops,
        dtype=dtype,
        shapes=shapes,
        backward=args.backward,
        repeat=args.repeat,
        compile_=compile_,
        device=device,
        progress=sys.stderr.isatty() and not args.no_progress,
    )
    result["env"]["command"] = shlex.join(["rotalabs-accel", *args.argv])
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
    if args.plot:
        plot_results(result, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    mismatches = [
        r for r in result["rows"] if r["check"].startswith("MISMATCH") and r["impl"] == "rotalabs-accel"
    ]
    return 1 if mismatches else 0


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------


def _rotate_half_demo(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Rotary embedding the Hugging Face way (``optimize_model`` swaps this function for the demo)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half_demo(q) * sin, k * cos + _rotate_half_demo(k) * sin


class DemoMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DemoAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, hidden_states, position_embeddings):
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None


class DemoDecoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(hidden, eps=1e-6)
        self.self_attn = DemoAttention(hidden, heads, kv_heads)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=1e-6)
        self.mlp = DemoMLP(hidden, intermediate)

    def forward(self, hidden_states, position_embeddings=None):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, position_embeddings=position_embeddings
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class DemoDecoder(nn.Module):
    """A small Llama-style decoder (no embedding): rotary tables, N pre-norm layers, a final norm."""

    def __init__(self, hidden=256, intermediate=688, heads=4, kv_heads=2, layers=2, base=10000.0) -> None:
        super().__init__()
        head_dim = hidden // heads
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.layers = nn.ModuleList(
            DemoDecoderLayer(hidden, intermediate, heads, kv_heads) for _ in range(layers)
        )
        self.norm = nn.RMSNorm(hidden, eps=1e-6)

    def forward(self, hidden_states):
        s = hidden_states.shape[1]
        freqs = torch.arange(s, device=hidden_states.device, dtype=torch.float32)[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        position_embeddings = (emb.cos().to(hidden_states.dtype), emb.sin().to(hidden_states.dtype))
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings=position_embeddings)
        return self.norm(hidden_states)


_DEMO_GRADS = ("layers.0.post_attention_layernorm.weight", "layers.0.mlp.gate_proj.weight")


def _demo_run(model: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward and backward of the demo decoder; the output and a few gradients, detached."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(gy)
    params = dict(model.named_parameters())
    out = {"output": y.detach(), "grad of the input": x.grad.detach()}
    for name in _DEMO_GRADS:
        out[f"grad of {name}"] = params[name].grad.detach()
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from .integration import optimize_model, revert_rope_patches

    device = _default_device()
    dtype = (
        _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    print("rotalabs-accel demo")
    print(
        "A 2-layer Llama-style decoder built from plain PyTorch modules: torch.nn.RMSNorm, a gate/up/down "
        "SiLU MLP, and attention with rotary embeddings applied by a Hugging Face-style "
        "apply_rotary_pos_emb function."
    )
    if device.type == "cpu":
        print(
            "Device: cpu. No CUDA GPU found, so every op runs the library's PyTorch fallback "
            "(the Triton kernels need a CUDA GPU). The results must still match."
        )
    else:
        print(f"Device: {device} ({torch.cuda.get_device_name(device)}), dtype {_DTYPE_NAMES[dtype]}.")
    base = DemoDecoder().to(device=device)
    reference = copy.deepcopy(base).to(dtype)
    optimized = copy.deepcopy(base).to(dtype)
    x = torch.randn(2, 32, 256, device=device)
    gy = torch.randn(2, 32, 256, device=device)

    # The PyTorch block runs first (and in float64, as the yardstick): optimize_model swaps
    # apply_rotary_pos_emb for this whole Python module.
    exact = _demo_run(copy.deepcopy(base).double(), x.double(), gy.double())
    plain = _demo_run(reference, x.to(dtype), gy.to(dtype))

    print("")
    optimized, report = optimize_model(optimized, report=True)
    print(report)
    try:
        ours = _demo_run(optimized, x.to(dtype), gy.to(dtype))
        unit = _UNIT[dtype]
        print("")
        print(
            f"Optimized vs PyTorch block in {_DTYPE_NAMES[dtype]}, each measured against the same block in "
            "float64: the optimized block passes when its relative error is at most twice the PyTorch "
            "block's plus two units of roundoff."
        )
        ok = True
        width = max(len(label) for label in plain)
        for label in plain:
            e_plain = _rel_err(plain[label], exact[label])
            e_ours = _rel_err(ours[label], exact[label])
            bound = 2.0 * e_plain + 2.0 * unit
            diff = (ours[label].double() - plain[label].double()).abs().max().item()
            passed = e_ours <= bound
            ok &= passed
            print(
                f"  {label:<{width}}  max abs diff {diff:.1e}  rel. error: PyTorch {e_plain:.1e}, "
                f"optimized {e_ours:.1e}  {'ok' if passed else 'MISMATCH'}"
            )
        print("")
        print("Backend per op in this run:")
        h = torch.empty(2, 32, 256, device=device, dtype=dtype)
        w = optimized.norm.weight
        q = torch.empty(2, 4, 32, 64, device=device, dtype=dtype)
        k = torch.empty(2, 2, 32, 64, device=device, dtype=dtype)
        cos = torch.empty(32, 32, device=device)
        for what, op, tensors in (
            ("RMSNorm (TritonRMSNorm)", "rmsnorm", (h, w)),
            ("residual add + RMSNorm", "rmsnorm_residual_fused", (h, h, w)),
            ("SwiGLU activation", "swiglu_fused", (h, h)),
            ("rotary (apply_rope)", "apply_rope", (q, k, cos, cos)),
        ):
            backend, why = _explain_backend(op, tensors)
            shown = (
                "PyTorch fallback"
                if backend == "torch"
                else "Triton kernel"
                if backend == "triton"
                else backend
            )
            print(f"  {what:<24} {shown:<17} ({why})")
    finally:
        revert_rope_patches()
    print("")
    verdict = "outputs and gradients match" if ok else "MISMATCH between the optimized and the PyTorch block"
    print(f"Result: {verdict} ({time.perf_counter() - t0:.1f} s).")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rotalabs-accel",
        description="Triton kernels for LLM building blocks: environment report, benchmarks and a demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_info = sub.add_parser("info", help="device, versions, and which backend each op will use and why")
    p_info.set_defaults(func=cmd_info)

    p_bench = sub.add_parser(
        "bench",
        help="time each op against PyTorch eager, torch.compile and Liger-Kernel",
        description=(
            "Time each op of this library beside PyTorch eager, torch.compile and Liger-Kernel (when "
            "installed), check that the outputs agree, and print a table. Without a CUDA GPU the "
            "PyTorch fallback is timed on CPU with small shapes."
        ),
    )
    p_bench.add_argument("ops", nargs="*", metavar="OP", help=f"ops to time: {', '.join(OPS)} (default: all)")
    p_bench.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p_bench.add_argument("--shapes", choices=sorted(_SHAPES), help="default: llm on CUDA, small on CPU")
    p_bench.add_argument("--backward", action="store_true", help="time forward + backward")
    p_bench.add_argument("--repeat", type=int, default=1, help="measurements per row; the median is shown")
    p_bench.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p_bench.add_argument("--plot", metavar="FILE.png", help="draw the comparison with matplotlib")
    group = p_bench.add_mutually_exclusive_group()
    group.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="time torch.compile (default on CUDA)",
    )
    group.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="do not time torch.compile (default on CPU)",
    )
    p_bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p_bench.set_defaults(func=cmd_bench)

    p_demo = sub.add_parser("demo", help="optimize a small Llama-style decoder and show the outputs match")
    p_demo.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p_demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if getattr(args, "repeat", 1) < 1:
        parser.error("--repeat must be at least 1")
    unknown = [op for op in getattr(args, "ops", None) or [] if op not in OPS]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
