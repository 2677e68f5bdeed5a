"""INT8 linear: the W8A16 / W8A8 kernels (every variant forced, every M bucket) and ``Int8Linear``.

Oracles: ``int8_linear_reference`` evaluated in float64 on the same int8 weights and scales (the exact
dequantized product), and for W8A8 the exact float64 evaluation of the same quantized activations
(the activation quantizer is bit-identical to the reference, so only the epilogue's rounding remains).
Tolerances follow tests/helpers.py: at most 2x the error of the PyTorch reference in the same dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rotalabs_accel
from helpers import FLOAT_DTYPES, assert_within_torch_error, kernel_devices, randn, rel_err
from rotalabs_accel.functional import gemm as gemm_functional
from rotalabs_accel.kernels.gemm import Int8Linear, int8_gemm
from rotalabs_accel.quantization.symmetric import QuantizedLinear
from rotalabs_accel.reference.int8 import (
    dequantize_weight_reference,
    int8_linear_reference,
    quantize_symmetric_reference,
    quantize_weight_reference,
    w8a8_linear_reference,
)

# "dequant" rounds the dequantized weight once to x's dtype before a cuBLAS / PyTorch GEMM: its relative
# error is about sqrt(2) x the reference's (the weight's rounding, independent per element, adds about as
# much as the output's own rounding), inside the 2x bound of the same oracle as the exact variants.
W8A16_KERNELS = ["gemv", "splitk", "gemm", "dequant"]
# one M per bucket of the launch tables: 1, 2-16, 17-64, 65-256, >256
BUCKET_MS = [1, 5, 40, 100, 300]


def _problem(m, n, k, dtype, *, group_size=None, bias=True, device="cpu"):
    w = randn(n, k, device=device) * 0.05
    q, s = quantize_weight_reference(w, group_size)
    x = randn(m, k, dtype=dtype, device=device)
    b = randn(n, dtype=dtype, device=device) if bias else None
    return x, q, s, b


def _check_w8a16(out, x, q, s, b, group_size=None):
    assert out.dtype == x.dtype
    assert out.shape == (*x.shape[:-1], q.shape[0])
    ref64 = int8_linear_reference(x.double(), q, s, None if b is None else b.double(), group_size)
    baseline = int8_linear_reference(x, q, s, b, group_size)
    assert_within_torch_error(out, baseline, ref64, x.dtype)


def _every_int8_value(n, k, device="cuda"):
    """An int8 ``[n, k]`` weight holding every value from -128 to 127, scattered over rows and columns."""
    q = (torch.arange(n * k, device=device) * 7919 % 256 - 128).to(torch.int8).reshape(n, k)
    assert set(q.unique().tolist()) == set(range(-128, 128))
    return q


def _w8a8_exact64(x, q, s, b):
    """W8A8 evaluated exactly from the reference's quantized activations (float64 throughout)."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, sx = quantize_symmetric_reference(x2, dim=-1)
    out = (xq.double() @ q.double().T) * sx.double()[:, None] * s.double()[None, :]
    if b is not None:
        out = out + b.double()
    return out.reshape(*x.shape[:-1], q.shape[0])


