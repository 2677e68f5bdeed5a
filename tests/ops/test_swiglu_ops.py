"""SwiGLU activation: Triton kernels (interpreter on CPU, real on CUDA), autograd, custom ops, compile.

Oracle: the float64 reference. Baseline: what PyTorch itself computes in the same dtype,
``F.silu(gate) * up`` and its autograd gradients.

Tolerance factor per dtype (the bound is ``factor * err(PyTorch) + half a unit roundoff``):

* float16 / bfloat16: 2 (the rule in tests/helpers.py). The kernel rounds once from float32 while
  PyTorch rounds after the SiLU and again after the product, so ours is the smaller error.
* float32: 8. Triton evaluates ``exp`` in float32 with the GPU's approximate ``ex2`` instruction
  (a few units in the last place) where PyTorch's CUDA ``silu`` uses an accurate ``expf``; both errors
  are around 1e-7 relative, while a wrong index or term gives 1e-1 or more.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import rotalabs_accel
from helpers import FLOAT_DTYPES, assert_within_torch_error, kernel_devices, randn
from rotalabs_accel.functional.activations import swiglu_fused
from rotalabs_accel.kernels.activations import SwiGLU
from rotalabs_accel.reference.swiglu import swiglu_backward_reference, swiglu_reference

FACTOR = {torch.float32: 8.0, torch.float16: 2.0, torch.bfloat16: 2.0}
SHAPES = [(1, 1), (3, 37), (2, 3, 130), (4, 300), (0, 16), (2, 0, 8)]

pytestmark = pytest.mark.interpreter


def _eager(gate, up):
    return F.silu(gate) * up


def _eager_grads(grad_out, gate, up):
    """PyTorch's own gradients of ``F.silu(gate) * up`` in the inputs' dtype."""
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    _eager(gate, up).backward(grad_out)
    return gate.grad, up.grad


def _check_forward_and_grads(ours_fn, inputs, baseline_fn, ref_fn, dtype, grad_out):
    """Run ``ours_fn`` / ``baseline_fn`` on ``inputs`` in ``dtype`` and ``ref_fn`` in float64; compare."""
    ours_in = [t.detach().clone().requires_grad_() for t in inputs]
    base_in = [t.detach().clone().requires_grad_() for t in inputs]
    ref_in = [t.detach().to(torch.float64).requires_grad_() for t in inputs]
    ours = ours_fn(*ours_in)
    base = baseline_fn(*base_in)
    ref = ref_fn(*ref_in)
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert_within_torch_error(ours, base, ref, dtype, "forward", FACTOR[dtype])
    ours.backward(grad_out)
    base.backward(grad_out)
    ref.backward(grad_out.to(torch.float64))
    for i, (o, b, r) in enumerate(zip(ours_in, base_in, ref_in)):
        assert o.grad is not None and o.grad.dtype == dtype
        assert_within_torch_error(o.grad, b.grad, r.grad, dtype, f"grad of input {i}", FACTOR[dtype])


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_separate_gate_up(device, dtype, shape):
    gate, up = randn(*shape, dtype=dtype, device=device), randn(*shape, dtype=dtype, device=device)
    grad_out = randn(*shape, dtype=dtype, device=device)
    with rotalabs_accel.use_backend("triton"):
        _check_forward_and_grads(swiglu_fused, [gate, up], _eager, swiglu_reference, dtype, grad_out)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_packed_gate_up(device, dtype, shape):
    *lead, n = shape
    gate_up = randn(*lead, 2 * n, dtype=dtype, device=device)
    grad_out = randn(*shape, dtype=dtype, device=device)

    def eager(gu):
        return _eager(gu[..., :n], gu[..., n:])

    def ref(gu):
        return swiglu_reference(gu[..., :n], gu[..., n:])

    with rotalabs_accel.use_backend("triton"):
        _check_forward_and_grads(swiglu_fused, [gate_up], eager, ref, dtype, grad_out)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_rows_are_read_in_place(device, dtype):
    """Row-strided slices of wider buffers (and a stride-0 grad) go to the kernel without a copy."""
    from rotalabs_accel.functional.activations import _rows

    rows, n = 5, 45
    gate_buf = randn(rows, n + 7, dtype=dtype, device=device)
    up_buf = randn(rows, n + 20, dtype=dtype, device=device)
    gate = gate_buf[:, 3 : 3 + n].requires_grad_()
    up = up_buf[:, 11 : 11 + n].requires_grad_()
    three_d = gate_buf.view(1, rows, n + 7)[..., :n]
    for view in (gate, up, three_d):
        flat = _rows(view)
        assert flat.data_ptr() == view.data_ptr() and flat.stride() == (view.stride(-2), 1)
    ref_g, ref_u = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    grad_row = randn(1, n, dtype=dtype, device=device)
    with rotalabs_accel.use_backend("triton"):
        y = swiglu_fused(gate, up)
        y.backward(grad_row.expand(rows, n))  # row stride 0
    ref = swiglu_reference(ref_g, ref_u)
    ref.backward(grad_row.double().expand(rows, n))
    base_g, base_u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    base = _eager(base_g, base_u)
    base.backward(grad_row.expand(rows, n))
    assert_within_torch_error(y, base, ref, dtype, "forward", FACTOR[dtype])
    assert_within_torch_error(gate.grad, base_g.grad, ref_g.grad, dtype, "grad gate", FACTOR[dtype])
    assert_within_torch_error(up.grad, base_u.grad, ref_u.grad, dtype, "grad up", FACTOR[dtype])


@pytest.mark.parametrize("device", kernel_devices())
def test_non_unit_column_stride_and_non_collapsible_leading_dims(device):
    dtype = torch.float16
    gate = randn(24, 6, dtype=dtype, device=device).t()  # column stride 6
    up = randn(6, 24, dtype=dtype, device=device)
    packed = randn(5, 3, 2 * 10, dtype=dtype, device=device).permute(1, 0, 2)  # [3, 5, 20], not viewable
    with rotalabs_accel.use_backend("triton"):
        y = swiglu_fused(gate, up)
        y_packed = swiglu_fused(packed)
    ref = swiglu_reference(gate.double(), up.double())
    ref_packed = swiglu_reference(packed[..., :10].double(), packed[..., 10:].double())
    assert_within_torch_error(y, _eager(gate, up), ref, dtype, "forward", FACTOR[dtype])
    assert_within_torch_error(y_packed, _eager(packed[..., :10], packed[..., 10:]), ref_packed, dtype,
                              "packed forward", FACTOR[dtype])
    assert y_packed.shape == (3, 5, 10)


# --------------------------------------------------------------------------------------------------
# Launchers: every kernel variant, in-place backward, heuristics
# --------------------------------------------------------------------------------------------------


def _configs():
    from rotalabs_accel.triton_kernels.swiglu import SwiGLULaunchConfig

    return [
        SwiGLULaunchConfig(block_m=1, block_n=16, num_warps=1),
        SwiGLULaunchConfig(block_m=1, block_n=16, num_warps=1, grid_2d=True),  # tile from the 2-D grid
        SwiGLULaunchConfig(block_m=4, block_n=32, num_warps=2, evict_first=False),
        SwiGLULaunchConfig(block_m=4, block_n=32, num_warps=2, grid_2d=True),
        SwiGLULaunchConfig(block_m=2, block_n=64, num_warps=4, programs_per_sm=2),  # persistent loop
        SwiGLULaunchConfig(block_m=8, block_n=8, num_warps=1, programs_per_sm=1),  # persistent, even
        SwiGLULaunchConfig(block_m=2, block_n=64, num_warps=2, flat=True),  # one long row
        SwiGLULaunchConfig(block_m=1, block_n=32, num_warps=1, programs_per_sm=2, flat=True),
    ]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("shape", [(8, 64), (7, 61), (1000, 777)], ids=str)
def test_every_launch_config_gives_identical_results(device, shape):
    from rotalabs_accel.triton_kernels import swiglu as k

    if device == "cpu" and shape[0] > 100:
        pytest.skip("GPU only: enough tiles that the persistent grids loop on a real GPU")

    gate, up, grad_out = (randn(*shape, device=device) for _ in range(3))
    expected = k.swiglu_forward(gate, up)
    exp_dg, exp_du, exp_h = k.swiglu_backward(grad_out, gate, up, store_h=True)
    ref_dg, ref_du, ref_h = swiglu_backward_reference(grad_out.double(), gate.double(), up.double())
    base_dg, base_du = _eager_grads(grad_out, gate, up)
    f32 = torch.float32
    assert_within_torch_error(exp_dg, base_dg, ref_dg, f32, "grad gate", FACTOR[f32])
    assert_within_torch_error(exp_du, base_du, ref_du, f32, "grad up", FACTOR[f32])
    assert_within_torch_error(exp_h, _eager(gate, up), ref_h, f32, "h", FACTOR[f32])
    assert_within_torch_error(expected, _eager(gate, up), ref_h, f32, "forward", FACTOR[f32])
    for config in _configs():
        assert torch.equal(k.swiglu_forward(gate, up, config=config), expected), config
        dg, du, h = k.swiglu_backward(grad_out, gate, up, store_h=True, config=config)
        assert torch.equal(dg, exp_dg) and torch.equal(du, exp_du) and torch.equal(h, exp_h), config


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_in_place_matches_out_of_place(device, dtype):
    """The feed-forward backward overwrites gate/up with their gradients and grad_out with h."""
    from rotalabs_accel.triton_kernels import swiglu as k

    gate_up = randn(6, 2 * 50, dtype=dtype, device=device)
    grad_out = randn(6, 50, dtype=dtype, device=device)
    gate, up = gate_up[:, :50], gate_up[:, 50:]
    exp_dg, exp_du, exp_h = k.swiglu_backward(grad_out, gate, up, store_h=True)
    k.swiglu_backward(grad_out, gate, up, gate, up, grad_out, store_h=True)
    assert torch.equal(gate, exp_dg) and torch.equal(up, exp_du) and torch.equal(grad_out, exp_h)


def test_launch_heuristics_are_well_formed():
    from rotalabs_accel.triton_kernels import swiglu as k

    picks = (k.forward_config, k.backward_config, lambda rows, cols: k.backward_config(rows, cols, True))
    for pick in picks:
        for rows in (1, 3, 64, 4096, 16384):
            for cols in (1, 7, 100, 256, 1000, 4096, 11008, 14336, 28672, 100000):
                c = pick(rows, cols)
                assert c.block_m & (c.block_m - 1) == 0 and c.block_n & (c.block_n - 1) == 0
                assert c.block_m * c.block_n <= 16384 and c.num_warps <= 16
                assert c.block_m <= max(1, 2 * rows)
                assert not c.evict_first and c.programs_per_sm == 0
                tiles = -(-cols // c.block_n)
                assert c.block_n <= k.MIN_BLOCK_N or tiles * c.block_n <= cols * (1 + k.MAX_COLUMN_WASTE)
    # The issue's shapes get the fastest configurations of the H100 sweep.
    Config = k.SwiGLULaunchConfig
    assert k.forward_config(16384, 14336) == Config(block_m=16, block_n=512, num_warps=16)
    assert k.forward_config(4096, 11008) == Config(block_m=2, block_n=1024, num_warps=8)
    assert k.backward_config(16384, 14336) == Config(block_m=4, block_n=4096, num_warps=16)
    # the feed-forward block's backward (also storing the activation): 16 elements per thread, no spill
    assert k.backward_config(8192, 14336, store_h=True) == Config(block_m=4, block_n=2048, num_warps=16)
    assert k.backward_config(4096, 11008) == Config(block_m=4, block_n=2048, num_warps=16)
    with pytest.raises(ValueError, match="block_n"):
        k.SwiGLULaunchConfig(block_m=1, block_n=48, num_warps=4)


@pytest.fixture
def recorded_launches(monkeypatch):
    """Replace kernel launches by a recorder (nothing runs): ``(kernel, grid, args, num_warps, meta)``."""
    from rotalabs_accel.ops import swiglu as ops
    from rotalabs_accel.triton_kernels import swiglu as k

    ops._kernels()
    calls = []

    class RecordingSite:
        def __init__(self, kernel, grid, num_warps, num_stages=None, device=-1, **meta):
            self.spec = (kernel, grid, num_warps, meta)

        def launch_ptrs(self, args, key=0):
            return False  # as a site without a C entry: the caller makes the call recorded below

        def __call__(self, args, key=0):
            kernel, grid, num_warps, meta = self.spec
            calls.append((kernel, grid, args, num_warps, meta))

    monkeypatch.setattr(k, "KernelLaunch", RecordingSite)
    monkeypatch.setattr(k, "_SITES", {})
    monkeypatch.setattr(k, "launch", lambda kernel, grid, args, num_warps, **meta: calls.append(
        (kernel, grid, args, num_warps, meta)))
    return calls


@pytest.mark.parametrize("device", kernel_devices())
def test_launch_sites_are_memoized_and_match_the_configs(device, recorded_launches):
    """Repeated shapes reuse one launch site (no table walk per call), built from the table's config."""
    from rotalabs_accel.triton_kernels import swiglu as k

    m, n = 4096, 11008
    # the rows launchers take base tensors and strides as given (nothing runs here, nothing is read)
    gate = grad = torch.empty(8, dtype=torch.bfloat16, device=device)
    for _ in range(2):
        k.swiglu_forward_rows(gate, gate, gate, m, n, 2 * n, 2 * n, 2 * n, n)
        for store_h in (False, True):
            k.swiglu_backward_rows(grad, gate, gate, gate, gate, gate, m, n, 0, 2 * n, 2 * n, 2 * n, 2 * n,
                                   2 * n, n, n, store_h=store_h)
    assert len(k._SITES) == 3 and len(recorded_launches) == 6
    kernels = (k._swiglu_forward_kernel, k._swiglu_backward_kernel, k._swiglu_backward_kernel)
    for (kernel, grid, _, num_warps, meta), pick, store_h, want_kernel in zip(
        recorded_launches[:3], (k.forward_config, k.backward_config, k.backward_config), (None, False, True),
        kernels,
    ):
        assert kernel is want_kernel
        c = pick(m, n)
        # row strides 2n: not contiguous, so a flat table row keeps its 2-D tiles
        assert grid == (m // c.block_m * -(-n // c.block_n), 1, 1) and num_warps == c.num_warps
        assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["PERSISTENT"]) == (c.block_m, c.block_n, False)
        assert meta["GRID_2D"] is False
        assert meta["EVEN"] is (n % c.block_n == 0) and meta["LOAD_POLICY"] == ""
        assert meta.get("STORE_H") is store_h
    assert recorded_launches[3:] == recorded_launches[:3]


