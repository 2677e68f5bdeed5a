"""The RoPE Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) through apply_rope with the backend
forced to "triton": forward and gradients against the float64 reference, every dtype, both layouts,
strided q/k from a fused qkv tensor, GQA, partial and interleaved rotation, position_ids and offsets,
the in-place mode, empty inputs, torch.library registration (opcheck) and torch.compile.
"""

from __future__ import annotations

import pytest
import torch

import rotalabs_accel
from helpers import FLOAT_DTYPES, assert_within_torch_error, kernel_devices, randn
from rotalabs_accel import apply_rope, build_rope_cache
from rotalabs_accel.reference import rope as ref

pytestmark = pytest.mark.interpreter


@pytest.fixture(params=kernel_devices())
def kernel_device(request):
    return request.param


def make_qk(b, s, hq, hk, d, dtype, device, layout, fused=False):
    """q and k in the given layout; ``fused`` slices them out of one (b, s, hq + 2 hk, d) qkv tensor
    (as a fused projection produces), so their batch/seq/head strides are not their own shapes'."""
    if fused:
        qkv = randn(b, s, hq + 2 * hk, d, dtype=dtype, device=device)
        q, k = qkv[:, :, :hq], qkv[:, :, hq : hq + hk]
        if layout == "bhsd":  # Hugging Face: view(b, s, h, d).transpose(1, 2)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q, k
    shape = (lambda h: (b, s, h, d)) if layout == "bshd" else (lambda h: (b, h, s, d))
    return randn(*shape(hq), dtype=dtype, device=device), randn(*shape(hk), dtype=dtype, device=device)


def check_against_reference(
    q, k, cos_len, rotary_dim, *, layout, interleaved=False, position_ids=None, offset=0, grads=True
):
    """Run the kernel and compare forward (and backward) with the float64 reference; the baseline is
    the PyTorch reference in the inputs' dtype."""
    dtype, device = q.dtype, q.device
    cos, sin = build_rope_cache(cos_len, rotary_dim, device=device)
    cos64, sin64 = build_rope_cache(cos_len, rotary_dim, device=device, dtype=torch.float64)
    kw = dict(
        position_ids=position_ids,
        offset=offset,
        layout=layout,
        interleaved=interleaved,
        rotary_dim=rotary_dim,
    )
    q_in = q.detach().requires_grad_(grads)  # same strides as q (a view when q is one)
    k_in = k.detach().requires_grad_(grads)
    q_snapshot, k_snapshot = q.detach().clone(), k.detach().clone()
    with rotalabs_accel.use_backend("triton"):
        q_rot, k_rot = apply_rope(q_in, k_in, cos, sin, **kw)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    assert q_rot.dtype == dtype and k_rot.dtype == dtype
    assert torch.equal(q_in.detach(), q_snapshot) and torch.equal(k_in.detach(), k_snapshot), (
        "inputs modified"
    )

    q64 = q.detach().double().requires_grad_(grads)
    k64 = k.detach().double().requires_grad_(grads)
    q_ref, k_ref = ref.apply_rope(q64, k64, cos64, sin64, **kw)
    q_base, k_base = ref.apply_rope(q.detach(), k.detach(), cos, sin, **kw)
    assert_within_torch_error(q_rot, q_base, q_ref, dtype, what="q_rot")
    assert_within_torch_error(k_rot, k_base, k_ref, dtype, what="k_rot")
    if not grads:
        return
    gq, gk = randn(*q.shape, dtype=dtype, device=device), randn(*k.shape, dtype=dtype, device=device)
    torch.autograd.backward((q_rot, k_rot), (gq, gk))
    torch.autograd.backward((q_ref, k_ref), (gq.double(), gk.double()))
    qb = q.detach().requires_grad_()
    kb = k.detach().requires_grad_()
    torch.autograd.backward(ref.apply_rope(qb, kb, cos, sin, **kw), (gq, gk))
    assert_within_torch_error(q_in.grad, qb.grad, q64.grad, dtype, what="dq")
    assert_within_torch_error(k_in.grad, kb.grad, k64.grad, dtype, what="dk")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_kernel_forward_backward_all_dtypes_layouts(kernel_device, dtype, layout, interleaved):
    q, k = make_qk(2, 3, 4, 2, 16, dtype, kernel_device, layout)
    pos = torch.randint(0, 24, (2, 3), device=kernel_device)
    check_against_reference(q, k, 24, 16, layout=layout, interleaved=interleaved, position_ids=pos)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("rotary_dim", [8, 6])
