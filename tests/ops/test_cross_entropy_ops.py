"""Cross-entropy: Triton kernels (interpreter on CPU, real on CUDA), autograd, custom ops, compile.

Oracle: the float64 reference (``rotalabs_accel.reference.cross_entropy``) on the same logits.
Baseline: what PyTorch computes in the logits' dtype, ``F.cross_entropy`` (plus
``z * logsumexp(x)**2`` for the z-loss) and its autograd gradients.

Tolerance (tests/helpers.py): ``err(ours) <= FACTOR * err(baseline) + unit_roundoff / 2``.

=========  ======  ===============================================================================
dtype      FACTOR  why
=========  ======  ===============================================================================
float16    2       ours accumulates in fp32 and rounds the loss / each gradient once; PyTorch rounds
                   its log-softmax to the dtype before picking and summing, so ours is the smaller
bfloat16   2       as float16, at bfloat16's coarser unit roundoff
float32    8       both are a few fp32 roundings (~1e-7), but the GPU evaluates ``exp2`` with the
                   approximate ``ex2`` instruction (a few ulps) where PyTorch uses an accurate ``expf``
=========  ======  ===============================================================================

A wrong target column, a dropped smoothing or z-loss term, a wrong mean divisor or a gradient for an
ignored row is off by 1e-2..1 relative, far above every bound.

The interpreter tests use vocabularies of 300 (not a power of two) with the launch tables forced to
64-column chunks (``small_chunks``), so the online log-sum-exp crosses chunk boundaries and ends on a
partial chunk, as it does at 128256 on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rotalabs_accel
from helpers import FLOAT_DTYPES, assert_within_torch_error, kernel_devices, randn
from rotalabs_accel.functional.loss import cross_entropy
from rotalabs_accel.reference.cross_entropy import cross_entropy_reference

FACTOR = {torch.float32: 8.0, torch.float16: 2.0, torch.bfloat16: 2.0}
VOCAB = 300

pytestmark = pytest.mark.interpreter


def _kernels():
    from rotalabs_accel.triton_kernels import cross_entropy as k

    return k


@pytest.fixture
def small_chunks(monkeypatch):
    """Launch tables with 64-column chunks: a 300-class row takes 5 chunks, the last one partial."""
    k = _kernels()
    monkeypatch.setattr(k, "FORWARD_TABLE", ((None, 64, 2),))
    monkeypatch.setattr(k, "BACKWARD_TABLE", ((None, 64, 2),))


@pytest.fixture
def launches(monkeypatch):
    """Record every kernel launch ``(kernel name, grid, args, meta)`` and run it."""
    k = _kernels()
    calls = []
    original = k.launch

    def recording(kernel, grid, args, num_warps, num_stages=None, **meta):
        name = kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__
        calls.append((name, grid, args, meta))
        original(kernel, grid, args, num_warps, num_stages, **meta)

    monkeypatch.setattr(k, "launch", recording)
    return calls


def _targets(n, vocab, device, ignored=(1,)):
    t = torch.randint(0, vocab, (n,), device=device)
    for i in ignored:
        if i < n:
            t[i] = -100
    return t


def _baseline(x, target, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """PyTorch in the logits' dtype: F.cross_entropy (+ z * logsumexp**2 on counted rows).

    With label smoothing over a large vocabulary, PyTorch's fp16 CUDA path sums V log-probabilities
    in fp16 and overflows to inf (on the CPU it accumulates in fp32); a user would then upcast, as
    Hugging Face does, so the baseline is then the fp32 computation rounded to the logits' dtype.
    """
    if x.dtype == torch.float16 and label_smoothing and x.is_cuda:
        return _baseline(x.float(), target, reduction, label_smoothing, z_loss).to(x.dtype)
    v = x.shape[-1]
    x2, t = x.reshape(-1, v), target.reshape(-1).long()
    loss = F.cross_entropy(x2, t, reduction="none" if z_loss else reduction, label_smoothing=label_smoothing)
    if not z_loss:
        return loss.view(target.shape) if reduction == "none" else loss
    counted = t != -100
    loss = loss + torch.where(counted, z_loss * torch.logsumexp(x2, -1).square(), torch.zeros_like(loss))
    if reduction == "none":
        return loss.view(target.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / counted.sum()


def _reference(x, target, **kw):
    v = x.shape[-1]
    out = cross_entropy_reference(x.reshape(-1, v), target.reshape(-1), **kw)
    return out.view(target.shape) if kw.get("reduction") == "none" else out


def _check(logits, target, dtype, grad_seed=False, view=None, **kw):
    """Forward and gradient of ``cross_entropy`` (forced Triton) vs the baseline and the fp64 oracle;
    also checks that the logits were not modified. With ``view`` the op sees ``view(leaf)`` (e.g. a
    row-strided slice of ``logits``) and the gradients compared are those of the whole leaf."""
    view = view or (lambda t: t)
    before = logits.detach().clone()
    ours_in = logits.detach().clone().requires_grad_()
    base_in = logits.detach().clone().requires_grad_()
    ref_in = logits.detach().to(torch.float64).requires_grad_()
    with rotalabs_accel.use_backend("triton"):
        ours = cross_entropy(view(ours_in), target, **kw)
    base = _baseline(view(base_in), target, **kw)
    ref = _reference(view(ref_in), target, **kw)
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert_within_torch_error(ours, base, ref, dtype, "loss", FACTOR[dtype])
    grad_out = torch.randn(ref.shape, device=ref.device) if grad_seed else torch.ones_like(ref)
    ours.backward(grad_out.to(dtype))
    base.backward(grad_out.to(dtype))
    ref.backward(grad_out.to(torch.float64))
    assert ours_in.grad.dtype == dtype and ours_in.grad.shape == logits.shape
    assert_within_torch_error(ours_in.grad, base_in.grad, ref_in.grad, dtype, "grad", FACTOR[dtype])
    assert torch.equal(ours_in.detach(), before), "the logits were modified"
    return ours_in.grad


# --------------------------------------------------------------------------------------------------
# Numerics through the functional API with the kernels forced
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_forward_and_gradients(device, dtype, reduction, label_smoothing, small_chunks):
    logits = randn(6, VOCAB, dtype=dtype, device=device, scale=2.0)
    target = _targets(6, VOCAB, device, ignored=(1, 4))
    grad = _check(logits, target, dtype, grad_seed=reduction == "none", reduction=reduction,
                  label_smoothing=label_smoothing)
    assert not grad[[1, 4]].any(), "ignored rows must get a zero gradient"


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_z_loss_with_smoothing(device, dtype, small_chunks):
    logits = randn(5, VOCAB, dtype=dtype, device=device, scale=2.0) + 3.0  # lse far from 0
    target = _targets(5, VOCAB, device)
    for reduction in ("mean", "none"):
        _check(logits, target, dtype, grad_seed=True, reduction=reduction, label_smoothing=0.2, z_loss=1e-2)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("vocab", [1, 7, 64, 129])
def test_small_vocabularies_in_one_chunk(device, vocab):
    logits = randn(4, vocab, device=device, scale=3.0)
    _check(logits, _targets(4, vocab, device), torch.float32, label_smoothing=0.05)


@pytest.mark.parametrize("device", kernel_devices())
def test_leading_dims_and_unbatched(device, small_chunks):
    dtype = torch.bfloat16
    logits = randn(2, 3, VOCAB, dtype=dtype, device=device)
    target = _targets(6, VOCAB, device).view(2, 3)
    _check(logits, target, dtype)
    _check(logits, target, dtype, grad_seed=True, reduction="none")
    one = randn(VOCAB, dtype=dtype, device=device)
    _check(one, torch.tensor(5, device=device), dtype, reduction="none")
    with rotalabs_accel.use_backend("triton"):
        assert cross_entropy(one, torch.tensor(5, device=device), reduction="none").shape == ()


@pytest.mark.parametrize("device", kernel_devices())
def test_strided_rows_are_read_in_place(device, small_chunks, launches):
    """Rows of a wider buffer (row stride != V) and a stride-0 gradient reach the kernels uncopied."""
    dtype = torch.bfloat16
    buf = randn(5, VOCAB + 37, dtype=dtype, device=device)
    target = _targets(5, VOCAB, device)
    # "mean": the gradient arriving at the rows is an expanded scalar
    grad = _check(buf, target, dtype, view=lambda t: t[:, 11 : 11 + VOCAB])
    assert not grad[:, :11].any() and not grad[:, 11 + VOCAB :].any()
    fwd, bwd = [c for c in launches if c[0].startswith("_cross_entropy")][-2:]
    assert fwd[0] == "_cross_entropy_forward_kernel" and bwd[0] == "_cross_entropy_backward_kernel"
    fwd_logits, _, _, _, n_cols, stride_row = fwd[2][:6]
    assert n_cols == VOCAB and stride_row == VOCAB + 37 and fwd_logits.stride() == (VOCAB + 37, 1)
    grad_loss, bwd_logits = bwd[2][:2]
    assert grad_loss.stride() == (0,), "the expanded gradient of the mean was copied"
    assert bwd[2][6] == VOCAB + 37 and bwd_logits.data_ptr() == fwd_logits.data_ptr()


@pytest.mark.parametrize("device", kernel_devices())
def test_column_strided_logits_and_int32_targets(device):
    dtype = torch.float16
    logits = randn(VOCAB, 4, dtype=dtype, device=device)
    target = _targets(4, VOCAB, device)
    transposed = lambda t: t.t()  # column stride 4: copied once  # noqa: E731
    expected = _check(logits, target, dtype, view=transposed)
    got = _check(logits, target.to(torch.int32), dtype, view=transposed)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=str)
def test_narrow_and_unsigned_target_dtypes_forward_and_backward(device, target_dtype):
    # uint8 targets failed to compile in the backward (an unsigned target against a -1)
    logits = randn(6, 33, device=device).requires_grad_()
    target = torch.tensor([3, 1, 32, 4, 0, 7], device=device)
    ignore = 7
    with rotalabs_accel.use_backend("triton"):
        loss = cross_entropy(logits, target.to(target_dtype), ignore_index=ignore, label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, logits)
    l64 = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(l64, target, ignore_index=ignore, label_smoothing=0.1)
    (ref_grad,) = torch.autograd.grad(ref, l64)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert grad[5].abs().max() == 0  # the ignored row


_COMPILE_BACKWARD = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rotalabs_accel.triton_kernels import cross_entropy as kernels

fn = kernels._cross_entropy_backward_kernel
consts = {"BLOCK_V": 1024, "SMOOTHING": True, "Z_LOSS": True}
for target_type in ("i64", "i32", "i16", "i8", "u8"):
    types = {"grad_loss_ptr": "*fp32", "logits_ptr": "*bf16", "target_ptr": "*" + target_type,
             "lse_ptr": "*fp32", "grad_ptr": "*bf16", "label_smoothing": "fp32", "z_loss": "fp32"}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"], target_type
print("compiled")
"""


