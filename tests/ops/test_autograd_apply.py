"""direct_apply (rotalabs_accel/ops/_autograd.py): the C++ apply when equivalent, Function.apply otherwise.

The op layers record their forwards through it; it must give the same outputs and gradients as
``Function.apply``, take the C++ path for plain tensors, and hand functorch transforms and tensors
that escaped a finished transform to ``Function.apply``, as if it were not there.
"""

from __future__ import annotations

import pytest
import torch

from rotalabs_accel.ops._autograd import direct_apply


class _Scale(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x, w, factor):
        _Scale.calls += 1
        ctx.save_for_backward(x, w)
        ctx.factor = factor
        return x * w * factor

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w * ctx.factor, (g * x * ctx.factor).sum(0), None


def test_same_results_and_gradients_as_function_apply(monkeypatch):
    apply = direct_apply(_Scale, 0, 1)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, dtype=torch.float64)
    ours = torch.autograd.grad(apply(x, w, 1.5), (x, w), g)
    theirs = torch.autograd.grad(_Scale.apply(x, w, 1.5), (x, w), g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda a, b: apply(a, b, 0.5), (x, w))
    # Plain tensors never touch Function.apply's Python path.
    monkeypatch.setattr(_Scale, "apply", classmethod(lambda cls, *a: pytest.fail("took Function.apply")))
    apply = direct_apply(_Scale, 0, 1)
    apply(x, w, 1.0)
    assert apply.__name__ == "direct_apply(_Scale)"


def test_none_at_a_tensor_position_is_allowed():
    class _Opt(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            return x * 2 if w is None else x * w

        @staticmethod
        def backward(ctx, g):
            return 2 * g, None

    x = torch.randn(3, requires_grad=True)
    direct_apply(_Opt, 0, 1)(x, None).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


def test_functorch_transform_and_escaped_wrappers_take_function_apply():
    func = pytest.importorskip("torch.func")
    apply = direct_apply(_Scale, 0, 1)
    w = torch.randn(3)
    # Under a transform: Function.apply's own answer (it requires setup_context for these Functions).
    with pytest.raises(RuntimeError, match="setup_context"):
        func.grad(lambda a: apply(a, w, 1.0).sum())(torch.randn(3))
    # A tensor that escaped a finished transform is unwrapped by Function.apply, as without direct_apply.
    leaked = []

    def f(a):
        leaked.append(a * 1)
        return a.sum()

    func.grad(f)(torch.randn(3))
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    original = _Scale.apply
    through_python = []

    def recording(*args):
        through_python.append(args)
        return original(*args)

    _Scale.apply = recording
    try:
        out = direct_apply(_Scale, 0, 1)(leaked[0], w, 2.0)
    finally:
        _Scale.apply = original
    assert len(through_python) == 1
    torch.testing.assert_close(out, _Scale.apply(leaked[0], w, 2.0))