def test_kernel_fused_qkv_strides_gqa_partial(kernel_device, layout, rotary_dim):
    # q and k are strided views of one qkv tensor; rotary_dim < head_dim (6: pairs not a power of 2)
    q, k = make_qk(2, 3, 3, 1, 12, torch.bfloat16, kernel_device, layout, fused=True)
    assert not q.is_contiguous()
    check_against_reference(q, k, 16, rotary_dim, layout=layout, offset=5)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_kernel_q_and_k_with_unrelated_strides(kernel_device, layout):
    # q stored in the other layout's order, k padded along head_dim: every stride of q differs from k's
    b, s, hq, hk, d = 2, 3, 3, 2, 8
    q = randn(b, hq, s, d, device=kernel_device).transpose(1, 2)
    k = randn(b, s, hk, d + 4, device=kernel_device)[..., :d]
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    check_against_reference(q, k, 8, d, layout=layout, offset=1)


def test_kernel_interleaved_partial_with_offset(kernel_device):
    q, k = make_qk(1, 5, 2, 1, 10, torch.float16, kernel_device, "bshd")
    check_against_reference(q, k, 16, 6, layout="bshd", interleaved=True, offset=7)


def test_kernel_position_id_forms(kernel_device):
    q, k = make_qk(2, 4, 2, 1, 8, torch.float32, kernel_device, "bhsd", fused=True)
    cos, sin = build_rope_cache(32, 8, device=kernel_device)
    with rotalabs_accel.use_backend("triton"):
        by_offset = apply_rope(q, k, cos, sin, offset=9, layout="bhsd")
        for pos in (
            torch.arange(9, 13, device=kernel_device),
            torch.arange(9, 13, device=kernel_device)[None],
            torch.arange(9, 13, device=kernel_device, dtype=torch.int32).expand(2, 4),
        ):
            got = apply_rope(q, k, cos, sin, position_ids=pos, layout="bhsd")
            assert torch.equal(got[0], by_offset[0]) and torch.equal(got[1], by_offset[1])
    assert by_offset[0].shape == q.shape and by_offset[1].shape == k.shape


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_kernel_output_memory_layout(kernel_device, layout):
    # dense inputs: outputs have the inputs' strides (a contiguous (b, h, s, d) q gives a contiguous
    # q_rot); views of a fused qkv tensor: outputs are dense
    q, k = make_qk(2, 3, 2, 1, 8, torch.float32, kernel_device, layout)
    cos, sin = build_rope_cache(8, 8, device=kernel_device)
    with rotalabs_accel.use_backend("triton"):
        q_rot, k_rot = apply_rope(q, k, cos, sin, layout=layout)
        assert q_rot.stride() == q.stride() and k_rot.stride() == k.stride()
        qf, kf = make_qk(2, 3, 2, 1, 8, torch.float32, kernel_device, layout, fused=True)
        q_rot, k_rot = apply_rope(qf, kf, cos, sin, layout=layout)
    assert q_rot.is_contiguous() or q_rot.transpose(1, 2).is_contiguous()
    assert k_rot.is_contiguous() or k_rot.transpose(1, 2).is_contiguous()