# --------------------------------------------------------------------------------------------------
# W8A16: every variant at every M bucket (the dtype rotates so each variant meets all three)
# --------------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("kernel", W8A16_KERNELS + ["auto"])
@pytest.mark.parametrize("m_index", range(len(BUCKET_MS)))
def test_w8a16_every_kernel_every_bucket(device, kernel, m_index):
    m = BUCKET_MS[m_index]
    dtype = FLOAT_DTYPES[(m_index + len(kernel)) % 3]
    x, q, s, b = _problem(m, 23, 100, dtype, bias=m_index % 2 == 0, device=device)
    with rotalabs_accel.use_backend("triton"):
        out = int8_gemm(x, q, s, b, kernel=kernel, mode="w8a16")
    _check_w8a16(out, x, q, s, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kernel", W8A16_KERNELS)
def test_w8a16_dtypes_even_k(device, dtype, kernel):
    # K a multiple of every block: the unmasked main loop
    x, q, s, b = _problem(3, 48, 128, dtype, device=device)
    with rotalabs_accel.use_backend("triton"):
        out = int8_gemm(x, q, s, b, kernel=kernel)
    _check_w8a16(out, x, q, s, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("kernel", W8A16_KERNELS)
@pytest.mark.parametrize("group_size", [32, 48])
def test_w8a16_group_scales(device, kernel, group_size):
    # K = 100 leaves a ragged last group; 48 is a multiple of 16 but not a power of two
    dtype = torch.bfloat16 if group_size == 32 else torch.float16
    x, q, s, b = _problem(6, 37, 100, dtype, group_size=group_size, device=device)
    with rotalabs_accel.use_backend("triton"):
        out = int8_gemm(x, q, s, b, group_size=group_size, kernel=kernel)
    _check_w8a16(out, x, q, s, b, group_size)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize(
    "kernel, config, group_size",
    [
        ("gemv", dict(block_n=8, block_k=16, split_k=4, num_stages=2), None),
        ("gemv", dict(block_n=8, block_k=16, split_k=3), 32),
        # a K block of 64 covering four groups of 16: the per-group partial sums inside one block
        ("gemv", dict(block_n=4, block_k=64, split_k=2, num_warps=2), 16),
        # 48 is no power of two: the block shrinks to 16, a divisor of the group
        ("gemv", dict(block_n=16, block_k=64, split_k=1, num_stages=1), 48),
        ("splitk", dict(block_m=16, block_n=16, block_k=16, split_k=5, swap_ab=False), None),
        ("splitk", dict(block_m=16, block_n=16, block_k=16, split_k=3, swap_ab=True), 32),
        ("gemm", dict(block_m=16, block_n=16, block_k=32, group_m=2, swap_ab=False), None),
        ("gemm", dict(block_m=16, block_n=32, block_k=16, group_m=3, swap_ab=True), 48),
        ("dequant", dict(block_n=4, block_k=32), None),
        # K tiles of 32 straddling groups of 48: the scale is looked up per element
        ("dequant", dict(block_n=16, block_k=32, num_warps=2), 48),
    ],
)
def test_w8a16_explicit_configs(device, kernel, config, group_size):
    """Splits with an uneven last share, both MMA orientations, grouped tile order, group scales."""
    from rotalabs_accel.triton_kernels.int8_config import DequantConfig, DotConfig, GemvConfig
    from rotalabs_accel.triton_kernels.int8_gemm import w8a16_linear

    cfg = {"gemv": GemvConfig, "dequant": DequantConfig}.get(kernel, DotConfig)(**config)
    m = 5 if kernel == "gemv" else 33  # GEMV programs are one row-block x 8 columns: keep the grid small
    x, q, s, b = _problem(m, 37, 96, torch.float16, group_size=group_size, device=device)
    out = w8a16_linear(x, q, s, b, group_size, kernel, cfg)
    _check_w8a16(out, x, q, s, b, group_size)
    # deterministic: split-K partial sums are added in split order, whichever program finishes last
    assert torch.equal(out, w8a16_linear(x, q, s, b, group_size, kernel, cfg))


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "kernel, config, group_size",
    [
        ("splitk", dict(block_m=16, block_n=16, block_k=16, split_k=5, swap_ab=False), None),
        ("splitk", dict(block_m=16, block_n=32, block_k=16, split_k=3, swap_ab=True), 32),
        ("gemm", dict(block_m=32, block_n=16, block_k=32, group_m=2, swap_ab=True), None),
        ("gemm", dict(block_m=16, block_n=16, block_k=16, swap_ab=False), 48),
        ("gemv", dict(block_n=8, block_k=32, split_k=2, num_stages=3), None),
        ("gemv", dict(block_n=16, block_k=16, split_k=4, num_stages=2), 48),
    ],
)
def test_w8a16_tma_loads(device, dtype, kernel, config, group_size):
    """DotConfig.tma / GemvConfig.tma: the tensor-core kernel reads x and W, the GEMV W, through TMA
    descriptors, whose zero fill replaces the masks at every ragged edge (N = 37, K = 96 split
    unevenly, a last group of 48 cut short). Only the loads change, so the product is the pointer-load
    kernel's, bit for bit, with the same tiles. Operands that break the descriptors' 16-byte rules (a
    base 2 bytes off, a row stride of K + 1 elements) run the same tiles with pointer loads."""
    from rotalabs_accel.triton_kernels import int8_gemm as kernels
    from rotalabs_accel.triton_kernels.int8_config import DotConfig, GemvConfig

    assert kernels.tma_available(-1 if device == "cpu" else torch.device(device).index or 0)
    config_class = GemvConfig if kernel == "gemv" else DotConfig
    m, n, k = (3 if kernel == "gemv" else 33), 37, 96
    x, q, s, b = _problem(m, n, k, dtype, group_size=group_size, device=device)
    kernels.clear_plans()
    out = kernels.w8a16_linear(x, q, s, b, group_size, kernel, config_class(**config, tma=True))
    (plan,) = kernels._PLANS.values()
    assert plan[4] is not None  # the TMA loads ran
    _check_w8a16(out, x, q, s, b, group_size)
    pointer = kernels.w8a16_linear(x, q, s, b, group_size, kernel, config_class(**config))
    assert torch.equal(out, pointer)
    again = kernels.w8a16_linear(x, q, s, b, group_size, kernel, config_class(**config, tma=True))
    assert torch.equal(out, again)
    # misaligned operands: same tiles, pointer loads, same bits
    shifted = torch.empty(m * k + 8, dtype=dtype, device=device)[1:1 + m * k].view(m, k)
    shifted.copy_(x)
    wide = torch.empty(m, k + 1, dtype=dtype, device=device)
    wide[:, :k] = x
    for x_odd in (shifted, wide[:, :k]):
        kernels.clear_plans()
        odd = kernels.w8a16_linear(x_odd, q, s, b, group_size, kernel, config_class(**config, tma=True))
        (plan,) = kernels._PLANS.values()
        assert plan[4] is None
        assert torch.equal(odd, pointer)
    kernels.clear_plans()


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("kernel", ["gemv", "splitk"])
def test_split_k_is_one_launch_and_leaves_its_counters_zero(device, kernel, monkeypatch):
    """A split-K call is one kernel: the last program of each tile adds the partial sums. The arrival
    counters are back to zero afterwards, so the next call (here: another shape and split sharing the
    buffer) starts clean."""
    from rotalabs_accel.triton_kernels import int8_gemm as kernels
    from rotalabs_accel.triton_kernels.int8_config import DotConfig, GemvConfig

    launched = []
    real_call, real_launch_ptrs = kernels.KernelLaunch.__call__, kernels.KernelLaunch.launch_ptrs

    def counting_call(site, args, key=0):
        launched.append(site.kernel)
        return real_call(site, args, key)

    def counting_launch_ptrs(site, args, key=0):
        done = real_launch_ptrs(site, args, key)
        if done:
            launched.append(site.kernel)
        return done

    monkeypatch.setattr(kernels.KernelLaunch, "__call__", counting_call)
    monkeypatch.setattr(kernels.KernelLaunch, "launch_ptrs", counting_launch_ptrs)
    kernels.clear_plans()
    for m, n, k, split in ((3, 37, 200, 4), (5, 50, 96, 3)):
        if kernel == "gemv":
            cfg = GemvConfig(block_n=8, block_k=32, split_k=split, num_stages=1)
        else:
            cfg = DotConfig(block_m=16, block_n=16, block_k=16, split_k=split)
        x, q, s, b = _problem(m, n, k, torch.float32, device=device)
        launched.clear()
        out = kernels.w8a16_linear(x, q, s, b, None, kernel, cfg)
        assert len(launched) == 1
        (plan,) = [p for key, p in kernels._PLANS.items() if key[:3] == (m, n, k)]
        assert plan[2] == split and plan[3] > 1  # split, tiles
        _check_w8a16(out, x, q, s, b)
        assert all(int(locks.count_nonzero()) == 0 for locks in kernels._LOCKS.values())
        assert torch.equal(out, kernels.w8a16_linear(x, q, s, b, None, kernel, cfg))
    kernels.clear_plans()


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("kernel", W8A16_KERNELS)
def test_every_int8_value_converts_exactly(device, kernel):
    """All 256 int8 values (-128 too, which a user-made weight may hold) reach the product exactly.

    The GEMV (and the fp32 tensor-core path) convert int8 to fp32 with integer bit operations: a wrong
    bias or sign handling would shift every value by a constant. x is one-hot, so each output is
    ``q[n, j] * s[n]``, one fp32 rounding of exact factors, which the reference computes identically.
    """
    from rotalabs_accel.triton_kernels.int8_config import DequantConfig, DotConfig, GemvConfig
    from rotalabs_accel.triton_kernels.int8_gemm import w8a16_linear

    q = torch.randint(-128, 128, (256, 32), dtype=torch.int8, device=device)
    q[:, 5] = torch.arange(-128, 128, dtype=torch.int32).to(torch.int8)
    s = torch.rand(256, device=device) + 0.5
    x = torch.zeros(2, 32, device=device)
    x[0, 5] = 1.0
    x[1, 30] = 1.0
    cfg = {"gemv": GemvConfig(64, 32), "dequant": DequantConfig(16, 16)}.get(kernel, DotConfig(16, 64, 32))
    out = w8a16_linear(x, q, s, None, None, kernel, cfg)
    expected = torch.stack([q[:, 5].float() * s, q[:, 30].float() * s])
    assert torch.equal(out, expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_launch_plans_are_reused_and_follow_the_tables(device, monkeypatch):
    """A problem size resolves its variant and tiles once; clear_plans() picks up edited tables."""
    from rotalabs_accel.triton_kernels import int8_config
    from rotalabs_accel.triton_kernels import int8_gemm as kernels

    x, q, s, b = _problem(1, 24, 64, torch.float16, device=device)
    kernels.clear_plans()
    first = kernels.w8a16_linear(x, q, s, b)
    assert len(kernels._PLANS) == 1
    (plan,) = kernels._PLANS.values()
    assert plan[0].kernel is kernels._w8a16_gemv_kernel  # M = 1: the GEMV
    assert torch.equal(kernels.w8a16_linear(x, q, s, b), first)
    assert len(kernels._PLANS) == 1
    # a tuned entry for this exact shape sends "auto" to another variant once the plans are cleared
    tuned = dict(int8_config.TUNED)
    tuned[("auto", "1", 24, 64)] = ("gemm", int8_config.DotConfig(16, 32, 32))
    monkeypatch.setattr(int8_config, "TUNED", tuned)
    kernels.clear_plans()
    out = kernels.w8a16_linear(x, q, s, b)
    (plan,) = kernels._PLANS.values()
    assert plan[0].kernel is kernels._w8a16_dot_kernel
    _check_w8a16(out, x, q, s, b)
    kernels.clear_plans()


def test_launch_heuristics():
    """Split-K only where the grid is short of programs, bounded by the partial sums' traffic."""
    from rotalabs_accel.triton_kernels.int8_config import (
        DotConfig,
        choose_split_k,
        group_block,
        resolve_w8a16,
        select_w8a16,
    )

    # decode on a 132-SM GPU: 1024 GEMV programs fill it, 256 do not
    assert select_w8a16(1, 4096, 4096, None, "auto", 132, False)[1].split_k == 1
    variant, cfg = select_w8a16(1, 1024, 4096, None, "auto", 132, False)
    assert variant == "gemv" and cfg.split_k == 2
    # a short grid splits, but never beyond a quarter of the weight's bytes in partial sums
    assert choose_split_k(64, 64, 132, fill=2, m=16, k=4096) == 4
    assert choose_split_k(64, 64, 132, fill=2, m=128, k=4096) == 1
    # the dispatcher's split-K variant may resolve to no split; a forced one always splits
    assert select_w8a16(16, 14336, 4096, None, "auto", 132, False)[1].split_k == 1
    forced = resolve_w8a16("splitk", DotConfig(16, 32, 256, split_k=0), 16, 14336, 4096,
                           group_size=None, sm_count=132, fp32=False)
    assert forced.split_k >= 2
    # group scales: power-of-two groups may share a K block, other sizes shrink the block
    assert group_block(1024, 128) == (1024, 128)
    assert group_block(64, 48) == (16, 16)
    assert group_block(512, None) == (512, 512)
    # prefill: "auto" dequantizes into a buffer for cuBLAS from DEQUANT_MIN_ROWS rows on, not before
    from rotalabs_accel.triton_kernels.int8_config import DEQUANT_MIN_ROWS

    assert select_w8a16(DEQUANT_MIN_ROWS, 4096, 4096, None, "auto", 132, False)[0] == "dequant"
    assert select_w8a16(DEQUANT_MIN_ROWS - 1, 4096, 4096, None, "auto", 132, False)[0] != "dequant"
    assert select_w8a16(DEQUANT_MIN_ROWS, 4096, 4096, None, "gemm", 132, False)[0] == "gemm"
    # group scales keep a second accumulator: big MMA tiles shrink so it fits in registers
    big = resolve_w8a16("gemm", DotConfig(256, 128, 64, num_warps=8), 4096, 4096, 4096,
                        group_size=128, sm_count=132, fp32=False)
    assert big.block_m * big.block_n <= 64 * 32 * 8


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_w8a16_strided_and_batched_inputs(device):
    x, q, s, b = _problem(4, 40, 100, torch.bfloat16, device=device)
    wide = randn(2, 3, 160, dtype=torch.bfloat16, device=device)
    x3 = wide[..., 30:130]  # rows with a stride > K, batched: no copy needed for the kernels
    xt = randn(100, 5, dtype=torch.bfloat16, device=device).T  # K not contiguous: copied once
    with rotalabs_accel.use_backend("triton"):
        out3 = int8_gemm(x3, q, s, b, kernel="gemv")
        outt = int8_gemm(xt, q, s, b, kernel="splitk")
        out1 = int8_gemm(x[0], q, s, b, kernel="gemv")  # a single row without a batch dimension
    _check_w8a16(out3, x3, q, s, b)
    _check_w8a16(outt, xt, q, s, b)
    _check_w8a16(out1, x[0], q, s, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_size", [None, 32, 48])
def test_dequantize_weight_is_the_reference_rounded_once(device, dtype, group_size):
    """The dequant variant's weight: ``q * s`` in fp32, one rounding to the dtype, bit for bit, on odd
    N and K (masked edges), a ragged last group, and a weight with a row stride wider than K."""
    from rotalabs_accel.triton_kernels.int8_config import DequantConfig
    from rotalabs_accel.triton_kernels.int8_gemm import dequantize_weight

    w = randn(37, 150, device=device) * 0.05
    q, s = quantize_weight_reference(w, group_size)
    q[0, :3] = torch.tensor([-128, 127, -127], dtype=torch.int8)
    wide = torch.zeros(37, 160, dtype=torch.int8, device=device)
    wide[:, 5:155] = q
    expected = dequantize_weight_reference(q, s, group_size, dtype=torch.float32).to(dtype)
    for weight in (q, wide[:, 5:155]):
        out = dequantize_weight(weight, s, group_size, dtype, config=DequantConfig(8, 64, 2))
        assert out.dtype == dtype and out.shape == (37, 150) and out.is_contiguous()
        assert torch.equal(out, expected)
    assert torch.equal(dequantize_weight(q, s, group_size, dtype), expected)  # the default tiles


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("bias", [True, False])
def test_dequant_variant_runs_wide_weights_in_column_chunks(device, bias, monkeypatch):
    """A weight wider than the transient buffer allows runs chunk by chunk into one reused buffer:
    the same product (bias included, columns in place) as in one piece, with a buffer never larger
    than DEQUANT_MAX_BUFFER_BYTES."""
    from rotalabs_accel.triton_kernels import int8_config
    from rotalabs_accel.triton_kernels import int8_gemm as kernels

    x, q, s, b = _problem(9, 1100, 48, torch.bfloat16, bias=bias, device=device)
    whole = kernels.w8a16_linear(x, q, s, b, None, "dequant")
    # room for 300 rows of 48 bf16: chunks are whole multiples of 256 columns (aligned column slices
    # of the output), so 256, 256, 256, 256 and the last 76
    monkeypatch.setattr(int8_config, "DEQUANT_MAX_BUFFER_BYTES", 300 * 48 * 2)
    sizes = []
    real = kernels.dequantize_weight

    def recording(weight, *args, **kw):
        sizes.append(weight.shape[0])
        return real(weight, *args, **kw)

    monkeypatch.setattr(kernels, "dequantize_weight", recording)
    chunked = kernels.w8a16_linear(x, q, s, b, None, "dequant")
    assert sizes == [256, 256, 256, 256, 76]
    assert chunked.shape == (9, 1100) and chunked.is_contiguous()
    _check_w8a16(chunked, x, q, s, b)
    torch.testing.assert_close(chunked, whole, rtol=2**-7, atol=1e-3)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_empty_rows_return_empty(device):
    x, q, s, b = _problem(4, 40, 100, torch.float16, device=device)
    empty = x[:0].reshape(0, 0, 100).requires_grad_()
    with rotalabs_accel.use_backend("triton"):
        for kernel in ("auto", "gemv", "w8a8"):
            out = int8_gemm(empty, q, s, b, kernel=kernel)
            assert out.shape == (0, 0, 40) and out.dtype == torch.float16
    out.sum().backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("shape", [(0, 24), (2, 0, 24)])
def test_empty_rows_give_the_bias_a_zero_gradient_like_nn_linear(device, shape):
    linear = nn.Linear(24, 10).to(device)
    layer = QuantizedLinear.from_linear(linear)
    for backend in ("torch", "triton"):
        layer.bias.grad = linear.bias.grad = None
        x = randn(*shape, device=device).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        with rotalabs_accel.use_backend(backend):
            out = layer(x)
        expected = linear(x_ref)
        assert out.shape == expected.shape == (*shape[:-1], 10)
        out.sum().backward()
        expected.sum().backward()
        assert torch.equal(layer.bias.grad, linear.bias.grad)
        assert layer.bias.grad.shape == (10,) and x.grad.shape == x.shape


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_in_features_give_nn_linears_result(device, bias):
    linear = nn.Linear(0, 8, bias=bias).to(device)
    if bias:
        with torch.no_grad():
            linear.bias.copy_(randn(8, device=device))
    layer = QuantizedLinear.from_linear(linear)
    assert layer.weight_int8.shape == (8, 0) and torch.isfinite(layer.scale).all()
    x = randn(2, 3, 0, device=device)
    for backend, mode in (("torch", "w8a16"), ("torch", "w8a8"), ("triton", "w8a16"), ("triton", "w8a8")):
        layer.mode = mode
        with rotalabs_accel.use_backend(backend):
            out = layer(x)
        assert out.shape == (2, 3, 8) and out.dtype == x.dtype
        assert torch.equal(out, linear(x)), (backend, mode)  # the bias (or zeros): an empty sum is exact
    b = randn(8, device=device) if bias else None
    out = int8_gemm(x, torch.zeros(8, 0, dtype=torch.int8, device=device), torch.ones(8, device=device), b)
    assert torch.equal(out, b.expand(2, 3, 8) if bias else torch.zeros(2, 3, 8, device=device))


# --------------------------------------------------------------------------------------------------
# Gradients with respect to x and the bias (the int8 weight is frozen)
# --------------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("kernel, dtype", [("gemv", torch.float32), ("splitk", torch.bfloat16),
                                           ("gemm", torch.float16), ("w8a8", torch.bfloat16)])
def test_gradients(device, kernel, dtype):
    group_size = 32 if kernel == "splitk" else None
    x, q, s, b = _problem(5, 40, 96, dtype, group_size=group_size, device=device)
    x.requires_grad_()
    b.requires_grad_()
    dy = randn(5, 40, dtype=dtype, device=device)
    with rotalabs_accel.use_backend("triton"):
        int8_gemm(x, q, s, b, group_size=group_size, kernel=kernel).backward(dy)
    w64 = dequantize_weight_reference(q, s, group_size, dtype=torch.float64)
    # what a user gets from autograd on the eager dequantized product in the same dtype
    xb = x.detach().clone().requires_grad_()
    F.linear(xb, dequantize_weight_reference(q, s, group_size, dtype=dtype)).backward(dy)
    assert x.grad.dtype == dtype and b.grad.dtype == dtype
    assert_within_torch_error(x.grad, xb.grad, dy.double() @ w64, dtype, what="dx")
    assert_within_torch_error(b.grad, dy.sum(0), dy.double().sum(0), dtype, what="dbias")


def test_gradients_torch_backend_match_kernel_path():
    """The CPU fallback's gradients (autograd through the reference) equal the kernel path's formula."""
    x, q, s, b = _problem(3, 24, 64, torch.float32)
    x.requires_grad_()
    dy = randn(3, 24)
    with rotalabs_accel.use_backend("torch"):
        int8_gemm(x, q, s, b, mode="w8a8").backward(dy)
    torch.testing.assert_close(x.grad, dy @ dequantize_weight_reference(q, s))


# --------------------------------------------------------------------------------------------------
# W8A8 dynamic
# --------------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [1, 20, 300])
def test_w8a8_kernel(device, dtype, m):
    x, q, s, b = _problem(m, 40, 100, dtype, bias=m != 20, device=device)
    with rotalabs_accel.use_backend("triton"):
        out = int8_gemm(x, q, s, b, mode="w8a8")
    assert out.dtype == dtype
    exact = _w8a8_exact64(x, q, s, b)
    assert_within_torch_error(out, w8a8_linear_reference(x, q, s, b), exact, dtype)
    # and W8A8 stays a good approximation of the unquantized-activation product
    ref64 = int8_linear_reference(x.double(), q, s, None if b is None else b.double())
    assert rel_err(out, ref64) < 0.02


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_activation_quantizer_is_bit_identical(device, dtype):
    from rotalabs_accel.triton_kernels.int8_gemm import quantize_rows

    x = randn(64, 300, dtype=dtype, device=device) * 3
    x[3] = 0  # an all-zero token: tiny scale, zeros, no NaN
    x[5, 7] = 1e4  # an outlier
    for rows in (x, randn(3, 5000, dtype=dtype, device=device)):  # one pass, and two passes over K
        q, sx = quantize_rows(rows)
        q_ref, s_ref = quantize_symmetric_reference(rows, dim=-1)
        assert torch.equal(q, q_ref)
        assert torch.equal(sx, s_ref)
    assert not q.isnan().any()


def _old_quantize_rows(x):
    """The per-token quantizer as it was for finite rows (fp32 ops in the same order)."""
    xf = x.float()
    amax = xf.abs().amax(-1).clamp_min(2.0**-64)
    int8_max = torch.full_like(amax, 127)
    q = (xf * (int8_max / amax)[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, amax / int8_max


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("k", [100, 5000])  # one pass, and two passes over K
def test_activation_quantizer_gives_non_finite_rows_a_nan_scale(device, dtype, k):
    from rotalabs_accel.triton_kernels.int8_gemm import quantize_rows

    x = randn(6, k, dtype=dtype, device=device) * 3
    x[1, k // 2] = float("nan")
    x[2, k - 1] = float("inf")
    x[3, 0] = -float("inf")
    x[5] = 0
    bad, good = [1, 2, 3], [0, 4, 5]
    q, sx = quantize_rows(x)
    q_ref, s_ref = quantize_symmetric_reference(x, dim=-1)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(sx, s_ref, rtol=0, atol=0, equal_nan=True)
    assert sx[bad].isnan().all() and torch.equal(q[bad], torch.zeros(3, k, dtype=torch.int8, device=device))
    # finite rows: bit-identical to the quantizer before non-finite rows were handled
    q_old, s_old = _old_quantize_rows(x[good])
    assert torch.equal(q[good], q_old) and torch.equal(sx[good], s_old)
    # through W8A8 on both backends: NaN rows, and the finite rows as the exact float64 evaluation
    _, qw, sw, b = _problem(1, 24, k, dtype, device=device)
    exact = _w8a8_exact64(x[good], qw, sw, b)
    outs = {}
    for backend in ("torch", "triton"):
        with rotalabs_accel.use_backend(backend):
            outs[backend] = out = int8_gemm(x, qw, sw, b, mode="w8a8")
        assert out[bad].isnan().all(), backend
        assert_within_torch_error(out[good], w8a8_linear_reference(x[good], qw, sw, b), exact, dtype)
    torch.testing.assert_close(outs["triton"][good], outs["torch"][good], rtol=2**-7, atol=1e-2)


def test_auto_mode_is_weight_only_by_default():
    assert gemm_functional.W8A8_AUTO_MIN_TOKENS is None
    x, q, s, b = _problem(2000, 8, 32, torch.float32)
    with rotalabs_accel.use_backend("torch"):
        assert torch.equal(int8_gemm(x, q, s, b), int8_gemm(x, q, s, b, mode="w8a16"))


@pytest.mark.parametrize("rows", [63, 64])
def test_auto_mode_switches_to_w8a8_when_enabled(rows, monkeypatch):
    monkeypatch.setattr(gemm_functional, "W8A8_AUTO_MIN_TOKENS", 64)
    x, q, s, b = _problem(rows, 8, 32, torch.float32)
    with rotalabs_accel.use_backend("torch"):
        out = int8_gemm(x, q, s, b)
        w8a16 = int8_gemm(x, q, s, b, mode="w8a16")
        w8a8 = int8_gemm(x, q, s, b, mode="w8a8")
        qg, sg = quantize_weight_reference(randn(8, 32), 16)
        grouped = int8_gemm(x, qg, sg, group_size=16)  # group scales stay weight-only
    expected = w8a8 if rows >= 64 else w8a16
    assert torch.equal(out, expected)
    assert not torch.equal(w8a8, w8a16)
    assert torch.equal(grouped, int8_linear_reference(x, qg, sg, None, 16))


def test_autocast_computes_in_the_autocast_dtype_like_nn_linear():
    x, q, s, b = _problem(3, 8, 32, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = int8_gemm(x, q, s, b)
        linear_dtype = F.linear(x, torch.randn(8, 32)).dtype
    assert out.dtype == linear_dtype == torch.bfloat16
    # the reference inside ran with autocast off: the same result as a bf16 call outside autocast
    assert torch.equal(out, int8_gemm(x.bfloat16(), q, s, b))


def test_autocast_leaves_fp64_inputs_alone_like_nn_linear():
    x, q, s, b = _problem(3, 8, 32, torch.float64)
    layer = QuantizedLinear(32, 8, dtype=torch.float64)
    layer.quantize_weights(randn(8, 32))
    for x_dtype, expected_dtype in ((torch.float64, torch.float64), (torch.float16, torch.bfloat16)):
        xi = x.to(x_dtype)
        linear = nn.Linear(32, 8, dtype=torch.float64 if x_dtype == torch.float64 else torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = int8_gemm(xi, q, s, b)
            layer_out = layer(xi)
            assert linear(xi).dtype == expected_dtype  # what nn.Linear does
        assert out.dtype == layer_out.dtype == expected_dtype
        # the same values as the call outside autocast in that dtype
        assert torch.equal(out, int8_gemm(xi.to(expected_dtype), q, s, b))
    # fp64 keeps its precision: the float64 product, not a bf16 one
    ref64 = int8_linear_reference(x, q, s, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_err(int8_gemm(x, q, s, b), ref64) < 1e-12


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x, q, s, b = _problem(2, 8, 32, torch.float32)
    cases = [
        ((x.long(), q, s), {}, TypeError, "x must be a floating-point"),
        ((x, q.float(), s), {}, TypeError, "weight_int8 must be an int8"),
        ((x, q[None], s), {}, ValueError, "weight_int8 must be 2-D"),
        ((x[:, :31], q, s), {}, ValueError, "last dimension must equal weight_int8.shape"),
        ((x, q, s.int()), {}, TypeError, "scale must be a floating-point"),
        ((x, q, s[:4]), {}, ValueError, "scale must have shape"),
        ((x, q, s[:, None].expand(8, 2)), {}, ValueError, "needs group_size"),
        ((x, q, s), {"group_size": 16}, ValueError, r"scale must have shape \[8, 2\]"),
        ((x, q, s), {"group_size": 0}, ValueError, "group_size must be a positive int"),
        ((x, q, s, b[:3]), {}, ValueError, "bias must have shape"),
        ((x, q, s, b.long()), {}, TypeError, "bias must be a floating-point"),
        ((x, q, s), {"mode": "int4"}, ValueError, "mode must be one of"),
        ((x, q, s), {"kernel": "cutlass"}, ValueError, "kernel must be one of"),
        ((x, q, s), {"mode": "w8a16", "kernel": "w8a8"}, ValueError, "contradicts"),
        ((x, q, s), {"mode": "w8a8", "kernel": "gemv"}, ValueError, "contradicts"),
        ((x, q, s.new_ones(8, 2)), {"group_size": 16, "mode": "w8a8"}, ValueError, "per-channel"),
        ((x.to("meta"), q, s), {}, ValueError, "must be on one device"),
    ]
    for args, kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            int8_gemm(*args, **kwargs)


def test_forced_triton_without_kernel_says_why():
    x, q, s, b = _problem(2, 8, 32, torch.float64)
    with rotalabs_accel.use_backend("triton"), pytest.raises((NotImplementedError, RuntimeError)):
        int8_gemm(x, q, s, b)
    with rotalabs_accel.use_backend("auto"):  # auto falls back to the reference quietly
        _check_w8a16(int8_gemm(x, q, s, b), x, q, s, b)


# --------------------------------------------------------------------------------------------------
# Int8Linear
# --------------------------------------------------------------------------------------------------


def test_int8_linear_spec_example_and_dtypes():
    torch.manual_seed(0)
    layer = Int8Linear(in_features=64, out_features=32, bias=False)
    assert layer.bias is None
    w = randn(32, 64) * 0.1
    assert layer.quantize_weights(w) is layer
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8.shape == (32, 64)
    assert layer.scale.dtype == torch.float32 and layer.scale.shape == (32,)
    for dtype in FLOAT_DTYPES:
        x = randn(2, 5, 64, dtype=dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (2, 5, 32)
        assert rel_err(y, x.double() @ w.double().T) < 0.02


def test_int8_linear_forward_before_quantization_raises():
    with pytest.raises(RuntimeError, match="quantize_weights"):
        Int8Linear(16, 8)(torch.randn(2, 16))


def test_int8_linear_quantize_weights_validation():
    layer = Int8Linear(16, 8)
    with pytest.raises(ValueError, match=r"\[out_features, in_features\] = \[8, 16\]"):
        layer.quantize_weights(torch.randn(16, 8))
    with pytest.raises(TypeError, match="floating-point"):
        layer.quantize_weights(torch.ones(8, 16, dtype=torch.int8))
    bad = torch.randn(8, 16)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.quantize_weights(bad)
    with pytest.raises(ValueError, match="in_features"):
        Int8Linear(-1, 8)
    with pytest.raises(ValueError, match="group_size"):
        Int8Linear(16, 8, group_size=0)
    with pytest.raises(ValueError, match="mode"):
        Int8Linear(16, 8, mode="int4")


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_int8_linear_kernel_path_matches_reference(device):
    layer = Int8Linear(100, 40, bias=True, group_size=32, device=device, dtype=torch.bfloat16)
    layer.quantize_weights(randn(40, 100, device=device) * 0.05)
    with torch.no_grad():
        layer.bias.copy_(randn(40, dtype=torch.bfloat16))
    x = randn(3, 100, dtype=torch.bfloat16, device=device)
    with rotalabs_accel.use_backend("triton"):
        out = layer(x)
    with rotalabs_accel.use_backend("torch"):
        ref = layer(x)
    _check_w8a16(out, x, layer.weight_int8, layer.scale, layer.bias.detach(), 32)
    assert rel_err(out, ref) < 2**-7


def test_int8_linear_dtype_moves_keep_fp32_scales():
    layer = Int8Linear(32, 8, bias=True)
    layer.quantize_weights(torch.randn(8, 32))
    scale = layer.scale.clone()
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)
    layer.half()
    assert layer.bias.dtype == torch.float16 and torch.equal(layer.scale, scale)
    assert layer.weight_int8.dtype == torch.int8
    layer.to("meta")
    assert layer.scale.device.type == "meta" and layer.scale.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# GPU: the benchmark's shapes, CUDA graphs, a second device
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("m", [1, 16, 128, 4096])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_issue_shapes_every_kernel(n, k, m, group_size, dtype):
    x, q, s, b = _problem(m, n, k, dtype, group_size=group_size, device="cuda")
    ref64 = int8_linear_reference(x.double(), q, s, b.double(), group_size)
    baseline = int8_linear_reference(x, q, s, b, group_size)
    kernels = ["auto", "splitk", "gemm", "dequant"]
    if m <= 128:
        kernels.append("gemv")
    if group_size is None:
        kernels.append("w8a8")
    for kernel in kernels:
        out = int8_gemm(x, q, s, b, group_size=group_size, kernel=kernel)
        if kernel == "w8a8":
            exact = _w8a8_exact64(x, q, s, b)
            assert_within_torch_error(out, w8a8_linear_reference(x, q, s, b), exact, dtype, what=kernel)
        else:
            assert_within_torch_error(out, baseline, ref64, dtype, what=kernel)
            assert torch.equal(out, int8_gemm(x, q, s, b, group_size=group_size, kernel=kernel))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336), (1000, 4100)])
@pytest.mark.parametrize("m", [16, 128, 300])
@pytest.mark.parametrize("group_size", [None, 128])
def test_gpu_tma_loads(n, k, m, group_size):
    """TMA-fed tiles on the GPU at the benchmark's shapes: correct, deterministic, the pointer-load
    kernel's bits with the same tiles (also for a new x at another address, whose tensor map is encoded
    anew), and capturable in a CUDA graph. K = 4100 gives the int8 weight a row stride that is no
    multiple of 16 bytes: the same tiles run with pointer loads."""
    from rotalabs_accel.triton_kernels import int8_gemm as kernels
    from rotalabs_accel.triton_kernels.int8_config import DotConfig

    if not kernels.tma_available(torch.cuda.current_device()):
        pytest.skip("no TMA on this GPU")
    x, q, s, b = _problem(m, n, k, torch.bfloat16, group_size=group_size, device="cuda")
    configs = [("splitk", DotConfig(128, 128, 128, split_k=4, num_warps=8, num_stages=4, swap_ab=True)),
               ("gemm", DotConfig(128, 64, 128, num_warps=4, num_stages=4, swap_ab=False))]
    for kernel, cfg in configs:
        tma_cfg = DotConfig(**{**cfg.__dict__, "tma": True})
        kernels.clear_plans()
        out = kernels.w8a16_linear(x, q, s, b, group_size, kernel, tma_cfg)
        (plan,) = kernels._PLANS.values()
        assert (plan[4] is not None) == (k % 16 == 0)
        _check_w8a16(out, x, q, s, b, group_size)
        assert torch.equal(out, kernels.w8a16_linear(x, q, s, b, group_size, kernel, tma_cfg))
        pointer = kernels.w8a16_linear(x, q, s, b, group_size, kernel, cfg)
        assert torch.equal(out, pointer), f"{kernel}: TMA, pointer loads differ: {rel_err(out, pointer):.1e}"
        x_new = randn(*x.shape, dtype=x.dtype, device="cuda")
        assert torch.equal(kernels.w8a16_linear(x_new, q, s, b, group_size, kernel, tma_cfg),
                           kernels.w8a16_linear(x_new, q, s, b, group_size, kernel, cfg))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.w8a16_linear(x, q, s, b, group_size, kernel, tma_cfg)
    x.copy_(randn(*x.shape, dtype=x.dtype, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, kernels.w8a16_linear(x, q, s, b, group_size, kernel, tma_cfg))
    kernels.clear_plans()


def test_fast_convert_stays_off_where_no_ptx_runs():
    """The fp16 weight conversion is inline PTX: a plan for Triton's interpreter (CPU tensors) and a plan
    for bf16 activations do not ask for it."""
    pytest.importorskip("triton")
    from rotalabs_accel.triton_kernels import int8_gemm as kernels
    from rotalabs_accel.triton_kernels.int8_config import DotConfig

    if not kernels.is_triton_interpreter():
        pytest.skip("needs TRITON_INTERPRET=1")
    for dtype in (torch.float16, torch.bfloat16):
        x, q, s, b = _problem(16, 48, 64, dtype)
        kernels.clear_plans()
        out = kernels.w8a16_linear(x, q, s, b, None, "gemm", DotConfig(16, 16, 32, fast_convert=True))
        (plan,) = kernels._PLANS.values()
        assert plan[0].constexprs["FAST_CVT"] is False
        _check_w8a16(out, x, q, s, b)
    kernels.clear_plans()


def test_gemv_fast_convert_stays_off_where_no_ptx_runs(monkeypatch):
    """The GEMV's int8 -> fp32 byte permute is inline PTX: plans for Triton's interpreter (CPU tensors),
    of the GEMV and of the group GEMV, do not ask for it and give the reference's result."""
    pytest.importorskip("triton")
    from rotalabs_accel.triton_kernels import int8_gemm as kernels
    from rotalabs_accel.triton_kernels.int8_config import GemvConfig

    if not kernels.is_triton_interpreter():
        pytest.skip("needs TRITON_INTERPRET=1")
    x, q, s, b = _problem(2, 48, 64, torch.float32)
    kernels.clear_plans()
    out = kernels.w8a16_linear(x, q, s, b, None, "gemv", GemvConfig(8, 32, split_k=1, fast_convert=True))
    (plan,) = kernels._PLANS.values()
    assert plan[0].constexprs["FAST_CVT"] is False
    _check_w8a16(out, x, q, s, b)
    kernels.clear_plans()
    launched = []
    real_launch = kernels.launch

    def spy(kernel, grid, args, *options, **constexprs):
        launched.append(constexprs["FAST_CVT"])
        return real_launch(kernel, grid, args, *options, **constexprs)

    monkeypatch.setattr(kernels, "launch", spy)
    group = kernels.w8a16_gemv_group(x, [q, q[:16]], [s, s[:16]], fast_convert=True)
    assert launched == [False]
    _check_w8a16(group[:, :48], x, q, s, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 4096, 4096), (1, 1000, 4100), (3, 333, 777)])
@pytest.mark.parametrize("group_size", [None, 128])
def test_gpu_gemv_fast_convert(dtype, m, n, k, group_size):
    """The GEMV's byte-permute int8 -> fp32 conversion gives the plain conversion's bits, for a weight
    holding every int8 value from -128 to 127, with register and TMA loads, with and without a K
    split, and in the group GEMV."""
    from rotalabs_accel.triton_kernels import int8_gemm as kernels
    from rotalabs_accel.triton_kernels.int8_config import GemvConfig

    x, q, s, b = _problem(m, n, k, dtype, group_size=group_size, device="cuda")
    q = _every_int8_value(n, k)
    configs = [GemvConfig(2, 1024, split_k=1, num_warps=2, num_stages=1, fast_convert=True),
               GemvConfig(4, 512, split_k=4, num_warps=2, num_stages=1, fast_convert=True),
               GemvConfig(8, 256, split_k=1, num_warps=4, num_stages=3, fast_convert=True),
               GemvConfig(4, 256, split_k=2, num_warps=4, num_stages=3, tma=True, fast_convert=True)]
    for cfg in configs:
        kernels.clear_plans()
        fast = kernels.w8a16_linear(x, q, s, b, group_size, "gemv", cfg)
        (plan,) = kernels._PLANS.values()
        assert plan[0].constexprs["FAST_CVT"] is True
        plain = kernels.w8a16_linear(x, q, s, b, group_size, "gemv", GemvConfig(**{**cfg.__dict__,
                                                                                    "fast_convert": False}))
        assert torch.equal(fast, plain), f"{cfg}: {rel_err(fast, plain):.1e}"
        _check_w8a16(fast, x, q, s, b, group_size)
    if group_size is None:
        q2, s2 = q[: n // 3 + 1].flip(1).contiguous(), s[: n // 3 + 1].flip(0).contiguous()
        fast = kernels.w8a16_gemv_group(x, [q, q2], [s, s2], fast_convert=True)
        plain = kernels.w8a16_gemv_group(x, [q, q2], [s, s2], fast_convert=False)
        assert torch.equal(fast, plain)
        _check_w8a16(fast[:, :n], x, q, s, None)
    kernels.clear_plans()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m, n, k", [(16, 4096, 4096), (128, 1000, 4100), (300, 512, 768)])
@pytest.mark.parametrize("group_size", [None, 128])
def test_gpu_fast_convert_fp16(m, n, k, group_size):
    """fp16 activations: the inline-PTX int8 -> fp16 conversion gives the plain conversion's bits, for a
    weight holding every int8 value from -128 to 127, in both MMA orientations, with pointer and TMA
    loads, with and without a K split."""
    from rotalabs_accel.triton_kernels import int8_gemm as kernels
    from rotalabs_accel.triton_kernels.int8_config import DotConfig

    x, q, s, b = _problem(m, n, k, torch.float16, group_size=group_size, device="cuda")
    q = _every_int8_value(n, k)
    configs = [("gemm", DotConfig(64, 64, 128, num_warps=4, num_stages=3, swap_ab=False)),
               ("gemm", DotConfig(16, 64, 128, num_warps=4, num_stages=4, swap_ab=True)),
               ("splitk", DotConfig(128, 64, 128, split_k=2, num_warps=4, num_stages=4, swap_ab=True)),
               ("gemm", DotConfig(128, 64, 128, num_warps=4, num_stages=3, swap_ab=True, tma=True))]
    for kernel, cfg in configs:
        kernels.clear_plans()
        fast = kernels.w8a16_linear(x, q, s, b, group_size, kernel, cfg)
        (plan,) = kernels._PLANS.values()
        assert plan[0].constexprs["FAST_CVT"] is True
        plain = kernels.w8a16_linear(x, q, s, b, group_size, kernel, DotConfig(**{**cfg.__dict__,
                                                                                   "fast_convert": False}))
        assert torch.equal(fast, plain), f"{kernel} {cfg}: {rel_err(fast, plain):.1e}"
        _check_w8a16(fast, x, q, s, b, group_size)
    kernels.clear_plans()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gpu_dtypes_and_odd_shapes(dtype):
    # (33, 257, 14336): a long K, where an fp32 sum over all of K in one FMA chain would be several
    # times less accurate than cuBLAS's fp32 GEMM (the kernels add BLOCK_K chains with compensation)
    for m, n, k in [(1, 4099, 1000), (7, 333, 4100), (130, 1000, 777), (1500, 515, 2048), (33, 257, 14336)]:
        for group_size in (None, 64):
            x, q, s, b = _problem(m, n, k, dtype, group_size=group_size, device="cuda")
            for kernel in ("auto", "gemv", "splitk", "gemm", "dequant"):
                out = int8_gemm(x, q, s, b, group_size=group_size, kernel=kernel)
                _check_w8a16(out, x, q, s, b, group_size)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_activation_quantizer_bit_identical():
    from rotalabs_accel.triton_kernels.int8_gemm import quantize_rows

    for k in (4096, 14336, 333):
        x = randn(257, k, dtype=torch.bfloat16, device="cuda") * 4
        x[0] = 0
        q, sx = quantize_rows(x)
        q_ref, s_ref = quantize_symmetric_reference(x, dim=-1)
        assert torch.equal(q, q_ref) and torch.equal(sx, s_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_capture():
    layer = Int8Linear(4096, 4096, bias=True, device="cuda", dtype=torch.bfloat16)
    layer.quantize_weights(torch.randn(4096, 4096, device="cuda") * 0.02)
    for m in (1, 16, 2048):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)  # warm up (compiles) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn_like(x))
        expected = layer(x)
        graph.replay()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["gemv", "splitk"])
def test_gpu_split_k_deterministic_under_concurrency(kernel):
    """Split-K on the GPU, where the programs of a tile finish in varying order: every run gives the
    same bits (the last program adds the partial sums in split order), also with the same problem
    running on a second stream at the same time (each stream has its own arrival counters), and
    inside a CUDA graph (whose counters are its own)."""
    from rotalabs_accel.triton_kernels import int8_gemm as kernels
    from rotalabs_accel.triton_kernels.int8_config import DotConfig, GemvConfig

    if kernel == "gemv":
        m, cfg = 1, GemvConfig(block_n=4, block_k=256, split_k=8, num_stages=1)
    else:
        m, cfg = 16, DotConfig(block_m=16, block_n=64, block_k=128, split_k=8)
    x, q, s, b = _problem(m, 4096, 4096, torch.bfloat16, device="cuda")
    first = kernels.w8a16_linear(x, q, s, b, None, kernel, cfg)
    _check_w8a16(first, x, q, s, b)
    for _ in range(50):
        assert torch.equal(kernels.w8a16_linear(x, q, s, b, None, kernel, cfg), first)
    # two streams at once, different inputs
    x2 = randn(*x.shape, dtype=x.dtype, device="cuda")
    second = kernels.w8a16_linear(x2, q, s, b, None, kernel, cfg)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    outs_main, outs_side = [], []
    for _ in range(20):
        outs_main.append(kernels.w8a16_linear(x, q, s, b, None, kernel, cfg))
        with torch.cuda.stream(side):
            outs_side.append(kernels.w8a16_linear(x2, q, s, b, None, kernel, cfg))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert all(torch.equal(o, first) for o in outs_main)
    assert all(torch.equal(o, second) for o in outs_side)
    # captured in a CUDA graph, replayed with new inputs
    graph = torch.cuda.CUDAGraph()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph):
        captured = kernels.w8a16_linear(x, q, s, b, None, kernel, cfg)
    x.copy_(x2)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, second)
    assert all(int(locks.count_nonzero()) == 0 for locks in kernels._LOCKS.values())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_second_device():
    x, q, s, b = _problem(16, 1000, 512, torch.bfloat16, device="cuda:1")
    for kernel in ("gemv", "splitk", "gemm", "w8a8"):
        out = int8_gemm(x, q, s, b, kernel=kernel)
        assert out.device == x.device
        expected = int8_gemm(x.cpu(), q.cpu(), s.cpu(), b.cpu(), kernel=kernel)
        assert rel_err(out, expected) < 2**-7


# --------------------------------------------------------------------------------------------------
# Every tuned configuration computes the right product (the sweep that chose them only timed them)
# --------------------------------------------------------------------------------------------------
def _tuned_configs():
    from rotalabs_accel.triton_kernels import int8_config

    seen = {}
    for (_, bucket, _, _), (variant, cfg) in int8_config.TUNED.items():
        seen.setdefault((variant, cfg), bucket)
    return [pytest.param(variant, cfg, bucket, id=f"{variant}-{i}") for i, ((variant, cfg), bucket)
            in enumerate(sorted(seen.items(), key=repr))]


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("variant, cfg, bucket", _tuned_configs())
def test_every_tuned_config_is_correct(device, variant, cfg, bucket):
    from rotalabs_accel.triton_kernels.int8_gemm import w8a8_linear, w8a16_linear

    # odd N and K (masks on every edge), M from the configuration's bucket (bounded: interpreter cost)
    m = {"1": 1, "16": 5, "64": 17, "256": 33}.get(bucket, 70)
    x, q, s, b = _problem(m, 40, 300, torch.bfloat16, device=device)
    if variant == "w8a8":
        out = w8a8_linear(x, q, s, b, config=cfg)
        assert_within_torch_error(out, w8a8_linear_reference(x, q, s, b), _w8a8_exact64(x, q, s, b),
                                  torch.bfloat16)
    else:
        _check_w8a16(w8a16_linear(x, q, s, b, kernel=variant, config=cfg), x, q, s, b)
