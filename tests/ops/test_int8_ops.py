"""Op layer of INT8 linear: custom-op registration (opcheck, fake tensors, torch.compile), autograd and
lazy kernel import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rotalabs_accel
from helpers import assert_within_torch_error, kernel_devices, randn
from rotalabs_accel.functional.gemm import int8_gemm
from rotalabs_accel.ops import int8 as int8_ops
from rotalabs_accel.reference.int8 import (
    dequantize_weight_reference,
    int8_linear_reference,
    quantize_weight_reference,
)


def _inputs(m, n, k, dtype, device, group_size=None):
    q, s = quantize_weight_reference(randn(n, k, device=device) * 0.05, group_size)
    return randn(m, k, dtype=dtype, device=device), q, s, randn(n, dtype=dtype, device=device)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("with_bias, group_size", [(True, 0), (False, 16)])
def test_opcheck_int8_linear(device, with_bias, group_size):
    x, q, s, b = _inputs(3, 24, 48, torch.float32, device, group_size or None)
    x.requires_grad_()
    args = (x, q, s, b.requires_grad_() if with_bias else None, group_size, "auto")
    torch.library.opcheck(torch.ops.rotalabs_accel.int8_linear.default, args)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_opcheck_int8_linear_w8a8(device):
    x, q, s, b = _inputs(3, 24, 48, torch.float16, device)
    torch.library.opcheck(torch.ops.rotalabs_accel.int8_linear_w8a8.default, (x.requires_grad_(), q, s, b))


def test_fake_tensor_shapes_without_running_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 64, dtype=torch.bfloat16)
        q = torch.empty(33, 64, dtype=torch.int8)
        s = torch.empty(33)
        out = torch.ops.rotalabs_accel.int8_linear(x, q, s, None, 0, "auto")
        out8 = torch.ops.rotalabs_accel.int8_linear_w8a8(x, q, s, None)
    assert out.shape == out8.shape == (7, 33) and out.dtype == torch.bfloat16


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_autograd_function_gradients(device):
    x, q, s, b = _inputs(4, 24, 64, torch.bfloat16, device, group_size=32)
    x.requires_grad_()
    b.requires_grad_()
    dy = randn(4, 24, dtype=torch.bfloat16, device=device)
    out = int8_ops.int8_linear(x, q, s, b, 32, False, "splitk")
    out.backward(dy)
    w = dequantize_weight_reference(q, s, 32, dtype=torch.float64)
    baseline = dy @ dequantize_weight_reference(q, s, 32, torch.bfloat16)
    assert_within_torch_error(x.grad, baseline, dy.double() @ w, torch.bfloat16, what="dx")
    torch.testing.assert_close(b.grad, dy.sum(0))
    # no input needs a gradient: nothing is saved, backward is never built
    with torch.no_grad():
        assert int8_ops.int8_linear(x, q, s, b, 32, False, "gemv").grad_fn is None
    x0, b0 = x.detach(), b.detach()
    assert int8_ops.int8_linear(x0, q, s, b0, 32, False, "gemv").grad_fn is None
    # only the bias needs one: the autograd path, and the bias gradient is the column sum
    b1 = b0.clone().requires_grad_()
    out = int8_ops.int8_linear(x0, q, s, b1, 32, False, "gemv")
    assert out.grad_fn is not None
    out.backward(dy)
    torch.testing.assert_close(b1.grad, dy.sum(0))


@pytest.mark.compile
@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_compile_fullgraph_forward_and_backward(device):
    x, q, s, b = _inputs(3, 24, 48, torch.float16, device)
    qg, sg = quantize_weight_reference(randn(24, 48, device=device), 16)

    def f(x):
        return (
            int8_gemm(x, q, s, b, mode="w8a16"),
            int8_gemm(x, q, s, mode="w8a8"),
            int8_gemm(x, qg, sg, group_size=16),
        )

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    with rotalabs_accel.use_backend("triton"):
        xe = x.clone().requires_grad_()
        sum(y.float().sum() for y in f(xe)).backward()
        xc = x.clone().requires_grad_()
        outs = compiled(xc)
        sum(y.float().sum() for y in outs).backward()
        expected = f(x)
    for out, exp in zip(outs, expected):  # the same kernels ran: bitwise equal
        torch.testing.assert_close(out, exp, rtol=0, atol=0)
    # dy = 1 for each of the three outputs (straight-through for W8A8)
    w64 = 2 * dequantize_weight_reference(q, s, None, torch.float64) + dequantize_weight_reference(
        qg, sg, 16, torch.float64
    )
    ones = torch.ones(3, 24, dtype=torch.float64, device=device)
    assert_within_torch_error(xc.grad, xe.grad, ones @ w64, torch.float16)
    assert_within_torch_error(outs[0], int8_linear_reference(x, q, s, b),
                              int8_linear_reference(x.double(), q, s, b.double()), torch.float16)


def test_importing_the_package_imports_no_kernel_module():
    code = (
        "import sys, rotalabs_accel, rotalabs_accel.ops.int8, rotalabs_accel.functional.gemm; "
        "assert 'rotalabs_accel.triton_kernels.int8_gemm' not in sys.modules; "
        "assert 'triton' not in sys.modules, 'triton imported at package import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