def test_kernel_matches_torch_path_exactly_in_fp32(kernel_device):
    # same fp32 arithmetic on both paths: agreement to a few ulps (a wrong index would be O(1))
    q, k = make_qk(2, 3, 4, 2, 16, torch.float32, kernel_device, "bshd")
    cos, sin = build_rope_cache(8, 16, device=kernel_device)
    with rotalabs_accel.use_backend("triton"):
        got = apply_rope(q, k, cos, sin)
    with rotalabs_accel.use_backend("torch"):
        want = apply_rope(q, k, cos, sin)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_kernel_inplace_opt_in_with_autograd(kernel_device, layout):
    dtype = torch.float32
    q0, k0 = make_qk(2, 3, 2, 1, 8, dtype, kernel_device, layout)
    pos = torch.randint(0, 16, (2, 3), device=kernel_device)
    cos, sin = build_rope_cache(16, 8, device=kernel_device)
    want_q, want_k = ref.apply_rope(q0, k0, cos, sin, position_ids=pos, layout=layout)
    # leaf -> non-leaf (as q after a projection), then rotated in place
    ql, kl = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    q, k = ql * 1.0, kl * 1.0
    with rotalabs_accel.use_backend("triton"):
        q_rot, k_rot = apply_rope(q, k, cos, sin, position_ids=pos, layout=layout, inplace=True)
    assert q_rot is q and k_rot is k
    torch.testing.assert_close(q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, want_k, rtol=1e-6, atol=1e-6)
    gq, gk = randn(*q.shape, device=kernel_device), randn(*k.shape, device=kernel_device)
    torch.autograd.backward((q_rot, k_rot), (gq, gk))
    qr, kr = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    torch.autograd.backward(ref.apply_rope(qr, kr, cos, sin, position_ids=pos, layout=layout), (gq, gk))
    torch.testing.assert_close(ql.grad, qr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl.grad, kr.grad, rtol=1e-6, atol=1e-6)


def test_kernel_inplace_partial_leaves_pass_through_and_no_grad(kernel_device):
    # fp16, not bf16: Triton's interpreter converts fp32 -> bf16 by truncation (1 ulp off the GPU's
    # round-to-nearest), which would break the exact comparison below on CPU
    q, k = make_qk(1, 3, 2, 2, 12, torch.float16, kernel_device, "bshd", fused=True)
    tail_q, tail_k = q[..., 4:].clone(), k[..., 4:].clone()
    cos, sin = build_rope_cache(8, 4, device=kernel_device)
    want = ref.apply_rope(q, k, cos, sin, rotary_dim=4)
    with rotalabs_accel.use_backend("triton"):
        apply_rope(q, k, cos, sin, inplace=True)
    assert torch.equal(q[..., 4:], tail_q) and torch.equal(k[..., 4:], tail_k)
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])


@pytest.mark.parametrize("shape", [(0, 3, 2, 8), (2, 0, 2, 8)])
def test_kernel_empty_inputs(kernel_device, shape):
    q = torch.empty(shape, device=kernel_device)
    cos, sin = build_rope_cache(4, 8, device=kernel_device)
    with rotalabs_accel.use_backend("triton"):
        q_rot, k_rot = apply_rope(q, q[:, :, :1], cos, sin)
    assert q_rot.shape == shape and k_rot.shape == (shape[0], shape[1], 1, 8)


def test_kernel_out_of_range_position_gives_nan_not_garbage(kernel_device):
    # On CUDA apply_rope cannot check positions without a device sync; the kernel makes such rows NaN.
    from rotalabs_accel.triton_kernels.rope import rope_forward

    q, k = make_qk(1, 2, 1, 1, 8, torch.float32, kernel_device, "bshd")
    cos, sin = build_rope_cache(4, 8, device=kernel_device)
    pos = torch.tensor([[1, 4]], device=kernel_device)
    q_rot, k_rot = rope_forward(q, k, cos, sin, pos, 0, False, 8)
    assert (
        torch.isfinite(q_rot[0, 0]).all()
        and torch.isnan(q_rot[0, 1]).all()
        and torch.isnan(k_rot[0, 1]).all()
    )


