"""StaticCacheDecoder against Hugging Face ``generate`` and forward passes of small random models.

Greedy tokens are compared exactly (fp32 models whose logits are far from ties), logits by the
tests/helpers.py rule: against the float64 run of the same weights, the decoder in a dtype may be at
most twice as far as Hugging Face's own forward pass in that dtype, plus half a unit of roundoff. A wrong
rotary position, a cache slot off by one or a key/value head read by the wrong query heads is off by
order one. CUDA graphs and Inductor on CUDA are exercised by the GPU-only tests at the end.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import assert_within_torch_error, kernel_devices
from rotalabs_accel import TritonRMSNorm, optimize_model, use_backend
from rotalabs_accel.generation import SUPPORTED_MODEL_TYPES, StaticCacheDecoder
from rotalabs_accel.integration import revert_rope_patches

transformers = pytest.importorskip("transformers")

VOCAB = 96
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
}


@pytest.fixture(autouse=True)
def _restore_rope():
    revert_rope_patches()
    yield
    revert_rope_patches()


def _model(family: str = "llama", layers: int = 2, **overrides) -> torch.nn.Module:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,  # the decoder never stops early; neither may the reference
    )
    if family == "mistral":
        kwargs["sliding_window"] = None
    if family == "phi3":
        kwargs["partial_rotary_factor"] = 0.5  # rotary on half of each head: pass-through features
    kwargs.update(overrides)
    config_cls, model_cls = _CLASSES[family]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    with torch.no_grad():
        # Norm weights far from one and projections large enough to move the logits (as trained weights
        # would), so a dropped norm or a wrong head shows.
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "norm" in name else 0.2)
    return model.eval()


def _prompt(batch: int = 2, seq: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def _hf_generate(model, prompt, new_tokens):
    return model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False
    )


# --------------------------------------------------------------------------------------------------
# Same tokens and logits as Hugging Face
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_hugging_face_generate(family):
    model = _model(family, layers=3)
    prompt = _prompt()
    expected = _hf_generate(model, prompt, 8)
    decoder = StaticCacheDecoder(model, max_seq_len=16, batch_size=2)
    got = decoder.generate(prompt, max_new_tokens=8)
    assert got.dtype == torch.long and got.shape == (2, 13)
    assert torch.equal(got, expected)
    # a second call starts from a clean state and a different prompt decodes on its own terms
    other = _prompt(seed=1)
    assert torch.equal(decoder.generate(other, 8), _hf_generate(model, other, 8))
    assert torch.equal(decoder.generate(prompt, 8), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_logits_within_the_dtype_error_of_hugging_face(family, dtype):
    base = _model(family)
    seq = _prompt(seq=12)
    model64 = copy.deepcopy(base).double()
    model_lp = copy.deepcopy(base).to(dtype)
    with torch.no_grad():
        ref64 = model64(seq).logits
        hf = model_lp(seq).logits
    decoder = StaticCacheDecoder(model_lp, max_seq_len=16, batch_size=2)
    prefill = decoder.forward_logits(seq)
    assert prefill.dtype == dtype
    assert_within_torch_error(prefill, hf, ref64, dtype, what="prompt-pass logits")
    # the decode step, fed the same tokens one at a time from position 4 on
    stepped = decoder.decode_logits(seq, prompt_len=4)
    assert stepped.shape == (2, 9, VOCAB)
    assert_within_torch_error(stepped, hf[:, 3:], ref64[:, 3:], dtype, what="decode-step logits")


def test_decode_logits_follow_the_given_tokens():
    model = _model()
    seq = _hf_generate(model, _prompt(), 6)  # [2, 11]
    decoder = StaticCacheDecoder(model, max_seq_len=16, batch_size=2)
    logits = decoder.decode_logits(seq[:, :-1], prompt_len=5)
    # teacher forcing on the model's own greedy continuation reproduces it
    assert torch.equal(logits.argmax(-1), seq[:, 5:])
    # and a different forced token changes the next prediction's input, not the earlier rows
    forced = seq[:, :-1].clone()
    forced[:, 7] = (forced[:, 7] + 1) % VOCAB
    changed = decoder.decode_logits(forced, prompt_len=5)
    torch.testing.assert_close(changed[:, :3], logits[:, :3], rtol=0, atol=0)
    assert not torch.allclose(changed[:, 3:], logits[:, 3:])


def test_model_is_left_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    decoder = StaticCacheDecoder(model, max_seq_len=16, batch_size=2)
    decoder.generate(_prompt(), 6)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p is params[n] for n, p in model.named_parameters())
    timing = decoder.last_timing
    assert set(timing) == {"prefill_ms", "decode_ms", "decode_steps"}
    assert timing["decode_steps"] == 5 and timing["decode_ms"] >= 0


def test_no_new_tokens_and_one_new_token():
    model = _model()
    prompt = _prompt()
    decoder = StaticCacheDecoder(model, max_seq_len=8, batch_size=2)
    assert torch.equal(decoder.generate(prompt, 0), prompt)
    assert torch.equal(decoder.generate(prompt, 1), _hf_generate(model, prompt, 1))
    # the full cache: prompt + new tokens == max_seq_len
    assert torch.equal(decoder.generate(prompt, 3), _hf_generate(model, prompt, 3))


# --------------------------------------------------------------------------------------------------
# Models converted by optimize_model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_optimized_model_decodes_like_its_own_generate(quantize):
    model = _model(layers=3)
    optimize_model(model, quantize=quantize)
    assert isinstance(model.model.layers[0].post_attention_layernorm, TritonRMSNorm)
    prompt = _prompt()
    expected = _hf_generate(model, prompt, 8)
    decoder = StaticCacheDecoder(model, max_seq_len=16, batch_size=2)
    assert torch.equal(decoder.generate(prompt, 8), expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_optimized_model_through_the_triton_kernels(device, quantize):
    # int8: the decode steps run q/k/v and gate/up as grouped GEMV launches
    model = _model(layers=1, hidden_size=32, intermediate_size=48, head_dim=8).to(device)
    optimize_model(model, quantize=quantize)
    prompt = _prompt(batch=1, seq=3).to(device)
    expected = _hf_generate(model, prompt, 2)
    with use_backend("triton"):
        decoder = StaticCacheDecoder(model, max_seq_len=8)
        got = decoder.generate(prompt, 2)
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------------------
# torch.compile: one region for every layer
# --------------------------------------------------------------------------------------------------


class _CountingBackend:
    """A torch.compile backend that records each graph it is handed and runs it as is."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.compile
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_compiled_layer_is_traced_once_for_all_layers(quantize):
    torch._dynamo.reset()
    model = _model(layers=4)
    if quantize != "none":
        optimize_model(model, quantize=quantize)
    prompt = _prompt()
    expected = _hf_generate(model, prompt, 6)
    backend = _CountingBackend()
    decoder = StaticCacheDecoder(model, max_seq_len=16, batch_size=2,
                                 compile={"backend": backend, "fullgraph": True})
    assert decoder.compile_seconds is None
    assert torch.equal(decoder.generate(prompt, 6), expected)
    assert backend.graphs == 1  # no graph break, and no recompilation per layer
    assert decoder.compile_seconds is not None and decoder.compile_seconds > 0
    torch._dynamo.reset()


