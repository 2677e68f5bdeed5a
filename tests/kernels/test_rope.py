"""RotaryEmbedding, build_rope_cache and apply_rope on the PyTorch path: math, frequency schemes,
Hugging Face parity, cache management and argument checking.

The kernel itself (interpreter / CUDA) is tested in tests/ops/test_rope_ops.py.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import rotalabs_accel
from helpers import FLOAT_DTYPES, assert_within_torch_error, randn
from rotalabs_accel import RotaryEmbedding, apply_rope, build_rope_cache
from rotalabs_accel.reference import rope as ref

# ---------------------------------------------------------------------------------------------------
# Hugging Face helpers (skipped when transformers is not installed)

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
SCHEMES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 64},
    "llama3": LLAMA3,
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 16,
        "beta_slow": 2,
    },
    "yarn_attention_factor_no_truncate": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 64,
        "attention_factor": 1.3,
        "truncate": False,
    },
}


def hf_rotary(scaling, head_dim, base=10000.0, max_pos=64, partial=None):
    """A Hugging Face LlamaRotaryEmbedding configured like our scaling dict."""
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = dict(scaling or {"rope_type": "default"})
    max_pos = params.pop("max_position_embeddings", max_pos)
    kwargs = dict(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=max_pos
    )
    if int(transformers.__version__.split(".")[0]) >= 5:
        params["rope_theta"] = base
        if partial is not None:
            params["partial_rotary_factor"] = partial
        cfg = LlamaConfig(**kwargs, rope_parameters=params)
    else:
        cfg = LlamaConfig(**kwargs, rope_theta=base, rope_scaling=params if scaling else None)
        if partial is not None:
            cfg.partial_rotary_factor = partial
    return LlamaRotaryEmbedding(cfg)


def hf_apply(q, k, cos_half, sin_half, positions, layout):
    """Hugging Face's apply_rotary_pos_emb fed with duplicated full-width tables (float64)."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    # the original even if some test in this process left this library's adapter patched in
    apply_rotary_pos_emb = inspect.unwrap(apply_rotary_pos_emb)
    cos = torch.cat((cos_half, cos_half), -1)[positions]  # (batch, seq, dim)
    sin = torch.cat((sin_half, sin_half), -1)[positions]
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1 if layout == "bhsd" else 2)


# ---------------------------------------------------------------------------------------------------
# The rotation itself (reference = oracle of every other test, so it is checked independently)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_reference_matches_hugging_face_apply_rotary_pos_emb(layout):
    b, s, hq, hk, d = 2, 7, 4, 2, 16
    cos, sin = build_rope_cache(32, d, dtype=torch.float64)
    shape_q = (b, s, hq, d) if layout == "bshd" else (b, hq, s, d)
    shape_k = (b, s, hk, d) if layout == "bshd" else (b, hk, s, d)
    q, k = randn(*shape_q, dtype=torch.float64), randn(*shape_k, dtype=torch.float64)
    pos = torch.randint(0, 32, (b, s))
    ours = ref.apply_rope(q, k, cos, sin, position_ids=pos, layout=layout)
    theirs = hf_apply(q, k, cos, sin, pos, layout)
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a, t, rtol=1e-12, atol=1e-12)