@pytest.mark.parametrize("device", kernel_devices())
def test_table_flat_rows_tile_contiguous_operands_as_one_row(device, recorded_launches, monkeypatch):
    """A flat table row launches a contiguous problem as one long row of tiles of the row's size; the
    same shape with strided rows keeps the 2-D tiles. The site remembers the rewritten arguments."""
    from rotalabs_accel.triton_kernels import swiglu as k

    monkeypatch.setattr(k, "FORWARD_TABLE", ((None, 0, 1024, 2048, 8, True),))
    m, n = 4096, 11008
    c = k.forward_config(m, n)
    assert c.flat and not k.forward_config(1, n).flat  # a clamped tile (1 x 1024) keeps its 2-D shape
    t = torch.empty(8, dtype=torch.bfloat16, device=device)
    for _ in range(2):
        k.swiglu_forward_rows(t, t, t, m, n, n, n, n)
    (kernel, grid, args, _, meta), again = recorded_launches
    tile = c.block_m * c.block_n
    assert grid == (-(-m * n // tile), 1, 1) and (meta["BLOCK_M"], meta["BLOCK_N"]) == (1, tile)
    assert args[3:5] == (1, m * n) and meta["EVEN"] is (m * n % tile == 0)
    assert again[2] == args
    k.swiglu_forward_rows(t, t, t, m, n, n + 8, n, n)  # gate rows strided: 2-D tiles
    grid = recorded_launches[-1][1]
    assert grid == (m // c.block_m * -(-n // c.block_n), 1, 1) and recorded_launches[-1][2][3:5] == (m, n)


def test_grid_layout_of_one_program_per_tile():
    """With ``grid_2d``: column tiles by row tiles on a 2-D grid, up to CUDA's 65535 row tiles; past
    that, without it (the default) and for persistent grids, one linear axis."""
    from rotalabs_accel.triton_kernels import swiglu as k

    assert not k.SwiGLULaunchConfig(1, 16, 1).grid_2d
    c = k.SwiGLULaunchConfig(block_m=2, block_n=1024, num_warps=8, grid_2d=True)
    assert k._make_plan(c, 4096, 11008, -1, None)[0] == (11, 2048, 1)
    grid, _, meta = k._make_plan(c, 2 * 65535, 11008, -1, None)
    assert grid == (11, 65535, 1) and meta["GRID_2D"] is True
    grid, _, meta = k._make_plan(c, 2 * 65535 + 1, 11008, -1, False)
    assert grid == (11 * 65536, 1, 1) and meta["GRID_2D"] is False and meta["PERSISTENT"] is False
    grid, _, meta = k._make_plan(replace(c, grid_2d=False), 4096, 11008, -1, None)
    assert grid == (11 * 2048, 1, 1) and meta["GRID_2D"] is False
    grid, _, meta = k._make_plan(replace(c, programs_per_sm=2), 4096, 11008, -1, None)
    assert grid == (2, 1, 1) and meta["PERSISTENT"] is True and meta["GRID_2D"] is False


@pytest.mark.parametrize("device", kernel_devices())
def test_flat_tiling_applies_only_to_contiguous_operands(device, monkeypatch):
    from rotalabs_accel.triton_kernels import swiglu as k

    launches = []
    monkeypatch.setattr(k, "launch", lambda kernel, grid, args, num_warps, **meta: launches.append(
        (grid, args, meta)))
    flat = k.SwiGLULaunchConfig(block_m=2, block_n=64, num_warps=4, flat=True)
    gate, up = randn(6, 40, device=device), randn(6, 40, device=device)
    k.swiglu_forward(gate, up, config=flat)
    k.swiglu_backward(gate, gate, up, config=flat)
    packed = randn(6, 80, device=device)
    k.swiglu_forward(packed[:, :40], packed[:, 40:], config=flat)
    flat_fwd, flat_bwd, strided = launches
    assert flat_fwd[1][3:5] == (1, 240) and flat_fwd[2]["BLOCK_N"] == 128 and flat_fwd[0] == (2, 1, 1)
    assert flat_bwd[1][6:8] == (1, 240) and flat_bwd[2]["BLOCK_M"] == 1
    assert strided[1][3:5] == (6, 40) and strided[2]["BLOCK_N"] == 64  # row stride 80: stays 2-D


@pytest.mark.parametrize("device", kernel_devices())
def test_launchers_reject_bad_operands(device):
    from rotalabs_accel.triton_kernels import swiglu as k

    gate = randn(4, 8, device=device)
    with pytest.raises(ValueError, match="up: expected a 2-D tensor of shape"):
        k.swiglu_forward(gate, randn(4, 9, device=device))
    with pytest.raises(ValueError, match="unit stride"):
        k.swiglu_forward(gate, randn(8, 4, device=device).t())
    with pytest.raises(TypeError, match="float64"):
        k.swiglu_forward(gate.double(), gate.double())


# --------------------------------------------------------------------------------------------------
# torch.library custom ops and torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.parametrize("device", kernel_devices())
def test_custom_ops_pass_opcheck(device):
    import rotalabs_accel.ops.swiglu  # noqa: F401  (registers the ops)

    gate = randn(3, 10, device=device, dtype=torch.bfloat16).requires_grad_()
    up = randn(3, 10, device=device, dtype=torch.bfloat16).requires_grad_()
    gate_up = randn(3, 20, device=device, dtype=torch.bfloat16).requires_grad_()
    grad = randn(3, 10, device=device, dtype=torch.bfloat16)
    ops = torch.ops.rotalabs_accel
    torch.library.opcheck(ops.swiglu_fwd.default, (gate, up))
    torch.library.opcheck(ops.swiglu_bwd.default, (grad, gate.detach(), up.detach()))
    torch.library.opcheck(ops.swiglu_packed_fwd.default, (gate_up,))
    torch.library.opcheck(ops.swiglu_packed_bwd.default, (grad, gate_up.detach()))
    # A row-strided view goes through the op too.
    torch.library.opcheck(ops.swiglu_fwd.default, (gate_up[:, :10], gate_up[:, 10:]))


@pytest.mark.compile
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    dtype = torch.bfloat16
    n = 24

    def block(gate, up, gate_up):
        return swiglu_fused(gate, up) * 2.0 + swiglu_fused(gate_up)

    gate, up = randn(2, 3, n, dtype=dtype, device=device), randn(2, 3, n, dtype=dtype, device=device)
    gate_up = randn(2, 3, 2 * n, dtype=dtype, device=device)
    grad = randn(2, 3, n, dtype=dtype, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=backend)

    def reference(g, u, gu):
        return swiglu_reference(g, u) * 2.0 + swiglu_reference(gu[..., :n], gu[..., n:])

    with rotalabs_accel.use_backend("triton"):
        _check_forward_and_grads(
            compiled, [gate, up, gate_up],
            lambda g, u, gu: _eager(g, u) * 2.0 + _eager(gu[..., :n], gu[..., n:]),
            reference, dtype, grad,
        )


# --------------------------------------------------------------------------------------------------
# GPU only: big shapes, 64-bit offsets, a second device
# --------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(4096, 11008), (1000, 14336), (333, 4097)], ids=str)
def test_gpu_issue_shapes(dtype, shape):
    gate, up = randn(*shape, dtype=dtype, device="cuda"), randn(*shape, dtype=dtype, device="cuda")
    grad_out = randn(*shape, dtype=dtype, device="cuda")
    _check_forward_and_grads(swiglu_fused, [gate, up], _eager, swiglu_reference, dtype, grad_out)
    m, n = shape
    gate_up = torch.cat([gate, up], dim=-1)
    _check_forward_and_grads(
        swiglu_fused, [gate_up], lambda gu: _eager(gu[:, :n], gu[:, n:]),
        lambda gu: swiglu_reference(gu[:, :n], gu[:, n:]), dtype, grad_out,
    )


@pytest.mark.gpu
@needs_cuda
def test_gpu_offsets_past_two_to_the_31():
    """A packed [M, 2N] activation with more than 2**31 elements: row offsets must be 64-bit."""
    from rotalabs_accel.triton_kernels import swiglu as k

    n = 14336
    rows = 2**31 // (2 * n) + 64
    if torch.cuda.get_device_properties(0).total_memory < 3 * rows * 2 * n * 2:
        pytest.skip("not enough GPU memory")
    gate_up = torch.empty(rows, 2 * n, dtype=torch.bfloat16, device="cuda").normal_()
    out = k.swiglu_forward(gate_up[:, :n], gate_up[:, n:])
    tail = slice(rows - 128, rows)
    ref = swiglu_reference(gate_up[tail, :n].double(), gate_up[tail, n:].double())
    base = _eager(gate_up[tail, :n], gate_up[tail, n:])
    assert_within_torch_error(out[tail], base, ref, torch.bfloat16, "tail rows")
    grad = torch.empty(rows, n, dtype=torch.bfloat16, device="cuda").normal_()
    del out
    dg, du, _ = k.swiglu_backward(grad, gate_up[:, :n], gate_up[:, n:])
    ref_dg, ref_du, _ = swiglu_backward_reference(grad[tail].double(), gate_up[tail, :n].double(),
                                                  gate_up[tail, n:].double())
    base_dg, base_du = _eager_grads(grad[tail], gate_up[tail, :n], gate_up[tail, n:])
    assert_within_torch_error(dg[tail], base_dg, ref_dg, torch.bfloat16, "grad gate tail")
    assert_within_torch_error(du[tail], base_du, ref_du, torch.bfloat16, "grad up tail")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_second_device():
    gate = randn(64, 300, dtype=torch.bfloat16, device="cuda:1").requires_grad_()
    up = randn(64, 300, dtype=torch.bfloat16, device="cuda:1").requires_grad_()
    y = swiglu_fused(gate, up)
    y.sum().backward()
    assert y.device == torch.device("cuda:1") and gate.grad.device == torch.device("cuda:1")
    ref = swiglu_reference(gate.double(), up.double())
    assert_within_torch_error(y, _eager(gate, up), ref, torch.bfloat16, "forward on cuda:1")


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_graph_capture_and_replay():
    """Forward and backward are capturable (no host sync, caching-allocator memory only)."""
    gate = randn(256, 1000, dtype=torch.bfloat16, device="cuda").requires_grad_()
    gate_up = randn(256, 2000, dtype=torch.bfloat16, device="cuda").requires_grad_()
    up = randn(256, 1000, dtype=torch.bfloat16, device="cuda").requires_grad_()
    grad = randn(256, 1000, dtype=torch.bfloat16, device="cuda")

    def step():
        y = swiglu_fused(gate, up) + swiglu_fused(gate_up)
        return (y, *torch.autograd.grad(y, (gate, up, gate_up), grad))

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
        for t in (gate, up, gate_up):
            t.copy_(randn(*t.shape, dtype=t.dtype, device="cuda"))
    graph.replay()
    expected = step()
    for got, exp in zip(captured, expected):
        assert torch.equal(got, exp)


# --------------------------------------------------------------------------------------------------
# The eager host path: one autograd node, one launch per pass, only the output allocations
# --------------------------------------------------------------------------------------------------


class _AtenLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op run inside the block (views, copies, allocations)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("packed", [False, True])
def test_eager_path_is_one_node_one_launch_no_extra_ops(device, packed, recorded_launches):
    from rotalabs_accel.triton_kernels import swiglu as k

    launches = recorded_launches
    n = 24
    width = 2 * n if packed else n
    inputs = [randn(2, 3, width, device=device).requires_grad_() for _ in range(1 if packed else 2)]
    with rotalabs_accel.use_backend("triton"), _AtenLog() as log:
        y = swiglu_fused(*inputs)
    assert log.ops == ["new_empty"] and y.shape == (2, 3, n) and y.is_contiguous()
    assert [type(f).__name__ for f, _ in y.grad_fn.next_functions] == ["AccumulateGrad"] * len(inputs)
    (_, grid, args, _, meta), = launches
    assert args[0] is inputs[0] and args[2] is y and args[3:5] == (6, n)  # rows addressed in place
    assert args[-1] == (n if packed else 0)  # up starts n columns into the packed rows
    assert meta["BLOCK_N"] == k.forward_config(6, n).block_n
    with _AtenLog() as log:
        grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
    assert len(launches) == 2 and launches[1][4]["STORE_H"] is False
    # ones_like is the test's; then one new_empty per gradient; no copies or views
    assert log.ops == ["ones_like"] + ["new_empty"] * len(inputs)
    assert all(g.shape == t.shape for g, t in zip(grads, inputs))
    bwd_args = launches[1][2]
    if packed:
        assert bwd_args[1] is bwd_args[2] is inputs[0] and bwd_args[3] is bwd_args[4] is grads[0]
        assert bwd_args[-2:] == (n, n)


@pytest.mark.parametrize("device", kernel_devices())
def test_gradients_from_sum_and_non_collapsible_packed_input(device):
    """Broadcast (stride-0) incoming gradients and packed inputs whose rows need a copy."""
    dtype, n = torch.float32, 12
    gate = randn(2, 3, n, device=device, dtype=dtype).requires_grad_()
    up = randn(2, 3, n, device=device, dtype=dtype).requires_grad_()
    packed = randn(3, 2, 2 * n, device=device, dtype=dtype).permute(1, 0, 2).detach().requires_grad_()
    with rotalabs_accel.use_backend("triton"):
        (swiglu_fused(gate, up).sum() + swiglu_fused(packed).sum()).backward()
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    p64 = packed.detach().double().requires_grad_()
    (swiglu_reference(g64, u64).sum() + swiglu_reference(p64[..., :n], p64[..., n:]).sum()).backward()
    base_g, base_u = _eager_grads(torch.ones_like(gate), gate.detach(), up.detach())
    base_p = torch.cat(_eager_grads(torch.ones(2, 3, n, device=device), packed.detach()[..., :n],
                                    packed.detach()[..., n:]), -1)
    f32 = torch.float32
    assert_within_torch_error(gate.grad, base_g, g64.grad, f32, "grad gate", FACTOR[f32])
    assert_within_torch_error(up.grad, base_u, u64.grad, f32, "grad up", FACTOR[f32])
    assert_within_torch_error(packed.grad, base_p, p64.grad, f32, "grad packed", FACTOR[f32])


@pytest.mark.parametrize("device", kernel_devices())
def test_double_backward_through_a_gradient_that_needs_grad(device):
    # v requires grad: the second backward differentiates through the first one's incoming gradient
    # (tests/test_transforms.py checks gradient penalties against the float64 model)
    gate = randn(3, 8, device=device).requires_grad_()
    up = randn(3, 8, device=device).requires_grad_()
    v = randn(3, 8, device=device).requires_grad_()
    with rotalabs_accel.use_backend("triton"):
        (g_gate,) = torch.autograd.grad(swiglu_fused(gate, up), gate, v, create_graph=True)
    g_gate.sum().backward()
    s = torch.sigmoid(gate.detach())
    # d/dv of sum(v * up * s * (1 + g (1 - s))) is up * s * (1 + g (1 - s))
    torch.testing.assert_close(v.grad, up.detach() * s * (1 + gate.detach() * (1 - s)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", kernel_devices())
def test_compile_traces_leading_dimensions_that_do_not_collapse(device):
    gate = randn(3, 2, 8, device=device).transpose(0, 1)
    up = randn(3, 2, 8, device=device).transpose(0, 1)
    packed = randn(3, 2, 16, device=device).transpose(0, 1)
    with rotalabs_accel.use_backend("triton"):
        compiled = torch.compile(swiglu_fused, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(gate, up), swiglu_reference(gate, up), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(compiled(packed), swiglu_reference(packed[..., :8], packed[..., 8:]),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", kernel_devices())
def test_packed_custom_ops_check_their_inputs(device):
    ops = torch.ops.rotalabs_accel
    with pytest.raises(ValueError, match=r"swiglu_packed_bwd: grad_out must have shape \[4, 6\], got \[1"):
        ops.swiglu_packed_bwd(randn(1, 2, device=device), randn(4, 12, device=device))
    with pytest.raises(ValueError, match="even last dimension"):
        ops.swiglu_packed_fwd(randn(4, 7, device=device))
    with pytest.raises(TypeError, match="got torch.int32"):
        ops.swiglu_packed_fwd(torch.ones(4, 8, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="grad_out must have the dtype of gate_up"):
        ops.swiglu_packed_bwd(randn(4, 6, device=device, dtype=torch.float16), randn(4, 12, device=device))


@pytest.mark.parametrize("device", kernel_devices())
def test_custom_ops_accept_empty_tensors_with_any_strides(device):
    # 0-row tensors may carry strides (0, 0) (the dynamic-shape pass of opcheck makes some)
    gate = torch.empty_strided((0, 5), (0, 0), device=device).requires_grad_()
    up = torch.empty_strided((0, 5), (0, 0), device=device).requires_grad_()
    torch.library.opcheck(torch.ops.rotalabs_accel.swiglu_fwd, (gate, up))
    assert torch.ops.rotalabs_accel.swiglu_fwd(gate, up).shape == (0, 5)


def test_meta_module_with_fused_gate_up_does_not_warn():
    import warnings

    module = SwiGLU(8, 16, fused_gate_up=True, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = module(torch.empty(2, 8, device="meta"))
    assert y.shape == (2, 8) and y.device.type == "meta"


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("packed", [False, True])
def test_no_grad_call_is_one_launch_without_autograd(device, packed, recorded_launches):
    n = 16
    width = 2 * n if packed else n
    inputs = [randn(3, width, device=device).requires_grad_() for _ in range(1 if packed else 2)]
    with rotalabs_accel.use_backend("triton"), torch.no_grad(), _AtenLog() as log:
        y = swiglu_fused(*inputs)
    assert y.grad_fn is None and not y.requires_grad and y.shape == (3, n)
    assert log.ops == ["new_empty"] and len(recorded_launches) == 1