@pytest.mark.compile
def test_inductor_compiled_decoding():
    torch._dynamo.reset()
    model = _model(layers=2)
    prompt = _prompt()
    expected = _hf_generate(model, prompt, 5)
    decoder = StaticCacheDecoder(model, max_seq_len=16, batch_size=2, compile=True)
    assert decoder.compile_options == {"mode": "default", "dynamic": False}
    assert torch.equal(decoder.generate(prompt, 5), expected)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# Arguments and unsupported models
# --------------------------------------------------------------------------------------------------


def test_unsupported_models_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="model_type must be one of"):
        StaticCacheDecoder(_model("gemma"), max_seq_len=8)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        StaticCacheDecoder("llama", max_seq_len=8)
    with pytest.raises(ValueError, match="sliding window of 8"):
        StaticCacheDecoder(_model("mistral", sliding_window=8), max_seq_len=16)
    # a window longer than the cache changes nothing
    StaticCacheDecoder(_model("mistral", sliding_window=16), max_seq_len=16)
    broken = _model()
    del broken.model.layers[0].self_attn.o_proj
    with pytest.raises(ValueError, match=r"layers\[0\] lacks the Llama-family structure"):
        StaticCacheDecoder(broken, max_seq_len=8)
    assert "llama" in SUPPORTED_MODEL_TYPES


