"""optimize_model on Hugging Face models built from small random configs (no hub downloads), on plain
PyTorch models, and on models it does not know.

Numerical rule: the optimized model's logits and gradients are compared with the float64 run of the
same weights, and may be at most the tests/helpers.py bound away: twice the error of the original
model in the same dtype plus half a unit of roundoff. A dropped offset, a swapped gate/up or a wrong
rotary position is off by order one.

``apply_rotary_pos_emb`` is patched per Hugging Face modeling module, for the whole process: every
reference result here is computed before optimize_model runs, and a fixture restores the originals.
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import sys
import types

import pytest
import torch
from torch import nn

from helpers import TINY_DECODER_VOCAB, assert_within_torch_error, kernel_devices, tiny_decoder_config
from rotalabs_accel import SwiGLU, TritonEmbedding, TritonRMSNorm, optimize_model, use_backend
from rotalabs_accel.integration import (
    FusedGateUpSwiGLU,
    OptimizationReport,
    _is_skipped,
    revert_patches,
    revert_rope_patches,
)

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
VOCAB = TINY_DECODER_VOCAB


@pytest.fixture(autouse=True)
def _restore_rope():
    revert_patches()
    yield
    revert_patches()


def _config(family: str, **overrides):
    common = tiny_decoder_config(**overrides)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common)
    if family == "gemma":
        return transformers.GemmaConfig(**common)
    if family == "phi3":
        # A partial rotary factor exercises the adapter's pass-through features.
        return transformers.Phi3Config(**common, partial_rotary_factor=0.5)
    raise AssertionError(family)


_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def _model(family: str, **overrides) -> nn.Module:
    model = getattr(transformers, _MODEL_CLASSES[family])(_config(family, **overrides))
    with torch.no_grad():
        # Trained-looking weights: norms far from their init (ones, or Gemma's zeros) so a dropped
        # weight or offset shows, and projections large enough to move the logits.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def _inputs(batch=2, seq=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    return ids


def _logits_and_grads(model: nn.Module, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


# --------------------------------------------------------------------------------------------------
# Hugging Face families: what is converted, and the same function afterwards
# --------------------------------------------------------------------------------------------------

EXPECTED = {
    # family: (RMSNorm replaced, MLPs replaced, MLP replacement type)
    "llama": (5, 2, SwiGLU),
    "mistral": (5, 2, SwiGLU),
    "qwen2": (5, 2, SwiGLU),
    "qwen3": (9, 2, SwiGLU),  # + q_norm and k_norm in each attention
    "gemma": (5, 0, None),  # GELU-gated MLP: left alone and reported
    "phi3": (5, 2, FusedGateUpSwiGLU),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_converted_and_reported(family):
    model = _model(family)
    keys_before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {n: p for n, p in model.named_parameters()}
    model, report = optimize_model(model, report=True)
    norms, mlps, mlp_type = EXPECTED[family]
    assert report.count("rmsnorm", "replaced") == norms, str(report)
    assert report.count("mlp", "replaced") == mlps, str(report)
    assert report.count("rope", "patched") == 1, str(report)
    assert report.count("residual_norm", "fused") == 2, str(report)
    assert report.count("packed_check", "skipped") == 1, str(report)
    # Gemma scales its embedding output (a subclass with its own forward): not a plain lookup.
    assert report.count("embedding_backward", "replaced") == (family != "gemma"), str(report)
    assert isinstance(model.model.embed_tokens, TritonEmbedding) == (family != "gemma")
    assert sum(isinstance(m, TritonRMSNorm) for m in model.modules()) == norms
    if mlp_type is not None:
        assert all(isinstance(layer.mlp, mlp_type) for layer in model.model.layers)
    else:
        left = [e for e in report.entries if e.kind == "mlp" and e.action == "left"]
        assert len(left) == 2 and all("not SiLU" in e.detail for e in left), str(report)
    if family == "gemma":
        assert all(m.offset == 1.0 for m in model.modules() if isinstance(m, TritonRMSNorm))
    # Same state_dict keys and values, and the very same Parameter objects.
    after = model.state_dict()
    assert after.keys() == keys_before.keys()
    for k, v in keys_before.items():
        assert torch.equal(after[k], v), k
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params_before.items()}
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    assert hasattr(modeling.apply_rotary_pos_emb, "_rotalabs_accel_original")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_match(family, dtype):
    base = _model(family)
    ids = _inputs()
    ref_logits, ref_grads = _logits_and_grads(copy.deepcopy(base).double(), ids)
    original = copy.deepcopy(base).to(dtype)
    base_logits, base_grads = _logits_and_grads(original, ids)

    model = optimize_model(copy.deepcopy(base).to(dtype))
    logits, grads = _logits_and_grads(model, ids)

    assert logits.dtype == base_logits.dtype
    assert_within_torch_error(logits, base_logits, ref_logits, dtype, what=f"{family} logits")
    assert grads.keys() == base_grads.keys()
    for name in grads:
        assert_within_torch_error(grads[name], base_grads[name], ref_grads[name], dtype, what=f"grad {name}")


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_optimized_model_through_the_triton_kernels(family, device):
    """The whole converted model with every op forced onto its Triton kernel (CUDA, or the interpreter).

    fp32: this checks the plumbing (layouts, strides, positions, the fused residual) with the real
    kernels; their low-precision accuracy is the kernel tests' subject.
    """
    dtype = torch.float32
    base = _model(family, num_hidden_layers=1).to(device)
    ids = _inputs(batch=2, seq=5).to(device)
    ref_logits, ref_grads = _logits_and_grads(copy.deepcopy(base).double(), ids)
    base_logits, base_grads = _logits_and_grads(copy.deepcopy(base).to(dtype), ids)
    with use_backend("triton"):
        model = optimize_model(copy.deepcopy(base).to(dtype))
        logits, grads = _logits_and_grads(model, ids)
    assert_within_torch_error(logits, base_logits, ref_logits, dtype, what=f"{family} logits")
    for name in grads:
        assert_within_torch_error(grads[name], base_grads[name], ref_grads[name], dtype, what=f"grad {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_match_on_cuda(family):
    dtype = torch.bfloat16
    base = _model(family).cuda()
    ids = _inputs(batch=4, seq=64).cuda()
    ref_logits, ref_grads = _logits_and_grads(copy.deepcopy(base).double(), ids)
    base_logits, base_grads = _logits_and_grads(copy.deepcopy(base).to(dtype), ids)
    model, report = optimize_model(copy.deepcopy(base).to(dtype), report=True)
    assert not report.left or family == "gemma", str(report)
    logits, grads = _logits_and_grads(model, ids)
    assert_within_torch_error(logits, base_logits, ref_logits, dtype, what=f"{family} logits")
    for name in grads:
        assert_within_torch_error(grads[name], base_grads[name], ref_grads[name], dtype, what=f"grad {name}")


@pytest.mark.gpu
@pytest.mark.compile
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_optimized_model_on_cuda():
    dtype = torch.bfloat16
    base = _model("llama").cuda()
    ids = _inputs(batch=2, seq=32).cuda()
    ref_logits = copy.deepcopy(base).double()(input_ids=ids, use_cache=False).logits
    base = base.to(dtype)
    expected = base(input_ids=ids, use_cache=False).logits
    model = optimize_model(copy.deepcopy(base))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(input_ids=ids, use_cache=False).logits
    assert_within_torch_error(got, expected, ref_logits, dtype, what="compiled logits")


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_greedy_generation_is_unchanged(family):
    model = _model(family)
    ids = _inputs(batch=2, seq=6, seed=1)
    # Left padding gives each row its own positions: cos/sin then differ per batch element.
    ids[0, :2] = 0
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    optimize_model(model)
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, expected)


def test_second_call_changes_nothing():
    model = _model("llama")
    model, first = optimize_model(model, report=True)
    modules = {n: m for n, m in model.named_modules()}
    forwards = {n: vars(m).get("forward") for n, m in modules.items()}
    model2, second = optimize_model(model, report=True)
    assert model2 is model
    assert first.changed and not second.changed, str(second)
    assert second.count("rmsnorm", "already") == 5
    assert second.count("mlp", "already") == 2
    assert second.count("rope", "already") == 1
    assert second.count("residual_norm", "already") == 2
    assert second.count("packed_check", "already") == 1
    assert second.count("embedding_backward", "already") == 1
    assert {n: m for n, m in model.named_modules()} == modules
    assert {n: vars(m).get("forward") for n, m in model.named_modules()} == forwards


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequence_check_skipped_only_for_derived_positions(family, monkeypatch):
    masking = pytest.importorskip("transformers.masking_utils")
    calls = []
    original = masking.find_packed_sequence_indices

    def counting(position_ids, *args, **kwargs):
        calls.append(position_ids)
        return original(position_ids, *args, **kwargs)

    monkeypatch.setattr(masking, "find_packed_sequence_indices", counting)
    base = _model(family)
    ids = _inputs()
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2)  # two sequences per row
    with torch.no_grad():
        want = base(input_ids=ids, use_cache=False).logits
        want_packed = base(input_ids=ids, position_ids=packed, use_cache=False).logits
    assert calls, "this transformers runs no packed check: the test would prove nothing"
    # The packed positions change the result (a block-diagonal mask), so the check matters there.
    assert (want_packed - want).abs().max() > 1e-3
    model = optimize_model(copy.deepcopy(base))
    calls.clear()
    with torch.no_grad(), use_backend("torch"):
        got = model(input_ids=ids, use_cache=False).logits
        assert not calls
        got_packed = model(input_ids=ids, position_ids=packed, use_cache=False).logits
        assert len(calls) >= 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_packed, want_packed, rtol=1e-5, atol=1e-5)
    # Outside an optimized model the wrapper is the original check.
    calls.clear()
    with torch.no_grad():
        base(input_ids=ids, use_cache=False)
    assert len(calls) >= 1
    # Restoring the original function leaves the optimized model working, with the check back on.
    assert "transformers.masking_utils" in revert_patches()
    assert masking.find_packed_sequence_indices is counting
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)
    assert len(calls) >= 1


def test_packed_sequence_check_switch_positional_positions_and_copies(monkeypatch):
    masking = pytest.importorskip("transformers.masking_utils")
    model, report = optimize_model(_model("llama"), skip_packed_check=False, report=True)
    assert report.count("packed_check") == 0 and "forward" not in vars(model.model)
    calls = []
    original = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda p: calls.append(p) or original(p))
    model = optimize_model(_model("llama"))
    ids = _inputs()
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2)
    with torch.no_grad():
        model.model(ids, None, packed, use_cache=False)  # position_ids passed positionally
        assert len(calls) == 1 and calls[0] is packed
        model.model(ids, None, use_cache=False)  # attention_mask positionally, no positions
        assert len(calls) == 1
    # A copy's instance forward belongs to the copy (a bound method is copied by name).
    clone = copy.deepcopy(model)
    assert clone.model.forward.__self__ is clone.model
    # Pickling stores the instance forward by name: the loaded model runs its class's forward (the
    # check on again, same results), and optimizing it again restores the skip.
    loaded = pickle.loads(pickle.dumps(model))
    assert getattr(vars(loaded.model).get("forward"), "__func__", None) is not None
    calls.clear()
    with torch.no_grad():
        loaded.model(ids, use_cache=False)
    assert len(calls) == 1
    loaded, report = optimize_model(loaded, report=True)
    assert report.count("packed_check", "skipped") == 1, str(report)
    calls.clear()
    with torch.no_grad():
        loaded.model(ids, use_cache=False)
    assert not calls


@pytest.mark.parametrize("order", ["optimize_then_move", "move_then_optimize"])
def test_before_or_after_moving_the_model(order):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    base = _model("qwen3")
    ids = _inputs()
    ref_logits, _ = _logits_and_grads(copy.deepcopy(base).double(), ids)
    base_logits, _ = _logits_and_grads(copy.deepcopy(base).to(device, dtype), ids.to(device))
    model = copy.deepcopy(base)
    if order == "optimize_then_move":
        model = optimize_model(model).to(device, dtype)
    else:
        model = optimize_model(model.to(device, dtype))
    logits, _ = _logits_and_grads(model, ids.to(device))
    assert all(p.device.type == device and p.dtype == dtype for p in model.parameters())
    assert_within_torch_error(logits, base_logits, ref_logits, dtype, what="logits")


def test_training_with_gradient_checkpointing():
    base = _model("llama")
    ids = _inputs()
    ref_logits, ref_grads = _logits_and_grads(copy.deepcopy(base).double(), ids)
    base_logits, base_grads = _logits_and_grads(copy.deepcopy(base), ids)
    model = optimize_model(copy.deepcopy(base))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    logits, grads = _logits_and_grads(model, ids)
    assert_within_torch_error(logits, base_logits, ref_logits, torch.float32)
    for name in grads:
        assert_within_torch_error(grads[name], base_grads[name], ref_grads[name], torch.float32, what=name)


@pytest.mark.compile
def test_compiled_optimized_model_fullgraph():
    base = _model("llama")
    ids = _inputs()
    expected = base(input_ids=ids, use_cache=False).logits
    model = optimize_model(copy.deepcopy(base))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# INT8 and save / load
# --------------------------------------------------------------------------------------------------


def _sqnr_db(signal: torch.Tensor, noisy: torch.Tensor) -> float:
    s = signal.double()
    noise = (noisy.double() - s).pow(2).sum().item()
    return 10 * math.log10(s.pow(2).sum().item() / max(noise, 1e-30))


def test_quantize_int8_routes_linears_except_lm_head():
    model = _model("llama")
    ids = _inputs()
    expected = model(input_ids=ids).logits.detach()
    linear_names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    model, report = optimize_model(model, quantize="int8", report=True)
    modules = dict(model.named_modules())
    assert type(modules["lm_head"]) is nn.Linear
    quantized = [n for n in linear_names if n != "lm_head"]
    for n in quantized:
        assert type(modules[n]) is not nn.Linear, n
    assert report.count("linear", "quantized") == len(quantized), str(report)
    got = model(input_ids=ids).logits.detach()
    # Per-channel int8 weights: the logits keep most of their signal (a broken GEMM gives ~0 dB).
    assert _sqnr_db(expected, got) > 20.0
    again = optimize_model(model, quantize="int8", report=True)[1]
    assert not again.changed, str(again)


def test_quantize_options_reach_quantize_model():
    model = optimize_model(
        _model("llama"), quantize="int8", quantize_options={"group_size": 32, "mode": "w8a16"}
    )
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.group_size == 32 and layer.mode == "w8a16"


def test_quantize_options_embeddings_converts_and_reports_the_table():
    from rotalabs_accel import Int8Embedding

    model = _model("llama", tie_word_embeddings=False)
    ids = _inputs()
    expected = model(input_ids=ids).logits.detach()
    # first the linear layers only; a second call with embeddings=True still converts the table
    model = optimize_model(model, quantize="int8")
    model, report = optimize_model(model, quantize="int8", quantize_options={"embeddings": True}, report=True)
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert report.count("embedding", "quantized") == 1, str(report)
    assert "Embedding: 1 quantized" in report.summary()
    assert _sqnr_db(expected, model(input_ids=ids).logits.detach()) > 20.0
    again = optimize_model(model, quantize="int8", quantize_options={"embeddings": True}, report=True)[1]
    assert again.count("embedding", "already") == 1 and not again.changed, str(again)
    with pytest.raises(ValueError, match="must not contain 'report'"):
        optimize_model(_model("llama"), quantize="int8", quantize_options={"report": True})


def test_save_and_load_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _model("llama")
    ids = _inputs()
    optimized = optimize_model(copy.deepcopy(model))
    expected = optimized(input_ids=ids).logits.detach()

    # An optimized model saves a checkpoint the stock Hugging Face class loads.
    optimized.save_pretrained(tmp_path / "hf")
    reloaded = type(model).from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    # An optimized and quantized model round-trips through safetensors into a freshly built one.
    quantized = optimize_model(copy.deepcopy(model), quantize="int8")
    q_expected = quantized(input_ids=ids).logits.detach()
    state = {k: v.contiguous() for k, v in quantized.state_dict().items()}
    safetensors_torch.save_file(state, str(tmp_path / "q.safetensors"))
    fresh = optimize_model(_model("llama"), quantize="int8")
    fresh.load_state_dict(safetensors_torch.load_file(str(tmp_path / "q.safetensors")))
    torch.testing.assert_close(fresh(input_ids=ids).logits, q_expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Models it does not know, and modules it must leave alone
# --------------------------------------------------------------------------------------------------


def test_unknown_model_gets_a_report_not_an_error(caplog):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = _inputs(seq=5)
    expected = model(input_ids=ids).logits
    with caplog.at_level(logging.INFO, logger="rotalabs_accel.integration"):
        model2, report = optimize_model(model, report=True)
    assert model2 is model
    # Only its plain embedding tables (token and position) are recognised.
    assert {(e.name, e.kind, e.action) for e in report.entries} == {
        ("transformer.wte", "embedding_backward", "replaced"),
        ("transformer.wpe", "embedding_backward", "replaced"),
    }, str(report)
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
    with caplog.at_level(logging.INFO, logger="rotalabs_accel.integration"):
        _, report = optimize_model(
            transformers.GPT2LMHeadModel(config).eval(), embedding=False, report=True
        )
    assert not report.entries
    assert "no RMSNorm, SwiGLU MLP, rotary function, Embedding or Linear layer recognised" in report.summary()
    assert "unchanged" in caplog.text


def test_plain_pytorch_model_and_root_module():
    block = nn.Sequential(
        nn.Linear(16, 16), nn.RMSNorm(16, eps=1e-5), nn.RMSNorm(16, elementwise_affine=False)
    )
    with torch.no_grad():
        block[1].weight.normal_()
    x = torch.randn(3, 16)
    expected = block(x)
    block, report = optimize_model(block, report=True)
    assert isinstance(block[1], TritonRMSNorm) and isinstance(block[2], TritonRMSNorm)
    assert report.count("rmsnorm", "replaced") == 2
    torch.testing.assert_close(block(x), expected)
    # A model that is itself an RMSNorm: the replacement is returned.
    root = nn.RMSNorm(8)
    new_root = optimize_model(root)
    assert isinstance(new_root, TritonRMSNorm) and new_root.weight is root.weight


def test_modules_with_hooks_are_left_alone():
    model = nn.Sequential(nn.RMSNorm(8), nn.RMSNorm(8))
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    model, report = optimize_model(model, report=True)
    assert type(model[0]) is nn.RMSNorm and isinstance(model[1], TritonRMSNorm)
    entry = next(e for e in report.entries if e.name == "0")
    assert entry.action == "left" and "forward hooks" in entry.detail
    model(torch.randn(2, 8))
    assert calls == [1]


def test_shared_module_is_replaced_once_everywhere():
    norm = nn.RMSNorm(8)
    model = nn.ModuleDict({"a": nn.Sequential(norm), "b": nn.Sequential(norm)})
    optimize_model(model)
    assert isinstance(model["a"][0], TritonRMSNorm)
    assert model["a"][0] is model["b"][0]


class _ImpostorRMSNorm(nn.Module):
    """Named like an RMSNorm, computes a LayerNorm: must be left alone."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.eps = 1e-6

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], self.weight, None, self.eps)