def test_every_table_config_is_correct(kernel_device):
    from rotalabs_accel.triton_kernels import rope as kernels

    cos, sin = build_rope_cache(8, 8, device=kernel_device)
    configs = {entry[2] for entry in kernels._TABLE} | {kernels.RopeConfig(16, 1, 0, 1)}
    # both storage orders, fused-qkv strides: each table entry on the layout it is chosen for and the other
    for layout in ("bshd", "bhsd"):
        q, k = make_qk(2, 3, 3, 2, 8, torch.float32, kernel_device, layout, fused=True)
        want = ref.apply_rope(q, k, cos, sin, offset=2, layout=layout)
        for config in sorted(configs, key=repr):
            got = kernels.rope_apply(q, k, cos, sin, None, 2, False, 8, head_major=layout == "bhsd",
                                     config=config)
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6, msg=f"{layout} {config}")
            torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6, msg=f"{layout} {config}")
    assert kernels.rope_config(64, 40, True) in configs
    assert all(c.heads_per_program % c.block_h == 0 for c in kernels.SWEEP_CONFIGS)


def test_forced_triton_on_float64_says_why(kernel_device):
    q, k = make_qk(1, 2, 1, 1, 8, torch.float64, kernel_device, "bshd")
    cos, sin = build_rope_cache(4, 8, device=kernel_device)
    with rotalabs_accel.use_backend("triton"), pytest.raises(NotImplementedError, match="float64"):
        apply_rope(q, k, cos, sin)


# ---------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile


def _op_args(device, dtype=torch.float32, with_pos=True):
    q, k = make_qk(2, 3, 2, 1, 8, dtype, device, "bshd", fused=True)
    cos, sin = build_rope_cache(8, 6, device=device)
    pos = torch.randint(0, 8, (2, 3), device=device) if with_pos else None
    return q, k, cos, sin, pos, 0 if with_pos else 1, False, 6


@pytest.mark.parametrize("with_pos", [True, False])
def test_opcheck_custom_ops(kernel_device, with_pos):
    from rotalabs_accel.ops import rope as ops

    args = _op_args(kernel_device, with_pos=with_pos)
    fwd_args = (args[0].detach().requires_grad_(), args[1].detach().requires_grad_(), *args[2:])
    torch.library.opcheck(ops.rope_fwd, fwd_args)
    torch.library.opcheck(ops.rope_bwd, args)
    q, k = (args[0].contiguous(), args[1].contiguous())
    torch.library.opcheck(ops.rope_inplace_, (q, k, *args[2:]))


def test_custom_ops_take_any_last_dimension_stride(kernel_device):
    # rope_fwd is also the gradient of rope_bwd, whose incoming gradients may be strided
    from rotalabs_accel.ops import rope as ops

    cos, sin = build_rope_cache(8, 8, device=kernel_device)
    q = torch.randn(2, 3, 8, 4, device=kernel_device).transpose(-1, -2)  # (2, 3, 4, 8), stride(-1) = 4
    k = torch.randn(2, 3, 1, 8, device=kernel_device)
    q_rot, k_rot = ops.rope_fwd(q, k, cos, sin, None, 2, False, 8)
    q_ref, k_ref = ref.apply_rope(q.double(), k.double(), cos.double(), sin.double(), offset=2)
    torch.testing.assert_close(q_rot.double(), q_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_rot.double(), k_ref, rtol=1e-5, atol=1e-6)
    qg = torch.randn(2, 3, 4, 8, device=kernel_device, requires_grad=True)
    kg = k.detach().requires_grad_()
    torch.library.opcheck(ops.rope_bwd, (qg, kg, cos, sin, None, 2, False, 8))
    with pytest.raises(ValueError, match="rope_inplace_: q must have unit stride"):
        ops.rope_inplace_(q, k.clone(), cos, sin, None, 2, False, 8)


