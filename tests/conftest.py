"""Test session set-up.

Without a GPU, Triton kernels are tested through Triton's interpreter: TRITON_INTERPRET must be set
before any kernel module is imported (the @triton.jit decorator reads it), so it is set here, first.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import rotalabs_accel  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed_and_backend(request):
    """Each test starts from its own seed (fresh data per test, reproducible) and the auto backend."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    rotalabs_accel.set_backend(None)
    yield
    rotalabs_accel.set_backend(None)


@pytest.fixture(autouse=True)
def _bf16_round_to_nearest(monkeypatch):
    """Make the interpreter's float32 -> bfloat16 conversion round to nearest even, as the GPU does.

    Triton's interpreter truncates instead, which roughly doubles bf16 errors and would make the
    tolerance rule (tests/helpers.py) judge the interpreter rather than the kernel.
    """
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    triton = pytest.importorskip("triton")
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == triton.language.float32 and dst_type.scalar == triton.language.bfloat16:
            arr = np.asarray(src.data, dtype=np.float32)
            bits = torch.from_numpy(arr.reshape(-1).copy()).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(bits.view(np.uint16).reshape(arr.shape), dst_type.scalar)
        return original(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)