def test_bad_arguments():
    model = _model()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
            StaticCacheDecoder(model, max_seq_len=bad)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        StaticCacheDecoder(model, max_seq_len=8, batch_size=0)
    with pytest.raises(ValueError, match="captures CUDA graphs itself"):
        StaticCacheDecoder(model, max_seq_len=8, compile="reduce-overhead")
    with pytest.raises(TypeError, match="compile must be"):
        StaticCacheDecoder(model, max_seq_len=8, compile=3)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on CUDA"):
        StaticCacheDecoder(model, max_seq_len=8, cuda_graph=True)
    decoder = StaticCacheDecoder(model, max_seq_len=8, batch_size=2)
    prompt = _prompt()
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        decoder.generate(prompt, 4)
    with pytest.raises(TypeError, match="integer tensor"):
        decoder.generate(prompt.float(), 2)
    with pytest.raises(TypeError, match="integer tensor"):
        decoder.generate(prompt.tolist(), 2)
    with pytest.raises(ValueError, match=r"shape \[batch_size=2, seq >= 1\]"):
        decoder.generate(prompt[:1], 2)
    with pytest.raises(ValueError, match=r"shape \[batch_size=2, seq >= 1\]"):
        decoder.generate(prompt[:, :0], 2)
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative int"):
        decoder.generate(prompt, -1)
    with pytest.raises(ValueError, match=r"prompt_len must be an int in \[1, 5\]"):
        decoder.decode_logits(prompt, prompt_len=0)
    with pytest.raises(ValueError, match=r"prompt_len must be an int in \[1, 5\]"):
        decoder.decode_logits(prompt, prompt_len=6)
    # int32 prompts are accepted and decoded as long
    assert torch.equal(decoder.generate(prompt.int(), 2), _hf_generate(model, prompt, 2))


# --------------------------------------------------------------------------------------------------
# CUDA: the captured graph and Inductor
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantize", ["none", None, "int8"])
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decoding_matches_eager_decoding(compile, quantize):
    torch._dynamo.reset()
    model = _model(layers=4, hidden_size=256, intermediate_size=512, head_dim=64).to("cuda", torch.bfloat16)
    if quantize != "none":
        optimize_model(model, quantize=quantize)
    prompt = _prompt(batch=1, seq=7).cuda()
    sequence = _hf_generate(model, prompt, 30)
    eager = StaticCacheDecoder(model, max_seq_len=48, cuda_graph=False)
    graphed = StaticCacheDecoder(model, max_seq_len=48, compile=compile)
    assert graphed.cuda_graph and not eager.cuda_graph
    reference = eager.decode_logits(sequence[:, :-1], prompt_len=7).float()
    stepped = graphed.decode_logits(sequence[:, :-1], prompt_len=7).float()
    assert graphed.capture_seconds is not None
    assert (graphed.compile_seconds is not None) == compile
    # The same modules recorded once and replayed. Compiled, Inductor's fusions round differently:
    # up to about two bf16 unit roundoffs (2 * 2**-8) per rounding stage the logits pass through (4
    # layers, the final norm and lm_head: 6). A wrong slot or position is off by order one.
    err = ((stepped - reference).norm() / reference.norm()).item()
    assert err < (6 * 2 * 2**-8 if compile else 1e-2)
    assert (stepped.argmax(-1) == sequence[:, 7:]).float().mean() >= 0.9
    tokens = graphed.generate(prompt, 30)
    assert torch.equal(graphed.generate(prompt, 30), tokens)  # replays start from a clean state
    assert torch.equal(tokens[:, :7], prompt)
    assert graphed.last_timing["decode_steps"] == 29
    torch._dynamo.reset()