def test_backward_kernel_compiles_for_sm90_with_every_target_dtype(tmp_path):
    # The interpreter does not type-check branches; the GPU compiler does (a variable retyped in one
    # branch of an `if` does not compile: uint8 .. int32 targets failed on the H100 that way). Compiling
    # for sm_90 needs no GPU, only Triton's ptxas, and a process without TRITON_INTERPRET.
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    done = subprocess.run([sys.executable, "-c", _COMPILE_BACKWARD], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(device, reduction):
    """The mean over no row is nan (as PyTorch); the gradient is zero everywhere, the logits unread."""
    logits = randn(3, 40, device=device).requires_grad_()
    target = torch.full((3,), -100, device=device)
    with rotalabs_accel.use_backend("triton"):
        ours = cross_entropy(logits, target, reduction=reduction)
    theirs = F.cross_entropy(logits.detach(), target, reduction=reduction)
    torch.testing.assert_close(ours.detach(), theirs, equal_nan=True)
    ours.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("device", kernel_devices())
def test_custom_ignore_index(device):
    logits = randn(4, 50, device=device)
    target = _targets(4, 50, device, ignored=())
    target[2] = 7
    with rotalabs_accel.use_backend("triton"):
        ours = cross_entropy(logits, target, ignore_index=7, reduction="none")
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, ignore_index=7, reduction="none"))
    assert ours[2] == 0


