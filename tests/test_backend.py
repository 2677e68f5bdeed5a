"""Dispatch rules (rotalabs_accel._backend): the environment variable, set_backend, use_backend
nesting and restoration, invalid names, the forced-Triton errors, and import hygiene (importing the
package neither imports triton nor initialises CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rotalabs_accel
from rotalabs_accel import _backend, get_backend, set_backend, use_backend
from rotalabs_accel._backend import ENV_VAR, check_same_device, select_backend
from rotalabs_accel.utils import is_triton_available


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    set_backend(None)
    yield monkeypatch
    set_backend(None)


def test_default_is_auto(clean_env):
    assert get_backend() == "auto"


@pytest.mark.parametrize(
    "value, expected", [("torch", "torch"), (" TRITON ", "triton"), ("auto", "auto"), ("", "auto")]
)
def test_environment_variable(clean_env, value, expected):
    clean_env.setenv(ENV_VAR, value)
    assert get_backend() == expected


def test_invalid_environment_variable_names_it(clean_env):
    clean_env.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=f"{ENV_VAR} must be one of .*'cuda'"):
        get_backend()


def test_set_backend_overrides_the_environment_and_none_restores_it(clean_env):
    clean_env.setenv(ENV_VAR, "torch")
    set_backend("triton")
    assert get_backend() == "triton"
    set_backend(None)
    assert get_backend() == "torch"


@pytest.mark.parametrize("bad", ["cuda", "", "Torch", None])
def test_invalid_names_are_rejected(clean_env, bad):
    if bad is None:
        with pytest.raises(ValueError):
            with use_backend(bad):
                pass
        return
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend(bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend(bad):
            pass
    assert get_backend() == "auto"


def test_use_backend_nests_and_restores(clean_env):
    set_backend("torch")
    with use_backend("auto"):
        assert get_backend() == "auto"
        with use_backend("triton"):
            assert get_backend() == "triton"
        assert get_backend() == "auto"
    assert get_backend() == "torch"


def test_use_backend_restores_after_an_exception(clean_env):
    with pytest.raises(KeyError):
        with use_backend("torch"):
            raise KeyError("boom")
    assert get_backend() == "auto"


def test_use_backend_is_the_public_one():
    assert rotalabs_accel.use_backend is use_backend
    assert rotalabs_accel.set_backend is set_backend
    assert rotalabs_accel.get_backend is get_backend


def test_select_backend_rules_on_cpu(clean_env):
    x = torch.randn(4, 8)
    clean_env.setenv("TRITON_INTERPRET", "0")
    assert select_backend("op", x) == "torch"
    with use_backend("torch"):
        assert select_backend("op", x) == "torch"
    # auto never raises, even when there is no kernel for the arguments
    assert select_backend("op", x, kernel_reason="no kernel for this") == "torch"
    # auto keeps the reference on CPU tensors even under the interpreter
    clean_env.setenv("TRITON_INTERPRET", "1")
    assert select_backend("op", x) == "torch"


def test_forced_triton_on_cpu_without_interpreter_raises_clearly(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 8)
    with use_backend("triton"):
        if is_triton_available():
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
                select_backend("my_op", x)
        else:
            with pytest.raises(RuntimeError, match="cannot be imported"):
                select_backend("my_op", x)


def test_forced_triton_through_a_public_op_raises_clearly(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 8)
    with use_backend("triton"):
        with pytest.raises(RuntimeError, match="rmsnorm.*(TRITON_INTERPRET=1|cannot be imported)"):
            rotalabs_accel.rmsnorm(x, torch.ones(8))


def test_forced_triton_without_a_kernel_says_why(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(4, 8)
    with use_backend("triton"):
        if not is_triton_available():
            pytest.skip("triton is not installed")
        with pytest.raises(
            NotImplementedError, match="my_op: backend 'triton' was forced but the layout has none"
        ):
            select_backend("my_op", x, kernel_reason="the layout has none")
        assert select_backend("my_op", x) == "triton"


def test_forced_triton_without_triton_installed(clean_env):
    clean_env.setattr(_backend, "is_triton_available", lambda: False)
    with use_backend("triton"):
        with pytest.raises(
            RuntimeError, match="my_op: backend 'triton' was forced but the triton package cannot"
        ):
            select_backend("my_op", torch.randn(2))
    with use_backend("auto"):
        assert select_backend("my_op", torch.randn(2)) == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_triton_on_cuda(clean_env):
    clean_env.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(4, 8, device="cuda")
    expected = "triton" if is_triton_available() else "torch"
    assert select_backend("op", x) == expected
    assert select_backend("op", x, kernel_reason="no kernel") == "torch"
    assert select_backend("op", x, torch.randn(8)) == "torch"  # mixed devices: not all CUDA


def test_check_same_device():
    a = torch.randn(2)
    assert check_same_device("op", x=a, weight=None, bias=a) == a.device
    meta = torch.empty(2, device="meta")
    with pytest.raises(
        ValueError, match="op: all tensors must be on one device, but x is on cpu and weight is on meta"
    ):
        check_same_device("op", x=a, weight=meta)


def _run_python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_touches_neither_triton_nor_cuda():
    out = _run_python(
        """
        import sys
        import torch
        import rotalabs_accel
        import rotalabs_accel.integration, rotalabs_accel.cli
        print("triton-imported", "triton" in sys.modules)
        print("cuda-initialized", torch.cuda.is_initialized())
        # CPU calls under 'auto' take the reference: still no triton, no CUDA context.
        x = torch.randn(3, 16)
        rotalabs_accel.rmsnorm(x, torch.ones(16))
        rotalabs_accel.swiglu_fused(x, x)
        cos, sin = rotalabs_accel.build_rope_cache(8, 8)
        q = torch.randn(1, 8, 2, 8)
        rotalabs_accel.apply_rope(q, q, cos, sin)
        print("after-cpu-calls", "triton" in sys.modules, torch.cuda.is_initialized())
        """
    )
    assert "triton-imported False" in out
    assert "cuda-initialized False" in out
    assert "after-cpu-calls False False" in out
