"""optimize_model and the causal-LM loss: Hugging Face models get ``causal_lm_loss`` as their
``loss_function`` (per instance), with the same loss and gradients as before.

Models are built from small random configurations (no hub downloads), as in tests/test_integration.py.
Numerical rule: the optimized model's loss and gradients (computed with labels) are compared with the
float64 run of the same weights and may be at most the tests/helpers.py bound away from it: twice the
error of the original model in the same dtype plus half a unit of roundoff.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import TINY_DECODER_VOCAB, assert_within_torch_error, kernel_devices, tiny_decoder_config
from rotalabs_accel import optimize_model, use_backend
from rotalabs_accel.functional.loss import causal_lm_loss
from rotalabs_accel.integration import revert_patches

transformers = pytest.importorskip("transformers")
loss_utils = pytest.importorskip("transformers.loss.loss_utils")

VOCAB = TINY_DECODER_VOCAB


@pytest.fixture(autouse=True)
def _restore_rope():
    revert_patches()
    yield
    revert_patches()


def _config(**overrides):
    return transformers.LlamaConfig(**tiny_decoder_config(**overrides))


def _llama(cls=None, **overrides) -> nn.Module:
    model = (cls or transformers.LlamaForCausalLM)(_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "norm" in name else 0.2)
    return model.eval()


def _batch(batch=2, seq=9, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    return ids.to(device), labels.to(device)


def _loss_and_grads(model: nn.Module, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def _expected(base, ids, labels, dtype, **kwargs):
    """(float64 oracle, original model in ``dtype``) results; computed before optimize_model patches
    the rotary function process-wide."""
    ref = _loss_and_grads(copy.deepcopy(base).double(), ids, labels, **kwargs)
    return ref, _loss_and_grads(copy.deepcopy(base).to(dtype), ids, labels, **kwargs)


def _assert_same_training_signal(model, expected, ids, labels, dtype, **kwargs):
    (ref_loss, _, ref_grads), (base_loss, _, base_grads) = expected
    loss, logits, grads = _loss_and_grads(model, ids, labels, **kwargs)
    assert loss.dtype == base_loss.dtype == torch.float32
    # the loss is a mean over the predicted tokens: a scalar summing that many terms
    terms = int((labels[..., 1:] != -100).sum())
    assert_within_torch_error(loss, base_loss, ref_loss, dtype, what="loss", terms=terms)
    assert grads.keys() == base_grads.keys()
    for name in grads:
        assert_within_torch_error(grads[name], base_grads[name], ref_grads[name], dtype, what=f"grad {name}")
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loss_function_is_replaced_per_instance_with_the_same_result(dtype):
    base = _llama()
    ids, labels = _batch()
    expected = _expected(base, ids, labels, dtype)
    num_items = torch.tensor(11)
    expected_accumulated = _expected(base, ids, labels, dtype, num_items_in_batch=num_items)
    model, report = optimize_model(copy.deepcopy(base).to(dtype), report=True)
    assert model.loss_function is causal_lm_loss
    assert report.count("loss", "replaced") == 1, str(report)
    entry = next(e for e in report.entries if e.kind == "loss")
    assert entry.name == "<root>" and "causal_lm_loss" in entry.detail
    # the class and every other instance keep Hugging Face's loss
    assert base.loss_function is loss_utils.ForCausalLMLoss
    assert _llama().loss_function is loss_utils.ForCausalLMLoss
    _assert_same_training_signal(model, expected, ids, labels, dtype)
    # gradient accumulation's normalisation goes through as well
    _assert_same_training_signal(
        model, expected_accumulated, ids, labels, dtype, num_items_in_batch=num_items
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_optimized_model_loss_through_the_kernels(device):
    """The loss forced onto its Triton kernels (with every other op): same loss and gradients, and the
    logits the model returns are the ones the loss read (not overwritten by the gradient)."""
    dtype = torch.float32
    base = _llama(num_hidden_layers=1).to(device)
    ids, labels = _batch(seq=5, device=device)
    expected = _expected(base, ids, labels, dtype)
    with use_backend("triton"):
        model = optimize_model(copy.deepcopy(base).to(dtype))
        assert model.loss_function is causal_lm_loss
        logits = _assert_same_training_signal(model, expected, ids, labels, dtype)
        with torch.no_grad():
            again = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, again, rtol=0, atol=0)


def test_second_call_and_switch_off():
    model, _ = optimize_model(_llama(), report=True)
    _, again = optimize_model(model, report=True)
    assert again.count("loss", "already") == 1 and not again.changed, str(again)
    assert model.loss_function is causal_lm_loss
    untouched, report = optimize_model(_llama(), cross_entropy=False, report=True)
    assert untouched.loss_function is loss_utils.ForCausalLMLoss and report.count("loss") == 0


def test_other_losses_and_custom_loss_functions_are_left_alone():
    classifier = _llama(transformers.LlamaForSequenceClassification)
    _, report = optimize_model(classifier, report=True)
    entry = next(e for e in report.entries if e.kind == "loss")
    assert entry.action == "left" and "ForSequenceClassification" in entry.detail
    assert classifier.loss_function is not causal_lm_loss

    def my_loss(logits, labels, vocab_size, **kwargs):
        return logits.sum() * 0

    model = _llama()
    model.loss_function = my_loss
    _, report = optimize_model(model, report=True)
    entry = next(e for e in report.entries if e.kind == "loss")
    assert entry.action == "left" and "custom loss_function" in entry.detail and "my_loss" in entry.detail
    assert model.loss_function is my_loss
    # A base model without a head computes no loss: nothing to report.
    _, report = optimize_model(transformers.LlamaModel(_config()), report=True)
    assert report.count("loss") == 0


def test_a_replacement_that_disagrees_is_not_installed(monkeypatch):
    from rotalabs_accel import integration

    def wrong(logits, labels, vocab_size, **kwargs):
        return causal_lm_loss(logits, labels, vocab_size, **kwargs) * 1.01

    monkeypatch.setattr(integration, "causal_lm_loss", wrong)
    model, report = optimize_model(_llama(), report=True)
    entry = next(e for e in report.entries if e.kind == "loss")
    assert entry.action == "left" and "losses differ" in entry.detail
    assert model.loss_function is loss_utils.ForCausalLMLoss
    model, report = optimize_model(_llama(), verify=False, report=True)
    entry = next(e for e in report.entries if e.kind == "loss")
    assert model.loss_function is wrong and "not checked" in entry.detail


def test_meta_device_and_skip():
    with torch.device("meta"):
        model = _llama()
    model, report = optimize_model(model, report=True)
    entry = next(e for e in report.entries if e.kind == "loss")
    assert entry.action == "replaced" and "meta device" in entry.detail
    # skip matches module names; the root model has none, so only a nested model can be skipped
    holder = nn.ModuleDict({"lm": _llama()})
    optimize_model(holder, skip=("lm",))
    assert holder["lm"].loss_function is loss_utils.ForCausalLMLoss
    optimize_model(holder)
    assert holder["lm"].loss_function is causal_lm_loss


@pytest.mark.compile
def test_compiled_training_step_fullgraph():
    base = _llama()
    ids, labels = _batch()
    model = optimize_model(copy.deepcopy(base))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=ids, labels=labels, use_cache=False)
    expected = base(input_ids=ids, labels=labels, use_cache=False).loss
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