def _complex_rotation(x, angles, rotary_dim, interleaved):
    """Independent oracle: pairs as complex numbers multiplied by exp(i * angle)."""
    rot = x[..., :rotary_dim]
    if interleaved:
        z = torch.view_as_complex(rot.reshape(*rot.shape[:-1], rotary_dim // 2, 2).contiguous())
    else:
        z = torch.complex(rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :])
    z = z * torch.polar(torch.ones_like(angles), angles)
    if interleaved:
        out = torch.view_as_real(z).flatten(-2)
    else:
        out = torch.cat((z.real, z.imag), -1)
    return torch.cat((out, x[..., rotary_dim:]), -1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [12, 6])
def test_reference_equals_complex_rotation(interleaved, rotary_dim):
    b, s, h, d = 2, 5, 3, 12
    inv_freq, _ = ref.rope_inv_freq(rotary_dim, 10000.0)
    cos, sin = build_rope_cache(16, rotary_dim, dtype=torch.float64)
    q, k = randn(b, s, h, d, dtype=torch.float64), randn(b, s, 1, d, dtype=torch.float64)
    offset = 4
    angles = (torch.arange(s, dtype=torch.float64) + offset)[:, None] * inv_freq  # (s, rotary_dim / 2)
    angles = angles[None, :, None, :]
    q_rot, k_rot = ref.apply_rope(
        q, k, cos, sin, offset=offset, interleaved=interleaved, rotary_dim=rotary_dim
    )
    torch.testing.assert_close(
        q_rot, _complex_rotation(q, angles, rotary_dim, interleaved), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        k_rot, _complex_rotation(k, angles, rotary_dim, interleaved), rtol=1e-12, atol=1e-12
    )


def test_rotation_preserves_norm_and_relative_position():
    # <R(p) q, R(p') k> depends only on p - p': the property RoPE exists for.
    d = 16
    cos, sin = build_rope_cache(64, d, dtype=torch.float64)
    q, k = randn(1, 1, 1, d, dtype=torch.float64), randn(1, 1, 1, d, dtype=torch.float64)

    def score(pq, pk):
        qr, _ = ref.apply_rope(q, k, cos, sin, offset=pq)
        _, kr = ref.apply_rope(q, k, cos, sin, offset=pk)
        return (qr * kr).sum().item()

    assert score(10, 3) == pytest.approx(score(40, 33), rel=1e-10)
    assert score(10, 3) != pytest.approx(score(10, 4), rel=1e-3)
    qr, _ = ref.apply_rope(q, k, cos, sin, offset=37)
    assert qr.norm().item() == pytest.approx(q.norm().item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# Frequency schemes against Hugging Face


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_inv_freq_matches_hugging_face(name):
    scaling = SCHEMES[name]
    head_dim = 64
    hf = hf_rotary(scaling, head_dim, base=10000.0)
    inv, attention_factor = ref.rope_inv_freq(head_dim, 10000.0, scaling)
    # HF computes in fp32: agreement to fp32 precision
    torch.testing.assert_close(inv, hf.inv_freq.double(), rtol=2e-6, atol=0)
    assert attention_factor == pytest.approx(float(hf.attention_scaling), rel=1e-12)


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn"])
def test_build_rope_cache_matches_hugging_face_cos_sin(name):
    scaling = SCHEMES[name]
    head_dim = 32
    hf = hf_rotary(scaling, head_dim, base=500000.0)
    positions = torch.arange(48)[None]
    cos_hf, sin_hf = hf(torch.ones(1, dtype=torch.float32), positions)  # (1, 48, head_dim)
    cos, sin = build_rope_cache(48, head_dim, 500000.0, scaling=scaling)
    # HF's fp32 angles lose ~pos * 2^-24 rad; at pos < 48 that is < 1e-5
    torch.testing.assert_close(cos, cos_hf[0, :, : head_dim // 2], rtol=0, atol=2e-5)
    torch.testing.assert_close(sin, sin_hf[0, :, : head_dim // 2], rtol=0, atol=2e-5)


def test_partial_rotary_frequencies_match_hugging_face():
    # (Llama's default init ignores partial_rotary_factor; HF's scaled inits honour it)
    hf = hf_rotary(SCHEMES["linear"], 64, partial=0.5)
    inv, _ = ref.rope_inv_freq(32, 10000.0, SCHEMES["linear"])
    torch.testing.assert_close(inv, hf.inv_freq.double(), rtol=2e-6, atol=0)
    rope = RotaryEmbedding(64, max_seq_len=16, scaling={"partial_rotary_factor": 0.5})
    assert rope.rotary_dim == 32 and rope.cos_cached.shape == (16, 16)


@pytest.mark.parametrize("seq_len", [32, 64, 100, 257])
def test_dynamic_ntk_frequencies_follow_seq_len(seq_len):
    scaling = SCHEMES["dynamic"]
    hf = hf_rotary(scaling, 64)
    x = torch.ones(1)
    hf(x, torch.arange(seq_len)[None])
    inv, _ = ref.rope_inv_freq(64, 10000.0, scaling, seq_len=seq_len)
    torch.testing.assert_close(inv, hf.inv_freq.double(), rtol=2e-6, atol=0)
    plain, _ = ref.rope_inv_freq(64, 10000.0)
    assert torch.equal(inv, plain) == (seq_len <= 64)


def test_dynamic_ntk_module_grows_and_resets_like_hugging_face():
    scaling = {"rope_type": "dynamic", "factor": 2.0}
    hf = hf_rotary({**scaling, "max_position_embeddings": 32}, 16)
    rope = RotaryEmbedding(16, max_seq_len=32, scaling=scaling)
    x = torch.ones(1)
    for n in (8, 40, 36, 60, 20, 33):  # grow, keep, grow, reset, grow
        cos_hf, sin_hf = hf(x, torch.arange(n)[None])
        q, k = randn(1, n, 2, 16), randn(1, n, 1, 16)
        q_rot, k_rot = rope(q, k)
        torch.testing.assert_close(rope.cos_cached[:n], cos_hf[0, :, :8], rtol=0, atol=2e-5)
        torch.testing.assert_close(rope.sin_cached[:n], sin_hf[0, :, :8], rtol=0, atol=2e-5)
        q_hf, k_hf = hf_apply(
            q.double(),
            k.double(),
            cos_hf[0, :, :8].double(),
            sin_hf[0, :, :8].double(),
            torch.arange(n)[None],
            "bshd",
        )
        torch.testing.assert_close(q_rot, q_hf.float(), rtol=0, atol=1e-4)
        torch.testing.assert_close(k_rot, k_hf.float(), rtol=0, atol=1e-4)


def test_cache_is_accurate_at_long_positions():
    # float64 angles: fp32 cos/sin correct to rounding even at position 300k, where fp32 angles are not
    n, dim = 300_007, 64
    cos, sin = build_rope_cache(n, dim)
    inv, _ = ref.rope_inv_freq(dim, 10000.0)
    p = torch.tensor([n - 1], dtype=torch.float64)
    truth = torch.cos(p[:, None] * inv)
    assert (cos[-1:].double() - truth).abs().max().item() <= 2**-24
    naive = torch.cos(p.float()[:, None] * inv.float()).double()
    assert (naive - truth).abs().max().item() > 1e-3  # what the fp32-angle recipe gets wrong


def test_scheme_errors():
    with pytest.raises(ValueError, match="rope_type"):
        build_rope_cache(8, 8, scaling={"rope_type": "longrope"})
    with pytest.raises(ValueError, match="'factor'"):
        build_rope_cache(8, 8, scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="low_freq_factor"):
        build_rope_cache(8, 8, scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_rope_cache(8, 8, scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="unknown keys"):
        build_rope_cache(8, 8, scaling={"rope_type": "linear", "factor": 2.0, "fator": 3})
    with pytest.raises(ValueError, match="rope_theta"):
        build_rope_cache(8, 8, base=5000.0, scaling={"rope_theta": 20000.0})
    with pytest.raises(ValueError, match="even"):
        build_rope_cache(8, 7)
    with pytest.raises(ValueError, match="seq_len"):
        build_rope_cache(-1, 8)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        build_rope_cache(8, 8, scaling={"partial_rotary_factor": 0.5})
    with pytest.raises(TypeError, match="dtype"):
        build_rope_cache(8, 8, dtype=torch.int32)
    # a rope_theta key replaces the default base
    a = build_rope_cache(8, 8, scaling={"rope_theta": 500000.0})[0]
    b = build_rope_cache(8, 8, base=500000.0)[0]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# apply_rope on the PyTorch path: dtypes, layouts, gradients


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_apply_rope_torch_path_within_error_forward_and_backward(dtype, layout):
    b, s, hq, hk, d = 2, 9, 4, 2, 16
    shape = (lambda h: (b, s, h, d)) if layout == "bshd" else (lambda h: (b, h, s, d))
    q0, k0 = randn(*shape(hq), dtype=dtype), randn(*shape(hk), dtype=dtype)
    gq, gk = randn(*shape(hq), dtype=dtype), randn(*shape(hk), dtype=dtype)
    pos = torch.randint(0, 40, (b, s))
    cos, sin = build_rope_cache(40, d)
    cos64, sin64 = build_rope_cache(40, d, dtype=torch.float64)

    def run(qx, kx, c, sn):
        qx, kx = qx.detach().requires_grad_(), kx.detach().requires_grad_()
        out = apply_rope(qx, kx, c, sn, position_ids=pos, layout=layout)
        torch.autograd.backward(out, (gq.to(qx.dtype), gk.to(kx.dtype)))
        return out, (qx.grad, kx.grad)

    with rotalabs_accel.use_backend("torch"):
        ours, ours_g = run(q0, k0, cos, sin)
    ref64, ref64_g = run(q0.double(), k0.double(), cos64, sin64)
    # PyTorch eager in this dtype: Hugging Face style, arithmetic in the input dtype
    theirs = hf_style(q0, k0, cos.to(dtype), sin.to(dtype), pos, layout)
    for name, o, t, r in (("q", ours[0], theirs[0], ref64[0]), ("k", ours[1], theirs[1], ref64[1])):
        assert o.dtype == dtype and o.shape == r.shape
        assert_within_torch_error(o, t, r, dtype, what=f"{name}_rot")
    for name, o, r in (("dq", ours_g[0], ref64_g[0]), ("dk", ours_g[1], ref64_g[1])):
        # the gradient is the inverse rotation of (gq, gk); compare against that rotation in dtype
        assert o.dtype == dtype
        assert_within_torch_error(o, r.to(dtype), r, dtype, what=name)


def hf_style(q, k, cos_half, sin_half, pos, layout):
    """rotate_half formulation in the input dtype (what eager Hugging Face code computes)."""
    cos = torch.cat((cos_half, cos_half), -1)[pos]
    sin = torch.cat((sin_half, sin_half), -1)[pos]
    cos, sin = (
        (cos.unsqueeze(1), sin.unsqueeze(1)) if layout == "bhsd" else (cos.unsqueeze(2), sin.unsqueeze(2))
    )

    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), -1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def test_apply_rope_position_forms_agree():
    b, s, d = 3, 6, 8
    cos, sin = build_rope_cache(32, d)
    q, k = randn(b, s, 2, d), randn(b, s, 2, d)
    base = apply_rope(q, k, cos, sin, offset=5)
    for pos in (
        torch.arange(5, 5 + s),
        torch.arange(5, 5 + s)[None],
        torch.arange(5, 5 + s).expand(b, s),
        torch.arange(5, 5 + s, dtype=torch.int32),
    ):
        out = apply_rope(q, k, cos, sin, position_ids=pos)
        assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])
    # per-token positions really are per token
    pos = torch.randint(0, 32, (b, s))
    q_rot, _ = apply_rope(q, k, cos, sin, position_ids=pos)
    q_one, _ = apply_rope(q[1:2, 2:3], k[1:2, 2:3], cos, sin, offset=int(pos[1, 2]))
    torch.testing.assert_close(q_rot[1:2, 2:3], q_one, rtol=0, atol=0)


def test_apply_rope_out_of_place_and_inplace_torch_path():
    cos, sin = build_rope_cache(16, 8)
    q, k = randn(2, 5, 3, 8), randn(2, 5, 1, 8)
    q0, k0 = q.clone(), k.clone()
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0), "out-of-place call modified its inputs"
    q2, k2 = apply_rope(q, k, cos, sin, inplace=True)
    assert q2 is q and k2 is k
    assert torch.equal(q, q_rot) and torch.equal(k, k_rot)


def test_apply_rope_empty_inputs():
    cos, sin = build_rope_cache(8, 8)
    for shape_q, shape_k in (((0, 4, 2, 8), (0, 4, 1, 8)), ((2, 0, 2, 8), (2, 0, 1, 8))):
        q_rot, k_rot = apply_rope(torch.randn(shape_q), torch.randn(shape_k), cos, sin)
        assert q_rot.shape == shape_q and k_rot.shape == shape_k


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rotary_dim=5), ValueError, "even"),
        (dict(rotary_dim=10), ValueError, "exceeds head_dim"),
        (dict(rotary_dim=4), ValueError, "columns"),
        (dict(layout="sbhd"), ValueError, "layout"),
        (dict(offset=12), ValueError, "cache has 16 positions"),
        (dict(offset=-1), ValueError, "offset must be >= 0"),
        (dict(position_ids=torch.tensor([[0, 1, 2, 3, 16]])), ValueError, r"\[0, 16\)"),
        (dict(position_ids=torch.tensor([[0, 1, 2, 3, -1]])), ValueError, r"\[0, 16\)"),
        (dict(position_ids=torch.zeros(1, 5)), TypeError, "integer"),
        (dict(position_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "position_ids must be"),
        (dict(position_ids=torch.zeros(5, dtype=torch.long), offset=2), ValueError, "not both"),
        (dict(inplace=1), TypeError, "inplace"),
    ],
)
def test_apply_rope_argument_errors(kwargs, error, match):
    cos, sin = build_rope_cache(16, 8)
    q, k = randn(2, 5, 3, 8), randn(2, 5, 1, 8)
    with pytest.raises(error, match=match):
        apply_rope(q, k, cos, sin, **kwargs)