class _SwappedMLP(nn.Module):
    """gate/up/down and SiLU, but the activation is applied to up_proj: not SwiGLU as converted."""

    def __init__(self, n=16, inter=24):
        super().__init__()
        self.gate_proj = nn.Linear(n, inter, bias=False)
        self.up_proj = nn.Linear(n, inter, bias=False)
        self.down_proj = nn.Linear(inter, n, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


def test_lookalikes_are_left_alone_with_a_reason():
    model = nn.Sequential(_ImpostorRMSNorm(16), _SwappedMLP())
    x = torch.randn(2, 16)
    expected = model(x)
    model, report = optimize_model(model, report=True)
    assert isinstance(model[0], _ImpostorRMSNorm) and isinstance(model[1], _SwappedMLP)
    norm_entry = next(e for e in report.entries if e.kind == "rmsnorm")
    mlp_entry = next(e for e in report.entries if e.kind == "mlp")
    assert norm_entry.action == "left" and "not a standard RMSNorm" in norm_entry.detail
    assert mlp_entry.action == "left" and "outputs differ" in mlp_entry.detail
    torch.testing.assert_close(model(x), expected)


def test_skip_and_switches():
    model = _model("llama")
    model, report = optimize_model(model, skip=("layers.0",), rope=False, fuse_residual=False, report=True)
    layers = model.model.layers
    assert not isinstance(layers[0].input_layernorm, TritonRMSNorm)
    assert not isinstance(layers[0].mlp, SwiGLU)
    assert isinstance(layers[1].input_layernorm, TritonRMSNorm) and isinstance(layers[1].mlp, SwiGLU)
    assert report.count("rope") == 0 and report.count("residual_norm") == 0
    model = _model("llama")
    model, report = optimize_model(model, rmsnorm=False, swiglu=False, report=True)
    assert not any(isinstance(m, (TritonRMSNorm, SwiGLU)) for m in model.modules())
    assert report.count("rope", "patched") == 1


def test_skip_matching_rule():
    assert _is_skipped("lm_head", ("lm_head",))
    assert _is_skipped("model.lm_head", ("lm_head",))
    assert _is_skipped("model.layers.0.mlp.up_proj", ("layers.0",))
    assert not _is_skipped("model.layers.10.mlp", ("layers.1",))
    assert not _is_skipped("model.lm_head_extra", ("lm_head",))
    assert not _is_skipped("x.head", ("lm_head",))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        optimize_model("not a model")
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        optimize_model(nn.Linear(2, 2), quantize="int4")
    with pytest.raises(TypeError, match="skip must be module names"):
        optimize_model(nn.Linear(2, 2), skip=(1,))
    with pytest.raises(ValueError, match="quantize_options given but quantize is None"):
        optimize_model(nn.Linear(2, 2), quantize_options={"group_size": 16})


def test_meta_device_model_is_converted_without_checks():
    with torch.device("meta"):
        model = _model("llama")
    model, report = optimize_model(model, report=True)
    assert report.count("rmsnorm", "replaced") == 5
    assert all("meta device" in e.detail for e in report.entries if e.kind in ("rmsnorm", "mlp"))


def test_verbose_prints_the_report(capsys):
    optimize_model(nn.Sequential(nn.RMSNorm(4)), verbose=True)
    assert "RMSNorm: 1 replaced" in capsys.readouterr().out


def test_report_type_and_text():
    model, report = optimize_model(nn.Sequential(nn.RMSNorm(4)), report=True)
    assert isinstance(report, OptimizationReport)
    text = str(report)
    assert text.splitlines()[0] == report.summary()
    assert "replaced" in text and "TritonRMSNorm" in text


# --------------------------------------------------------------------------------------------------
# The rotary adapter and the decoder-layer fusion, directly
# --------------------------------------------------------------------------------------------------


def _hf_cos_sin(batch, seq, rot, dtype, per_batch=True):
    inv = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    if per_batch:
        pos = torch.stack([torch.randperm(64)[:seq] for _ in range(batch)]).double()
    else:
        pos = torch.arange(seq, dtype=torch.float64)[None]
    emb = torch.cat((pos[..., None] * inv,) * 2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["bhsd_per_batch", "bhsd_shared", "bshd", "partial", "noncontiguous_q"])
def test_rope_adapter_matches_hugging_face(case, dtype):
    from transformers.models.llama import modeling_llama
    from transformers.models.phi3 import modeling_phi3

    from rotalabs_accel.integration import _hf_rope_adapter

    b, hq, hk, s, d = 3, 4, 2, 7, 16
    original = (
        modeling_phi3.apply_rotary_pos_emb if case == "partial" else modeling_llama.apply_rotary_pos_emb
    )
    adapter = _hf_rope_adapter(original)
    rot = d // 2 if case == "partial" else d
    cos, sin = _hf_cos_sin(b, s, rot, torch.float64, per_batch=case != "bhsd_shared")
    q64 = torch.randn(b, hq, s, d, dtype=torch.float64)
    k64 = torch.randn(b, hk, s, d, dtype=torch.float64)
    kwargs = {}
    if case == "bshd":
        q64, k64 = q64.transpose(1, 2).contiguous(), k64.transpose(1, 2).contiguous()
        kwargs["unsqueeze_dim"] = 2
    if case == "noncontiguous_q":
        # What Hugging Face attention passes: a (b, s, h, d) projection viewed as (b, h, s, d).
        q64 = q64.transpose(1, 2).contiguous().transpose(1, 2)
    ref = original(q64, k64, cos, sin, **kwargs)
    q, k = q64.to(dtype), k64.to(dtype)
    base = original(q, k, cos.to(dtype), sin.to(dtype), **kwargs)
    got = adapter(q, k, cos.to(dtype), sin.to(dtype), **kwargs)
    for g, bl, r, name in zip(got, base, ref, "qk"):
        assert g.shape == r.shape and g.dtype == dtype
        assert_within_torch_error(g, bl, r, dtype, what=f"{case} {name}")


def test_rope_adapter_defers_to_the_original_for_other_calls():
    from transformers.models.llama import modeling_llama

    from rotalabs_accel.integration import _hf_rope_adapter

    calls = []

    def original(q, k, cos, sin, unsqueeze_dim=1):
        calls.append(unsqueeze_dim)
        return modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)

    adapter = _hf_rope_adapter(original)
    q = torch.randn(2, 3, 4)  # 3-D: not a shape the library path takes
    cos = torch.randn(2, 3, 4)
    adapter(q, q, cos, cos, unsqueeze_dim=0)
    assert calls == [0]