def test_reference_bhsd_results_are_laid_out_as_bhsd():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 1, 4, 8)
    cos, sin = build_rope_cache(8, 8)
    with rotalabs_accel.use_backend("torch"):
        q_rot, k_rot = apply_rope(q, k, cos, sin, layout="bhsd")
    assert q_rot.is_contiguous() and k_rot.is_contiguous()


def test_interleaved_must_be_a_bool():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    cos, sin = build_rope_cache(8, 8)
    with pytest.raises(TypeError, match="interleaved must be a bool, got 'no'"):
        apply_rope(q, k, cos, sin, interleaved="no")


@pytest.mark.compile
def test_torch_compile_fullgraph_forward_backward(kernel_device):
    q0, k0 = make_qk(2, 3, 2, 1, 8, torch.float32, kernel_device, "bhsd", fused=True)
    cos, sin = build_rope_cache(8, 8, device=kernel_device)
    pos = torch.randint(0, 8, (2, 3), device=kernel_device)

    def attention_scores(q, k):
        q_rot, k_rot = apply_rope(q, k, cos, sin, position_ids=pos, layout="bhsd")
        return q_rot @ k_rot.transpose(-1, -2)

    with rotalabs_accel.use_backend("triton"):
        compiled = torch.compile(attention_scores, fullgraph=True)
        q, k = q0.detach().requires_grad_(), k0.detach().requires_grad_()
        out = compiled(q, k)
        out.square().sum().backward()
    qr, kr = q0.detach().requires_grad_(), k0.detach().requires_grad_()
    q_ref, k_ref = ref.apply_rope(qr, kr, cos, sin, position_ids=pos, layout="bhsd")
    want = q_ref @ k_ref.transpose(-1, -2)
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.grad, qr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.grad, kr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.compile
def test_torch_compile_fullgraph_inplace(kernel_device):
    q0, k0 = make_qk(1, 3, 2, 1, 8, torch.float32, kernel_device, "bshd", fused=True)
    cos, sin = build_rope_cache(8, 8, device=kernel_device)
    want = ref.apply_rope(q0, k0, cos, sin, offset=3)

    def rotate_(q, k):
        apply_rope(q, k, cos, sin, offset=3, inplace=True)
        return q.sum() + k.sum()

    with rotalabs_accel.use_backend("triton"):
        compiled = torch.compile(rotate_, fullgraph=True, backend="aot_eager")
        q, k = q0.clone(), k0.clone()  # contiguous copies owned by the test
        compiled(q, k)
    torch.testing.assert_close(q, want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, want[1], rtol=1e-6, atol=1e-6)

    # with autograd: in place on non-leaf views of a fused qkv tensor, gradients flow to the source
    def project_and_rotate(qkv):
        qkv = qkv * 1.0
        q, k = qkv[:, :, :2], qkv[:, :, 2:3]
        apply_rope(q, k, cos, sin, offset=3, inplace=True)
        return (qkv * qkv).sum()

    x = randn(1, 3, 4, 8, device=kernel_device)
    with rotalabs_accel.use_backend("triton"):
        xc = x.clone().requires_grad_()
        torch.compile(project_and_rotate, fullgraph=True, backend="aot_eager")(xc).backward()
        xe = x.clone().requires_grad_()
        project_and_rotate(xe).backward()
    xr = x.clone().requires_grad_()
    xq = xr * 1.0
    q_ref, k_ref = ref.apply_rope(xq[:, :, :2], xq[:, :, 2:3], cos, sin, offset=3)
    (torch.cat((q_ref, k_ref, xq[:, :, 3:]), 2).square().sum()).backward()
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xe.grad, xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.compile
def test_torch_compile_fullgraph_module(kernel_device):
    from rotalabs_accel import RotaryEmbedding

    rope = RotaryEmbedding(16, max_seq_len=32, layout="bhsd", device=kernel_device)
    q, k = make_qk(2, 5, 4, 2, 16, torch.float32, kernel_device, "bhsd")
    pos = torch.randint(0, 32, (2, 5), device=kernel_device)
    with rotalabs_accel.use_backend("triton"):
        compiled = torch.compile(rope, fullgraph=True, backend="aot_eager")
        for kwargs in (dict(), dict(offset=3), dict(position_ids=pos, seq_len=32)):
            got, want = compiled(q, k, **kwargs), rope(q, k, **kwargs)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kwargs