@pytest.mark.parametrize("device", kernel_devices())
def test_zero_rows_launch_nothing(device, monkeypatch):
    k = _kernels()

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for an empty input")

    monkeypatch.setattr(k, "launch", no_launch)
    for dtype in FLOAT_DTYPES:
        logits = randn(0, VOCAB, dtype=dtype, device=device).requires_grad_()
        target = torch.zeros(0, dtype=torch.long, device=device)
        with rotalabs_accel.use_backend("triton"):
            mean = cross_entropy(logits, target)
            total = cross_entropy(logits, target, reduction="sum")
            rows = cross_entropy(logits, target, reduction="none")
        assert mean.isnan() and total == 0 and rows.shape == (0,)
        assert mean.dtype == total.dtype == rows.dtype == dtype
        (total + rows.sum()).backward()
        assert logits.grad.shape == (0, VOCAB)


@pytest.mark.parametrize("device", kernel_devices())
def test_masked_vocabulary_and_out_of_range_target(device, small_chunks):
    """-inf logits (a masked vocabulary, here the whole first chunks of a row) are handled as PyTorch
    does; a target outside [0, V) gives nan instead of reading out of bounds."""
    logits = randn(3, VOCAB, device=device)
    logits[0, :200] = float("-inf")
    logits[1, 150:] = float("-inf")
    target = torch.tensor([250, 3, 0], device=device)
    x = logits.clone().requires_grad_()
    with rotalabs_accel.use_backend("triton"):
        ours = cross_entropy(x, target, reduction="none")
    expected = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(ours, expected)
    ours.sum().backward()
    x64 = logits.double().requires_grad_()
    F.cross_entropy(x64, target, reduction="sum").backward()
    torch.testing.assert_close(x.grad, x64.grad.float())
    bad = torch.tensor([VOCAB, -3, 2], device=device)
    with rotalabs_accel.use_backend("triton"):
        rows = cross_entropy(randn(3, VOCAB, device=device), bad, reduction="none")
    assert rows[:2].isnan().all() and rows[2].isfinite()


