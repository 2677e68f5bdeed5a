"""Higher-order gradients, ``torch.func`` transforms and forward-mode AD through the ops.

* ``create_graph=True``: the op layers' backward differentiates the PyTorch reference, so a gradient
  penalty (a loss on a gradient) gets the same gradients as the same model written in plain PyTorch.
  Checked on the kernel path against the float64 reference model.
* ``vmap`` / ``grad`` / forward-mode AD: the calls take the reference (the transforms see plain PyTorch);
  a forced ``triton`` backend says why it cannot run there.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import rotalabs_accel
from helpers import kernel_devices, randn
from rotalabs_accel import SwiGLU, rmsnorm, rmsnorm_residual_fused, swiglu_fused
from rotalabs_accel._backend import select_backend, transform_reason
from rotalabs_accel.functional.loss import cross_entropy
from rotalabs_accel.reference.cross_entropy import cross_entropy_reference
from rotalabs_accel.reference.rmsnorm import add_rmsnorm_reference, rmsnorm_reference
from rotalabs_accel.reference.swiglu import swiglu_reference

# The kernel path runs in fp32 (the create_graph backward is the reference in fp32); the oracle is the
# same model in float64. fp32 carries ~24 bits, so the second-order terms agree to ~1e-5 relative.
RTOL, ATOL = 1e-4, 1e-5


def _penalized_grads(model, inputs):
    """Gradients of ``model(*inputs).sum() + sum(d ** 2)`` with ``d`` the first-order gradients."""
    out = model(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    first = sum(o.float().sum() for o in outs)
    grads = torch.autograd.grad(first, inputs, create_graph=True)
    loss = first + sum((g.float() ** 2).sum() for g in grads)
    return torch.autograd.grad(loss, inputs)


def _check(model, reference, tensors):
    ours = [t.detach().clone().requires_grad_() for t in tensors]
    ref = [t.detach().double().requires_grad_() for t in tensors]
    with rotalabs_accel.use_backend("triton"):
        got = _penalized_grads(model, ours)
    want = _penalized_grads(reference, ref)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.requires_grad is False
        torch.testing.assert_close(g.double(), w, rtol=RTOL, atol=ATOL, msg=f"input {i}")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("mode, offset", [("llama", 0.0), ("gemma", 1.0), ("none", 0.0)])
def test_rmsnorm_gradient_penalty(device, mode, offset):
    x, w = randn(6, 40, device=device), randn(40, device=device)

    def ours(x, w):
        return rmsnorm(x, w, 1e-6, offset=offset, casting_mode=mode)

    def ref(x, w):
        return rmsnorm_reference(x, w, 1e-6, offset=offset, casting_mode=mode)

    _check(ours, ref, (x, w))


@pytest.mark.parametrize("device", kernel_devices())
def test_fused_add_rmsnorm_gradient_penalty(device):
    x, r, w = randn(5, 24, device=device), randn(5, 24, device=device), randn(24, device=device)

    def ours(x, r, w):
        return rmsnorm_residual_fused(x, r, w, 1e-6)

    def ref(x, r, w):
        return add_rmsnorm_reference(x, r, w, 1e-6)

    _check(ours, ref, (x, r, w))


@pytest.mark.parametrize("device", kernel_devices())
def test_swiglu_gradient_penalty(device):
    gate, up = randn(4, 3, 16, device=device), randn(4, 3, 16, device=device)
    _check(swiglu_fused, swiglu_reference, (gate, up))
    # a layout the kernels read through a copy (leading dimensions that do not collapse)
    _check(swiglu_fused, swiglu_reference, (gate.transpose(0, 1), up.transpose(0, 1)))
    packed = randn(5, 32, device=device)
    _check(swiglu_fused, lambda t: swiglu_reference(t[..., :16], t[..., 16:]), (packed,))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("fused", [False, True])
def test_swiglu_module_gradient_penalty(device, fused):
    # The module's own parameters (with fused_gate_up they share one buffer: the one-GEMM path).
    module = SwiGLU(16, 40, bias=True, fused_gate_up=fused, device=device)
    assert module.gate_up_packed == fused
    x = randn(7, 16, device=device).requires_grad_()
    params = [module.gate_proj.weight, module.gate_proj.bias, module.up_proj.weight, module.up_proj.bias,
              module.down_proj.weight, module.down_proj.bias]
    with rotalabs_accel.use_backend("triton"):
        got = _penalized_grads(lambda x, *_: module(x), [x, *params])

    def ref(x, wg, bg, wu, bu, wd, bd):
        return F.linear(swiglu_reference(F.linear(x, wg, bg), F.linear(x, wu, bu)), wd, bd)

    want = _penalized_grads(ref, [t.detach().double().requires_grad_() for t in (x, *params)])
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.double(), w, rtol=RTOL, atol=ATOL, msg=f"input {i}")


@pytest.mark.parametrize("device", kernel_devices())
def test_cross_entropy_gradient_penalty(device):
    logits = randn(6, 11, device=device, scale=2.0)
    target = torch.tensor([0, 3, -100, 10, 5, 5], device=device)

    def ours(logits):
        return cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-3)

    def ref(logits):
        return cross_entropy_reference(logits, target, label_smoothing=0.1, z_loss=1e-3)

    _check(ours, ref, (logits,))


def test_transform_reason_names_the_transform():
    assert transform_reason() is None
    seen = []

    def probe(t):
        seen.append(transform_reason())
        return t * 2

    torch.func.vmap(probe)(torch.ones(2))
    torch.func.grad(lambda t: probe(t).sum())(torch.ones(2))
    with fwAD.dual_level():
        probe(fwAD.make_dual(torch.ones(2), torch.ones(2)))
    assert [r is not None and r.split()[0] for r in seen] == ["a", "a", "forward-mode"]
    assert "torch.func" in seen[0] and "forward-mode AD" in seen[2]


@pytest.mark.parametrize("device", kernel_devices())
def test_forced_triton_refuses_transforms(device):
    x, w = randn(3, 8, device=device), randn(8, device=device)
    with rotalabs_accel.use_backend("triton"):
        with pytest.raises(RuntimeError, match="rmsnorm: backend 'triton' was forced but a torch.func"):
            torch.func.vmap(lambda t: rmsnorm(t, w))(x[None])
        with pytest.raises(RuntimeError, match="swiglu_fused: .* forward-mode AD"), fwAD.dual_level():
            swiglu_fused(fwAD.make_dual(x, torch.ones_like(x)), x)


@pytest.mark.parametrize("device", kernel_devices())
def test_auto_backend_takes_the_reference_under_transforms(device):
    # On CUDA the auto backend would run the kernels; inside a transform it must not.
    x, w = randn(4, 8, device=device), randn(8, device=device)
    picks = []

    def f(t):
        picks.append(select_backend("rmsnorm", t))
        return rmsnorm(t, w)

    batched = torch.func.vmap(f)(x[:, None])
    assert picks == ["torch"]
    torch.testing.assert_close(batched[:, 0], rmsnorm_reference(x, w), rtol=1e-6, atol=1e-6)
    with fwAD.dual_level():
        tangent = randn(4, 8, device=device)
        out = fwAD.unpack_dual(swiglu_fused(fwAD.make_dual(x, tangent), x))
    # d/dg [silu(g) * u] = u * s * (1 + g (1 - s)), s = sigmoid(g), times the tangent
    s = torch.sigmoid(x)
    torch.testing.assert_close(out.tangent, tangent * x * s * (1 + x * (1 - s)), rtol=1e-5, atol=1e-6)


def test_module_under_vmap_and_func_grad_matches_plain_pytorch():
    module = SwiGLU(8, 20)
    x = torch.randn(5, 8)

    def plain(t):
        return module.down_proj(F.silu(module.gate_proj(t)) * module.up_proj(t))

    torch.testing.assert_close(torch.func.vmap(module)(x[:, None]), torch.func.vmap(plain)(x[:, None]))
    torch.testing.assert_close(torch.func.grad(lambda t: module(t).sum())(x),
                               torch.func.grad(lambda t: plain(t).sum())(x))
    norm = rotalabs_accel.TritonRMSNorm(8)
    jac = torch.func.jacrev(norm)(x[0])
    assert jac.shape == (8, 8)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(norm, x[0]))


@pytest.mark.parametrize("device", kernel_devices())
def test_meta_tensors_take_the_reference_even_when_triton_is_forced(device):
    x = torch.empty(3, 5, 8, device="meta")
    with rotalabs_accel.use_backend("triton"):
        y = rmsnorm(x, torch.empty(8, device="meta"))
        h = swiglu_fused(torch.empty(2, 16, device="meta"))
    assert y.device.type == "meta" and y.shape == x.shape and h.shape == (2, 8)


@pytest.mark.parametrize("device", kernel_devices())
def test_rope_double_backward(device):
    # The rotation is linear: a penalty on dq reaches the incoming gradient (here a function of q),
    # which the backward must pass through as the transposed rotation.
    from rotalabs_accel.functional.rope import apply_rope, build_rope_cache
    from rotalabs_accel.reference.rope import apply_rope as apply_rope_reference

    cos, sin = build_rope_cache(16, 8, device=device)
    q, k = randn(2, 5, 3, 8, device=device), randn(2, 5, 1, 8, device=device)

    def ours(q, k):
        q_rot, k_rot = apply_rope(q, k, cos, sin)
        return (q_rot ** 3).sum() + (k_rot * k_rot.detach()).sum()

    def ref(q, k):
        q_rot, k_rot = apply_rope_reference(q, k, cos.double(), sin.double())
        return (q_rot ** 3).sum() + (k_rot * k_rot.detach()).sum()

    _check(ours, ref, (q, k))


@pytest.mark.parametrize("device", kernel_devices())
def test_embedding_double_backward(device):
    from rotalabs_accel.functional.embedding import embedding

    ids = torch.tensor([[1, 4, 4], [0, 2, 1]], device=device)
    table = randn(6, 8, device=device)

    def ours(table):
        return torch.tanh(embedding(ids, table, padding_idx=2)).sum()

    def ref(table):
        return torch.tanh(F.embedding(ids, table, padding_idx=2)).sum()

    _check(ours, ref, (table,))