def test_apply_rope_tensor_errors():
    cos, sin = build_rope_cache(16, 8)
    q, k = randn(2, 5, 3, 8), randn(2, 5, 1, 8)
    with pytest.raises(ValueError, match="same head_dim"):
        apply_rope(q, randn(2, 5, 1, 10), cos, sin)
    with pytest.raises(ValueError, match="batch and seq"):
        apply_rope(q, randn(2, 4, 1, 8), cos, sin)
    with pytest.raises(ValueError, match="4-D"):
        apply_rope(randn(5, 3, 8), k, cos, sin)
    with pytest.raises(TypeError, match="one dtype"):
        apply_rope(q, k.half(), cos, sin)
    with pytest.raises(TypeError, match="floating"):
        apply_rope(q.long(), k, cos, sin)
    with pytest.raises(TypeError, match="torch.Tensor"):
        apply_rope(q, k.numpy(), cos, sin)
    with pytest.raises(ValueError, match="one device"):
        apply_rope(q, k, cos.to("meta"), sin.to("meta"))
    with pytest.raises(ValueError, match="half width"):  # Hugging Face's duplicated tables
        apply_rope(q, k, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rope(q, k, cos, sin[:8])


# ---------------------------------------------------------------------------------------------------
# RotaryEmbedding


def test_spec_example_runs_and_state_dict_is_empty():
    rope = RotaryEmbedding(dim=128, max_seq_len=8192, base=10000.0)
    q = torch.randn(2, 512, 32, 128)
    k = torch.randn(2, 512, 32, 128)
    q_rot, k_rot = rope(q, k, seq_len=512)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    cos, sin = build_rope_cache(512, 128)
    expected = apply_rope(q, k, cos, sin)
    assert torch.equal(q_rot, expected[0]) and torch.equal(k_rot, expected[1])
    assert rope.state_dict() == {}
    rope.load_state_dict({})  # nothing to load; strict loading of an empty dict works
    assert {n for n, _ in rope.named_buffers()} == {"cos_cached", "sin_cached"}


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_module_matches_functional(layout, interleaved):
    rope = RotaryEmbedding(
        16, max_seq_len=32, base=500.0, layout=layout, interleaved=interleaved, rotary_dim=8, scaling=LLAMA3
    )
    shape = (2, 6, 3, 16) if layout == "bshd" else (2, 3, 6, 16)
    q, k = randn(*shape), randn(*shape)
    cos, sin = build_rope_cache(32, 8, 500.0, scaling=LLAMA3)
    got = rope(q, k, offset=3)
    want = ref.apply_rope(q, k, cos, sin, offset=3, layout=layout, interleaved=interleaved, rotary_dim=8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[0][..., 8:], q[..., 8:])  # pass-through features untouched


def test_module_cache_grows_and_matches_fresh_cache():
    rope = RotaryEmbedding(8, max_seq_len=16)
    q, k = randn(1, 40, 2, 8), randn(1, 40, 1, 8)
    q_rot, k_rot = rope(q, k)
    assert rope.cache_len >= 40
    cos, sin = build_rope_cache(rope.cache_len, 8)
    torch.testing.assert_close(rope.cos_cached, cos, rtol=0, atol=0)
    torch.testing.assert_close(rope.sin_cached, sin, rtol=0, atol=0)
    # decode step past the cache, via offset and via position_ids
    q1, k1 = randn(1, 1, 2, 8), randn(1, 1, 1, 8)
    a = rope(q1, k1, offset=200)
    assert rope.cache_len >= 201
    b = rope(q1, k1, position_ids=torch.tensor([[200]]))
    assert torch.equal(a[0], b[0])
    c = RotaryEmbedding(8, max_seq_len=300)(q1, k1, offset=200)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert rope.state_dict() == {}


def test_module_cast_to_low_precision_keeps_an_fp32_cache():
    rope = RotaryEmbedding(16, max_seq_len=64)
    q, k = randn(1, 8, 2, 16, dtype=torch.bfloat16), randn(1, 8, 1, 16, dtype=torch.bfloat16)
    want = rope(q, k, offset=40)
    rope.to(torch.bfloat16)  # as model.to(torch.bfloat16) does to every floating buffer
    assert rope.cos_cached.dtype == torch.bfloat16
    got = rope(q, k, offset=40)
    assert rope.cos_cached.dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_module_decode_offsets_reproduce_the_full_sequence():
    rope = RotaryEmbedding(16, max_seq_len=64)
    q, k = randn(2, 10, 4, 16), randn(2, 10, 2, 16)
    full_q, full_k = rope(q, k)
    for t in range(10):
        step_q, step_k = rope(q[:, t : t + 1], k[:, t : t + 1], offset=t)
        assert torch.equal(step_q, full_q[:, t : t + 1]) and torch.equal(step_k, full_k[:, t : t + 1])


def test_module_errors():
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(16, rotary_dim=7)
    with pytest.raises(ValueError, match="exceeds dim"):
        RotaryEmbedding(16, rotary_dim=32)
    with pytest.raises(ValueError, match="layout"):
        RotaryEmbedding(16, layout="hsd")
    with pytest.raises(ValueError, match="max_seq_len"):
        RotaryEmbedding(16, max_seq_len=0)
    rope = RotaryEmbedding(16, max_seq_len=8)
    with pytest.raises(ValueError, match="dim=16"):
        rope(randn(1, 4, 2, 8), randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="shorter than"):
        rope(randn(1, 4, 2, 16), randn(1, 4, 2, 16), seq_len=3)
    assert "rope_type='default'" in repr(rope)


def test_partial_rotary_module_gradient_of_pass_through_is_identity():
    rope = RotaryEmbedding(12, max_seq_len=16, rotary_dim=4)
    q = randn(1, 5, 2, 12, dtype=torch.float64).requires_grad_()
    k = randn(1, 5, 1, 12, dtype=torch.float64).requires_grad_()
    gq = randn(1, 5, 2, 12, dtype=torch.float64)
    q_rot, k_rot = rope(q, k)
    q_rot.backward(gq)
    torch.testing.assert_close(q.grad[..., 4:], gq[..., 4:], rtol=0, atol=0)
    # rotated part: gradient is the inverse rotation, so it has the same norm per pair
    torch.testing.assert_close(q.grad[..., :4].norm(), gq[..., :4].norm())


@pytest.mark.parametrize("name", ["linear", "yarn"])
def test_module_with_scaling_matches_hugging_face_rotation(name):
    scaling = SCHEMES[name]
    head_dim = 32
    hf = hf_rotary(scaling, head_dim, base=10000.0)
    rope = RotaryEmbedding(head_dim, max_seq_len=64, layout="bhsd", scaling=scaling)
    q, k = randn(2, 4, 20, head_dim), randn(2, 2, 20, head_dim)
    pos = torch.randint(0, 60, (2, 20))
    cos_hf, sin_hf = hf(q, pos)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q_hf, k_hf = inspect.unwrap(apply_rotary_pos_emb)(
        q.double(), k.double(), cos_hf.double(), sin_hf.double()
    )
    q_rot, k_rot = rope(q, k, position_ids=pos)
    torch.testing.assert_close(q_rot, q_hf.float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(k_rot, k_hf.float(), rtol=0, atol=1e-4)


def test_exports():
    from rotalabs_accel.kernels import rope as module

    assert module.apply_rope is apply_rope and module.build_rope_cache is build_rope_cache
    assert math.isclose(RotaryEmbedding(8, scaling={"rope_theta": 123.0}).base, 123.0)


def test_module_compiled_with_position_ids_uses_the_cache_or_says_why():
    q, k = torch.randn(1, 20, 2, 8), torch.randn(1, 20, 1, 8)
    pos = torch.arange(20)[None]
    plain = RotaryEmbedding(8, max_seq_len=64)
    eager = plain(q, k, position_ids=pos)
    compiled = torch.compile(RotaryEmbedding(8, max_seq_len=64), fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, position_ids=pos), eager):
        torch.testing.assert_close(got, want)
    scaling = {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 8}
    dynamic = RotaryEmbedding(8, max_seq_len=64, scaling=scaling)
    with pytest.raises(Exception, match="dynamic scaling with position_ids needs seq_len"):
        torch.compile(dynamic, fullgraph=True, backend="aot_eager")(q, k, position_ids=pos)
    eager = RotaryEmbedding(8, max_seq_len=64, scaling=scaling)(q, k, position_ids=pos)
    with_len = torch.compile(RotaryEmbedding(8, max_seq_len=64, scaling=scaling), fullgraph=True,
                             backend="aot_eager")(q, k, 20, position_ids=pos)
    for got, want in zip(with_len, eager):
        torch.testing.assert_close(got, want)


def test_module_position_ids_must_be_a_tensor():
    with pytest.raises(TypeError, match="position_ids must be an integer tensor, got list"):
        RotaryEmbedding(8)(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8), position_ids=[0, 1, 2])