# ---------------------------------------------------------------------------------------------------
# Larger shapes, CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_large_shapes(layout, dtype, fused):
    q, k = make_qk(2, 1024, 32, 8, 128, dtype, "cuda", layout, fused=fused)
    pos = torch.randint(0, 4096, (2, 1024), device="cuda")
    check_against_reference(q, k, 4096, 128, layout=layout, position_ids=pos)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_shape_and_partial_llama_shapes():
    q, k = make_qk(64, 1, 32, 8, 128, torch.bfloat16, "cuda", "bshd")
    pos = torch.randint(0, 8192, (64, 1), device="cuda")
    check_against_reference(q, k, 8192, 128, layout="bshd", position_ids=pos)
    q, k = make_qk(2, 333, 12, 4, 80, torch.bfloat16, "cuda", "bhsd", fused=True)
    check_against_reference(q, k, 400, 40, layout="bhsd", offset=17, interleaved=True)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_second_device():
    q, k = make_qk(2, 64, 8, 2, 64, torch.bfloat16, "cuda:1", "bshd")
    check_against_reference(q, k, 64, 64, layout="bshd", grads=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_capture_decode():
    q, k = make_qk(8, 1, 8, 2, 64, torch.bfloat16, "cuda", "bshd")
    cos, sin = build_rope_cache(128, 64, device="cuda")
    pos = torch.randint(0, 128, (8, 1), device="cuda")
    apply_rope(q, k, cos, sin, position_ids=pos)  # compile the kernel outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = apply_rope(q, k, cos, sin, position_ids=pos)
    pos.copy_(torch.randint(0, 128, (8, 1), device="cuda"))
    graph.replay()
    want = apply_rope(q, k, cos, sin, position_ids=pos)  # same kernel, eager, with the new positions
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])


# ---------------------------------------------------------------------------------------------------
# The eager host path: one node, one launch, no extra tensor ops, memoized plans, fast validation