def test_nonstandard_rotary_function_is_left_alone():
    pymodule = types.ModuleType("fake_interleaved_modeling")

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # GPT-J style pairs (2j, 2j+1): a different function from the half-split one.
        def rot(x):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((-x2, x1), dim=-1).flatten(-2)

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    class FakeAttention(nn.Module):
        pass

    FakeAttention.__module__ = pymodule.__name__
    pymodule.apply_rotary_pos_emb = apply_rotary_pos_emb
    pymodule.FakeAttention = FakeAttention
    sys.modules[pymodule.__name__] = pymodule
    try:
        model, report = optimize_model(nn.Sequential(FakeAttention()), report=True)
        entry = next(e for e in report.entries if e.kind == "rope")
        assert entry.action == "left" and "not the standard rotate-half RoPE" in entry.detail
        assert pymodule.apply_rotary_pos_emb is apply_rotary_pos_emb
    finally:
        del sys.modules[pymodule.__name__]


def test_revert_rope_patches_restores_the_original():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    optimize_model(_model("llama"))
    assert modeling_llama.apply_rotary_pos_emb is not original
    assert "transformers.models.llama.modeling_llama" in revert_rope_patches()
    assert modeling_llama.apply_rotary_pos_emb is original


class _ExtraStepLayer(nn.Module):
    """Pre-norm layer with one more operation than Llama's: must not be fused."""

    def __init__(self, n=16):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(n)
        self.post_attention_layernorm = nn.RMSNorm(n)
        self.self_attn = _PassAttention(n)
        self.mlp = _SwappedMLP(n)

    def forward(self, hidden_states, scale=None):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, scale=scale)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states) * 0.5
        hidden_states = residual + hidden_states
        return hidden_states


