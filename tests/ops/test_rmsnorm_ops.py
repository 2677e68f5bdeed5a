"""RMSNorm custom ops: torch.library.opcheck and torch.compile(fullgraph=True).

The ops run their Triton kernels (through the interpreter on CPU tensors, for real on CUDA); the
numerics are tested in tests/kernels/test_normalization.py. Here: the registrations (schema, fake
implementations, autograd formulas) are consistent, and a compiled model traces the ops with no graph
break and computes what eager does.
"""

from __future__ import annotations

import pytest
import torch

import rotalabs_accel
from helpers import kernel_devices, randn
from rotalabs_accel import TritonRMSNorm, rmsnorm, rmsnorm_residual_fused

pytestmark = [pytest.mark.interpreter, pytest.mark.compile]


def _ops():
    # Importing the functional layer registers the ops.
    import rotalabs_accel.ops.rmsnorm  # noqa: F401

    return torch.ops.rotalabs_accel


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize(
    "dtype, weight_dtype, mode, offset",
    [
        (torch.float32, torch.float32, "llama", 0.0),
        (torch.bfloat16, torch.float32, "llama", 0.5),
        (torch.float16, torch.float16, "gemma", 1.0),
        (torch.bfloat16, None, "none", 0.0),
    ],
    ids=str,
)
def test_opcheck_forward_ops(device, dtype, weight_dtype, mode, offset):
    ops = _ops()
    x = randn(3, 24, dtype=dtype, device=device).requires_grad_()
    r = randn(3, 24, dtype=dtype, device=device).requires_grad_()
    w = None if weight_dtype is None else randn(24, dtype=weight_dtype, device=device).requires_grad_()
    torch.library.opcheck(ops.rmsnorm_fwd.default, (x, w, 1e-6, offset, mode))
    torch.library.opcheck(ops.add_rmsnorm_fwd.default, (x, r, w, 1e-6, offset, mode))


@pytest.mark.parametrize("device", kernel_devices())
def test_opcheck_backward_ops(device):
    ops = _ops()
    x = randn(4, 20, dtype=torch.bfloat16, device=device)
    w = randn(20, dtype=torch.float32, device=device)
    dy = randn(4, 20, dtype=torch.float32, device=device)
    _, rstd = ops.rmsnorm_fwd(x, w, 1e-6, 0.0, "llama")
    for weight, compute_dw in ((w, True), (w, False), (None, False)):
        torch.library.opcheck(ops.rmsnorm_bwd.default, (dy, x, weight, rstd, 0.0, "llama", compute_dw))
    torch.library.opcheck(ops.add_rmsnorm_bwd.default, (dy, x, x, w, rstd, 0.0, "llama", True))
    torch.library.opcheck(ops.add_rmsnorm_bwd.default, (dy, None, x, w, rstd, 0.0, "llama", True))


def test_fake_implementations_give_shapes_and_dtypes():
    ops = _ops()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 8, dtype=torch.bfloat16)
        w = torch.empty(8, dtype=torch.float32)
        y, rstd = ops.rmsnorm_fwd(x, w, 1e-6, 0.0, "llama")
        assert (y.shape, y.dtype, rstd.shape, rstd.dtype) == ((5, 8), torch.float32, (5,), torch.float32)
        y, rstd = ops.rmsnorm_fwd(x, w, 1e-6, 0.0, "gemma")
        assert y.dtype == torch.bfloat16
        y, s, rstd = ops.add_rmsnorm_fwd(x, x.float(), w, 1e-6, 0.0, "gemma")
        assert (y.dtype, s.dtype) == (torch.float32, torch.float32)


class _Block(torch.nn.Module):
    """Two pre-norm sublayers, the way a decoder layer threads its residual stream."""

    def __init__(self, hidden, device, dtype):
        super().__init__()
        self.input_layernorm = TritonRMSNorm(hidden, device=device, dtype=dtype)
        self.post_attention_layernorm = TritonRMSNorm(hidden, offset=1.0, casting_mode="gemma", device=device,
                                                      dtype=dtype)
        self.proj = torch.nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.input_layernorm.weight.normal_(1.0, 0.3)
            self.post_attention_layernorm.weight.normal_(0.0, 0.3)

    def forward(self, x):
        h = self.proj(self.input_layernorm(x))
        normed, residual = self.post_attention_layernorm(h, x)
        return self.proj(normed) + residual


def _graph_capture():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


@pytest.mark.parametrize("device", kernel_devices())
def test_compile_fullgraph_uses_the_custom_ops(device):
    block = _Block(32, device, torch.float32)
    x = randn(2, 3, 32, device=device).requires_grad_()
    graphs, backend = _graph_capture()
    with rotalabs_accel.use_backend("triton"):
        eager = block(x)
        eager.sum().backward()
        eager_grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
        x.grad = None
        block.zero_grad()
        compiled = torch.compile(block, fullgraph=True, backend=backend)
        out = compiled(x)
        out.sum().backward()
    assert len(graphs) == 1
    targets = " ".join(str(node.target) for node in graphs[0].graph.nodes)
    assert "rotalabs_accel.rmsnorm_fwd" in targets and "rotalabs_accel.add_rmsnorm_fwd" in targets
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    grads = [x.grad] + [p.grad for p in block.parameters()]
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", kernel_devices())
def test_compile_inductor_forward_and_backward(device):
    x = randn(4, 40, dtype=torch.bfloat16, device=device).requires_grad_()
    r = randn(4, 40, dtype=torch.bfloat16, device=device).requires_grad_()
    w = randn(40, dtype=torch.float32, device=device).requires_grad_()

    def fn(x, r, w):
        y = rmsnorm(x, w, 1e-6)
        normed, residual = rmsnorm_residual_fused(y.to(x.dtype), r, w, casting_mode="gemma")
        return normed.float().sum() + residual.float().pow(2).sum()

    with rotalabs_accel.use_backend("triton"):
        expected = fn(x, r, w)
        expected_grads = torch.autograd.grad(expected, (x, r, w))
        got = torch.compile(fn, fullgraph=True)(x, r, w)
        got_grads = torch.autograd.grad(got, (x, r, w))
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_compile_on_cpu_without_kernels_traces_the_reference():
    graphs, backend = _graph_capture()
    x, w = torch.randn(3, 16), torch.randn(16)
    with rotalabs_accel.use_backend("torch"):
        out = torch.compile(lambda x, w: rmsnorm(x, w), fullgraph=True, backend=backend)(x, w)
    torch.testing.assert_close(out, rmsnorm(x, w))
    assert not any("rotalabs_accel" in str(n.target) for n in graphs[0].graph.nodes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compile_with_cuda_graphs():
    block = _Block(1024, "cuda", torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True, mode="reduce-overhead")
    x = randn(8, 64, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            out = compiled(x).clone()  # CUDA-graph outputs are overwritten by the next replay
        expected = block(x)
    # Compiled matmuls may round differently from eager ones; a wrong norm is off by O(1).
    torch.testing.assert_close(out.float(), expected.float(), rtol=3e-2, atol=3e-2)