class _AtenLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op run inside the block (views, copies, conversions, allocations)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def recorded_launches(monkeypatch):
    """Replace kernel launches by a recorder (nothing runs; the outputs stay uninitialised).

    Records ``(kernel, grid, args, num_warps, constexprs)`` per launch, whether it went through a
    memoized launch site (the default configuration) or through ``launch`` (an explicit one).
    """
    from rotalabs_accel.ops import rope as ops
    from rotalabs_accel.triton_kernels import rope as kernels

    ops._kernel_module()
    calls = []

    class RecordingSite:
        def __init__(self, kernel, grid, num_warps, num_stages=None, device=-1, **meta):
            self.spec = (kernel, grid, num_warps, meta)

        def launch_ptrs(self, args, key=0):
            return False  # as a site without a C entry: the caller makes the call recorded below

        def __call__(self, args, key=0):
            kernel, grid, num_warps, meta = self.spec
            calls.append((kernel, grid, args, num_warps, meta))

    monkeypatch.setattr(kernels, "KernelLaunch", RecordingSite)
    monkeypatch.setattr(kernels, "_SITES", {})
    monkeypatch.setattr(kernels, "launch", lambda kernel, grid, args, num_warps, **meta: calls.append(
        (kernel, grid, args, num_warps, meta)))
    return calls


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("pos_shape", [None, (4, 1), (1, 1), (1,)])
def test_eager_call_is_one_launch_and_two_allocations(kernel_device, recorded_launches, layout, pos_shape):
    # Decode-shaped call: the only tensor ops are the two output allocations (no expand, no dtype
    # conversion of the positions, no transposed views, no copies); then exactly one launch.
    q, k = make_qk(4, 1, 4, 2, 16, torch.bfloat16, kernel_device, layout)
    cos, sin = build_rope_cache(32, 16, device=kernel_device)
    pos = None if pos_shape is None else torch.randint(0, 32, pos_shape, device=kernel_device)
    with rotalabs_accel.use_backend("triton"), _AtenLog() as log:
        q_rot, k_rot = apply_rope(q, k, cos, sin, position_ids=pos, layout=layout)
    if pos is not None and pos.is_cpu:
        # CPU positions are range-checked (free there; skipped on a GPU, where it would sync)
        log.ops = [op for op in log.ops if op not in ("min", "max", "_local_scalar_dense")]
    assert log.ops == ["empty_like", "empty_like"]
    assert len(recorded_launches) == 1
    _, grid, args, _, meta = recorded_launches[0]
    assert args[:4] == (q, k, q_rot, k_rot) and meta["HAS_POSITIONS"] is (pos is not None)
    if pos is not None:
        assert args[6] is pos
        stride_pb, stride_ps = args[21:23]
        assert stride_pb == (0 if pos.dim() == 1 or pos.shape[0] == 1 else pos.stride(0))


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_eager_autograd_graph_is_one_node(kernel_device, recorded_launches, layout):
    q, k = make_qk(2, 3, 4, 2, 8, torch.float32, kernel_device, layout)
    q, k = q.requires_grad_(), k.requires_grad_()
    cos, sin = build_rope_cache(8, 8, device=kernel_device)
    with rotalabs_accel.use_backend("triton"):
        q_rot, k_rot = apply_rope(q, k, cos, sin, layout=layout)
    assert q_rot.grad_fn is k_rot.grad_fn
    # straight to the leaves: no transpose / view nodes around the rotation
    assert [type(f).__name__ for f, _ in q_rot.grad_fn.next_functions[:2]] == ["AccumulateGrad"] * 2
    with _AtenLog() as log:
        torch.autograd.grad((q_rot, k_rot), (q, k), (torch.ones_like(q_rot), torch.ones_like(k_rot)))
    assert len(recorded_launches) == 2 and recorded_launches[1][4]["BACKWARD"] is True
    assert log.ops.count("empty_like") == 2 and "transpose" not in log.ops and "copy_" not in log.ops


