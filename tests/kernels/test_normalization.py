"""RMSNorm and fused residual-add RMSNorm: kernels (interpreter on CPU, real on CUDA), module, functional.

Oracle: the float64 reference (``rotalabs_accel.reference.rmsnorm``) on the same inputs. Baseline:
the same reference run in the inputs' dtype with PyTorch autograd, i.e. what Hugging Face's
``LlamaRMSNorm`` / ``GemmaRMSNorm`` compute for a user without this library.

Tolerance (tests/helpers.py): ``err(ours) <= FACTOR * err(baseline) + unit_roundoff / 2``.

=========  ======  ===========  ===============================================================
dtype      FACTOR  floor        why
=========  ======  ===========  ===============================================================
float16    2       2.4e-4       both accumulate the sum of squares in fp32; the error is the final
                                rounding(s) to fp16 (two in llama mode: the normalized value, then
                                the product with the weight), identical in number for both
bfloat16   2       2.0e-3       as float16, at bfloat16's coarser unit roundoff
float32    4       3.0e-8       all error is a few fp32 roundings (mean, sqrt, division, product):
                                ~1e-7 for both, but the GPU's reduction order and approximate
                                division differ from PyTorch's, so allow a few ulps more
=========  ======  ===========  ===============================================================

A wrong index, a missing term (e.g. dropping the ``- n * mean(u * n)`` term of dx), or a wrong
scale produces relative errors of 1e-2..1, far above every bound.

Triton's interpreter converts float32 to bfloat16 by truncation where the GPU rounds to nearest even;
the ``_bf16_round_to_nearest`` fixture (tests/conftest.py) makes the interpreter round as the hardware
does, so the CPU run checks the GPU's numerics.
"""

from __future__ import annotations

import math

import pytest
import torch

import rotalabs_accel
from helpers import (
    FLOAT_DTYPES,
    assert_within_torch_error,
    kernel_devices,
    randn,
    rel_err,
)
from rotalabs_accel import TritonRMSNorm, rmsnorm, rmsnorm_residual_fused
from rotalabs_accel.functional import normalization
from rotalabs_accel.functional.normalization import _rows
from rotalabs_accel.reference.rmsnorm import add_rmsnorm_reference, rmsnorm_output_dtype, rmsnorm_reference

FACTOR = {torch.float32: 4.0, torch.float16: 2.0, torch.bfloat16: 2.0}
EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------


def _leaf(shape, dtype, device, pad):
    """A fresh random leaf; with ``pad`` the op sees a row-strided slice of a wider tensor."""
    wide = randn(*shape[:-1], shape[-1] + pad, dtype=dtype, device=device)
    return wide.requires_grad_()


def _view(leaf, n, pad):
    return leaf[..., :n] if pad else leaf


def _weight(n, dtype, offset, device):
    # offset + w ~ N(1, 0.5): a realistic, non-trivial scale.
    return (randn(n, device=device) * 0.5 + 1.0 - offset).to(dtype).requires_grad_()


def _run(fn, tensors, dtype_map=None):
    """Clone ``tensors`` (converted by ``dtype_map``) as fresh leaves and return (leaves, outputs)."""
    leaves = [
        None if t is None else t.detach().to(dtype_map or t.dtype).clone().requires_grad_() for t in tensors
    ]
    return leaves, fn(*leaves)


def _check_norm(device, dtype, shape, mode, offset=0.0, weight_dtype=None, pad=0, use_weight=True):
    n = shape[-1]
    x = _leaf(shape, dtype, device, pad)
    w = _weight(n, weight_dtype or dtype, offset, device) if use_weight else None
    out_dtype = rmsnorm_output_dtype(dtype, None if w is None else w.dtype, mode)
    grad = randn(*shape, dtype=out_dtype, device=device)

    def ours(xl, wl):
        with rotalabs_accel.use_backend("triton"):
            return rmsnorm(_view(xl, n, pad), wl, EPS, offset=offset, casting_mode=mode)

    def reference(xl, wl):
        return rmsnorm_reference(_view(xl, n, pad), wl, EPS, offset=offset, casting_mode=mode)

    (xo, wo), yo = _run(ours, [x, w])
    (xb, wb), yb = _run(reference, [x, w])
    (xr, wr), yr = _run(reference, [x, w], torch.float64)
    assert yo.dtype == yb.dtype == out_dtype and yo.shape == tuple(shape)
    factor = FACTOR[dtype]
    assert_within_torch_error(yo, yb, yr, dtype, "output", factor)
    yo.backward(grad)
    yb.backward(grad)
    yr.backward(grad.to(torch.float64))
    assert xo.grad.dtype == dtype
    assert_within_torch_error(xo.grad, xb.grad, xr.grad, dtype, "grad x", factor)
    if pad:
        assert torch.all(xo.grad[..., n:] == 0)
    if w is not None:
        assert wo.grad.dtype == w.dtype
        assert_within_torch_error(wo.grad, wb.grad, wr.grad, dtype, "grad weight", factor)


def _check_fused(device, dtype, shape, mode, offset=0.0, weight_dtype=None, residual_dtype=None, pad=0):
    n = shape[-1]
    x = _leaf(shape, dtype, device, pad)
    r = _leaf(shape, residual_dtype or dtype, device, 0)
    w = _weight(n, weight_dtype or dtype, offset, device)
    s_dtype = torch.promote_types(x.dtype, r.dtype)
    out_dtype = rmsnorm_output_dtype(s_dtype, w.dtype, mode)
    grad_y = randn(*shape, dtype=out_dtype, device=device)
    grad_s = randn(*shape, dtype=s_dtype, device=device)

    def ours(xl, rl, wl):
        with rotalabs_accel.use_backend("triton"):
            return rmsnorm_residual_fused(_view(xl, n, pad), rl, wl, EPS, offset=offset, casting_mode=mode)

    def reference(xl, rl, wl):
        return add_rmsnorm_reference(_view(xl, n, pad), rl, wl, EPS, offset=offset, casting_mode=mode)

    leaves_o, (yo, so) = _run(ours, [x, r, w])
    leaves_b, (yb, sb) = _run(reference, [x, r, w])
    leaves_r, (yr, sr) = _run(reference, [x, r, w], torch.float64)
    assert yo.dtype == out_dtype and so.dtype == s_dtype and yo.shape == so.shape == tuple(shape)
    factor = FACTOR[dtype]
    assert_within_torch_error(yo, yb, yr, dtype, "normed", factor)
    assert_within_torch_error(so, sb, sr, dtype, "new_residual", factor)
    (yo.float() * grad_y.float()).sum().add((so.float() * grad_s.float()).sum()).backward()
    (yb.float() * grad_y.float()).sum().add((sb.float() * grad_s.float()).sum()).backward()
    (yr * grad_y.double()).sum().add((sr * grad_s.double()).sum()).backward()
    for name, lo, lb, lr in zip(("x", "residual", "weight"), leaves_o, leaves_b, leaves_r):
        assert lo.grad.dtype == lo.dtype
        assert_within_torch_error(lo.grad, lb.grad, lr.grad, dtype, f"grad {name}", factor)


# ---------------------------------------------------------------------------------------------
# Kernels through the functional API (interpreter on CPU, real kernels on CUDA)
# ---------------------------------------------------------------------------------------------

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["llama", "gemma", "none"])
def test_rmsnorm_kernel_forward_backward(device, dtype, mode):
    # Odd hidden size (masked tail), three leading dims, strided rows, a Gemma-style offset in gemma mode.
    _check_norm(device, dtype, (2, 3, 67), mode, offset=1.0 if mode == "gemma" else 0.0, pad=5)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rmsnorm_kernel_fp32_weight_low_precision_input(device, dtype):
    # Llama checkpoints often keep the norm weight in fp32: the output is then fp32, as in Hugging Face.
    _check_norm(device, dtype, (5, 40), "llama", offset=0.5, weight_dtype=torch.float32)
    _check_norm(device, dtype, (5, 40), "gemma", weight_dtype=torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (1, 300), (33, 16)], ids=str)
