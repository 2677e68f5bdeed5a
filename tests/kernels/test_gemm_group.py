"""INT8 layers of one input in one launch: ``int8_gemm_group`` / ``linears_of_one_input``.

The grouped GEMV must compute what the separate ``int8_gemm`` calls compute: each output is checked
against the float64 reference of its own dequantized product with the tolerance rule of
tests/helpers.py. Tests also pin down when the grouped launch is taken (one row, per-channel scales,
no gradient, the Triton backend) and that every other case runs the layers one by one.
"""

from __future__ import annotations

import pytest
import torch

import rotalabs_accel
from helpers import FLOAT_DTYPES, assert_within_torch_error, kernel_devices, randn
from rotalabs_accel import QuantizedLinear
from rotalabs_accel.functional import gemm as gemm_functional
from rotalabs_accel.functional.gemm import int8_gemm, int8_gemm_group
from rotalabs_accel.kernels.gemm import linears_of_one_input
from rotalabs_accel.ops import int8 as int8_ops
from rotalabs_accel.reference.int8 import int8_linear_reference, quantize_weight_reference


def _weights(ns, k, dtype, device, bias):
    out = []
    for n in ns:
        q, s = quantize_weight_reference(randn(n, k, device=device) * 0.05)
        b = randn(n, dtype=dtype, device=device) if bias else None
        out.append((q, s, b))
    return out


def _check(outs, x, layers):
    assert len(outs) == len(layers)
    for out, (q, s, b) in zip(outs, layers):
        assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], q.shape[0])
        ref64 = int8_linear_reference(x.double(), q, s, None if b is None else b.double())
        assert_within_torch_error(out, int8_linear_reference(x, q, s, b), ref64, x.dtype)


@pytest.fixture
def grouped_calls(monkeypatch):
    """Counts launches of the grouped kernel (eager entry)."""
    calls = []
    original = int8_ops.int8_gemv_group

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(int8_ops, "int8_gemv_group", counting)
    return calls


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "ns, k, bias, lead",
    [
        ((64, 16, 16), 256, False, (1,)),  # q/k/v of a GQA layer
        ((40, 40), 100, True, (1, 1)),  # gate/up; K not a multiple of the block; bias
        ((24, 8, 8), 2048, True, ()),  # two K blocks; x 1-D
    ],
)
def test_grouped_launch_matches_the_reference(device, dtype, ns, k, bias, lead, grouped_calls):
    layers = _weights(ns, k, dtype, device, bias)
    x = randn(*lead, k, dtype=dtype, device=device)
    with rotalabs_accel.use_backend("triton"):
        outs = int8_gemm_group(x, *map(list, zip(*layers)))
        packed = int8_gemm_group(x, *map(list, zip(*layers)), concat=True)
    assert len(grouped_calls) == 2
    _check(outs, x, layers)
    assert packed.shape == (*x.shape[:-1], sum(ns))
    assert torch.equal(packed, torch.cat(outs, dim=-1))


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_other_calls_run_the_layers_one_by_one(device, grouped_calls):
    k = 64
    layers = _weights((32, 16), k, torch.float32, device, bias=True)
    weights, scales, biases = map(list, zip(*layers))
    with rotalabs_accel.use_backend("triton"):
        # two rows (prefill or batched decode): the tensor-core kernels' business
        x2 = randn(2, k, device=device)
        _check(int8_gemm_group(x2, weights, scales, biases), x2, layers)
        assert int8_gemm_group(x2, weights, scales, biases, concat=True) is None
        # a gradient to track: the separate calls have a backward
        x1 = randn(1, k, device=device).requires_grad_()
        outs = int8_gemm_group(x1, weights, scales, biases)
        sum(o.sum() for o in outs).backward()
        assert x1.grad is not None and x1.grad.shape == x1.shape
        # some layers with a bias, some without; W8A8
        mixed = [biases[0], None]
        _check(int8_gemm_group(x1.detach(), weights, scales, mixed), x1.detach(),
               [(q, s, b) for (q, s, _), b in zip(layers, mixed)])
        outs = int8_gemm_group(x1.detach(), weights, scales, biases, mode="w8a8")
        for out, q, s, b in zip(outs, weights, scales, biases):
            torch.testing.assert_close(out, int8_gemm(x1.detach(), q, s, b, mode="w8a8"), rtol=0, atol=0)
    assert grouped_calls == []


