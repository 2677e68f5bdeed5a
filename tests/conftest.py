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