def test_launch_sites_are_memoized(kernel_device, recorded_launches):
    from rotalabs_accel.triton_kernels import rope as kernels

    q, k = make_qk(2, 3, 4, 2, 8, torch.float32, kernel_device, "bhsd")
    cos, sin = build_rope_cache(8, 8, device=kernel_device)
    with rotalabs_accel.use_backend("triton"):
        for offset in range(3):  # decode steps at new offsets reuse the site (offset is not specialized)
            apply_rope(q, k, cos, sin, layout="bhsd", offset=offset)
    assert len(kernels._SITES) == 1
    (key, site), = kernels._SITES.items()
    assert all(c[1] == recorded_launches[0][1] and c[4] == recorded_launches[0][4] for c in recorded_launches)
    assert [c[2][-1] for c in recorded_launches] == [0, 1, 2]
    config = kernels.rope_config(6, 6, False)  # head-major storage
    assert recorded_launches[0][1] == (-(-6 // config.block_t), 1, 1) and key[0] == (
        *q.stride()[:1], q.stride(2), q.stride(1), *k.stride()[:1], k.stride(2), k.stride(1),
        *q.stride()[:1], q.stride(2), q.stride(1), *k.stride()[:1], k.stride(2), k.stride(1),
        4, 4, 0, 0, 3, 6, 4, 6, 8,
    )
    kernels.rope_apply(q, k, cos, sin, None, 0, False, 8, True, config=kernels.RopeConfig(1, 1, 1, 1))
    assert len(kernels._SITES) == 1 and recorded_launches[-1][1] == (6, 6, 1)  # overrides not cached
    with rotalabs_accel.use_backend("triton"):
        apply_rope(q[:1], k[:1], cos, sin, layout="bhsd")  # another shape: another site
    assert len(kernels._SITES) == 2


def _rope_call_variants(device):
    """(kwargs for apply_rope, valid?) pairs covering every check of the fast path."""
    q, k = make_qk(2, 3, 4, 2, 16, torch.bfloat16, device, "bshd")
    cos, sin = build_rope_cache(8, 16, device=device)
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    pos = torch.randint(0, 8, (2, 3), device=device)
    base = dict(q=q, k=k, cos=cos, sin=sin, position_ids=None, offset=0, layout="bshd", rotary_dim=None,
                inplace=False)
    cos12, sin12 = build_rope_cache(8, 12, device=device)
    valid = [
        {}, dict(layout="bhsd", q=qh, k=kh), dict(position_ids=pos), dict(position_ids=pos[:1]),
        dict(position_ids=pos[0]), dict(position_ids=pos.int()), dict(offset=5), dict(rotary_dim=16),
        dict(inplace=True), dict(cos=cos12, sin=sin12), dict(q=q.float(), k=k.float()),
        dict(position_ids=pos.short()), dict(cos=cos.double(), sin=sin.double()),
        dict(q=torch.nn.Parameter(q, requires_grad=False)),
        dict(q=q.transpose(2, 3).contiguous().transpose(2, 3)),
    ]
    invalid = [
        dict(layout="sbhd"), dict(layout="bhsd"), dict(q=q[..., :8]), dict(k=k[:1]), dict(k=k[:, :2]),
        dict(q=q.double(), k=k.double()), dict(k=k.half()), dict(q=q.int(), k=k.int()), dict(cos=cos[:, :4]),
        dict(sin=sin[:4]), dict(rotary_dim=8), dict(rotary_dim=15), dict(rotary_dim=16.0), dict(offset=6),
        dict(offset=-1), dict(offset=1.0), dict(offset=True), dict(inplace=1), dict(position_ids=pos.float()),
        dict(position_ids=pos[:, :2]), dict(position_ids=pos, offset=1),
        dict(position_ids=pos.tolist()), dict(q=q[0]), dict(cos=cos[None]), dict(q=q.tolist()),
        dict(cos=cos.clone().requires_grad_()),
    ]
    # Out-of-range positions are caught where the check is free (CPU); on a GPU it would cost a device
    # sync per call, so both paths accept them there.
    cases = [(c, True) for c in valid] + [(c, False) for c in invalid]
    cases.append((dict(position_ids=pos + 8), torch.device(device).type != "cpu"))
    for changes, ok in cases:
        yield {**base, **changes}, ok


def test_fast_validation_agrees_with_the_general_checks(kernel_device):
    """The fast check accepts only what _validate accepts (with the same rotary_dim) and passes the
    rest on: declined valid calls and every invalid call take the general path, which explains."""
    from rotalabs_accel.functional import rope as functional

    accepted = 0
    for kwargs, ok in _rope_call_variants(kernel_device):
        args = [kwargs[n] for n in ("q", "k", "cos", "sin", "position_ids", "offset", "layout", "rotary_dim",
                                     "inplace")]
        fast = functional._fast_rotary_dim(*args)
        if ok:
            assert fast is None or fast == functional._validate(*args), kwargs
            accepted += fast is not None
        else:
            assert fast is None, kwargs
            q, cos = kwargs["q"], kwargs["cos"]
            if isinstance(q, list) or not (cos.requires_grad or q.dtype == torch.float64):
                with pytest.raises((TypeError, ValueError)):
                    functional._validate(*args)
    assert accepted >= 10  # the common calls do take the fast path