@pytest.mark.parametrize("device", kernel_devices())
def test_no_grad_call_saves_nothing(device, launches):
    logits = randn(3, 40, device=device).requires_grad_()
    target = _targets(3, 40, device)
    with rotalabs_accel.use_backend("triton"), torch.no_grad():
        loss = cross_entropy(logits, target)
    assert loss.grad_fn is None and len(launches) == 1


@pytest.mark.parametrize("device", kernel_devices())
def test_double_backward_through_a_gradient_that_needs_grad(device):
    # (tests/test_transforms.py checks gradient penalties against the float64 model)
    logits = randn(3, 16, device=device).requires_grad_()
    v = randn(3, device=device).requires_grad_()  # a gradient that itself needs a gradient
    target = _targets(3, 16, device, ignored=())
    with rotalabs_accel.use_backend("triton"):
        rows = cross_entropy(logits, target, reduction="none")
        (grad,) = torch.autograd.grad(rows, logits, v, create_graph=True)
    grad.sum().backward(retain_graph=True)
    # d/dv of sum_i v_i * sum_j (softmax_ij - onehot_ij) = sum_j (softmax_ij - onehot_ij) = 0
    torch.testing.assert_close(v.grad, torch.zeros_like(v), rtol=0, atol=1e-6)
    (g2,) = torch.autograd.grad((grad ** 2).sum(), logits)
    l64 = logits.detach().double().requires_grad_()
    rows64 = cross_entropy_reference(l64, target, reduction="none")
    (r,) = torch.autograd.grad(rows64, l64, v.detach().double(), create_graph=True)
    (r2,) = torch.autograd.grad((r ** 2).sum(), l64)
    torch.testing.assert_close(g2.double(), r2, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Launchers and configurations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", kernel_devices())
def test_every_candidate_chunking_gives_the_same_result(device):
    k = _kernels()
    vocab = 1500 if device == "cpu" else 50_000
    logits = randn(3, vocab, device=device, dtype=torch.bfloat16)
    target = _targets(3, vocab, device)
    grad_loss = randn(3, device=device)
    loss, lse = k.cross_entropy_forward(logits, target, -100, 0.1, 1e-3)
    grad = k.cross_entropy_backward(grad_loss, logits, target, lse, -100, 0.1, 1e-3)
    ref = cross_entropy_reference(logits.double(), target, reduction="none", label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-5)
    configs = k.candidate_configs("fwd", vocab) + k.candidate_configs("bwd", vocab)
    # whatever the tables are tuned to at the issue's vocabularies is a tested configuration
    configs += [pick(v) for pick in (k.forward_config, k.backward_config) for v in (32000, 128256, 151936)]
    configs = list(dict.fromkeys(configs))
    if device == "cpu":
        configs = configs[:: max(1, len(configs) // 4)]  # the interpreter is slow: a spread of them
    for config in configs:
        loss_c, lse_c = k.cross_entropy_forward(logits, target, -100, 0.1, 1e-3, config=config)
        torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6, msg=str(config))
        torch.testing.assert_close(lse_c, lse, rtol=1e-6, atol=1e-6, msg=str(config))
        grad_c = k.cross_entropy_backward(grad_loss, logits, target, lse, -100, 0.1, 1e-3, config=config)
        # a different chunking may flip the last bit of a bf16 gradient, never more
        torch.testing.assert_close(grad_c, grad, rtol=2**-7, atol=1e-6, msg=str(config))


def test_launch_tables_are_well_formed():
    k = _kernels()
    for pick in (k.forward_config, k.backward_config):
        for vocab in (1, 2, 31, 300, 1024, 4097, 32000, 50257, 128256, 151936, 262144):
            c = pick(vocab)
            assert c.block_v & (c.block_v - 1) == 0 and c.num_warps & (c.num_warps - 1) == 0
            assert c.block_v <= max(32, 2 * vocab) and c.num_warps * 32 <= max(32, c.block_v)
    for direction in ("fwd", "bwd"):
        candidates = k.candidate_configs(direction, 128256)
        heuristic = (k.forward_config if direction == "fwd" else k.backward_config)(128256)
        assert candidates[0] == heuristic and len(set(candidates)) == len(candidates) > 5
    with pytest.raises(ValueError, match="block_v"):
        k.CrossEntropyConfig(block_v=48, num_warps=4)
    with pytest.raises(ValueError, match="direction"):
        k.candidate_configs("sideways", 10)


@pytest.mark.parametrize("device", kernel_devices())
def test_launchers_reject_bad_operands(device):
    k = _kernels()
    x = randn(4, 8, device=device)
    t = _targets(4, 8, device)
    with pytest.raises(ValueError, match="2-D"):
        k.cross_entropy_forward(x.view(2, 2, 8), t)
    with pytest.raises(TypeError, match="float64"):
        k.cross_entropy_forward(x.double(), t)
    with pytest.raises(ValueError, match="target must have shape"):
        k.cross_entropy_forward(x, t[:3])
    with pytest.raises(TypeError, match="integer class indices"):
        k.cross_entropy_forward(x, t.float())
    with pytest.raises(ValueError, match="at least one class"):
        k.cross_entropy_forward(x[:, :0], t)
    _, lse = k.cross_entropy_forward(x, t)
    with pytest.raises(TypeError, match="lse must be float32"):
        k.cross_entropy_backward(torch.ones(4, device=device), x, t, lse.double())


# --------------------------------------------------------------------------------------------------
# torch.library custom ops and torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.parametrize("device", kernel_devices())
def test_custom_ops_pass_opcheck(device):
    import rotalabs_accel.ops.cross_entropy  # noqa: F401  (registers the ops)

    ops = torch.ops.rotalabs_accel
    logits = randn(4, 40, device=device, dtype=torch.bfloat16).requires_grad_()
    target = _targets(4, 40, device)
    torch.library.opcheck(ops.cross_entropy_fwd.default, (logits, target, -100, 0.0, 0.0))
    torch.library.opcheck(ops.cross_entropy_fwd.default, (logits, target, -100, 0.1, 1e-3))
    wide = randn(4, 50, device=device, dtype=torch.float16)
    strided = wide[:, 3:43].requires_grad_()
    torch.library.opcheck(ops.cross_entropy_fwd.default, (strided, target, -100, 0.0, 0.0))
    x = logits.detach()
    _, lse = ops.cross_entropy_fwd(x, target, -100, 0.1, 1e-3)
    grad_loss = randn(4, device=device)
    torch.library.opcheck(ops.cross_entropy_bwd.default, (grad_loss, x, target, lse, -100, 0.1, 1e-3))
    scalar = torch.ones((), device=device).expand(4)  # the stride-0 gradient of a sum
    torch.library.opcheck(ops.cross_entropy_bwd.default, (scalar, x, target, lse, -100, 0.0, 0.0))


@pytest.mark.compile
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    dtype = torch.bfloat16

    def loss_fn(logits, target):
        mean = cross_entropy(logits, target, label_smoothing=0.1)
        rows = cross_entropy(logits, target, reduction="none", z_loss=1e-3)
        return 2.0 * mean + rows.sum()

    def baseline(logits, target):
        return 2.0 * _baseline(logits, target, label_smoothing=0.1) + _baseline(
            logits, target, reduction="none", z_loss=1e-3).sum()

    def reference(logits, target):
        return 2.0 * _reference(logits, target, label_smoothing=0.1) + _reference(
            logits, target, reduction="none", z_loss=1e-3).sum()

    logits = randn(2, 3, 96, dtype=dtype, device=device)
    target = _targets(6, 96, device).view(2, 3)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    ours_in = logits.clone().requires_grad_()
    base_in = logits.clone().requires_grad_()
    ref_in = logits.double().requires_grad_()
    with rotalabs_accel.use_backend("triton"):
        ours = compiled(ours_in, target)
    base, ref = baseline(base_in, target), reference(ref_in, target)
    assert_within_torch_error(ours, base, ref, dtype, "compiled loss", FACTOR[dtype])
    ours.backward()
    base.backward()
    ref.backward()
    assert_within_torch_error(ours_in.grad, base_in.grad, ref_in.grad, dtype, "compiled grad", FACTOR[dtype])


# --------------------------------------------------------------------------------------------------
# GPU only: the issue's vocabularies, 64-bit offsets, a second device
# --------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(512, 128256), (1024, 32000), (256, 151936), (333, 50257)], ids=str)
def test_gpu_issue_vocabularies(dtype, shape):
    rows, vocab = shape
    logits = randn(rows, vocab, dtype=dtype, device="cuda", scale=3.0)
    target = _targets(rows, vocab, "cuda", ignored=range(0, rows, 7))
    _check(logits, target, dtype)
    _check(logits, target, dtype, grad_seed=True, reduction="none", label_smoothing=0.1)


@pytest.mark.gpu
@needs_cuda
def test_gpu_offsets_past_two_to_the_31():
    """A (N, V) bf16 problem with more than 2**31 elements: row offsets must be 64-bit."""
    k = _kernels()
    vocab = 128256
    rows = 2**31 // vocab + 64
    if torch.cuda.get_device_properties(0).total_memory < 3 * rows * vocab * 2:
        pytest.skip("not enough GPU memory")
    logits = torch.empty(rows, vocab, dtype=torch.bfloat16, device="cuda").normal_()
    target = torch.randint(0, vocab, (rows,), device="cuda")
    loss, lse = k.cross_entropy_forward(logits, target)
    tail = slice(rows - 64, rows)
    ref = cross_entropy_reference(logits[tail].double(), target[tail], reduction="none")
    torch.testing.assert_close(loss[tail], ref.float(), rtol=1e-5, atol=1e-5)
    grad = k.cross_entropy_backward(torch.ones(rows, device="cuda"), logits, target, lse)
    x64 = logits[tail].double().requires_grad_()
    cross_entropy_reference(x64, target[tail], reduction="sum").backward()
    assert_within_torch_error(grad[tail], x64.grad.bfloat16(), x64.grad, torch.bfloat16, "tail grad", 2.0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_second_device():
    logits = randn(8, 5000, device="cuda:1", dtype=torch.bfloat16)
    target = _targets(8, 5000, "cuda:1")
    with torch.cuda.device(0):
        grad = _check(logits, target, torch.bfloat16)
    assert grad.device == torch.device("cuda:1")