def test_rmsnorm_kernel_odd_shapes(device, shape):
    _check_norm(device, torch.bfloat16, shape, "llama")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("mode", ["llama", "gemma", "none"])
def test_rmsnorm_kernel_without_weight(device, mode):
    _check_norm(device, torch.float16, (4, 50), mode, use_weight=False)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["llama", "gemma"])
def test_fused_kernel_forward_backward(device, dtype, mode):
    _check_fused(device, dtype, (2, 3, 45), mode, offset=1.0 if mode == "gemma" else 0.0, pad=3)


@pytest.mark.parametrize("device", kernel_devices())
def test_fused_kernel_mixed_dtypes(device):
    # bf16 sublayer output into an fp32 residual stream: the sum and the norm run in fp32.
    fp32 = torch.float32
    _check_fused(device, torch.bfloat16, (4, 24), "none", weight_dtype=fp32, residual_dtype=fp32)


@pytest.mark.parametrize("device", kernel_devices())
def test_fused_kernel_only_one_output_used(device):
    x = randn(3, 20, dtype=torch.float32, device=device, scale=2.0)
    r = randn(3, 20, dtype=torch.float32, device=device)
    w = _weight(20, torch.float32, 0.0, device)
    for which in (0, 1):
        xo, ro, wo = (t.detach().clone().requires_grad_() for t in (x, r, w))
        xr, rr, wr = (t.detach().double().requires_grad_() for t in (x, r, w))
        with rotalabs_accel.use_backend("triton"):
            ours = rmsnorm_residual_fused(xo, ro, wo)[which]
        ref = add_rmsnorm_reference(xr, rr, wr)[which]
        ours.sum().backward()
        ref.sum().backward()
        for lo, lr in ((xo, xr), (ro, rr), (wo, wr)):
            # The reference leaves the weight's gradient None when only new_residual is used; ours is 0.
            expected = torch.zeros_like(lo.grad, dtype=torch.float64) if lr.grad is None else lr.grad
            torch.testing.assert_close(lo.grad.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", kernel_devices())
def test_kernel_empty_rows(device):
    w = _weight(16, torch.float16, 0.0, device)
    for shape in [(0, 16), (2, 0, 16)]:
        x = randn(*shape, dtype=torch.float16, device=device).requires_grad_()
        with rotalabs_accel.use_backend("triton"):
            y = rmsnorm(x, w)
            normed, new_residual = rmsnorm_residual_fused(x, x.detach(), w)
        assert y.shape == normed.shape == new_residual.shape == shape
        (y.sum() + normed.sum()).backward()
        assert x.grad.shape == shape
        assert torch.all(w.grad == 0)


@pytest.mark.parametrize("device", kernel_devices())
def test_kernel_expanded_grad_and_non_mergeable_dims(device):
    # .sum() hands backward an expanded (stride 0) gradient; a transposed input cannot be viewed as rows.
    x = randn(6, 4, 32, device=device).transpose(0, 1).requires_grad_()
    w = _weight(32, torch.float32, 0.0, device)
    with rotalabs_accel.use_backend("triton"):
        y = rmsnorm(x, w)
    y.sum().backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rmsnorm_reference(xr, wr).sum().backward()
    torch.testing.assert_close(y.double(), rmsnorm_reference(xr, wr), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", kernel_devices())
def test_kernel_eps_none_and_large_eps(device):
    x = randn(3, 8, device=device, scale=1e-2)
    with rotalabs_accel.use_backend("triton"):
        for eps in (None, 0.5):
            resolved = torch.finfo(torch.float32).eps if eps is None else eps
            expected = rmsnorm_reference(x.double(), None, resolved)
            torch.testing.assert_close(rmsnorm(x, None, eps).double(), expected, rtol=1e-5, atol=1e-6)


def test_rows_are_viewed_not_copied():
    wide = torch.randn(4, 5, 80)
    x = wide[..., :64]
    rows = _rows(x)
    assert rows.shape == (20, 64) and rows.data_ptr() == x.data_ptr() and rows.stride() == (80, 1)


# ---------------------------------------------------------------------------------------------
# Every launch strategy, forced (the heuristic picks only one per shape)
# ---------------------------------------------------------------------------------------------


def _forced_configs():
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    config = k.RMSNormConfig
    # Small blocks so that every loop runs several times at 9 x 100 (4 "SMs" under the interpreter).
    fwd = [
        config("tile", 128, 4, block_m=4, programs_per_sm=1),
        config("tile", 128, 4, block_m=2, programs_per_sm=1, prefetch=True),
        config("chunked", 32, 4, programs_per_sm=1),
        config("chunked", 32, 4, programs_per_sm=1, prefetch=True),
        config("split", 32, 4),
        config("split", 16, 4, split_n=48),
        # 9 rows in groups of 2 (the last one padded), 2 splits of 64 columns; then 4 splits of 32
        config("lookback", 32, 4, split_n=64, group_rows=2),
        config("lookback", 32, 4, split_n=32, group_rows=4),
    ]
    bwd = [
        config("tile", 128, 4, block_m=2, programs_per_sm=1),
        config("tile", 128, 4, block_m=1, programs_per_sm=1, prefetch=True),
        config("split", 32, 4),
    ]
    return k, fwd, bwd


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("residual", [False, True])
def test_every_strategy(device, residual):
    k, fwd, bwd = _forced_configs()
    m, n, mode, offset = 9, 100, "llama", 0.25
    dtype = torch.bfloat16
    x = randn(m, n + 7, dtype=dtype, device=device)[:, :n]
    r = randn(m, n, dtype=dtype, device=device) if residual else None
    w = _weight(n, dtype, offset, device).detach()
    s64 = x.double() + (r.double() if residual else 0)
    ref = rmsnorm_reference(s64, w.double(), EPS, offset=offset, casting_mode=mode)
    s_low = (x + r) if residual else x
    base = rmsnorm_reference(s_low, w, EPS, offset=offset, casting_mode=mode)
    for cfg in fwd:
        y, s, rstd = k.rmsnorm_forward(x, w, EPS, offset, mode, residual=r, config=cfg)
        assert_within_torch_error(y, base, ref, dtype, f"forward {cfg}")
        expected_rstd = torch.rsqrt(s_low.double().pow(2).mean(-1) + EPS)
        torch.testing.assert_close(rstd.double(), expected_rstd, rtol=1e-5, atol=0)
        if residual:
            assert torch.equal(s, x + r)
        # Inference skips the rstd store: same outputs.
        y2, s2, rstd2 = k.rmsnorm_forward(x, w, EPS, offset, mode, residual=r, store_rstd=False, config=cfg)
        assert rstd2 is None and torch.equal(y2, y) and (not residual or torch.equal(s2, s))
    # Backward from the low-precision input the forward saw; dresidual exercises the fused path.
    x64 = s_low.double().requires_grad_()
    w64 = w.double().requires_grad_()
    grad = randn(m, n, dtype=dtype, device=device)
    dres = randn(m, n, dtype=dtype, device=device) if residual else None
    rmsnorm_reference(x64, w64, EPS, offset=offset, casting_mode=mode).backward(grad.double())
    xb, wb = s_low.detach().clone().requires_grad_(), w.clone().requires_grad_()
    rmsnorm_reference(xb, wb, EPS, offset=offset, casting_mode=mode).backward(grad)
    dx_ref = x64.grad + (dres.double() if residual else 0)
    dx_base = xb.grad + (dres if residual else 0)
    _, _, rstd = k.rmsnorm_forward(s_low, w, EPS, offset, mode)
    for cfg in bwd:
        dx, dw = k.rmsnorm_backward(grad, s_low, w, rstd, offset, mode, dresidual=dres, config=cfg)
        assert_within_torch_error(dx, dx_base, dx_ref, dtype, f"dx {cfg}")
        assert_within_torch_error(dw, wb.grad, w64.grad, dtype, f"dw {cfg}")
        _, dw_none = k.rmsnorm_backward(grad, s_low, w, rstd, offset, mode, compute_dw=False, config=cfg)
        assert dw_none is None


# ---------------------------------------------------------------------------------------------
# The backward is the exact derivative of the forward as computed, rounding points included
# ---------------------------------------------------------------------------------------------


def _rounded_normalized(x, rstd, mode):
    """What the forward multiplies the weight by, evaluated with PyTorch's own (round-to-nearest) casts."""
    xf = x.float()
    if mode == "none":
        rstd = rstd.to(x.dtype).float()
    n = xf * rstd[:, None]  # one fp32 product, as in the kernel
    return n if mode == "gemma" else n.to(x.dtype).float()


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("mode", ["llama", "gemma", "none"])
def test_backward_matches_the_forward_rounding_points(device, mode):
    # An fp32 weight keeps dW unrounded, so it can be compared with its float64 evaluation to fp32
    # accuracy: dW = sum over rows of dy * normalized(x), where normalized(x) is rounded to bf16
    # exactly where the forward rounds it (llama, none) or not at all (gemma). A kernel that rounds
    # differently (a different point, or truncation instead of round-to-nearest) is off by ~1e-3.
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    m, n, offset = 24, 48, 0.5
    x = randn(m, n, dtype=torch.bfloat16, device=device)
    w = _weight(n, torch.float32, offset, device).detach()
    dy = randn(m, n, dtype=torch.float32, device=device)
    _, _, rstd = k.rmsnorm_forward(x, w, EPS, offset, mode)
    dx, dw = k.rmsnorm_backward(dy, x, w, rstd, offset, mode)
    normalized = _rounded_normalized(x, rstd, mode).double()
    expected_dw = (dy.double() * normalized).sum(0)
    torch.testing.assert_close(dw.double(), expected_dw, rtol=2e-5, atol=1e-5)
    # dx: d/dx of x * rstd(x) applied to u = dy * (offset + w), in float64 from the saved rstd; one
    # final rounding to bf16.
    r64 = rstd.double()[:, None]
    u = dy.double() * (offset + w.double())
    xn = x.double() * r64
    expected_dx = r64 * (u - xn * (u * xn).mean(-1, keepdim=True))
    assert rel_err(dx, expected_dx) <= 2.0**-8


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("mode", ["llama", "none"])
def test_low_precision_weight_gradient_no_worse_than_pytorch(device, mode):
    # Few rows of head_dim-sized vectors (Qwen3's q_norm/k_norm), bf16 everywhere. The kernel keeps
    # dy * normalized(x) in fp32 where PyTorch rounds every product to bf16, so over several draws its
    # dW error must not exceed PyTorch's (measured: ~0.85x). The factor-2 rule cannot see a 1.3x
    # regression such as round-toward-zero casts; this does.
    ratios = []
    for m, n in ((40, 16), (64, 64), (64, 256)):
        for _ in range(4):
            x = randn(m, n, dtype=torch.bfloat16, device=device)
            w = _weight(n, torch.bfloat16, 0.0, device)
            grad = randn(m, n, dtype=torch.bfloat16, device=device)

            def ours(xl, wl):
                with rotalabs_accel.use_backend("triton"):
                    return rmsnorm(xl, wl, EPS, casting_mode=mode)

            def reference(xl, wl):
                return rmsnorm_reference(xl, wl, EPS, casting_mode=mode)

            (_, wo), yo = _run(ours, [x, w])
            (_, wb), yb = _run(reference, [x, w])
            (_, wr), yr = _run(reference, [x, w], torch.float64)
            yo.backward(grad)
            yb.backward(grad)
            yr.backward(grad.double())
            ratios.append(rel_err(wo.grad, wr.grad) / rel_err(wb.grad, wr.grad))
    geo_mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    assert geo_mean <= 1.05, f"dW error {geo_mean:.2f}x PyTorch's (per draw: {[round(r, 2) for r in ratios]})"


def test_heuristic_tables_and_candidates(monkeypatch):
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    # A row-bounded entry serves row counts up to its bound; larger inputs fall through to the next.
    table = {2: ((4096, 4096, 2, 4, 0, False), (4096, 0, 1, 8, 2, True)), 4: k.FWD_TILE_TABLE[4]}
    monkeypatch.setattr(k, "FWD_TILE_TABLE", table)
    small, large = k.forward_config(4096, 3000, 2, 132), k.forward_config(4097, 3000, 2, 132)
    assert (small.block_m, small.num_warps, small.programs_per_sm) == (2, 4, 0)
    assert (large.block_m, large.num_warps, large.programs_per_sm, large.prefetch) == (1, 8, 2, True)
    assert k.forward_config(1, 3000, 2, 132).block_m == 1  # never more rows per tile than there are
    assert k.forward_config(4096, 65536, 2, 132) == k.FWD_WIDE
    # 2-byte rows past 65536 (still chunked) take twice the chunk; 4-byte rows of that width do not
    assert k.forward_config(2048, 131072, 2, 132) == k.FWD_WIDER != k.FWD_WIDE
    assert k.FWD_WIDER.block_n == 2 * k.FWD_WIDE.block_n
    assert k.forward_config(2048, 65537, 2, 132) == k.FWD_WIDER
    assert k.forward_config(2048, 65536, 4, 132) == k.FWD_WIDE
    assert k.forward_config(2048, 131072, 2, 132, residual=True) == k.FWD_WIDE_ADD
    # Rows too wide for one per SM to stay in L2 take the lookback forward; narrower ones stay chunked.
    assert k.forward_config(1024, 262144, 2, 132) == k.FWD_VERY_WIDE
    assert k.forward_config(1024, 131072, 4, 132) == k.FWD_VERY_WIDE
    assert k.forward_config(1024, 65536, 4, 132) == k.FWD_WIDE
    assert k.forward_config(64, 262144, 2, 132) == k.FWD_WIDE_FEW_ROWS
    assert k.forward_config(64, 65536, 2, 132) == k.FWD_WIDE_FEW_ROWS
    # The fused forward moves twice the bytes per row and has its own wide-row entry; very wide rows
    # take the lookback forward with or without a residual.
    assert k.forward_config(4096, 65536, 2, 132, residual=True) == k.FWD_WIDE_ADD != k.FWD_WIDE
    assert k.forward_config(1024, 262144, 2, 132, residual=True) == k.FWD_VERY_WIDE
    assert k.forward_config(64, 65536, 2, 132, residual=True) == k.FWD_WIDE_FEW_ROWS
    assert k.candidate_configs("fwd", 4096, 65536, residual=True)[0] == k.FWD_WIDE_ADD
    # The sweep's candidates: the heuristic first, no duplicates, and every kernel variant present.
    for direction, shape in (("fwd", (4096, 4096)), ("fwd", (1024, 262144)), ("bwd", (4096, 8192))):
        configs = k.candidate_configs(direction, *shape)
        pick = (k.forward_config if direction == "fwd" else k.backward_config)(*shape, 2, 132)
        assert configs[0] == pick and len(set(configs)) == len(configs)
    strategies = {c.strategy for c in k.candidate_configs("fwd", 1024, 262144)}
    assert strategies == {"chunked", "lookback", "coop", "split"}
    # coop's programs wait for each other: never a candidate where the interpreter runs them in turn
    interpreted = {c.strategy for c in k.candidate_configs("fwd", 1024, 262144, 2, k._INTERPRETER_SMS)}
    assert interpreted == {"chunked", "lookback", "split"}
    tiles = k.candidate_configs("fwd", 4096, 4096)
    assert any(c.programs_per_sm == 0 for c in tiles) and any(c.programs_per_sm > 0 for c in tiles)


@pytest.mark.parametrize("device", kernel_devices())
def test_wide_fused_forward_heuristic(device):
    # Enough rows for one per SM and rows past the tile range: the fused forward's own chunked entry,
    # whose chunks (three here, the last one ragged) are checked end to end, gradients included.
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    sms = k._sm_count(0 if device == "cuda" else -1)
    m, n = sms, 40000
    assert k.forward_config(m, n, 2, sms, residual=True) == k.FWD_WIDE_ADD
    _check_fused(device, torch.bfloat16, (m, n), "llama", pad=8)


@pytest.mark.parametrize("device", kernel_devices())
def test_wider_forward_heuristic(device):
    # 2-byte rows past 65536 with a row per SM: the chunked forward with 16384-wide chunks (five here,
    # the last one ragged; pass 2's first chunk is loaded before the row's sum is reduced), checked end
    # to end, gradients included.
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    sms = k._sm_count(0 if device == "cuda" else -1)
    m, n = sms, 70000
    assert k.forward_config(m, n, 2, sms) == k.FWD_WIDER
    _check_norm(device, torch.bfloat16, (m, n), "llama", pad=8)


@pytest.mark.parametrize("device", kernel_devices())
def test_weight_gradient_is_deterministic(device):
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    x = randn(40, 64, dtype=torch.bfloat16, device=device)
    w = _weight(64, torch.float32, 0.0, device).detach()
    grad = randn(40, 64, dtype=torch.float32, device=device)
    _, _, rstd = k.rmsnorm_forward(x, w, EPS, 0.0, "llama")
    first = k.rmsnorm_backward(grad, x, w, rstd, 0.0, "llama")[1]
    again = k.rmsnorm_backward(grad, x, w, rstd, 0.0, "llama")[1]
    assert torch.equal(first, again)


# ---------------------------------------------------------------------------------------------
# Dispatch and validation
# ---------------------------------------------------------------------------------------------


def test_cpu_default_runs_reference():
    x, w = torch.randn(3, 16), torch.randn(16)
    with rotalabs_accel.use_backend("auto"):
        y = rmsnorm(x, w, offset=0.5, casting_mode="gemma")
    assert torch.equal(y, rmsnorm_reference(x, w, offset=0.5, casting_mode="gemma"))
    normed, new_residual = rmsnorm_residual_fused(x, x, w)
    assert torch.equal(new_residual, x + x) and torch.equal(normed, rmsnorm_reference(x + x, w))


def test_float64_has_no_kernel():
    x, w = torch.randn(2, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert torch.equal(rmsnorm(x, w), rmsnorm_reference(x, w))
    if rotalabs_accel.is_triton_available():
        with rotalabs_accel.use_backend("triton"), pytest.raises(NotImplementedError, match="float64"):
            rmsnorm(x)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: rmsnorm([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: rmsnorm(torch.ones(2, 4), [1.0] * 4), TypeError, "weight must be a torch.Tensor"),
        (lambda: rmsnorm(torch.ones(2, 4, dtype=torch.int32)), TypeError, "x must have a floating-point"),
        (lambda: rmsnorm(torch.tensor(1.0)), ValueError, "at least one dimension"),
        (lambda: rmsnorm(torch.ones(2, 4), torch.ones(5)), ValueError, r"shape \(4,\).*got \(5,\)"),
        (lambda: rmsnorm(torch.ones(2, 4), torch.ones(4, 1)), ValueError, "weight must have shape"),
        (lambda: rmsnorm(torch.ones(2, 4), torch.ones(4, dtype=torch.int64)), TypeError, "weight must have"),
        (lambda: rmsnorm(torch.ones(2, 4), torch.ones(4), casting_mode="fp32"), ValueError, "casting_mode"),
        (lambda: rmsnorm(torch.ones(2, 4), offset=1.0), ValueError, "weight is None"),
        (lambda: rmsnorm(torch.ones(2, 4), torch.ones(4, device="meta")), ValueError, "one device"),
        (lambda: rmsnorm_residual_fused(torch.ones(2, 4), torch.ones(3, 4)), ValueError, "residual must"),
        (lambda: rmsnorm_residual_fused(torch.ones(2, 4), None), TypeError, "residual must be a torch"),
        (lambda: TritonRMSNorm((4, 4)), ValueError, "hidden_size must be one int"),
        (lambda: TritonRMSNorm(4, casting_mode="x"), ValueError, "casting_mode"),
    ],
)
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# The repeat path: an inference call of a layout that ran the kernel before skips the full checks
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def repeat_table(monkeypatch):
    """``functional.normalization._REPEAT``, emptied for the test (and restored after it)."""
    monkeypatch.setattr(normalization, "_REPEAT", {})
    return normalization._REPEAT


def _full_path_only(monkeypatch):
    """Make the repeat path unavailable: every call takes the full checks."""
    monkeypatch.setattr(normalization, "_repeat_call", lambda *args: None)


def _poison(table):
    """Make every remembered layout's launch fail, so a call that takes the repeat path says so."""
    for key, (device, plan, _, eps_none) in list(table.items()):
        def refuse(*args):
            raise AssertionError("the repeat path was taken")

        table[key] = (device, plan, refuse, eps_none)


REPEAT_LAYOUTS = {
    # name: (x's shape, row padding (a row-strided slice of a wider tensor), weight?, eps)
    "2-D": ((5, 48), 0, True, EPS),
    "3-D contiguous": ((2, 3, 40), 0, True, EPS),
    "2-D row-strided": ((4, 40), 24, True, EPS),
    "1-D": ((40,), 0, True, EPS),
    "no weight": ((3, 64), 0, False, EPS),
    "eps=None": ((3, 32), 0, True, None),
}


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["llama", "gemma", "none"])
@pytest.mark.parametrize("layout", list(REPEAT_LAYOUTS))
def test_repeat_path_gives_the_full_paths_bits(device, dtype, mode, layout, repeat_table, monkeypatch):
    shape, pad, use_weight, eps = REPEAT_LAYOUTS[layout]
    n = shape[-1]
    offset = 0.5 if use_weight and mode == "gemma" else 0.0

    def fresh():
        x = randn(*shape[:-1], n + pad, dtype=dtype, device=device)[..., :n]
        w = (randn(n, device=device) * 0.5 + 1.0).to(dtype) if use_weight else None
        return x, w

    with rotalabs_accel.use_backend("triton"), torch.no_grad():
        rmsnorm(*fresh(), eps, offset=offset, casting_mode=mode)
        assert len(repeat_table) == 1, "an inference call of this layout should be remembered"
        x, w = fresh()
        with pytest.MonkeyPatch.context() as patch:  # the repeat path must not need the full checks
            patch.setattr(normalization, "_validate", None)
            patch.setattr(normalization, "_common_call", None)
            y = rmsnorm(x, w, eps, offset=offset, casting_mode=mode)
        _full_path_only(monkeypatch)
        expected = rmsnorm(x, w, eps, offset=offset, casting_mode=mode)
    assert y.shape == expected.shape == x.shape and y.dtype == expected.dtype
    assert y.is_contiguous() and expected.is_contiguous()  # a fresh dense output, whatever x's strides
    assert torch.equal(y, expected)
    reference = rmsnorm_reference(x.double(), None if w is None else w.double(),
                                  torch.finfo(torch.float32).eps if eps is None and dtype != torch.float64
                                  else eps, offset=offset, casting_mode=mode)
    assert rel_err(y, reference) < 1e-2  # the right function, not merely the same bits twice


@pytest.mark.parametrize("device", kernel_devices())
def test_repeat_path_declines_what_it_cannot_serve(device, repeat_table):
    """After a layout is remembered, every call the full path would treat differently still gets the
    full path: a recorded gradient, another backend, transforms, subclasses, other eps types, other
    devices, non-contiguous views of the same shape."""
    dtype = torch.bfloat16
    x, w = randn(6, 32, dtype=dtype, device=device), randn(32, dtype=dtype, device=device)
    with rotalabs_accel.use_backend("triton"), torch.no_grad():
        rmsnorm(x, w, EPS)
    assert len(repeat_table) == 1
    _poison(repeat_table)

    with rotalabs_accel.use_backend("triton"):
        xg = x.clone().requires_grad_()
        y = rmsnorm(xg, w, EPS)
        assert y.grad_fn is not None
        y.float().sum().backward()
        assert xg.grad is not None and xg.grad.shape == x.shape
    with rotalabs_accel.use_backend("torch"), torch.no_grad():
        assert torch.equal(rmsnorm(x, w, EPS), rmsnorm_reference(x, w, EPS))
    if device == "cpu":
        # CPU tensors run the kernels only when the triton backend is forced (under the interpreter)
        with rotalabs_accel.use_backend("auto"), torch.no_grad():
            assert torch.equal(rmsnorm(x, w, EPS), rmsnorm_reference(x, w, EPS))
    with rotalabs_accel.use_backend("triton"), torch.no_grad():
        param = torch.nn.Parameter(x.clone(), requires_grad=False)  # a subclass of Tensor
        assert rel_err(rmsnorm(param, w, EPS), rmsnorm_reference(x.double(), w.double(), EPS)) < 1e-2
        # an int eps, converted by the full path; the meta device (same get_device() as the CPU)
        assert rel_err(rmsnorm(x, w, 1), rmsnorm_reference(x.double(), w.double(), 1.0)) < 1e-2
        y_meta = rmsnorm(x.to("meta"), w.to("meta"), EPS)
        assert y_meta.is_meta and y_meta.shape == x.shape
        # the same shape and strides as the remembered x... but transposed data is another layout
        xt = randn(32, 6, dtype=dtype, device=device).t()
        assert rel_err(rmsnorm(xt, w, EPS), rmsnorm_reference(xt.double(), w.double(), EPS)) < 1e-2
        # a strided weight of the same shape
        w_strided = randn(64, dtype=dtype, device=device)[::2]
        y_strided = rmsnorm(x, w_strided, EPS)
        assert rel_err(y_strided, rmsnorm_reference(x.double(), w_strided.double(), EPS)) < 1e-2
        # bad arguments still raise, even for the remembered layout
        with pytest.raises(ValueError, match="casting_mode"):
            rmsnorm(x, w, EPS, casting_mode="fp32")
        with pytest.raises(ValueError, match="weight is None"):
            rmsnorm(x, None, EPS, offset=1.0)
    with rotalabs_accel.use_backend("triton"):
        with torch.autograd.forward_ad.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
            rmsnorm(x, w, EPS)
        with pytest.raises(RuntimeError, match="torch.func"):
            torch.func.vmap(lambda t: rmsnorm(t, w, EPS))(x.unsqueeze(0))


FUSED_REPEAT_LAYOUTS = {
    # name: (shape, x's row padding, residual dtype (None: x's), eps)
    "2-D": ((5, 48), 0, None, EPS),
    "3-D contiguous": ((2, 3, 40), 0, None, EPS),
    "2-D row-strided x": ((4, 40), 24, None, EPS),
    "float32 residual": ((3, 64), 0, torch.float32, EPS),
    "eps=None": ((3, 32), 0, None, None),
}


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", list(FUSED_REPEAT_LAYOUTS))
def test_fused_repeat_path_gives_the_full_paths_bits(device, dtype, layout, repeat_table, monkeypatch):
    shape, pad, residual_dtype, eps = FUSED_REPEAT_LAYOUTS[layout]
    n = shape[-1]

    def fresh():
        x = randn(*shape[:-1], n + pad, dtype=dtype, device=device)[..., :n]
        r = randn(*shape, dtype=residual_dtype or dtype, device=device)
        return x, r, (randn(n, device=device) * 0.5 + 1.0).to(dtype)

    with rotalabs_accel.use_backend("triton"), torch.no_grad():
        rmsnorm_residual_fused(*fresh(), eps)
        assert len(repeat_table) == 1, "an inference call of this layout should be remembered"
        x, r, w = fresh()
        with pytest.MonkeyPatch.context() as patch:  # the repeat path must not need the full checks
            patch.setattr(normalization, "_validate", None)
            patch.setattr(normalization, "_common_residual_call", None)
            y, s = rmsnorm_residual_fused(x, r, w, eps)
        _full_path_only(monkeypatch)
        y_full, s_full = rmsnorm_residual_fused(x, r, w, eps)
    assert y.shape == s.shape == y_full.shape == x.shape
    assert y.is_contiguous() and s.is_contiguous() and y_full.is_contiguous() and s_full.is_contiguous()
    assert y.dtype == y_full.dtype and s.dtype == s_full.dtype == torch.promote_types(dtype, r.dtype)
    assert torch.equal(y, y_full) and torch.equal(s, s_full)
    assert torch.equal(s, x + r)  # the new residual is the rounded sum, exactly
    eps_ref = torch.finfo(torch.float32).eps if eps is None else eps
    assert rel_err(y, rmsnorm_reference((x + r).double(), w.double(), eps_ref)) < 1e-2


@pytest.mark.parametrize("device", kernel_devices())
def test_fused_repeat_path_declines_a_recorded_gradient(device, repeat_table):
    x, r = (randn(4, 32, dtype=torch.bfloat16, device=device) for _ in range(2))
    w = randn(32, dtype=torch.bfloat16, device=device)
    with rotalabs_accel.use_backend("triton"), torch.no_grad():
        rmsnorm_residual_fused(x, r, w, EPS)
    assert len(repeat_table) == 1
    _poison(repeat_table)
    with rotalabs_accel.use_backend("triton"):
        rg = r.clone().requires_grad_()
        y, s = rmsnorm_residual_fused(x, rg, w, EPS)
        assert y.grad_fn is not None and s.grad_fn is not None
        (y.float().sum() + s.float().sum()).backward()
        assert rg.grad is not None and rg.grad.shape == r.shape
        with pytest.raises(ValueError, match="residual must"):
            rmsnorm_residual_fused(x, r[:2], w, EPS)
    with rotalabs_accel.use_backend("torch"), torch.no_grad():
        y, s = rmsnorm_residual_fused(x, r, w, EPS)
        assert torch.equal(s, x + r) and torch.equal(y, rmsnorm_reference(x + r, w, EPS))


@pytest.mark.parametrize("device", kernel_devices())
def test_repeat_path_serves_modules(device, repeat_table):
    """TritonRMSNorm's inference calls take the repeat path (its weight is a Parameter) and match the
    full path; a gradient-recording call of the same module does not."""
    norm = TritonRMSNorm(48, eps=None, casting_mode="gemma", offset=1.0, device=device, dtype=torch.float16)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5)
    x = randn(2, 3, 48, dtype=torch.float16, device=device)
    with rotalabs_accel.use_backend("triton"):
        with torch.no_grad():
            first = norm(x)
        assert len(repeat_table) == 1
        with torch.inference_mode():
            again = norm(x)
        assert torch.equal(first, again)
        _poison(repeat_table)
        y = norm(x)  # the weight requires grad: autograd, not the repeat path
        assert y.grad_fn is not None and torch.equal(y.detach(), first)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