def test_cpu_fallback_equals_separate_calls(grouped_calls):
    layers = _weights((16, 8, 8), 32, torch.float32, "cpu", bias=False)
    weights, scales, _ = map(list, zip(*layers))
    x = randn(1, 32)
    with rotalabs_accel.use_backend("torch"):
        outs = int8_gemm_group(x, weights, scales)
        for out, q, s in zip(outs, weights, scales):
            assert torch.equal(out, int8_gemm(x, q, s))
        assert int8_gemm_group(x, weights, scales, concat=True) is None
    assert grouped_calls == []


def test_bad_arguments_raise():
    q, s = quantize_weight_reference(randn(8, 16))
    x = randn(1, 16)
    with pytest.raises(TypeError, match="non-empty lists"):
        int8_gemm_group(x, [], [])
    with pytest.raises(ValueError, match="2 weights but 1 scales"):
        int8_gemm_group(x, [q, q], [s])
    with pytest.raises(ValueError, match="2 weights but 3 biases"):
        int8_gemm_group(x, [q, q], [s, s], [None, None, None])
    with pytest.raises(ValueError, match="last dimension"):
        int8_gemm_group(randn(1, 15), [q, q], [s, s])
    with pytest.raises(TypeError, match="int8"):
        int8_gemm_group(x, [q, q.float()], [s, s])


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_linears_of_one_input(device, grouped_calls):
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=False).to(device) for n in (64, 16, 16)]
    layers = [QuantizedLinear.from_linear(lin) for lin in linears]
    x = randn(1, 1, 64, device=device)
    with rotalabs_accel.use_backend("triton"):
        outs = linears_of_one_input(x, layers)
        assert len(grouped_calls) == 1
        for out, layer in zip(outs, layers):
            assert_within_torch_error(
                out, int8_linear_reference(x, layer.weight_int8, layer.scale),
                int8_linear_reference(x.double(), layer.weight_int8, layer.scale), x.dtype,
            )
        # anything that is not a plain int8 layer is called as it is: no grouped launch
        handle = layers[1].register_forward_hook(lambda mod, inp, out: out * 2)
        hooked = linears_of_one_input(x, layers)
        handle.remove()
        assert torch.equal(hooked[1], 2 * layers[1](x))  # called through the module: the hook ran
        plain = linears_of_one_input(x, [linears[0], layers[1]])
        assert torch.equal(plain[0], linears[0](x))
        assert linears_of_one_input(x, [linears[0], layers[1]], concat=True) is None
    assert len(grouped_calls) == 1


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_custom_op_opcheck_and_compile(device):
    layers = _weights((16, 8), 64, torch.float32, device, bias=True)
    weights, scales, biases = map(list, zip(*layers))
    x = randn(1, 64, device=device)
    op = torch.ops.rotalabs_accel.int8_gemv_group.default
    torch.library.opcheck(op, (x, weights, scales, biases))
    torch.library.opcheck(op, (x, weights, scales, [None, None]))

    def step(x):
        a, b = int8_gemm_group(x, weights, scales, biases)
        return a.sum() + b.sum()

    with rotalabs_accel.use_backend("triton"):
        eager = step(x)
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_quantized_swiglu_uses_the_packed_gate_up(device, grouped_calls):
    from rotalabs_accel import SwiGLU, quantize_model

    torch.manual_seed(0)
    mlp = SwiGLU(64, 96).to(device)
    expected_module = SwiGLU(64, 96).to(device)
    expected_module.load_state_dict(mlp.state_dict())
    quantize_model(mlp, skip=())
    quantize_model(expected_module, skip=())
    x = randn(1, 64, device=device)
    with torch.no_grad():
        with rotalabs_accel.use_backend("triton"):
            got = mlp(x)
        assert len(grouped_calls) == 1
        with rotalabs_accel.use_backend("torch"):
            gate, up, down = (expected_module.gate_proj, expected_module.up_proj, expected_module.down_proj)
            ref = down(torch.nn.functional.silu(gate(x)) * up(x))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ns, k", [((4096, 1024, 1024), 4096), ((14336, 14336), 4096)])
def test_decode_shapes_on_gpu(ns, k):
    layers = _weights(ns, k, torch.bfloat16, "cuda", bias=False)
    x = randn(1, k, dtype=torch.bfloat16, device="cuda")
    weights, scales = [q for q, _, _ in layers], [s for _, s, _ in layers]
    assert gemm_functional._fused_group_ok(x, weights, scales, [None] * len(ns), None, "auto")
    _check(int8_gemm_group(x, weights, scales), x, layers)
