r"""Triton kernel for the weight gradient of an embedding lookup: deterministic, fp32 sums, no atomics.

The forward of an embedding is a gather (``F.embedding``, already at the bandwidth limit). Its backward
must add the output gradient of every token into the table row of its id; PyTorch's CUDA backward
sorts the ids and runs several passes over segments of them. Here:

1. ``torch.sort(ids, stable=True)`` gives the ids in order and, for each, the token it came from;
   ``torch.searchsorted`` gives, for each sorted position, the end of its run of equal ids (no host
   synchronisation: every size is known in advance);
2. the table gradient is allocated zeroed (one memset);
3. one kernel, grid ``(tokens, column blocks)``: the program at the first position of a run adds the
   gradient rows of the run's tokens in fp32, ``ROWS`` rows per step in token order (a fixed tree
   over the lanes at the end), and writes the sum once in the table's dtype; programs at other
   positions do nothing. The order of every sum is fixed, so the result is the same on every run
   (deterministic), unlike an atomic scatter.

Traffic: the output gradient is read once (``tokens x H``), each touched table row written once, and
the table zeroed once (``V x H``); the sort moves ``tokens`` integers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch

__all__ = ["KERNEL_DTYPES", "embedding_backward"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _embedding_backward_kernel(
    grad_ptr, stride_grad, sorted_ids_ptr, order_ptr, run_end_ptr, out_ptr, stride_out, n_cols,
    padding_idx, BLOCK_H: tl.constexpr, ROWS: tl.constexpr, HAS_PADDING: tl.constexpr,
):
    pos = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_row = cols < n_cols
    token_id = tl.load(sorted_ids_ptr + pos)
    previous = tl.load(sorted_ids_ptr + tl.maximum(pos - 1, 0))
    head = (pos == 0) | (previous != token_id)
    if HAS_PADDING:
        head = head & (token_id != padding_idx)
    # Only the first position of a run sums it; elsewhere the loop is empty and nothing is stored.
    end = tl.where(head, tl.load(run_end_ptr + pos), pos)
    # ROWS gradient rows per step, in flight together: a frequent id's run (hundreds of tokens in
    # text) takes ROWS times fewer dependent steps. The order of the sum is fixed by ROWS alone.
    lanes = tl.arange(0, ROWS)
    acc = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
    for start in range(pos, end, ROWS):
        idx = start + lanes
        valid = idx < end
        rows = tl.load(order_ptr + idx, mask=valid, other=0)
        ptrs = grad_ptr + rows[:, None] * stride_grad + cols[None, :]
        acc += tl.load(ptrs, mask=valid[:, None] & in_row[None, :], other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0)
    out_row = out_ptr + token_id * stride_out
    tl.store(out_row + cols, total.to(out_ptr.dtype.element_ty), mask=cols < tl.where(head, n_cols, 0))


def _launch_shape(hidden: int) -> tuple[int, int, int]:
    """``(BLOCK_H, ROWS, num_warps)``: 256 columns per program (16 column blocks at H = 4096, so a long
    run is summed by that many programs at once) and 16 rows per step (32 fp32 accumulators per
    thread with 4 warps)."""
    block = min(triton.next_power_of_2(max(hidden, 1)), 256)
    return block, 16, 4


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
    block_h, rows, num_warps = _launch_shape(hidden)
    grid = (tokens, triton.cdiv(hidden, block_h))
    args = (grad, grad.stride(0), sorted_ids, order, run_end, out, out.stride(0), hidden,
            -1 if padding_idx is None else padding_idx)
    device = grad.get_device()
    meta = {"BLOCK_H": block_h, "ROWS": rows, "HAS_PADDING": padding_idx is not None}
    if device >= 0 and device != torch.cuda.current_device():
        with torch.cuda.device(device):
            launch(_embedding_backward_kernel, grid, args, num_warps, **meta)
    else:
        launch(_embedding_backward_kernel, grid, args, num_warps, **meta)
    return out