def test_module_is_a_torch_rmsnorm_with_the_same_state_dict():
    norm = TritonRMSNorm(32)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert list(norm.state_dict()) == ["weight"] and torch.equal(norm.weight, torch.ones(32))
    source = torch.nn.RMSNorm(32)
    with torch.no_grad():
        source.weight.normal_()
    norm.load_state_dict(source.state_dict())
    assert torch.equal(norm.weight, source.weight)
    # A fresh Gemma-style module scales by one.
    assert torch.equal(TritonRMSNorm(8, offset=1.0).weight, torch.zeros(8))
    assert "casting_mode='llama'" in repr(norm)


def test_module_forward_matches_functional_and_fused_path():
    norm = TritonRMSNorm(24, eps=1e-5, offset=0.5, casting_mode="gemma")
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(2, 3, 24), torch.randn(2, 3, 24)
    assert torch.equal(norm(x), rmsnorm_reference(x, norm.weight, 1e-5, offset=0.5, casting_mode="gemma"))
    normed, new_residual = norm(x, r)
    assert torch.equal(new_residual, x + r)
    assert torch.equal(normed, rmsnorm_reference(x + r, norm.weight, 1e-5, offset=0.5, casting_mode="gemma"))


def test_module_uses_a_parametrized_or_swapped_weight():
    # forward reads the weight from the module's parameter dict; a parametrization (which moves it
    # behind a property) and torch.func.functional_call (which swaps the dict's entry) still count.
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    norm = TritonRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    raw = norm.weight.detach().clone()
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    other = torch.randn(16)
    swapped = torch.func.functional_call(norm, {"weight": other}, (x,))
    assert torch.equal(swapped, rmsnorm_reference(x, other, 1e-5))
    parametrize.register_parametrization(norm, "weight", Doubled())
    assert "weight" not in norm._parameters
    assert torch.equal(norm(x), rmsnorm_reference(x, 2 * raw, 1e-5))
    assert torch.equal(norm(x, r)[0], rmsnorm_reference(x + r, 2 * raw, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_from_torch_rmsnorm(dtype):
    for eps in (None, 1e-5):
        source = torch.nn.RMSNorm(40, eps=eps, dtype=dtype)
        with torch.no_grad():
            source.weight.normal_()
        norm = TritonRMSNorm.from_module(source)
        assert norm.eps == eps and norm.casting_mode == "gemma" and norm.weight.dtype == dtype
        x = randn(3, 40, dtype=dtype)
        torch.testing.assert_close(norm(x), source(x))
    no_affine = TritonRMSNorm.from_module(torch.nn.RMSNorm(8, elementwise_affine=False))
    assert no_affine.weight is None
    x = torch.randn(2, 8)
    torch.testing.assert_close(no_affine(x), torch.nn.RMSNorm(8, elementwise_affine=False)(x))
    with pytest.raises(ValueError, match="last dimension"):
        TritonRMSNorm.from_module(torch.nn.RMSNorm((4, 8)))
    ours = TritonRMSNorm(8, eps=1e-4, offset=1.0, casting_mode="none")
    copy = TritonRMSNorm.from_module(ours)
    assert (copy.eps, copy.offset, copy.casting_mode) == (1e-4, 1.0, "none")
    assert copy.weight is not ours.weight


def _hf(module_path, name):
    transformers = pytest.importorskip("transformers")
    del transformers
    import importlib

    return getattr(importlib.import_module(module_path), name)


@pytest.mark.parametrize(
    "module_path, name, kwargs, offset, mode",
    [
        ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", {}, 0.0, "llama"),
        ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", {}, 1.0, "gemma"),
        ("transformers.models.qwen3_next.modeling_qwen3_next", "Qwen3NextRMSNorm", {}, 1.0, "gemma"),
        ("transformers.models.gemma3n.modeling_gemma3n", "Gemma3nRMSNorm", {}, 0.0, "gemma"),
        # the weight multiplies the already cast output (the source mentions type_as, but not last)
        ("transformers.models.llama4.modeling_llama4", "Llama4TextRMSNorm", {}, 0.0, "llama"),
        # the product is cast last, with .to(input_dtype)
        ("transformers.models.olmo2.modeling_olmo2", "Olmo2RMSNorm", {}, 0.0, "gemma"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_from_hugging_face_module(module_path, name, kwargs, offset, mode, dtype):
    cls = _hf(module_path, name)
    source = cls(48, eps=1e-5, **kwargs).to(dtype)
    with torch.no_grad():
        source.weight.normal_()
    norm = TritonRMSNorm.from_module(source)
    assert (norm.offset, norm.casting_mode, norm.eps) == (offset, mode, 1e-5)
    assert norm.weight.dtype == dtype and torch.equal(norm.weight, source.weight)
    x = randn(2, 5, 48, dtype=dtype)
    expected = source(x)
    assert norm(x).dtype == expected.dtype
    torch.testing.assert_close(norm(x), expected)
    # And the state_dict goes both ways.
    fresh = TritonRMSNorm(48, offset=offset, casting_mode=mode, dtype=dtype)
    fresh.load_state_dict(source.state_dict())
    source.load_state_dict(fresh.state_dict())


@pytest.mark.parametrize(
    "module_path, name",
    [
        ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
        ("transformers.models.llama4.modeling_llama4", "Llama4TextRMSNorm"),
        ("transformers.models.olmo2.modeling_olmo2", "Olmo2RMSNorm"),
        ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm"),
    ],
)
def test_from_hugging_face_module_fp32_weight_bf16_input(module_path, name):
    # Mixed precision keeps the weight in fp32: the casting mode decides the output dtype and bits.
    source = _hf(module_path, name)(48, eps=1e-5)
    with torch.no_grad():
        source.weight.normal_()
    norm = TritonRMSNorm.from_module(source)
    x = randn(3, 48, dtype=torch.bfloat16, scale=3.0)
    expected = source(x)
    got = norm(x)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("make", [
    lambda: torch.nn.LayerNorm(16), lambda: torch.nn.LayerNorm(16, bias=False),
    lambda: torch.nn.GroupNorm(4, 16), lambda: torch.nn.BatchNorm1d(16),
    lambda: torch.nn.InstanceNorm1d(16, affine=True),
], ids=["LayerNorm", "LayerNorm-nobias", "GroupNorm", "BatchNorm1d", "InstanceNorm1d"])
def test_from_module_refuses_other_norms(make):
    with pytest.raises(ValueError, match="is not an RMSNorm"):
        TritonRMSNorm.from_module(make())


def test_from_module_refuses_mean_centering_and_bias():
    cohere = _hf("transformers.models.cohere.modeling_cohere", "CohereLayerNorm")(16)
    with pytest.raises(ValueError, match="subtracts a mean"):
        TritonRMSNorm.from_module(cohere)
    source = _hf("transformers.models.llama.modeling_llama", "LlamaRMSNorm")(16)
    source.bias = torch.nn.Parameter(torch.zeros(16))
    with pytest.raises(ValueError, match="has a bias"):
        TritonRMSNorm.from_module(source)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_eps_none_is_torchs_for_half_inputs(dtype):
    # nn.RMSNorm(eps=None) takes the epsilon of fp32 (the dtype it computes in), not of fp16 / bf16:
    # with small activations the difference is the whole result.
    source = torch.nn.RMSNorm(64, eps=None, dtype=dtype)
    with torch.no_grad():
        source.weight.normal_()
    x = randn(4, 64, dtype=dtype, scale=1e-2)
    expected = source(x)
    built = TritonRMSNorm(64, eps=None, casting_mode="gemma", dtype=dtype)
    for norm in (TritonRMSNorm.from_module(source), built):
        with torch.no_grad():
            norm.weight.copy_(source.weight)
        torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)
    for device in kernel_devices():
        if device == "none":
            continue
        with rotalabs_accel.use_backend("triton"):
            got = rmsnorm(x.to(device), source.weight.to(device), None, casting_mode="gemma")
        ref = rmsnorm_reference(x.double(), source.weight.double(), torch.finfo(torch.float32).eps,
                                casting_mode="gemma")
        assert_within_torch_error(got.cpu(), expected, ref, dtype, "eps=None")


@pytest.mark.parametrize("device", kernel_devices())
def test_none_mode_accumulates_squares_in_fp32(device):
    # |x| > 256 squares past fp16's range: both paths still return the normalized rows.
    x = randn(4, 64, dtype=torch.float16, scale=100.0, device=device)
    x[:, 0] = 300.0
    w = randn(64, dtype=torch.float16, device=device)
    with rotalabs_accel.use_backend("torch"):
        ref_path = rmsnorm(x, w, casting_mode="none")
    with rotalabs_accel.use_backend("triton"):
        kernel = rmsnorm(x, w, casting_mode="none")
    exact = rmsnorm_reference(x.double(), w.double(), 1e-6, casting_mode="none")
    assert torch.isfinite(ref_path).all() and ref_path.abs().max() > 1
    torch.testing.assert_close(kernel, ref_path, rtol=0, atol=0)
    torch.testing.assert_close(ref_path.double(), exact, rtol=4e-3, atol=1e-3)


@pytest.mark.parametrize("device", kernel_devices())
def test_zero_width_with_zero_eps(device):
    x = torch.randn(3, 0, device=device, requires_grad=True)
    with rotalabs_accel.use_backend("triton"):
        y = rmsnorm(x, None, eps=0.0)
    y.sum().backward()
    assert y.shape == (3, 0) and x.grad.shape == (3, 0)


def test_from_weightless_hugging_face_module():
    cls = _hf("transformers.models.gemma3n.modeling_gemma3n", "Gemma3nRMSNorm")
    source = cls(16, eps=1e-6, with_scale=False)
    source.dim = 16  # the module keeps no record of its size without a weight
    norm = TritonRMSNorm.from_module(source)
    assert norm.weight is None and norm.offset == 0.0
    x = torch.randn(3, 16)
    torch.testing.assert_close(norm(x), source(x))
    with pytest.raises(ValueError, match="no weight and no hidden_size"):
        TritonRMSNorm.from_module(cls(16, with_scale=False))


def test_from_module_keeps_requires_grad_and_rejects_non_norms():
    source = _hf("transformers.models.llama.modeling_llama", "LlamaRMSNorm")(8)
    source.weight.requires_grad_(False)
    assert not TritonRMSNorm.from_module(source).weight.requires_grad
    with pytest.raises(ValueError, match="must be 1-D"):
        TritonRMSNorm.from_module(torch.nn.Linear(8, 8, bias=False))
    with pytest.raises(ValueError, match="has a bias"):
        TritonRMSNorm.from_module(torch.nn.Linear(8, 8))
    bare = torch.nn.Module()
    bare.weight = torch.nn.Parameter(torch.ones(8))
    with pytest.raises(ValueError, match="neither a variance_epsilon nor an eps"):
        TritonRMSNorm.from_module(bare)


def test_spec_example_runs_on_cpu():
    norm_pytorch = torch.nn.RMSNorm(64)
    norm_triton = TritonRMSNorm(64)
    x = torch.randn(2, 16, 64)
    torch.testing.assert_close(norm_triton(x), norm_pytorch(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# GPU only: the sizes, every tuned configuration, devices, CUDA graphs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "shape", [(4096, 4096), (1000, 8192), (257, 40000), (3, 262144), (150, 131072)], ids=str
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_large_shapes(shape, dtype):
    _check_norm("cuda", dtype, shape, "llama", pad=64)
    _check_fused("cuda", dtype, shape, "gemma", offset=1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("shape", [(1024, 4096), (512, 8192), (300, 65536)], ids=str)
def test_gpu_every_candidate_config(direction, shape):
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    m, n = shape
    dtype = torch.bfloat16
    x = randn(m, n, dtype=dtype, device="cuda")
    w = _weight(n, dtype, 0.0, "cuda").detach()
    ref = rmsnorm_reference(x.double(), w.double(), EPS)
    base = rmsnorm_reference(x, w, EPS)
    grad = randn(m, n, dtype=dtype, device="cuda")
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    rmsnorm_reference(x64, w64, EPS).backward(grad.double())
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    rmsnorm_reference(xb, wb, EPS).backward(grad)
    _, _, rstd = k.rmsnorm_forward(x, w, EPS, 0.0, "llama")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    compiled = set()
    for cfg in k.candidate_configs(direction, m, n, 2, sms):
        persistent = cfg.programs_per_sm > 0
        variant = (cfg.strategy, cfg.block_n, cfg.num_warps, cfg.block_m, cfg.prefetch, persistent)
        if variant in compiled and cfg.strategy != "lookback":
            continue  # the grid size alone does not change the kernel
        compiled.add(variant)
        if direction == "fwd":
            y, _, _ = k.rmsnorm_forward(x, w, EPS, 0.0, "llama", config=cfg)
            assert_within_torch_error(y, base, ref, dtype, f"forward {cfg}")
        else:
            dx, dw = k.rmsnorm_backward(grad, x, w, rstd, 0.0, "llama", config=cfg)
            assert_within_torch_error(dx, xb.grad, x64.grad, dtype, f"dx {cfg}")
            assert_within_torch_error(dw, wb.grad, w64.grad, dtype, f"dw {cfg}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    "shape, split_n, group_rows",
    [((1000, 40000), 16384, 7), ((64, 262144), 32768, 0), ((5, 70000), 8192, 2)],
    ids=str,
)
def test_gpu_lookback_forward(shape, split_n, group_rows, residual):
    # Many groups, splits that do not divide the row, a padded last group; programs really run
    # concurrently here, so the ordering and the waiting are exercised. Repeats are bitwise equal
    # (the partial sums are reduced in a fixed order whatever the timing).
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    m, n = shape
    dtype = torch.bfloat16
    cfg = k.RMSNormConfig("lookback", 4096, 8, split_n=split_n, group_rows=group_rows)
    x = randn(m, n, dtype=dtype, device="cuda")
    r = randn(m, n, dtype=dtype, device="cuda") if residual else None
    w = _weight(n, dtype, 0.0, "cuda").detach()
    s = x + r if residual else x
    expected = rmsnorm_reference(s.double(), w.double(), EPS)
    base = rmsnorm_reference(s, w, EPS)
    first = None
    for _ in range(3):
        y, s_out, rstd = k.rmsnorm_forward(x, w, EPS, 0.0, "llama", residual=r, config=cfg)
        assert_within_torch_error(y, base, expected, dtype, f"lookback {shape}")
        if residual:
            assert torch.equal(s_out, s)
        if first is None:
            first = (y, rstd)
        assert torch.equal(y, first[0]) and torch.equal(rstd, first[1])


def test_coop_strategy_is_refused_off_the_gpu():
    # Under the interpreter the first slice of a row would wait forever for the next one.
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    x = randn(3, 300)
    with pytest.raises(ValueError, match="'coop' strategy needs a GPU"):
        k.rmsnorm_forward(x, None, EPS, 0.0, "llama", config=k.RMSNormConfig("coop", 128, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    "shape, block_n, num_warps",
    [((1000, 40000), 8192, 16), ((64, 262144), 16384, 32), ((5, 70000), 4096, 8), ((3000, 65536), 8192, 16)],
    ids=str,
)
def test_gpu_coop_forward(shape, block_n, num_warps, residual):
    # Slices that do not divide the row, more programs than fit on the GPU at once (the waiting and
    # the ticket order are exercised), bitwise-equal repeats (partials summed in a fixed order).
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    m, n = shape
    dtype = torch.bfloat16
    cfg = k.RMSNormConfig("coop", block_n, num_warps)
    x = randn(m, n, dtype=dtype, device="cuda")
    r = randn(m, n, dtype=dtype, device="cuda") if residual else None
    w = _weight(n, dtype, 0.0, "cuda").detach()
    s = x + r if residual else x
    expected = rmsnorm_reference(s.double(), w.double(), EPS)
    base = rmsnorm_reference(s, w, EPS)
    rstd_ref = torch.rsqrt(s.double().pow(2).mean(-1) + EPS)
    first = None
    for _ in range(3):
        y, s_out, rstd = k.rmsnorm_forward(x, w, EPS, 0.0, "llama", residual=r, config=cfg)
        assert_within_torch_error(y, base, expected, dtype, f"coop {shape}")
        torch.testing.assert_close(rstd.double(), rstd_ref, rtol=1e-5, atol=0)
        if residual:
            assert torch.equal(s_out, s)
        if first is None:
            first = (y, rstd)
        assert torch.equal(y, first[0]) and torch.equal(rstd, first[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_weight_gradient_bitwise_deterministic():
    norm = TritonRMSNorm(4096, device="cuda", dtype=torch.bfloat16)
    x = randn(8192, 4096, dtype=torch.bfloat16, device="cuda").requires_grad_()
    grad = randn(8192, 4096, dtype=torch.bfloat16, device="cuda")
    grads = []
    for _ in range(3):
        norm.weight.grad = None
        norm(x).backward(grad)
        grads.append(norm.weight.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_second_device():
    torch.cuda.set_device(0)
    norm = TritonRMSNorm(1024, device="cuda:1", dtype=torch.bfloat16)
    x = randn(64, 1024, dtype=torch.bfloat16, device="cuda:1").requires_grad_()
    y = norm(x)
    y.float().sum().backward()
    assert torch.cuda.current_device() == 0 and y.device == x.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(y, rmsnorm_reference(x.detach(), norm.weight.detach()), rtol=0.02, atol=0.02)
    normed, _ = norm(x.detach(), x.detach())
    expected = rmsnorm_reference(2 * x.detach(), norm.weight.detach())
    torch.testing.assert_close(normed, expected, rtol=0.02, atol=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_capture():
    norm = TritonRMSNorm(2048, device="cuda", dtype=torch.bfloat16)
    x = randn(256, 2048, dtype=torch.bfloat16, device="cuda")
    r = randn(256, 2048, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # warm up (compiles) outside the capture
            norm(x)
            norm(x, r)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        y = norm(x)
        normed, new_residual = norm(x, r)
    x.copy_(randn(256, 2048, dtype=torch.bfloat16, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        assert torch.equal(y, norm(x))
        assert torch.equal(normed, norm(x, r)[0]) and torch.equal(new_residual, x + r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_hidden_sizes_without_cliff():
    # Every size from tiny to past the register-tile limit, including non powers of two.
    for n in [1, 7, 96, 1000, 3000, 5120, 12288, 16385, 20000, 32769, 70000]:
        m = max(1, min(256, 2**22 // n))
        _check_norm("cuda", torch.bfloat16, (m, n), "llama")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_direct_launch_respects_alignment_and_sizes():
    # Alternate inputs that Triton specializes differently; each must get its own compiled kernel.
    wide = randn(64, 4096 + 8, dtype=torch.bfloat16, device="cuda")
    w = _weight(4096, torch.bfloat16, 0.0, "cuda").detach()
    for _ in range(2):
        for x in (wide[:, :4096], wide[:, 1:4097], wide[:1, 3:4099], wide[:17, 8:4104], wide[:16, :4096]):
            expected = rmsnorm_reference(x.double(), w.double())
            base = rmsnorm_reference(x, w)
            with torch.no_grad():
                ours = rmsnorm(x, w)
            assert_within_torch_error(ours, base, expected, torch.bfloat16, f"{x.shape} {x.stride()}")
    # The direct launch is in use (not silently disabled by a calling-convention mismatch), and the
    # shapes' launch plans hold one compiled entry per alignment seen.
    launch = pytest.importorskip("rotalabs_accel.triton_kernels._launch")
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    assert launch.direct_launch_enabled()
    entries = [len(site._entries) for plan in k._FWD_PLANS.values() for site in plan.sites]
    assert max(entries) >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_very_wide_rows_take_the_lookback_forward(residual):
    # The default heuristic's lookback path, end to end through the public functions, with autograd.
    k = pytest.importorskip("rotalabs_accel.triton_kernels.rmsnorm")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dtype = torch.bfloat16
    n = 2 * k.LOOKBACK_MIN_BYTES_IN_FLIGHT // (2 * sms) + 1000  # odd width, past the threshold
    m = sms + 3
    assert k.forward_config(m, n, 2, sms) == k.FWD_VERY_WIDE
    x = randn(m, n, dtype=dtype, device="cuda")
    r = randn(m, n, dtype=dtype, device="cuda") if residual else None
    w = _weight(n, dtype, 0.0, "cuda").detach()
    s = x + r if residual else x
    expected = rmsnorm_reference(s.double(), w.double(), EPS)
    base = rmsnorm_reference(s, w, EPS)
    if residual:
        y, s_out = rmsnorm_residual_fused(x, r, w, EPS)
        assert torch.equal(s_out, s)
    else:
        y = rmsnorm(x, w, EPS)
    assert_within_torch_error(y, base, expected, dtype, f"very wide {m}x{n}")


def test_common_call_check_accepts_only_what_validation_accepts():
    # The functional layer skips its full validation for calls the quick check accepts: every such call
    # must be one the validation passes with a kernel dtype, and the quick check must accept the plain one.
    from rotalabs_accel.functional import normalization as fn

    bf = torch.bfloat16
    x = torch.randn(3, 8, dtype=bf)
    cases = [
        (x, torch.randn(8, dtype=bf), 0.0, "llama"),
        (x, torch.nn.Parameter(torch.randn(8)), 1.0, "gemma"),
        (x, None, 0.0, "none"),
        (x, None, 1.0, "llama"),  # offset without a weight
        (x, torch.randn(7, dtype=bf), 0.0, "llama"),  # wrong width
        (x, torch.randn(1, 8, dtype=bf), 0.0, "llama"),  # 2-D weight
        (x, torch.randn(8, dtype=bf, device="meta"), 0.0, "llama"),  # another device
        (x, torch.randn(8, dtype=torch.float64), 0.0, "llama"),  # no kernel dtype
        (x.double(), torch.randn(8, dtype=bf), 0.0, "llama"),
        (torch.tensor(1.0, dtype=bf), None, 0.0, "llama"),  # 0-d
        (x, torch.randn(8, dtype=bf), 0.0, "nope"),  # unknown casting mode
        (x.to(torch.int32), None, 0.0, "llama"),
        (x.view(3, 8, 1)[..., 0], None, 0.0, "llama"),  # a view is a plain tensor too
    ]
    accepted = []
    for x_, w_, offset, mode in cases:
        if fn._common_call(x_, w_, offset, mode):
            accepted.append((x_.dtype, mode))
            fn._validate("rmsnorm", x_, w_, None, offset, mode)  # must not raise
            assert fn._kernel_reason(x_, w_) is None
    assert len(accepted) == 4
