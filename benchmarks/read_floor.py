"""What reading a buffer once costs, timed as the benchmarks time everything.

A decode-sized linear layer (M = 1 or 16 tokens) is bound by reading its weight: whatever the kernel
does with the bytes, it cannot finish before they have been read. This module times a kernel that
does nothing else: each program sums a contiguous run of int32 words with 16-byte loads and stores
one integer, so its traffic is the buffer's bytes read and a few bytes written. A handful of launch
shapes are timed and the fastest is the floor at that size (a kernel can only be slower than the
floor by what it does besides reading).

Imported lazily: the kernel is defined at import, after a ``--dry-run`` has switched Triton to its
interpreter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

__all__ = ["read_floor_ms", "READ_CONFIGS"]

# (words per step of one program, steps per program, warps, evict_first): 16-byte loads need
# BLOCK >= 4 * 32 * warps. evict_first marks the lines read as the first to leave L2, as the weight
# loads of the INT8 kernels do: the stream then recycles a few L2 sets instead of evicting (and, after
# the benchmarks' zeroing flush, writing back) everything else in L2.
READ_CONFIGS = [
    (block, steps, warps, evict)
    for block, steps, warps in ((512, 4, 2), (1024, 1, 4), (1024, 4, 4), (2048, 2, 4), (2048, 4, 8),
                                (4096, 1, 8), (4096, 2, 8), (8192, 1, 16))
    for evict in (False, True)
]


@triton.jit
def _read_words_kernel(src, out, n_words, BLOCK: tl.constexpr, STEPS: tl.constexpr,
                       EVICT_FIRST: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * (BLOCK * STEPS)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(STEPS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if EVICT_FIRST:
            acc += tl.load(src + offs, mask=offs < n_words, other=0, eviction_policy="evict_first")
        else:
            acc += tl.load(src + offs, mask=offs < n_words, other=0)
    tl.store(out + tl.program_id(0), tl.sum(acc, axis=0))


def read_words(buf: torch.Tensor, block: int, steps: int, warps: int, evict_first: bool) -> torch.Tensor:
    """Per-program sums of ``buf`` viewed as int32 words (the result proves every word was read)."""
    words = buf.reshape(-1).view(torch.int32)
    n = words.numel()
    programs = triton.cdiv(n, block * steps)
    out = torch.empty(programs, dtype=torch.int32, device=buf.device)
    _read_words_kernel[(programs,)](words, out, n, BLOCK=block, STEPS=steps, EVICT_FIRST=evict_first,
                                    num_warps=warps)
    return out


def read_floor_ms(buf: torch.Tensor, time_ms: Callable[[Callable[[], object]], float],
                  configs=READ_CONFIGS) -> tuple[float, tuple]:
    """The fastest time (ms) to read ``buf`` once over ``configs``, timed by ``time_ms``, and its config.

    ``buf`` must be contiguous with a byte size divisible by 4. Each configuration's result is checked
    against ``torch.sum`` (int32 wrap-around included), so a kernel that skipped words would not count.
    """
    if not buf.is_contiguous() or (buf.numel() * buf.element_size()) % 4:
        raise ValueError("read_floor_ms: buf must be contiguous with a byte size divisible by 4")
    want = buf.reshape(-1).view(torch.int32).to(torch.int64).sum().item()
    best = None
    for cfg in configs:
        got = read_words(buf, *cfg).to(torch.int64).sum().item()
        # each program's int32 sum wraps modulo 2**32; the total of those is congruent to the true sum
        if (got - want) % (1 << 32):
            raise AssertionError(f"read_floor_ms: config {cfg} read the wrong words")
        ms = time_ms(lambda c=cfg: read_words(buf, *c))
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return best
