"""Embedding: the table-gradient kernel (interpreter on CPU, real on CUDA), autograd, custom ops, compile.

Oracle: ``embedding_backward_reference`` in float64 on the same gradient. Baseline: PyTorch's own
``F.embedding`` backward in the table's dtype.

Tolerance (tests/helpers.py): ``err(ours) <= 2 * err(baseline) + unit_roundoff / 2``. The kernel sums
each row in fp32 and rounds once, so its error is one rounding of the output (at most the floor);
PyTorch also accumulates in fp32 on CUDA (and in the dtype on the CPU). A gradient sent to the wrong
row, a token dropped from a run or a padding row that receives gradient is off by order one.

Ids are drawn from a small vocabulary with a long run of one id, so rows sum many tokens (hidden sizes
100, and 1100 > 1024: two column blocks, the last partial). The kernel cuts the sorted ids into chunks
of ``CHUNK`` (64) positions and sums runs that cross chunks in pieces; the ``chunk`` fixture runs the
tests at chunks of 8 too, so runs cross one and several chunk boundaries, start on one, and end in a
partial last chunk.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rotalabs_accel
from helpers import FLOAT_DTYPES, assert_within_torch_error, kernel_devices, randn
from rotalabs_accel.functional.embedding import embedding
from rotalabs_accel.kernels.embedding import TritonEmbedding
from rotalabs_accel.reference.embedding import embedding_backward_reference

pytestmark = pytest.mark.interpreter


@pytest.fixture(params=[8, 64], ids=["chunk8", "chunk64"])
def chunk(request, monkeypatch):
    from rotalabs_accel.triton_kernels import embedding as k

    monkeypatch.setattr(k, "CHUNK", request.param)
    return request.param


def _ids(shape, vocab, device, run_id=3, run=40):
    ids = torch.randint(0, vocab, shape, device=device)
    flat = ids.view(-1)
    flat[: min(run, flat.numel())] = run_id  # one long run of equal ids
    return ids


def _check(ids, table, padding_idx=None, grad_view=None, dtype=None):
    """Gradient of the table through ``embedding`` (forced Triton) vs PyTorch and the fp64 oracle."""
    dtype = dtype or table.dtype
    ours_w = table.detach().clone().requires_grad_()
    base_w = table.detach().clone().requires_grad_()
    with rotalabs_accel.use_backend("triton"):
        out = embedding(ids, ours_w, padding_idx)
    base = F.embedding(ids, base_w, padding_idx)
    assert torch.equal(out, base), "the lookup differs from F.embedding"
    grad = randn(*out.shape, dtype=dtype, device=table.device)
    g = grad if grad_view is None else grad_view(grad)
    out.backward(g)
    base.backward(g)
    pad = None if padding_idx is None else padding_idx % table.shape[0]
    ref = embedding_backward_reference(g.double(), ids, table.shape[0], pad)
    assert ours_w.grad.dtype == table.dtype and ours_w.grad.shape == table.shape
    assert_within_torch_error(ours_w.grad, base_w.grad, ref, dtype, "table grad")
    if pad is not None:
        assert not ours_w.grad[pad].any()
    return ours_w.grad


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("hidden", [100, 1100])
def test_table_gradient(device, dtype, hidden, chunk):
    table = randn(37, hidden, dtype=dtype, device=device)
    _check(_ids((3, 29), 37, device), table)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("padding_idx", [3, -34, 0])
def test_padding_row_gets_no_gradient(device, padding_idx, chunk):
    # -34 is row 3 of 37: the long run is the padding id, and is dropped.
    table = randn(37, 64, dtype=torch.bfloat16, device=device)
    _check(_ids((2, 31), 37, device), table, padding_idx=padding_idx)


@pytest.mark.parametrize("device", kernel_devices())
def test_int32_ids_leading_dims_and_strided_gradient(device, chunk):
    table = randn(50, 48, dtype=torch.float16, device=device)
    ids = _ids((2, 3, 7), 50, device).to(torch.int32)
    # the gradient arrives as a transposed view (non-contiguous rows) and as a broadcast (stride 0)
    _check(ids, table, grad_view=lambda g: g.transpose(0, 1).contiguous().transpose(0, 1))
    _check(ids, table, grad_view=lambda g: g[:1, :1, :1].expand(g.shape))


@pytest.mark.parametrize("device", kernel_devices())
def test_every_token_the_same_and_every_token_distinct(device, chunk):
    table = randn(300, 32, dtype=torch.bfloat16, device=device)
    _check(torch.full((64,), 7, device=device), table)
    _check(torch.randperm(300, device=device)[:64], table)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("run", [7, 8, 9, 17, 24, 33])
def test_runs_across_chunk_boundaries(device, run, monkeypatch):
    """Chunks of 8: a run of ``run`` equal ids placed to start inside, on, and just before a boundary."""
    from rotalabs_accel.triton_kernels import embedding as k

    monkeypatch.setattr(k, "CHUNK", 8)
    table = randn(60, 40, dtype=torch.float32, device=device)
    for first_sorted in (0, 3, 8, 7):
        # ids below 20 fill the first sorted positions, then the run of id 20, then ids above
        before = torch.randint(0, 20, (first_sorted,), device=device)
        after = torch.randint(21, 60, (13,), device=device)
        ids = torch.cat([before, torch.full((run,), 20, device=device), after])
        ids = ids[torch.randperm(ids.numel(), device=device)]
        _check(ids, table)
        _check(ids, table, padding_idx=20)


@pytest.mark.parametrize("device", kernel_devices())
def test_no_tokens(device):
    table = randn(10, 8, device=device).requires_grad_()
    with rotalabs_accel.use_backend("triton"):
        out = embedding(torch.zeros((0, 3), dtype=torch.long, device=device), table)
    assert out.shape == (0, 3, 8)
    out.sum().backward()
    assert table.grad.shape == (10, 8) and not table.grad.any()


@pytest.mark.parametrize("device", kernel_devices())
def test_deterministic(device, chunk):
    table = randn(20, 96, dtype=torch.float32, device=device)
    ids = _ids((4, 50), 20, device, run=150)
    grad = randn(4, 50, 96, device=device)
    results = []
    for _ in range(2):
        w = table.clone().requires_grad_()
        with rotalabs_accel.use_backend("triton"):
            embedding(ids, w).backward(grad)
        results.append(w.grad)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("device", kernel_devices())
def test_frozen_table_and_no_grad_take_the_plain_lookup(device, monkeypatch):
    from rotalabs_accel.ops import embedding as ops

    monkeypatch.setattr(ops, "_EmbeddingFunction", None)  # must not be reached
    table = randn(10, 8, device=device)
    ids = torch.tensor([1, 2, 3], device=device)
    with rotalabs_accel.use_backend("triton"):
        assert torch.equal(embedding(ids, table), table[ids])
        with torch.no_grad():
            assert torch.equal(embedding(ids, table.requires_grad_()), table[ids])


def test_bad_arguments():
    table = randn(10, 4)
    with pytest.raises(TypeError, match="input must be an int64 or int32 tensor"):
        embedding(torch.tensor([1.0]), table)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        embedding(torch.tensor([1]), table.long())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        embedding(torch.tensor([1]), table[0])
    with pytest.raises(ValueError, match=r"padding_idx must be in \[-10, 10\)"):
        embedding(torch.tensor([1]), table, padding_idx=10)
    with pytest.raises(TypeError, match="padding_idx must be an int"):
        embedding(torch.tensor([1]), table, padding_idx=1.0)


def test_float64_and_cpu_calls_run_pytorch():
    table = randn(10, 4, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[1, 1, 2]])
    embedding(ids, table).sum().backward()
    assert table.grad[1].tolist() == [2.0] * 4 and table.grad[2].tolist() == [1.0] * 4


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


def test_module_keeps_the_parameter_and_state_dict():
    plain = torch.nn.Embedding(30, 8, padding_idx=2)
    ours = TritonEmbedding.from_embedding(plain)
    assert ours.weight is plain.weight and ours.padding_idx == 2
    assert ours.state_dict().keys() == plain.state_dict().keys()
    ids = torch.tensor([[2, 5, 5, 9]])
    torch.testing.assert_close(ours(ids), plain(ids))
    fresh = TritonEmbedding(30, 8, padding_idx=2)
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh.weight, plain.weight)


def test_module_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="max_norm is not supported"):
        TritonEmbedding(10, 4, max_norm=1.0)
    with pytest.raises(ValueError, match="sparse gradients are not supported"):
        TritonEmbedding.from_embedding(torch.nn.Embedding(10, 4, sparse=True))
    with pytest.raises(ValueError, match="scale_grad_by_freq is not supported"):
        TritonEmbedding.from_embedding(torch.nn.Embedding(10, 4, scale_grad_by_freq=True))

    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    with pytest.raises(TypeError, match="overrides nn.Embedding.forward"):
        TritonEmbedding.from_embedding(Scaled(10, 4))
    with pytest.raises(TypeError, match="expected a torch.nn.Embedding"):
        TritonEmbedding.from_embedding(torch.nn.Linear(4, 4))


# --------------------------------------------------------------------------------------------------
# torch.library custom ops and torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.parametrize("device", kernel_devices())
def test_custom_ops_pass_opcheck(device):
    import rotalabs_accel.ops.embedding  # noqa: F401  (registers the ops)

    ops = torch.ops.rotalabs_accel
    table = randn(20, 16, device=device, dtype=torch.bfloat16).requires_grad_()
    ids = _ids((3, 5), 20, device, run=4)
    torch.library.opcheck(ops.embedding_fwd.default, (ids, table, -1))
    torch.library.opcheck(ops.embedding_fwd.default, (ids, table, 3))
    grad = randn(3, 5, 16, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(ops.embedding_bwd.default, (grad, ids, 20, -1))
    torch.library.opcheck(ops.embedding_bwd.default, (grad, ids, 20, 3))


@pytest.mark.compile
@pytest.mark.parametrize("device", kernel_devices())
def test_compile_fullgraph(device):
    dtype = torch.bfloat16
    table = randn(40, 24, dtype=dtype, device=device)
    ids = _ids((2, 9), 40, device, run=6)

    def fn(w, ids):
        return (embedding(ids, w, padding_idx=1) * 1.5).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ours_w, base_w = table.clone().requires_grad_(), table.clone().requires_grad_()
    with rotalabs_accel.use_backend("triton"):
        out = compiled(ours_w, ids)
    base = (F.embedding(ids, base_w, padding_idx=1) * 1.5).sum(-1)
    torch.testing.assert_close(out, base)
    grad = randn(2, 9, device=device, dtype=dtype)
    out.backward(grad)
    base.backward(grad)
    ref = embedding_backward_reference(
        (grad.double()[..., None] * 1.5).expand(2, 9, 24), ids, 40, 1)
    assert_within_torch_error(ours_w.grad, base_w.grad, ref, dtype, "compiled table grad")


# --------------------------------------------------------------------------------------------------
# GPU only: a language model's table
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vocabulary_sized_table_on_cuda():
    table = randn(32000, 4096, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, 32000, (2, 4096), device="cuda")
    ids[0, :500] = 13  # a frequent token
    _check(ids, table)


def test_from_pretrained_as_nn_embedding():
    table = torch.randn(10, 4)
    frozen = TritonEmbedding.from_pretrained(table, padding_idx=1)
    assert type(frozen) is TritonEmbedding and not frozen.weight.requires_grad
    assert torch.equal(frozen.weight, table) and frozen.padding_idx == 1
    ids = torch.tensor([[0, 1, 9]])
    torch.testing.assert_close(frozen(ids), torch.nn.Embedding.from_pretrained(table, padding_idx=1)(ids))
    assert TritonEmbedding.from_pretrained(table, freeze=False).weight.requires_grad
    with pytest.raises(ValueError, match="TritonEmbedding"):
        TritonEmbedding.from_pretrained(table, max_norm=1.0)
