"""Functional losses: ``cross_entropy``'s contract (validation, dispatch, dtypes) and ``causal_lm_loss``
as a drop-in for Hugging Face's ``ForCausalLMLoss``.

The kernels' numerics are tested in tests/ops/test_cross_entropy_ops.py. Here ``causal_lm_loss`` is
compared with ``ForCausalLMLoss`` itself on the same logits: both compute in fp32 from the same
values, so on the reference path the results are identical, and through the kernels they differ by
fp32 rounding of the loss and one rounding of each gradient to the logits' dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rotalabs_accel
from helpers import FLOAT_DTYPES, assert_within_torch_error, kernel_devices, randn
from rotalabs_accel.functional.loss import causal_lm_loss, cross_entropy
from rotalabs_accel.reference.cross_entropy import cross_entropy_reference

loss_utils = pytest.importorskip("transformers.loss.loss_utils")
ForCausalLMLoss = loss_utils.ForCausalLMLoss

VOCAB = 50


def _labels(batch, seq, vocab, device="cpu", ignore_index=-100):
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[0, :2] = ignore_index  # a masked prompt
    return labels


def _oracle(logits, labels, vocab, num_items_in_batch=None, ignore_index=-100, **_):
    """The causal-LM loss in float64 (Hugging Face's own computes in float32 even for float64 logits)."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = cross_entropy_reference(logits.reshape(-1, vocab), shifted, ignore_index=ignore_index,
                                   reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _loss_and_grad(fn, logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


# --------------------------------------------------------------------------------------------------
# cross_entropy: the contract
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_matches_torch_on_the_reference_path(reduction, label_smoothing):
    """float64 logits (and any CPU call under "auto") run the reference: exactly F.cross_entropy."""
    logits = randn(7, 13, dtype=torch.float64)
    target = torch.randint(0, 13, (7,))
    target[3] = -100
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    ours, ours_grad = _loss_and_grad(lambda x: cross_entropy(x, target, **kw).sum(), logits)
    theirs, theirs_grad = _loss_and_grad(lambda x: F.cross_entropy(x, target, **kw).sum(), logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_output_dtype_follows_torch_and_autocast(dtype):
    logits = randn(4, 9, dtype=dtype)
    target = torch.randint(0, 9, (4,))
    assert cross_entropy(logits, target).dtype == F.cross_entropy(logits, target).dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cross_entropy(logits, target).dtype == F.cross_entropy(logits, target).dtype == torch.float32
    assert cross_entropy(logits.double(), target).dtype == torch.float64


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.interpreter
def test_autocast_output_through_the_kernels(device):
    logits = randn(4, 30, dtype=torch.bfloat16, device=device).requires_grad_()
    target = torch.randint(0, 30, (4,), device=device)
    device_type = torch.device(device).type
    with rotalabs_accel.use_backend("triton"), torch.autocast(device_type, dtype=torch.bfloat16):
        loss = cross_entropy(logits, target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = F.cross_entropy(logits.detach().double(), target)
    base = F.cross_entropy(logits.detach(), target)
    assert_within_torch_error(loss, base, ref, torch.bfloat16, "autocast loss")


def test_z_loss_on_the_reference_path_adds_lse_squared():
    logits = randn(5, 11, dtype=torch.float64) + 2.0
    target = torch.randint(0, 11, (5,))
    target[0] = -100
    rows = cross_entropy(logits, target, reduction="none", z_loss=0.1)
    lse = torch.logsumexp(logits, -1)
    plain = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(rows[1:], plain[1:] + 0.1 * lse[1:] ** 2)
    assert rows[0] == 0
    torch.testing.assert_close(cross_entropy(logits, target, z_loss=0.1), rows.sum() / 4)


def test_validation_names_the_argument():
    x = torch.randn(3, 5)
    t = torch.tensor([0, 1, 2])
    cases = [
        ((x.numpy(), t), {}, TypeError, "logits must be a torch.Tensor"),
        ((x.long(), t), {}, TypeError, "logits must have a floating-point dtype"),
        ((torch.tensor(1.0), t), {}, ValueError, "at least one dimension"),
        ((x[:, :0], t), {}, ValueError, "at least one class"),
        ((x, t.float()), {}, TypeError, "class probabilities are not supported"),
        ((x, t.bool()), {}, TypeError, "target must hold integer class indices"),
        ((x, [0, 1, 2]), {}, TypeError, "target must be a torch.Tensor"),
        ((x, t[:2]), {}, ValueError, r"target must have shape \(3,\)"),
        ((x, t), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((x, t), {"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\]"),
        ((x, t), {"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a real number"),
        ((x, t), {"z_loss": -1.0}, ValueError, "z_loss must be a finite number >= 0"),
        ((x, t), {"z_loss": float("inf")}, ValueError, "z_loss must be a finite number >= 0"),
        ((x, t), {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ((x, t), {"ignore_index": True}, TypeError, "ignore_index must be an int"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            cross_entropy(*args, **kwargs)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="logits is on .* and target is on"):
            cross_entropy(x.cuda(), t)


def test_forced_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with rotalabs_accel.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cross_entropy(torch.randn(2, 4), torch.tensor([0, 1]))
    with rotalabs_accel.use_backend("triton"), pytest.raises(NotImplementedError, match="float64 logits"):
        cross_entropy(torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------------
# causal_lm_loss: the drop-in for ForCausalLMLoss
# --------------------------------------------------------------------------------------------------


CASES = {
    "mean": dict(),
    "num_items tensor": dict(num_items_in_batch=torch.tensor(9)),
    "num_items int": dict(num_items_in_batch=5),
    "ignore_index": dict(ignore_index=-1),
    "extra kwargs": dict(output_attentions=False, position_ids=None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_causal_lm_loss_equals_hugging_face_on_the_reference_path(case, dtype):
    logits = randn(2, 6, VOCAB, dtype=dtype, scale=2.0)
    kw = CASES[case]
    labels = _labels(2, 6, VOCAB, ignore_index=kw.get("ignore_index", -100))
    ours, ours_grad = _loss_and_grad(causal_lm_loss, logits, labels, VOCAB, **kw)
    theirs, theirs_grad = _loss_and_grad(ForCausalLMLoss, logits, labels, VOCAB, **kw)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape == ()
    assert ours_grad.dtype == theirs_grad.dtype == dtype
    if dtype == torch.float64:
        # computed in float64 where Hugging Face downcasts to float32 first: equal to fp32 rounding
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-6, atol=1e-9)
    else:
        assert torch.equal(ours, theirs) and torch.equal(ours_grad, theirs_grad)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", ["mean", "num_items tensor"])
def test_causal_lm_loss_through_the_kernels(device, dtype, case):
    """Forced onto the kernels: Hugging Face's result to fp32 rounding, gradients to one rounding in
    the logits' dtype (both against the float64 oracle)."""
    logits = randn(2, 5, VOCAB, dtype=dtype, device=device, scale=2.0)
    labels = _labels(2, 5, VOCAB, device)
    kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in CASES[case].items()}
    with rotalabs_accel.use_backend("triton"):
        ours, ours_grad = _loss_and_grad(causal_lm_loss, logits, labels, VOCAB, **kw)
    theirs, theirs_grad = _loss_and_grad(ForCausalLMLoss, logits, labels, VOCAB, **kw)
    ref, ref_grad = _loss_and_grad(_oracle, logits.double(), labels, VOCAB, **kw)
    assert ours.dtype == torch.float32 and ours_grad.dtype == dtype
    assert_within_torch_error(ours, theirs, ref, torch.float32, "loss", factor=8.0)
    factor = 8.0 if dtype == torch.float32 else 2.0
    assert_within_torch_error(ours_grad, theirs_grad, ref_grad, dtype, "grad", factor=factor)


def test_causal_lm_loss_shift_labels_and_padding():
    logits = randn(2, 6, VOCAB)
    labels = _labels(2, 6, VOCAB)
    # the last position of every sequence predicts nothing: its logits get no gradient
    _, grad = _loss_and_grad(causal_lm_loss, logits, labels, VOCAB)
    assert not grad[:, -1].any() and grad[:, :-1].any()
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    ours, ours_grad = _loss_and_grad(causal_lm_loss, logits, None, VOCAB, shift_labels=shifted)
    theirs, theirs_grad = _loss_and_grad(ForCausalLMLoss, logits, None, VOCAB, shift_labels=shifted)
    assert torch.equal(ours, theirs) and torch.equal(ours_grad, theirs_grad)


def test_causal_lm_loss_validation():
    logits = randn(2, 6, VOCAB)
    labels = _labels(2, 6, VOCAB)
    with pytest.raises(ValueError, match="vocab_size must equal the last dimension of logits"):
        causal_lm_loss(logits, labels, VOCAB + 1)
    with pytest.raises(TypeError, match="labels must hold integer class indices"):
        causal_lm_loss(logits, labels.float(), VOCAB)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        causal_lm_loss(logits, None, VOCAB)
    with pytest.raises(ValueError, match="one entry per position"):
        causal_lm_loss(logits, labels[:, :4], VOCAB)
    with pytest.raises(TypeError, match="logits must have a floating-point dtype"):
        causal_lm_loss(labels, labels, VOCAB)
