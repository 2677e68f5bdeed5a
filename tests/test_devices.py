"""Device placement: tensors on different devices are rejected, and every op runs on the tensors' GPU.

* Mixed devices: for every functional op and module, moving any one tensor argument to another
  device raises a ``ValueError`` that names the arguments and their devices, under every backend,
  before anything is computed. Without a second GPU the other device is ``meta``: a tensor there has
  a shape and a dtype but no data, so reaching any computation with it fails with a different error.
* The ``meta`` device itself: with every tensor on it, the ops return ``meta`` tensors of the right
  shapes (shape inference, as ``torch.device("meta")`` model construction uses it).
* With two GPUs (skipped otherwise): the same mismatch between ``cuda:0`` and ``cuda:1``, and every
  case of tests/distributed/run_multi_gpu.py's device check run on ``cuda:1`` while ``cuda:0`` is
  current (same results as on ``cuda:0``, every library kernel on ``cuda:1``, current device kept).
  Here the case code itself is exercised on the CPU (a dry run with the PyTorch reference), so that
  the GPU run does not discover a broken case.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import rotalabs_accel
from helpers import cuda_available, interpreter_enabled, randn
from rotalabs_accel import (
    QuantizedLinear,
    RotaryEmbedding,
    SwiGLU,
    TritonRMSNorm,
    apply_rope,
    build_rope_cache,
    int8_gemm,
    quantize_weight_per_channel,
    rmsnorm,
    rmsnorm_residual_fused,
    swiglu_fused,
)
from rotalabs_accel.functional.activations import swiglu_ffn
from rotalabs_accel.utils import is_triton_available


def _load_multi_gpu_script():
    path = Path(__file__).parent / "distributed" / "run_multi_gpu.py"
    spec = importlib.util.spec_from_file_location("rotalabs_accel_run_multi_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


multi_gpu = _load_multi_gpu_script()

TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


# --------------------------------------------------------------------------------------------------
# Every functional op: its tensor arguments (on the CPU) and how to call it
# --------------------------------------------------------------------------------------------------


def _rope_args() -> dict[str, torch.Tensor]:
    cos, sin = build_rope_cache(16, 8)
    return {"q": randn(2, 16, 4, 8), "k": randn(2, 16, 2, 8), "cos": cos, "sin": sin,
            "position_ids": torch.arange(16)}


def _int8_args() -> dict[str, torch.Tensor]:
    q, s = quantize_weight_per_channel(randn(16, 8))
    return {"x": randn(3, 8), "weight_int8": q, "scale": s, "bias": randn(16)}


OPS: dict[str, tuple[Callable[[], dict[str, torch.Tensor]], Callable[[dict], object]]] = {
    "rmsnorm": (lambda: {"x": randn(4, 8), "weight": randn(8)}, lambda a: rmsnorm(**a)),
    "rmsnorm_residual_fused": (
        lambda: {"x": randn(4, 8), "residual": randn(4, 8), "weight": randn(8)},
        lambda a: rmsnorm_residual_fused(**a),
    ),
    "swiglu_fused": (lambda: {"gate": randn(4, 8), "up": randn(4, 8)}, lambda a: swiglu_fused(**a)),
    "swiglu_ffn": (
        lambda: {"x": randn(3, 8), "gate_weight": randn(16, 8), "up_weight": randn(16, 8),
                 "down_weight": randn(8, 16), "gate_bias": randn(16), "up_bias": randn(16),
                 "down_bias": randn(8)},
        lambda a: swiglu_ffn(**a),
    ),
    "apply_rope": (_rope_args, lambda a: apply_rope(a["q"], a["k"], a["cos"], a["sin"],
                                                    position_ids=a["position_ids"])),
    "int8_gemm": (_int8_args, lambda a: int8_gemm(**a)),
}

def _mismatch_params():
    params = []
    for op, (make, _) in OPS.items():
        for arg in make():
            params.append(pytest.param(op, arg, id=f"{op}-{arg}"))
    return params


def _backends():
    triton_ok = is_triton_available() and (cuda_available() or interpreter_enabled())
    skip = pytest.mark.skip(reason="no Triton kernels here (no triton, or no CUDA and no interpreter)")
    return ["auto", "torch", pytest.param("triton", marks=() if triton_ok else skip)]


def _moved(t: torch.Tensor, device: str) -> torch.Tensor:
    if device == "meta":
        return torch.empty_like(t, device="meta")
    return t.to(device)


def _expect_mismatch(fn: Callable[[], object], op: str, names: tuple[str, str], devices: tuple[str, str]):
    with pytest.raises(ValueError, match=rf"^{re.escape(op)}: all tensors must be on one device") as info:
        fn()
    message = str(info.value)
    for name in names:
        assert f" {name} is on " in message, message
    for device in devices:
        assert device in message, message


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(("op", "arg"), _mismatch_params())
def test_mixed_devices_raise(op, arg, backend):
    make, call = OPS[op]
    args = make()
    first = next(iter(args))
    # The message names the first argument and the odd one out (or, when the first is the odd one,
    # the second argument it was compared with).
    other = first if arg != first else list(args)[1]
    args[arg] = _moved(args[arg], "meta")
    with rotalabs_accel.use_backend(backend):
        _expect_mismatch(lambda: call(args), op, (arg, other), ("cpu", "meta"))


# --------------------------------------------------------------------------------------------------
# Modules: the input on another device than the parameters and buffers
# --------------------------------------------------------------------------------------------------


def _rotary_mixed():
    q = randn(2, 8, 4, 16)
    k = torch.empty(2, 8, 2, 16, device="meta")
    return lambda: RotaryEmbedding(16, max_seq_len=8)(q, k), "apply_rope", ("q", "k")


MODULES = {
    "TritonRMSNorm": lambda: (lambda: TritonRMSNorm(8)(torch.empty(3, 8, device="meta")), "rmsnorm",
                              ("x", "weight")),
    "SwiGLU": lambda: (lambda: SwiGLU(8, 16)(torch.empty(3, 8, device="meta")), "swiglu_ffn",
                       ("x", "gate_weight")),
    "QuantizedLinear": lambda: (
        lambda: QuantizedLinear.from_linear(torch.nn.Linear(8, 16))(torch.empty(3, 8, device="meta")),
        "int8_gemm", ("x", "weight_int8"),
    ),
    "RotaryEmbedding": _rotary_mixed,
}


@pytest.mark.parametrize("module", list(MODULES))
def test_module_input_on_another_device_raises(module):
    fn, op, names = MODULES[module]()
    _expect_mismatch(fn, op, names, ("cpu", "meta"))


# --------------------------------------------------------------------------------------------------
# Everything on the meta device: shapes propagate
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", list(OPS))
def test_all_meta_gives_meta_results(op):
    make, call = OPS[op]
    cpu_args = make()
    expected = call(cpu_args)
    got = call({k: _moved(v, "meta") for k, v in cpu_args.items()})
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    assert [g.device.type for g in got] == ["meta"] * len(expected)
    assert [(g.shape, g.dtype) for g in got] == [(e.shape, e.dtype) for e in expected]


# --------------------------------------------------------------------------------------------------
# Two GPUs
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@TWO_GPUS
@pytest.mark.parametrize(("op", "arg"), [pytest.param(op, arg, id=f"{op}-{arg}")
                                         for op, (make, _) in OPS.items() for arg in make()])
def test_mixed_gpus_raise(op, arg):
    torch.cuda.set_device(0)
    make, call = OPS[op]
    args = {k: v.to("cuda:0") for k, v in make().items()}
    first = next(iter(args))
    other = first if arg != first else list(args)[1]
    args[arg] = args[arg].to("cuda:1")
    _expect_mismatch(lambda: call(args), op, (arg, other), ("cuda:0", "cuda:1"))


DEVICE_CASES = {name: (dtype, run, tol) for name, dtype, run, tol in multi_gpu.device_cases()}


@pytest.mark.gpu
@TWO_GPUS
@pytest.mark.parametrize("case", list(DEVICE_CASES))
def test_case_on_second_gpu(case):
    pytest.importorskip("transformers")
    if not is_triton_available():
        pytest.skip("triton is not installed")
    torch.cuda.set_device(0)
    dtype, run, tol = DEVICE_CASES[case]
    record = multi_gpu.check_device_case(case, dtype, run, torch.device("cuda:0"), torch.device("cuda:1"),
                                         multi_gpu.library_kernel_names(), tol_units=tol)
    assert record["status"] == "PASS", record["detail"]
    assert torch.cuda.current_device() == 0


# The case code on the CPU, through the reference: catches a case broken by an API change before the
# GPU run does. The large shapes only repeat, on the CPU, the code of a smaller case.
_DRY_RUN_SKIP = ("rmsnorm/split/bf16", "rmsnorm/chunked/bf16", "rmsnorm_residual_fused/split/fp32",
                 "swiglu_fused/pair/fp32", "optimized Llama/fp32")


@pytest.mark.parametrize("case", [c for c in DEVICE_CASES if c not in _DRY_RUN_SKIP])
def test_device_case_dry_run_on_cpu(case):
    if case.startswith("optimized Llama"):
        pytest.importorskip("transformers")
    dtype, run, tol = DEVICE_CASES[case]
    cpu = torch.device("cpu")
    record = multi_gpu.check_device_case(case, dtype, run, cpu, cpu, set(), backend="torch", tol_units=tol)
    assert record["status"] == "PASS", record["detail"]
    assert record["metrics"]["bitwise_equal"]
    assert record["metrics"]["worst_vs_reference"]["ratio_to_bound"] > 0  # compared to the reference


def test_device_case_dry_run_catches_a_wrong_result():
    """The judge fails a case whose result on the 'other' device is off (here: by one rounding unit x 10)."""
    dtype, run, tol = DEVICE_CASES["rmsnorm/tile/fp32"]
    cpu = torch.device("cpu")
    calls = []

    def off_on_second_call(device, upcast):
        out = run(device, upcast)
        calls.append(upcast)
        if len(calls) == 3:  # the profiled call on the "other" device
            out["y"] = out["y"] * (1 + 10 * multi_gpu.UNIT_ROUNDOFF[dtype])
        return out

    record = multi_gpu.check_device_case("x", dtype, off_on_second_call, cpu, cpu, set(), backend="torch",
                                         tol_units=tol)
    assert record["status"] == "FAIL" and "second call y differs" in record["detail"], record["detail"]


def test_script_tolerance_rule_is_the_helpers_rule():
    """run_multi_gpu.py restates the rule of tests/helpers.py (it must run without pytest): same numbers."""
    import helpers

    assert multi_gpu.FACTOR == helpers.FACTOR
    assert multi_gpu.UNIT_ROUNDOFF == helpers.UNIT_ROUNDOFF
    for dtype in helpers.UNIT_ROUNDOFF:
        assert multi_gpu.floor(dtype) == helpers.floor(dtype)
    a, ref = randn(5, 7), randn(5, 7)
    assert multi_gpu.rel_err(a, ref) == pytest.approx(helpers.rel_err(a, ref), rel=1e-12)
    with pytest.raises(ValueError, match="NaN or Inf"):
        multi_gpu.rel_err(torch.tensor([float("nan")]), torch.ones(1))