class _PassAttention(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.proj = nn.Linear(n, n)

    def forward(self, hidden_states, scale=None):
        out = self.proj(hidden_states)
        return (out if scale is None else out * scale), None


class _LlamaLikeLayer(_ExtraStepLayer):
    def forward(self, hidden_states, scale=None):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, scale=scale)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


def test_decoder_fusion_only_for_the_llama_structure():
    x = torch.randn(2, 5, 16)
    layer = _ExtraStepLayer()
    expected = layer(x, 2.0)
    layer, report = optimize_model(layer, report=True)
    entry = next(e for e in report.entries if e.kind == "residual_norm")
    assert entry.action == "left" and "differs from the Llama structure" in entry.detail
    torch.testing.assert_close(layer(x, 2.0), expected)

    layer = _LlamaLikeLayer()
    expected_kw = layer(x, scale=2.0)
    expected_pos = layer(x, 3.0)
    layer, report = optimize_model(layer, report=True)
    entry = next(e for e in report.entries if e.kind == "residual_norm")
    assert entry.action == "fused", str(report)
    assert "forward" in vars(layer)
    torch.testing.assert_close(layer(x, scale=2.0), expected_kw)
    torch.testing.assert_close(layer(x, 3.0), expected_pos)
    # A deep copy keeps the fused forward bound to the copy.
    clone = copy.deepcopy(layer)
    assert clone.forward.__self__ is clone
    torch.testing.assert_close(clone(x, 3.0), expected_pos)
