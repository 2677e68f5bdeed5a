r"""Triton kernels for the weight gradient of an embedding lookup: deterministic, fp32 sums, no atomics.

The forward of an embedding is a gather (``F.embedding``, already at the bandwidth limit). Its backward
must add the output gradient of every token into the table row of its id. Here:

1. ``torch.sort(ids, stable=True)`` gives the ids in order and, for each, the token it came from;
   ``torch.searchsorted`` gives, for each sorted position, the end of its run of equal ids (no host
   synchronisation: every size is known in advance; a run's start shows as a change of id);
2. the table gradient is allocated zeroed (one memset);
3. ``_embedding_backward_kernel``, grid ``(tokens, column blocks)``: the sorted positions are cut into
   chunks of ``CHUNK``. A *leader* is the first position of a run, or the first position of a chunk
   inside a run that began earlier. Each leader adds, in fp32 and in token order, the gradient rows
   of its run's tokens up to the end of the run or of the chunk, whichever comes first; every other
   program does nothing. A run that lies in one chunk is written to the table at once; the pieces of
   a run that crosses chunks go to a small fp32 scratch (two slots per chunk: the piece of a run
   entering from the previous chunk, the piece of a run leaving for the next one);
4. ``_embedding_finish_kernel``, grid ``(chunks, column blocks)``: for each run leaving chunk ``k``
   and starting in it, adds its pieces in chunk order and writes the row.

So no program sums more than ``CHUNK`` rows (a frequent id in text, hundreds of tokens, is summed by
many programs at once), and the order of every sum is fixed: the result is the same on every run
(deterministic), unlike an atomic scatter.

Traffic: the output gradient is read once (``tokens x H``), each touched table row written once, and
the table zeroed once (``V x H``); the sort moves ``tokens`` integers; the scratch is
``2 x ceil(tokens / CHUNK) x H`` fp32 values, of which only the pieces of crossing runs are touched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch, on_device

__all__ = ["KERNEL_DTYPES", "CHUNK", "embedding_backward"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


CHUNK = 64  # most rows one program sums; also the scratch's granularity


@triton.jit
def _embedding_backward_kernel(
    grad_ptr, stride_grad, sorted_ids_ptr, order_ptr, run_end_ptr, out_ptr, stride_out, part_ptr, n_cols,
    padding_idx, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, HAS_PADDING: tl.constexpr,
):
    pos = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_row = cols < n_cols
    token_id = tl.load(sorted_ids_ptr + pos)
    previous = tl.load(sorted_ids_ptr + tl.maximum(pos - 1, 0))
    run_end = tl.load(run_end_ptr + pos)
    chunk = pos // CHUNK
    chunk_end = (chunk + 1) * CHUNK
    is_head = (pos == 0) | (previous != token_id)
    entering = (pos % CHUNK == 0) & (pos > 0) & (previous == token_id)  # a run from the previous chunk
    leader = is_head | entering
    if HAS_PADDING:
        leader = leader & (token_id != padding_idx)
    stop = tl.where(leader, tl.minimum(run_end, chunk_end), pos)  # empty loop for non-leaders
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in range(pos, stop):
        row = tl.load(order_ptr + j)
        acc += tl.load(grad_ptr + row * stride_grad + cols, mask=in_row, other=0.0).to(tl.float32)
    piece = leader & (entering | (run_end > chunk_end))
    whole = leader & is_head & (run_end <= chunk_end)
    tl.store(out_ptr + token_id * stride_out + cols, acc.to(out_ptr.dtype.element_ty),
             mask=cols < tl.where(whole, n_cols, 0))
    slot = 2 * chunk + tl.where(entering, 0, 1)
    tl.store(part_ptr + slot * n_cols + cols, acc, mask=cols < tl.where(piece, n_cols, 0))


@triton.jit
def _embedding_finish_kernel(
    sorted_ids_ptr, run_end_ptr, out_ptr, stride_out, part_ptr, n_cols, n_tokens, padding_idx,
    CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, HAS_PADDING: tl.constexpr,
):
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_row = cols < n_cols
    last = tl.minimum((k + 1) * CHUNK, n_tokens) - 1
    token_id = tl.load(sorted_ids_ptr + last)
    before = tl.load(sorted_ids_ptr + tl.maximum(k * CHUNK - 1, 0))
    run_end = tl.load(run_end_ptr + last)
    # The run holding chunk k's last position began in chunk k (the previous chunk's last id differs:
    # a run is contiguous) and goes on past it: chunk k owns it.
    owner = ((k == 0) | (before != token_id)) & (run_end > (k + 1) * CHUNK)
    if HAS_PADDING:
        owner = owner & (token_id != padding_idx)
    acc = tl.load(part_ptr + (2 * k + 1) * n_cols + cols, mask=cols < tl.where(owner, n_cols, 0), other=0.0)
    last_chunk = tl.where(owner, (run_end - 1) // CHUNK, k)
    for c in range(k + 1, last_chunk + 1):
        acc += tl.load(part_ptr + (2 * c) * n_cols + cols, mask=in_row, other=0.0)
    tl.store(out_ptr + token_id * stride_out + cols, acc.to(out_ptr.dtype.element_ty),
             mask=cols < tl.where(owner, n_cols, 0))


def _launch_shape(hidden: int) -> tuple[int, int]:
    """``(BLOCK_H, num_warps)``: up to 1024 columns per program, 8 bf16 elements (16 bytes) per thread."""
    block = min(triton.next_power_of_2(max(hidden, 1)), 1024)
    return block, max(1, min(4, block // 256))


def embedding_backward(
    grad: torch.Tensor, ids: torch.Tensor, num_embeddings: int, padding_idx: int | None = None
) -> torch.Tensor:
    """Launch the backward on flattened inputs.

    Args:
        grad: ``(T, H)`` gradient of the lookup's output, float32 / float16 / bfloat16, unit stride in
            the last dimension (any row stride).
        ids: ``(T,)`` int64 ids in ``[0, num_embeddings)`` (not checked here: the forward's lookup
            already rejected ids out of range).
        num_embeddings: rows of the table.
        padding_idx: non-negative row that gets no gradient, or ``None``.

    Returns:
        ``(num_embeddings, H)`` gradient of the table in ``grad.dtype``, each row summed in fp32 in a
        fixed order.
    """
    tokens, hidden = grad.shape
    out = torch.zeros((num_embeddings, hidden), dtype=grad.dtype, device=grad.device)
    if tokens == 0 or hidden == 0:
        return out
    sorted_ids, order = torch.sort(ids, stable=True)
    run_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
    chunks = triton.cdiv(tokens, CHUNK)
    part = torch.empty((2 * chunks, hidden), dtype=torch.float32, device=grad.device)
    block_h, num_warps = _launch_shape(hidden)
    col_blocks = triton.cdiv(hidden, block_h)
    pad = -1 if padding_idx is None else padding_idx
    meta = {"CHUNK": CHUNK, "BLOCK_H": block_h, "HAS_PADDING": padding_idx is not None}
    sums = (grad, grad.stride(0), sorted_ids, order, run_end, out, out.stride(0), part, hidden, pad)
    finish = (sorted_ids, run_end, out, out.stride(0), part, hidden, tokens, pad)
    def run():
        launch(_embedding_backward_kernel, (tokens, col_blocks), sums, num_warps, **meta)
        launch(_embedding_finish_kernel, (chunks, col_blocks), finish, num_warps, **meta)

    on_device(grad.get_device(), run)
    return out
