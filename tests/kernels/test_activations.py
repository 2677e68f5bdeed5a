"""The SwiGLU module and the functional API: against Hugging Face's LlamaMLP and the float64 reference.

Baseline for the tolerance rule: Hugging Face's ``LlamaMLP`` run in the same dtype (what a user gets
without this library); oracle: the same module in float64 with the same weights. Float32 allows a
factor 8 (see tests/ops/test_swiglu_ops.py: Triton's float32 ``exp`` is the GPU's approximate one).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rotalabs_accel
from helpers import FLOAT_DTYPES, assert_within_torch_error, kernel_devices, randn
from rotalabs_accel.functional.activations import swiglu_ffn
from rotalabs_accel.kernels.activations import SwiGLU, swiglu_fused
from rotalabs_accel.reference.swiglu import swiglu_ffn_reference, swiglu_reference

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

FACTOR = {torch.float32: 8.0, torch.float16: 2.0, torch.bfloat16: 2.0}
HIDDEN, INTER = 24, 72


def _llama_mlp(hidden=HIDDEN, inter=INTER, bias=False, dtype=torch.float32, device="cpu") -> nn.Module:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu", mlp_bias=bias,
                         num_attention_heads=4, num_key_value_heads=4)
    mlp = LlamaMLP(config).to(device=device, dtype=dtype)
    with torch.no_grad():  # fresh random weights, scaled so activations are O(1)
        for p in mlp.parameters():
            p.copy_(randn(*p.shape, dtype=dtype, device=device, scale=p.shape[-1] ** -0.5))
    return mlp


def _named_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters()}


def _compare_with_llama(ours: nn.Module, hf: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, dtype):
    """Forward and every gradient of ``ours`` against ``hf`` (baseline, same dtype) and float64 ``hf``."""
    ref = copy.deepcopy(hf).double()
    x_ours, x_hf, x_ref = (x.detach().clone().to(d).requires_grad_() for d in (dtype, dtype, torch.float64))
    y_ours, y_hf, y_ref = ours(x_ours), hf(x_hf), ref(x_ref)
    assert y_ours.dtype == dtype and y_ours.shape == x.shape
    assert_within_torch_error(y_ours, y_hf, y_ref, dtype, "forward", FACTOR[dtype])
    y_ours.backward(grad_out)
    y_hf.backward(grad_out)
    y_ref.backward(grad_out.double())
    assert_within_torch_error(x_ours.grad, x_hf.grad, x_ref.grad, dtype, "grad x", FACTOR[dtype])
    g_ours, g_hf, g_ref = _named_grads(ours), _named_grads(hf), _named_grads(ref)
    assert set(g_ours) == set(g_hf)
    for name in g_hf:
        assert g_ours[name] is not None and g_ours[name].dtype == dtype, name
        assert_within_torch_error(g_ours[name], g_hf[name], g_ref[name], dtype, f"grad {name}", FACTOR[dtype])


# --------------------------------------------------------------------------------------------------
# Hugging Face compatibility
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_state_dict_loads_both_ways(bias, fused):
    hf = _llama_mlp(bias=bias)
    ours = SwiGLU(HIDDEN, INTER, bias=bias, fused_gate_up=fused)
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in hf.named_parameters()]
    ours.load_state_dict(hf.state_dict())
    for key, value in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert ours.gate_up_packed == fused  # loading copies in place: the packing survives

    other = SwiGLU(HIDDEN, INTER, bias=bias, fused_gate_up=fused)
    hf2 = _llama_mlp(bias=bias)
    hf2.load_state_dict(other.state_dict())
    x = randn(5, HIDDEN)
    with rotalabs_accel.use_backend("torch"):
        torch.testing.assert_close(other(x), hf2(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_llama_mlp_on_the_reference_backend(dtype, bias, fused):
    hf = _llama_mlp(bias=bias, dtype=dtype)
    ours = SwiGLU(HIDDEN, INTER, bias=bias, fused_gate_up=fused, dtype=dtype)
    ours.load_state_dict(hf.state_dict())
    x, grad_out = randn(2, 7, HIDDEN, dtype=dtype), randn(2, 7, HIDDEN, dtype=dtype)
    with rotalabs_accel.use_backend("torch"):
        _compare_with_llama(ours, hf, x, grad_out, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_llama_mlp_with_kernels(device, dtype, bias, fused):
    hidden, inter = 16, 40
    hf = _llama_mlp(hidden, inter, bias=bias, dtype=dtype, device=device)
    ours = SwiGLU.from_module(copy.deepcopy(hf), fused_gate_up=fused)
    x, grad_out = (randn(3, 5, hidden, dtype=dtype, device=device) for _ in range(2))
    with rotalabs_accel.use_backend("triton"):
        _compare_with_llama(ours, hf, x, grad_out, dtype)


def test_from_module_shares_parameters_and_keeps_device_dtype_mode():
    hf = _llama_mlp(bias=True, dtype=torch.float16).eval()
    ours = SwiGLU.from_module(hf)
    assert not ours.training
    assert ours.gate_proj.weight is hf.gate_proj.weight and ours.down_proj.bias is hf.down_proj.bias
    assert ours.gate_proj.weight.dtype == torch.float16 and ours.gate_proj.weight.device.type == "cpu"
    assert (ours.hidden_size, ours.intermediate_size) == (HIDDEN, INTER)

    fused = SwiGLU.from_module(hf, fused_gate_up=True)
    assert fused.gate_up_packed and fused.fused_gate_up
    assert fused.up_proj.weight is hf.up_proj.weight  # same objects, data moved into one buffer
    x = randn(4, HIDDEN, dtype=torch.float16)
    with rotalabs_accel.use_backend("torch"):
        ref = swiglu_ffn_reference(x.double(), *(p.double() for p in (
            hf.gate_proj.weight, hf.up_proj.weight, hf.down_proj.weight,
            hf.gate_proj.bias, hf.up_proj.bias, hf.down_proj.bias)))
        assert_within_torch_error(fused(x), hf(x), ref, torch.float16, "forward")


def test_from_module_accepts_nn_silu_and_rejects_the_rest():
    class MLP(nn.Module):
        def __init__(self, act=None, down_in=INTER):
            super().__init__()
            self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
            self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
            self.down_proj = nn.Linear(down_in, HIDDEN, bias=False)
            if act is not None:
                self.act_fn = act

    assert SwiGLU.from_module(MLP(nn.SiLU())).intermediate_size == INTER
    with pytest.raises(ValueError, match="SiLU"):
        SwiGLU.from_module(MLP(nn.GELU()))
    with pytest.raises(ValueError, match="SiLU"):
        SwiGLU.from_module(MLP())  # nothing says the activation is SiLU
    with pytest.raises(ValueError, match=r"down_proj.weight must have shape \[24, 72\]"):
        SwiGLU.from_module(MLP(nn.SiLU(), down_in=INTER + 1))
    bad = MLP(nn.SiLU())
    bad.up_proj = nn.Conv1d(1, 1, 1)
    with pytest.raises(TypeError, match="up_proj must be an nn.Linear"):
        SwiGLU.from_module(bad)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="gelu",
                         num_attention_heads=4)
    with pytest.raises(ValueError, match="SiLU"):
        SwiGLU.from_module(LlamaMLP(config))


# --------------------------------------------------------------------------------------------------
# Memory: what backward keeps
# --------------------------------------------------------------------------------------------------


def _saved_activation_elements(fn, x: torch.Tensor, tokens: int, widths: tuple[int, ...]) -> int:
    """Elements of the [tokens, width] tensors autograd keeps for backward while running ``fn(x)``."""
    saved: dict[int, int] = {}

    def pack(t):
        if t.dim() == 2 and t.shape[0] == tokens and t.shape[1] in widths:
            saved[t.untyped_storage().data_ptr() + t.storage_offset()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    y.sum().backward()
    return sum(saved.values())


@pytest.mark.parametrize("fused", [False, True])
def test_backward_keeps_gate_and_up_but_not_the_activation(fused):
    tokens = 9
    hf = _llama_mlp()
    ours = SwiGLU.from_module(copy.deepcopy(hf), fused_gate_up=fused)
    x = randn(tokens, HIDDEN).requires_grad_()
    with rotalabs_accel.use_backend("torch"):
        kept_ours = _saved_activation_elements(ours, x, tokens, (INTER, 2 * INTER))
    kept_hf = _saved_activation_elements(hf, x, tokens, (INTER, 2 * INTER))
    assert kept_ours == 2 * tokens * INTER  # gate and up only
    assert kept_hf >= 4 * tokens * INTER  # gate, up, silu(gate) and the product


def test_second_backward_through_a_retained_graph_raises_clearly():
    ours = SwiGLU(HIDDEN, INTER)
    x = randn(3, HIDDEN).requires_grad_()
    with rotalabs_accel.use_backend("torch"):
        y = ours(x)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        y.sum().backward()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("which", ["gate_proj", "up_proj", "down_proj"])
def test_weights_updated_between_forward_and_backward_are_caught(fused, which):
    ours = SwiGLU(HIDDEN, INTER, fused_gate_up=fused)
    with rotalabs_accel.use_backend("torch"):
        y = ours(randn(3, HIDDEN).requires_grad_())
    with torch.no_grad():
        getattr(ours, which).weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("fused", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(fused):
    ours = SwiGLU(HIDDEN, INTER, bias=True, fused_gate_up=fused)
    x = randn(2, 4, HIDDEN)
    grads = []
    for checkpointed in (False, True):
        ours.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with rotalabs_accel.use_backend("torch"):
            y = torch.utils.checkpoint.checkpoint(ours, xi, use_reentrant=False) if checkpointed else ours(xi)
        y.pow(2).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_frozen_projections_and_input_without_grad():
    """Only the gradients that are asked for are computed, including down_proj alone."""
    hf = _llama_mlp(bias=True)
    ours = SwiGLU.from_module(copy.deepcopy(hf))
    for module in (hf, ours):
        module.gate_proj.requires_grad_(False)
        module.up_proj.requires_grad_(False)
    x = randn(6, HIDDEN)  # no grad
    with rotalabs_accel.use_backend("torch"):
        ours(x).sum().backward()
    hf(x).sum().backward()
    assert ours.gate_proj.weight.grad is None and ours.up_proj.bias.grad is None
    torch.testing.assert_close(ours.down_proj.weight.grad, hf.down_proj.weight.grad)
    torch.testing.assert_close(ours.down_proj.bias.grad, hf.down_proj.bias.grad)


# --------------------------------------------------------------------------------------------------
# Packed gate/up storage
# --------------------------------------------------------------------------------------------------


def test_packing_survives_conversions_copies_and_assign_loading():
    ours = SwiGLU(HIDDEN, INTER, bias=True, fused_gate_up=True)
    assert ours.gate_up_packed
    gate_w = ours.gate_proj.weight
    ours.double()
    assert ours.gate_up_packed and ours.gate_proj.weight is gate_w and gate_w.dtype == torch.float64
    assert ours.gate_proj.weight.data_ptr() + INTER * HIDDEN * 8 == ours.up_proj.weight.data_ptr()
    clone = copy.deepcopy(ours)
    assert clone.gate_up_packed
    hf = _llama_mlp(bias=True, dtype=torch.float64)
    ours.load_state_dict(hf.state_dict(), assign=True)
    assert ours.gate_up_packed
    assert torch.equal(ours.up_proj.weight, hf.up_proj.weight)
    assert not SwiGLU(HIDDEN, INTER).gate_up_packed


def test_unpacked_fused_module_warns_once_and_stays_correct():
    hf = _llama_mlp()
    ours = SwiGLU.from_module(copy.deepcopy(hf), fused_gate_up=True)
    ours.up_proj.weight = nn.Parameter(ours.up_proj.weight.detach().clone())
    x = randn(4, HIDDEN)
    with rotalabs_accel.use_backend("torch"):
        with pytest.warns(UserWarning, match="pack_gate_up_"):
            y = ours(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours(x)
        torch.testing.assert_close(y, hf(x), rtol=1e-5, atol=1e-6)
        ours.pack_gate_up_()
        assert ours.gate_up_packed
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-6)


def test_replaced_or_hooked_projection_runs_the_module():
    """A projection replaced (LoRA-style) or carrying hooks is called as a module."""
    ours = SwiGLU(HIDDEN, INTER)
    x = randn(3, HIDDEN)
    calls = []
    handle = ours.gate_proj.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    with rotalabs_accel.use_backend("torch"):
        ours(x)
    handle.remove()
    assert calls == [torch.Size([3, INTER])]

    class Scaled(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, t):
            return 2 * self.linear(t)

    ours.up_proj = Scaled(ours.up_proj)
    expected = ours.down_proj(F.silu(ours.gate_proj(x)) * (2 * ours.up_proj.linear(x)))
    with rotalabs_accel.use_backend("torch"):
        torch.testing.assert_close(ours(x), expected)


def test_swapped_or_parametrized_projection_weights_are_used():
    # forward reads the projections' parameters from their dicts: torch.func.functional_call's
    # swap is seen, and a parametrized projection (another class) runs as a module.
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    ours = SwiGLU(HIDDEN, INTER)
    x = randn(3, HIDDEN)
    w = randn(INTER, HIDDEN)
    with rotalabs_accel.use_backend("torch"):
        swapped = torch.func.functional_call(ours, {"up_proj.weight": w}, (x,))
        expected = ours.down_proj(F.silu(ours.gate_proj(x)) * F.linear(x, w, ours.up_proj.bias))
        torch.testing.assert_close(swapped, expected)
        raw = ours.gate_proj.weight.detach().clone()
        parametrize.register_parametrization(ours.gate_proj, "weight", Doubled())
        expected = ours.down_proj(F.silu(F.linear(x, 2 * raw, ours.gate_proj.bias)) * ours.up_proj(x))
        torch.testing.assert_close(ours(x), expected)


# --------------------------------------------------------------------------------------------------
# Other modes and shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_zero_tokens(fused):
    ours = SwiGLU(HIDDEN, INTER, bias=True, fused_gate_up=fused)
    x = torch.empty(0, 3, HIDDEN, requires_grad=True)
    with rotalabs_accel.use_backend("torch"):
        y = ours(x)
    assert y.shape == (0, 3, HIDDEN)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(ours.gate_proj.weight.grad) == 0


def test_inference_mode_and_one_dimensional_input():
    hf = _llama_mlp()
    ours = SwiGLU.from_module(copy.deepcopy(hf), fused_gate_up=True)
    x = randn(HIDDEN)
    with torch.inference_mode(), rotalabs_accel.use_backend("torch"):
        y = ours(x)
    assert y.shape == (HIDDEN,)
    torch.testing.assert_close(y, hf(x), rtol=1e-5, atol=1e-6)


def test_autocast_composes_the_block():
    hf = _llama_mlp()
    ours = SwiGLU.from_module(copy.deepcopy(hf), fused_gate_up=True)
    ref = copy.deepcopy(hf).double()
    x = randn(5, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_hf = ours(x), hf(x)
    assert y_ours.dtype == torch.bfloat16
    assert_within_torch_error(y_ours, y_hf, ref(x.double()), torch.bfloat16, "autocast forward")


@pytest.mark.compile
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("fused", [False, True])
def test_compile_fullgraph_module(device, fused):
    hf = _llama_mlp(bias=True, device=device)
    ours = SwiGLU.from_module(copy.deepcopy(hf), fused_gate_up=fused)
    torch._dynamo.reset()
    ours.compile(fullgraph=True, backend="aot_eager")  # in place: parameter names unchanged
    x = randn(2, 3, HIDDEN, device=device)
    with rotalabs_accel.use_backend("triton"):
        _compare_with_llama(ours, hf, x, randn(2, 3, HIDDEN, device=device), torch.float32)


def test_spec_example_scaled_down():
    ffn = SwiGLU(hidden_size=64, intermediate_size=176, bias=False)
    x = torch.randn(2, 16, 64, dtype=torch.float32)
    y = ffn(x)
    assert y.shape == (2, 16, 64)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        SwiGLU(0, 8)
    with pytest.raises(TypeError, match="intermediate_size must be an int"):
        SwiGLU(8, 2.5)
    ours = SwiGLU(HIDDEN, INTER)
    with pytest.raises(ValueError, match="hidden_size=24"):
        ours(randn(3, HIDDEN + 1))
    with pytest.raises(TypeError, match="floating dtype"):
        ours(torch.ones(3, HIDDEN, dtype=torch.int64))
    with pytest.raises(TypeError, match="gate_weight must have the dtype of x"):
        ours(randn(3, HIDDEN, dtype=torch.bfloat16))


def test_swiglu_ffn_validates_shapes():
    x = randn(3, 8)
    w_g, w_u, w_d = randn(16, 8), randn(16, 8), randn(8, 16)
    with pytest.raises(ValueError, match="up_weight must have shape"):
        swiglu_ffn(x, w_g, randn(15, 8), w_d)
    with pytest.raises(ValueError, match="down_weight must have shape"):
        swiglu_ffn(x, w_g, w_u, w_g)
    with pytest.raises(ValueError, match="down_bias must have shape"):
        swiglu_ffn(x, w_g, w_u, w_d, down_bias=randn(16))
    with pytest.raises(ValueError, match="last dimension of x"):
        swiglu_ffn(randn(3, 9), w_g, w_u, w_d)
    with pytest.raises(ValueError, match="one device"):
        swiglu_ffn(x, w_g, w_u, w_d.to("meta"))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_swiglu_fused_validates_arguments(backend):
    if backend == "triton" and not rotalabs_accel.is_triton_available():
        pytest.skip("triton not installed")
    rotalabs_accel.set_backend(backend)  # the fixture resets it
    g = randn(3, 8)
    with pytest.raises(ValueError, match="shape of gate"):
        swiglu_fused(g, randn(3, 9))
    with pytest.raises(TypeError, match="dtype of gate"):
        swiglu_fused(g, randn(3, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match="floating dtype"):
        swiglu_fused(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        swiglu_fused(g, [1.0] * 8)
    with pytest.raises(ValueError, match="must be even"):
        swiglu_fused(randn(3, 7))
    with pytest.raises(ValueError, match="0-d"):
        swiglu_fused(torch.tensor(1.0))
    with pytest.raises(ValueError, match="one device"):
        swiglu_fused(g, g.to("meta"))


def test_swiglu_fused_reference_backend_and_float64():
    g, u = randn(4, 10, dtype=torch.float64), randn(4, 10, dtype=torch.float64)
    expected = F.silu(g) * u
    torch.testing.assert_close(swiglu_fused(g, u), expected)  # auto on CPU: the reference
    torch.testing.assert_close(swiglu_fused(torch.cat([g, u], -1)), expected)
    with rotalabs_accel.use_backend("torch"):
        torch.testing.assert_close(swiglu_fused(g.float(), u.float()), swiglu_reference(g.float(), u.float()))
    if rotalabs_accel.is_triton_available():
        with rotalabs_accel.use_backend("triton"), pytest.raises(NotImplementedError, match="float64"):
            swiglu_fused(g, u)


def test_reexported_at_documented_path():
    import rotalabs_accel.functional as functional

    assert swiglu_fused is functional.swiglu_fused
    assert rotalabs_accel.SwiGLU is SwiGLU


# --------------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gpu_matches_llama_mlp(dtype, fused):
    hidden, inter = 512, 1376
    hf = _llama_mlp(hidden, inter, dtype=dtype, device="cuda")
    ours = SwiGLU.from_module(copy.deepcopy(hf), fused_gate_up=fused)
    x, grad_out = (randn(4, 300, hidden, dtype=dtype, device="cuda") for _ in range(2))
    _compare_with_llama(ours, hf, x, grad_out, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_peak_memory_below_llama_mlp(fused):
    hidden, inter, tokens = 1024, 4096, 4096
    hf = _llama_mlp(hidden, inter, dtype=torch.bfloat16, device="cuda")
    ours = SwiGLU.from_module(copy.deepcopy(hf), fused_gate_up=fused)
    x = randn(tokens, hidden, dtype=torch.bfloat16, device="cuda", scale=1.0).requires_grad_()
    grad_out = randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")

    def peak(module):
        module.zero_grad(set_to_none=True)
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        module(x).backward(grad_out)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(ours)  # warm-up (kernel compilation, cuBLAS workspaces)
    peak(hf)
    act = tokens * inter * 2
    ours_peak, hf_peak = peak(ours), peak(hf)
    assert ours_peak <= hf_peak - 2 * act, (ours_peak / act, hf_peak / act)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_cuda_graph_capture_of_forward_and_backward(fused):
    ours = SwiGLU(256, 688, bias=True, fused_gate_up=fused, device="cuda", dtype=torch.bfloat16)
    x = randn(128, 256, dtype=torch.bfloat16, device="cuda").requires_grad_()
    grad = randn(128, 256, dtype=torch.bfloat16, device="cuda")
    inputs = [x, *ours.parameters()]

    def step():
        y = ours(x)
        return (y, *torch.autograd.grad(y, inputs, grad))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        x.copy_(randn(128, 256, dtype=torch.bfloat16, device="cuda"))
    graph.replay()
    expected = step()
    for got, exp in zip(captured, expected):  # cuBLAS may pick other algorithms outside the capture
        torch.testing.assert_close(got, exp, rtol=2e-2, atol=2e-2)
