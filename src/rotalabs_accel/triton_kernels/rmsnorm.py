"""Triton kernels for RMSNorm and fused residual-add RMSNorm: forward, backward, launchers, heuristics.

Every kernel works on a 2-D view ``(M, N)`` whose rows may be strided (row stride != N) but whose
elements within a row are contiguous. Math and casting modes are those of
:mod:`rotalabs_accel.reference.rmsnorm`; reductions accumulate in fp32.

Strategies (chosen by :func:`forward_config` / :func:`backward_config` from the tables below):

``tile``
    The whole row lives in registers. A program owns ``BLOCK_M`` rows at a time and loops over
    row tiles (``range(pid, num_tiles, num_programs)``). Forward reads x once and writes y once;
    backward reads x and dy once, writes dx once, and keeps its partial dW in registers for all of
    its rows, storing one fp32 row of partials per program at the end.
``chunked`` (forward only, large N, many rows)
    One row per loop iteration, walked in ``BLOCK_N`` chunks twice: once for the sum of squares,
    once (in reverse order, so the most recently read chunks come first while they are still in
    L2) to normalize. The first pass loads with ``evict_last`` and the second with ``evict_first``
    so the row tends to be served from L2 the second time.
``split`` (large N)
    Rows are cut into column splits across programs. Forward: one kernel writes per-split partial
    sums of squares, a second one reduces them (fixed order) and normalizes. Backward: one kernel
    writes per-split partial dot products, a second one computes dx for a ``(row group, chunk)``
    tile and one fp32 row of dW partials per row group.

dW is always reduced deterministically: each program writes its own fp32 partial row (no atomics)
and the launcher sums the partials with one ``torch.sum`` over a fixed layout.

Launches go through ``_launch``, which re-launches Triton's compiled kernel directly once the
arguments' specialization has been seen (see the comment there): for small inputs Triton's per-call
argument binding would otherwise cost more than the kernel.

Only long-standing Triton features are used (masked ``tl.load``/``tl.store`` with eviction hints,
``tl.sum``, ``tl.sqrt_rn``/``tl.div_rn``, constexpr flags, runtime-bounded loops), so the kernels
build with Triton 3.6 through 3.9 and run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import launch as _launch

__all__ = [
    "CASTING_CODES",
    "RMSNormConfig",
    "FWD_TILE_TABLE",
    "BWD_TILE_TABLE",
    "FWD_CHUNKED",
    "FWD_SPLIT",
    "BWD_SPLIT",
    "forward_config",
    "backward_config",
    "candidate_configs",
    "rmsnorm_forward",
    "rmsnorm_backward",
]

# Casting modes as kernel constants: 0 llama, 1 gemma, 2 none (see reference/rmsnorm.py).
CASTING_CODES = {"llama": 0, "gemma": 1, "none": 2}

# ---------------------------------------------------------------------------------------------
# Launch heuristics: data only. Tune these from `python benchmarks/bench_rmsnorm.py --sweep`.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RMSNormConfig:
    """One launch configuration.

    Attributes:
        strategy: ``"tile"``, ``"chunked"`` or ``"split"`` (module docstring).
        block_n: tile: the padded row width (a power of two >= N); chunked/split: the chunk width.
        num_warps: warps per program.
        block_m: tile only: rows per program iteration.
        programs_per_sm: tile/chunked: ``0`` launches one program per row tile; ``k > 0`` launches
            ``min(tiles, k * SMs)`` programs that loop over the tiles (persistent).
        prefetch: tile/chunked: issue the loads of the next row tile (or chunk) before reducing the
            current one, so that each program keeps two in flight (costs registers; pays off with
            persistent grids and long chunk loops).
        split_n: split only: columns each program of the partial-sum kernel covers (a multiple of
            ``block_n``); 0 derives it from the shape so that the grid fills the GPU.
    """

    strategy: str
    block_n: int
    num_warps: int
    block_m: int = 1
    programs_per_sm: int = 0
    prefetch: bool = False
    split_n: int = 0


# Forward with the row in registers, per element size in bytes of the input:
# (largest padded hidden size, rows per program, num_warps, programs per SM, prefetch), where
# programs per SM 0 = one program per row tile (no loop). Chosen so that nothing spills on sm_90 and
# each SM keeps >= 16K elements of reads in flight; tune from `bench_rmsnorm.py --sweep`.
FWD_TILE_TABLE: dict[int, tuple[tuple[int, int, int, int, bool], ...]] = {
    2: (
        (128, 16, 4, 0, False),
        (256, 16, 4, 0, False),
        (512, 8, 4, 0, False),
        (1024, 4, 4, 0, False),
        (2048, 2, 4, 0, False),
        (4096, 1, 8, 0, False),
        (8192, 1, 16, 0, False),
        (16384, 1, 32, 0, False),
    ),
    4: (
        (128, 16, 4, 0, False),
        (256, 8, 4, 0, False),
        (512, 4, 4, 0, False),
        (1024, 2, 4, 0, False),
        (2048, 1, 4, 0, False),
        (4096, 1, 8, 0, False),
        (8192, 1, 16, 0, False),
        (16384, 1, 32, 0, False),
    ),
}

# Backward with the row in registers: same columns. Persistent grids (programs per SM > 0, at most
# what fits on an SM) let each program carry its dW partial in registers over many rows and keep the
# partial buffer small (programs x N fp32). The backward holds ~6 fp32 values per element (x, dy,
# weight, dW, two temporaries), hence fewer elements per thread than the forward.
BWD_TILE_TABLE: dict[int, tuple[tuple[int, int, int, int, bool], ...]] = {
    2: (
        (128, 8, 4, 4, False),
        (256, 4, 4, 4, False),
        (512, 2, 4, 4, False),
        (1024, 1, 4, 8, False),
        (2048, 1, 8, 4, False),
        (4096, 1, 16, 2, False),
        (8192, 1, 32, 1, True),
        (16384, 1, 32, 1, False),
    ),
    4: (
        (128, 8, 4, 4, False),
        (256, 4, 4, 4, False),
        (512, 2, 4, 4, False),
        (1024, 1, 4, 8, False),
        (2048, 1, 8, 4, False),
        (4096, 1, 16, 2, False),
        (8192, 1, 32, 1, True),
        (16384, 1, 32, 1, False),
    ),
}

# Forward above the tile range with at least one row per SM: one row per SM at a time, in large
# chunks with the next chunk prefetched, so the rows being normalized fit in L2 for the second pass.
FWD_CHUNKED = RMSNormConfig("chunked", block_n=8192, num_warps=32, programs_per_sm=1, prefetch=True)
# Forward above the tile range with fewer rows than SMs, and the whole backward above it.
FWD_SPLIT = RMSNormConfig("split", block_n=4096, num_warps=8)
BWD_SPLIT = RMSNormConfig("split", block_n=4096, num_warps=8)

# Under Triton's interpreter (CPU tensors) grids stay tiny; this stands in for the SM count.
_INTERPRETER_SMS = 4


def _table_entry(table: dict, n: int, elt_bytes: int) -> tuple[int, int, int, int, bool] | None:
    rows = table[2 if elt_bytes <= 2 else 4]
    block_n = triton.next_power_of_2(max(n, 1))
    for entry in rows:
        if block_n <= entry[0]:
            return entry
    return None


def forward_config(m: int, n: int, elt_bytes: int, num_sms: int) -> RMSNormConfig:
    """Pick the forward launch configuration for an ``(m, n)`` input of ``elt_bytes``-byte elements.

    Example:
        >>> forward_config(16384, 4096, 2, 132).strategy
        'tile'
    """
    entry = _table_entry(FWD_TILE_TABLE, n, elt_bytes)
    if entry is not None:
        _, block_m, num_warps, pps, prefetch = entry
        block_m = min(block_m, triton.next_power_of_2(max(m, 1)))
        return RMSNormConfig("tile", triton.next_power_of_2(n), num_warps, block_m, pps, prefetch)
    if m >= num_sms:
        return FWD_CHUNKED
    return FWD_SPLIT


def backward_config(m: int, n: int, elt_bytes: int, num_sms: int) -> RMSNormConfig:
    """Pick the backward launch configuration for an ``(m, n)`` input of ``elt_bytes``-byte elements.

    Example:
        >>> backward_config(16384, 4096, 2, 132).programs_per_sm
        2
    """
    entry = _table_entry(BWD_TILE_TABLE, n, elt_bytes)
    if entry is not None:
        _, block_m, num_warps, pps, prefetch = entry
        block_m = min(block_m, triton.next_power_of_2(max(m, 1)))
        return RMSNormConfig("tile", triton.next_power_of_2(n), num_warps, block_m, pps, prefetch)
    return BWD_SPLIT


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_CONFIG_CACHE: dict[tuple, RMSNormConfig] = {}


def _config_for(direction: str, m: int, n: int, elt_bytes: int, sms: int) -> RMSNormConfig:
    # The heuristics depend on m only through min(m, 32) (rows per tile) and m >= sms (chunked vs split),
    # so one cache entry serves every larger batch: a dictionary hit instead of a table walk per call.
    m_key = m if m <= 32 else (33 if m < sms else -1)
    key = (direction, m_key, n, elt_bytes, sms)
    cfg = _CONFIG_CACHE.get(key)
    if cfg is None:
        pick = forward_config if direction == "fwd" else backward_config
        cfg = _CONFIG_CACHE[key] = pick(m, n, elt_bytes, sms)
    return cfg


def _grid_size(tiles: int, programs_per_sm: int, sms: int) -> int:
    if programs_per_sm <= 0:
        return tiles
    return max(1, min(tiles, programs_per_sm * sms))


def _split_layout(m: int, n: int, cfg: RMSNormConfig, sms: int, target_per_sm: int = 2) -> tuple[int, int]:
    """(split_n, num_splits) for the partial-sum kernels: enough programs to fill the GPU."""
    chunks = triton.cdiv(n, cfg.block_n)
    if cfg.split_n > 0:
        split_n = max(cfg.block_n, cfg.split_n // cfg.block_n * cfg.block_n)
    else:
        want = max(1, min(chunks, triton.cdiv(target_per_sm * sms, max(m, 1))))
        split_n = triton.cdiv(chunks, want) * cfg.block_n
    return split_n, triton.cdiv(n, split_n)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_scale(W, cols, mask, offset, CASTING: tl.constexpr):
    """``offset + w`` in fp32, rounded to the weight dtype first where the reference rounds it."""
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    if CASTING != 1:
        # llama/none compute ``offset + w`` in the weight's own dtype
        w = w.to(W.dtype.element_ty).to(tl.float32)
    return w


@triton.jit
def _rstd(sum_sq, N, eps):
    return tl.div_rn(1.0, tl.sqrt_rn(sum_sq / N + eps))


@triton.jit
def _normalized(xf, rstd, X_TY: tl.constexpr, CASTING: tl.constexpr):
    """The value the weight multiplies, in fp32, rounded where the reference rounds it."""
    if CASTING == 2:
        rstd = rstd.to(X_TY).to(tl.float32)
    n = xf * rstd
    if CASTING != 1:
        n = n.to(X_TY).to(tl.float32)
    return n


@triton.jit
def _load_tile(P, stride, rows, M, cols, col_mask):
    """Rows ``rows`` (a [BLOCK_M] vector) of a row-strided matrix; out-of-range rows read as 0."""
    mask = (rows < M)[:, None] & col_mask[None, :]
    return tl.load(P + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _rmsnorm_fwd_tile_kernel(
    X, stride_x, R, stride_r, W, Y, stride_y, S, stride_s, RSTD,
    M, N, eps, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, CASTING: tl.constexpr, STORE_RSTD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = _load_scale(W, cols, col_mask, offset, CASTING)[None, :]
    if HAS_RESIDUAL:
        x_ty = S.dtype.element_ty
    else:
        x_ty = X.dtype.element_ty
    num_tiles = tl.cdiv(M, BLOCK_M)
    step = num_programs * BLOCK_M
    if PREFETCH:
        # Loads for the program's next tile are issued before this tile's reduction, so each
        # program keeps two tiles of reads in flight.
        first = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        x_next = _load_tile(X, stride_x, first, M, cols, col_mask)
        if HAS_RESIDUAL:
            r_next = _load_tile(R, stride_r, first, M, cols, col_mask)
    for tile in range(pid, num_tiles, num_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        if PREFETCH:
            x = x_next
            x_next = _load_tile(X, stride_x, rows + step, M, cols, col_mask)
            if HAS_RESIDUAL:
                r = r_next
                r_next = _load_tile(R, stride_r, rows + step, M, cols, col_mask)
        else:
            x = _load_tile(X, stride_x, rows, M, cols, col_mask)
            if HAS_RESIDUAL:
                r = _load_tile(R, stride_r, rows, M, cols, col_mask)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ty)
            tl.store(S + rows64[:, None] * stride_s + cols[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        rstd = _rstd(tl.sum(xf * xf, axis=1), N, eps)
        if STORE_RSTD:
            tl.store(RSTD + rows64, rstd, mask=row_mask)
        y = _normalized(xf, rstd[:, None], x_ty, CASTING)
        if HAS_WEIGHT:
            y = y * w
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_fwd_chunked_kernel(
    X, stride_x, R, stride_r, W, Y, stride_y, S, stride_s, RSTD,
    M, N, eps, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, CASTING: tl.constexpr, STORE_RSTD: tl.constexpr,
    BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    if HAS_RESIDUAL:
        x_ty = S.dtype.element_ty
    else:
        x_ty = X.dtype.element_ty
    offs = tl.arange(0, BLOCK_N)
    num_chunks = tl.cdiv(N, BLOCK_N)
    for row in range(pid, M, num_programs):
        row64 = tl.cast(row, tl.int64)
        x_row = X + row64 * stride_x
        r_row = R + row64 * stride_r
        s_row = S + row64 * stride_s
        # Pass 1: sum of squares. Without a residual, x is read again in pass 2: keep it in L2.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        if PREFETCH:
            x_next = tl.load(x_row + offs, mask=offs < N, other=0.0, eviction_policy="evict_last")
            if HAS_RESIDUAL:
                r_next = tl.load(r_row + offs, mask=offs < N, other=0.0, eviction_policy="evict_first")
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            mask = cols < N
            if PREFETCH:
                x = x_next
                x_next = tl.load(x_row + cols + BLOCK_N, mask=cols + BLOCK_N < N, other=0.0,
                                 eviction_policy="evict_last")
                if HAS_RESIDUAL:
                    r = r_next
                    r_next = tl.load(r_row + cols + BLOCK_N, mask=cols + BLOCK_N < N, other=0.0,
                                     eviction_policy="evict_first")
            else:
                x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_last")
                if HAS_RESIDUAL:
                    r = tl.load(r_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
            if HAS_RESIDUAL:
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ty)
                tl.store(s_row + cols, x, mask=mask, eviction_policy="evict_last")
            xf = x.to(tl.float32)
            acc += xf * xf
        rstd = _rstd(tl.sum(acc, axis=0), N, eps)
        if STORE_RSTD:
            tl.store(RSTD + row64, rstd)
        if HAS_RESIDUAL:
            src_row = s_row
        else:
            src_row = x_row
        # Pass 2, in reverse: the chunks read last in pass 1 are the likeliest still in L2.
        last = (num_chunks - 1) * BLOCK_N + offs
        if PREFETCH:
            x_next = tl.load(src_row + last, mask=last < N, other=0.0, eviction_policy="evict_first")
        for i in range(0, num_chunks):
            cols = last - i * BLOCK_N
            mask = cols < N
            if PREFETCH:
                xf = x_next.to(tl.float32)
                prev = cols - BLOCK_N
                x_next = tl.load(src_row + prev, mask=(prev >= 0) & (prev < N), other=0.0,
                                 eviction_policy="evict_first")
            else:
                xf = tl.load(src_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
                xf = xf.to(tl.float32)
            y = _normalized(xf, rstd, x_ty, CASTING)
            if HAS_WEIGHT:
                y = y * _load_scale(W, cols, mask, offset, CASTING)
            tl.store(Y + row64 * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask,
                     eviction_policy="evict_first")


@triton.jit
def _rmsnorm_fwd_split_sumsq_kernel(
    X, stride_x, R, stride_r, S, stride_s, PART,
    M, N, SPLIT_N, NUM_SPLITS,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row64 = tl.cast(tl.program_id(0), tl.int64)
    split = tl.program_id(1)
    if HAS_RESIDUAL:
        x_ty = S.dtype.element_ty
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    start0 = split * SPLIT_N
    for start in range(start0, start0 + SPLIT_N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + row64 * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ty)
            tl.store(S + row64 * stride_s + cols, x, mask=mask)
        xf = x.to(tl.float32)
        acc += xf * xf
    tl.store(PART + row64 * NUM_SPLITS + split, tl.sum(acc, axis=0))


@triton.jit
def _rmsnorm_fwd_split_apply_kernel(
    X, stride_x, W, Y, stride_y, RSTD, PART,
    M, N, eps, offset, SPLIT_N, NUM_SPLITS,
    HAS_WEIGHT: tl.constexpr, CASTING: tl.constexpr, STORE_RSTD: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    row64 = tl.cast(tl.program_id(0), tl.int64)
    split = tl.program_id(1)
    x_ty = X.dtype.element_ty
    splits = tl.arange(0, SPLITS_P2)
    parts = tl.load(PART + row64 * NUM_SPLITS + splits, mask=splits < NUM_SPLITS, other=0.0)
    rstd = _rstd(tl.sum(parts, axis=0), N, eps)
    if STORE_RSTD:
        tl.store(RSTD + row64, rstd, mask=split == 0)
    start0 = split * SPLIT_N
    for start in range(start0, start0 + SPLIT_N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        xf = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        y = _normalized(xf, rstd, x_ty, CASTING)
        if HAS_WEIGHT:
            y = y * _load_scale(W, cols, mask, offset, CASTING)
        tl.store(Y + row64 * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd_tile_kernel(
    DY, stride_dy, X, stride_x, W, RSTD, DX, stride_dx, DS, stride_ds, DW_PART,
    M, N, offset,
    HAS_DRESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr,
    CASTING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    x_ty = X.dtype.element_ty
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = _load_scale(W, cols, col_mask, offset, CASTING)[None, :]
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    num_tiles = tl.cdiv(M, BLOCK_M)
    step = num_programs * BLOCK_M
    if PREFETCH:
        first = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        x_next = _load_tile(X, stride_x, first, M, cols, col_mask)
        g_next = _load_tile(DY, stride_dy, first, M, cols, col_mask)
    for tile in range(pid, num_tiles, num_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        if PREFETCH:
            xf = x_next.to(tl.float32)
            g = g_next.to(tl.float32)
            x_next = _load_tile(X, stride_x, rows + step, M, cols, col_mask)
            g_next = _load_tile(DY, stride_dy, rows + step, M, cols, col_mask)
        else:
            xf = _load_tile(X, stride_x, rows, M, cols, col_mask).to(tl.float32)
            g = _load_tile(DY, stride_dy, rows, M, cols, col_mask).to(tl.float32)
        rstd = tl.load(RSTD + rows64, mask=row_mask, other=0.0)[:, None]
        if HAS_WEIGHT:
            u = g * w
            if COMPUTE_DW:
                dw_acc += g * _normalized(xf, rstd, x_ty, CASTING)
        else:
            u = g
        n = xf * rstd
        # d/dx of x * rstd: rstd * (u - n * mean(u * n))
        c = tl.sum(u * n, axis=1) / N
        dx = (u - n * c[:, None]) * rstd
        if HAS_DRESIDUAL:
            dx += _load_tile(DS, stride_ds, rows, M, cols, col_mask).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


@triton.jit
def _rmsnorm_bwd_split_dot_kernel(
    DY, stride_dy, X, stride_x, W, RSTD, PART,
    M, N, offset, SPLIT_N, NUM_SPLITS,
    HAS_WEIGHT: tl.constexpr, CASTING: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row64 = tl.cast(tl.program_id(0), tl.int64)
    split = tl.program_id(1)
    rstd = tl.load(RSTD + row64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    start0 = split * SPLIT_N
    for start in range(start0, start0 + SPLIT_N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        xf = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            u = u * _load_scale(W, cols, mask, offset, CASTING)
        acc += u * (xf * rstd)
    tl.store(PART + row64 * NUM_SPLITS + split, tl.sum(acc, axis=0))


@triton.jit
def _rmsnorm_bwd_split_apply_kernel(
    DY, stride_dy, X, stride_x, W, RSTD, PART, DX, stride_dx, DS, stride_ds, DW_PART,
    M, N, offset, ROWS_PER_GROUP, NUM_SPLITS,
    HAS_DRESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr,
    CASTING: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    x_ty = X.dtype.element_ty
    if HAS_WEIGHT:
        w = _load_scale(W, cols, mask, offset, CASTING)
    splits = tl.arange(0, SPLITS_P2)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = group * ROWS_PER_GROUP
    row_end = tl.minimum(row_start + ROWS_PER_GROUP, M)
    for row in range(row_start, row_end):
        row64 = tl.cast(row, tl.int64)
        rstd = tl.load(RSTD + row64)
        parts = tl.load(PART + row64 * NUM_SPLITS + splits, mask=splits < NUM_SPLITS, other=0.0)
        c = tl.sum(parts, axis=0) / N
        xf = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            u = g * w
            if COMPUTE_DW:
                dw_acc += g * _normalized(xf, rstd, x_ty, CASTING)
        else:
            u = g
        dx = (u - xf * rstd * c) * rstd
        if HAS_DRESIDUAL:
            dx += tl.load(DS + row64 * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PART + tl.cast(group, tl.int64) * N + cols, dw_acc, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    # Kernels take any row stride but need unit stride inside a row.
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _launch_device(t: torch.Tensor) -> tuple[int, int]:
    """(CUDA device index or -1, SM count) of ``t``."""
    index = t.get_device()
    return index, (_sm_count(index) if index >= 0 else _INTERPRETER_SMS)


def rmsnorm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    offset: float,
    casting_mode: str,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    store_rstd: bool = True,
    config: RMSNormConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward kernel(s) on a 2-D ``(M, N)`` input.

    Args:
        x: ``(M, N)`` fp32/fp16/bf16, any row stride.
        weight: ``(N,)`` or ``None``.
        eps, offset, casting_mode: as in :func:`rotalabs_accel.reference.rmsnorm.rmsnorm_reference`.
        residual: ``(M, N)`` or ``None``; when given, the kernel normalizes ``x + residual`` and also
            returns that sum.
        out_dtype: dtype of ``y`` (the caller knows the casting rules); default ``x``'s (or the sum's).
        store_rstd: whether to return ``1 / rms`` per row for the backward (inference skips it).
        config: overrides the heuristic (benchmark sweeps and tests use this).

    Returns:
        ``(y, new_residual, rstd)``: ``y`` ``(M, N)`` contiguous, ``new_residual`` ``(M, N)`` contiguous
        or ``None``, ``rstd`` ``(M,)`` fp32 or ``None`` when ``store_rstd`` is false.
    """
    x = _rows_ready(x)
    m, n = x.shape
    device = x.device
    x_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((m, n), dtype=out_dtype or x_dtype, device=device)
    new_residual = None if residual is None else torch.empty((m, n), dtype=x_dtype, device=device)
    rstd = torch.empty((m,), dtype=torch.float32, device=device) if store_rstd else None
    if m == 0:
        return y, new_residual, rstd
    if n == 0:
        if rstd is not None:
            rstd.fill_(float(eps) ** -0.5)
        return y, new_residual, rstd
    if residual is not None:
        residual = _rows_ready(residual)
    if weight is not None:
        weight = weight.contiguous()
    index, sms = _launch_device(x)
    cfg = config or _config_for("fwd", m, n, x.element_size(), sms)
    args = (x, weight, residual, y, new_residual, rstd, m, n, float(eps), float(offset),
            CASTING_CODES[casting_mode], cfg, sms)
    # Triton launches on the current device: switch only when the tensor lives elsewhere.
    if index >= 0 and index != torch.cuda.current_device():
        with torch.cuda.device(index):
            _launch_forward(*args)
    else:
        _launch_forward(*args)
    return y, new_residual, rstd


def _launch_forward(x, weight, residual, y, new_residual, rstd, m, n, eps, offset, casting, cfg, sms):
    has_weight = weight is not None
    has_residual = residual is not None
    store_rstd = rstd is not None
    # Unused pointer slots get a real tensor: the kernels never touch them.
    w_arg = weight if has_weight else x
    rstd_arg = rstd if store_rstd else y
    r_arg, sr = (residual, residual.stride(0)) if has_residual else (x, 0)
    s_arg, ss = (new_residual, n) if has_residual else (y, 0)
    if cfg.strategy == "tile":
        grid = (_grid_size(triton.cdiv(m, cfg.block_m), cfg.programs_per_sm, sms),)
        _launch(
            _rmsnorm_fwd_tile_kernel, grid,
            (x, x.stride(0), r_arg, sr, w_arg, y, n, s_arg, ss, rstd_arg, m, n, eps, offset),
            cfg.num_warps,
            HAS_RESIDUAL=has_residual, HAS_WEIGHT=has_weight, CASTING=casting, STORE_RSTD=store_rstd,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PREFETCH=cfg.prefetch,
        )
    elif cfg.strategy == "chunked":
        grid = (_grid_size(m, cfg.programs_per_sm, sms),)
        _launch(
            _rmsnorm_fwd_chunked_kernel, grid,
            (x, x.stride(0), r_arg, sr, w_arg, y, n, s_arg, ss, rstd_arg, m, n, eps, offset),
            cfg.num_warps,
            HAS_RESIDUAL=has_residual, HAS_WEIGHT=has_weight, CASTING=casting, STORE_RSTD=store_rstd,
            BLOCK_N=cfg.block_n, PREFETCH=cfg.prefetch,
        )
    elif cfg.strategy == "split":
        split_n, num_splits = _split_layout(m, n, cfg, sms)
        part = torch.empty((m, num_splits), dtype=torch.float32, device=x.device)
        _launch(
            _rmsnorm_fwd_split_sumsq_kernel, (m, num_splits),
            (x, x.stride(0), r_arg, sr, s_arg, ss, part, m, n, split_n, num_splits),
            cfg.num_warps,
            HAS_RESIDUAL=has_residual, BLOCK_N=cfg.block_n,
        )
        src, src_stride = (new_residual, n) if has_residual else (x, x.stride(0))
        _launch(
            _rmsnorm_fwd_split_apply_kernel, (m, num_splits),
            (src, src_stride, w_arg, y, n, rstd_arg, part, m, n, eps, offset, split_n, num_splits),
            cfg.num_warps,
            HAS_WEIGHT=has_weight, CASTING=casting, STORE_RSTD=store_rstd, BLOCK_N=cfg.block_n,
            SPLITS_P2=triton.next_power_of_2(num_splits),
        )
    else:
        raise ValueError(f"rmsnorm_forward: unknown strategy {cfg.strategy!r}")


def rmsnorm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    offset: float,
    casting_mode: str,
    dresidual: torch.Tensor | None = None,
    compute_dw: bool = True,
    config: RMSNormConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel(s) on 2-D ``(M, N)`` tensors.

    Args:
        dy: ``(M, N)`` gradient of the normalized output.
        x: ``(M, N)`` the normalized input (for the fused op: the saved ``new_residual``).
        weight: ``(N,)`` or ``None``.
        rstd: ``(M,)`` fp32 from the forward.
        offset, casting_mode: as in the forward.
        dresidual: ``(M, N)`` gradient flowing into ``new_residual`` from later layers (fused op), added
            to dx; ``None`` when there is none.
        compute_dw: whether to reduce dW (``False`` when the weight needs no gradient).
        config: overrides the heuristic.

    Returns:
        ``(dx, dw)``: ``dx`` ``(M, N)`` contiguous in ``x.dtype``; ``dw`` ``(N,)`` in the weight's dtype,
        reduced in fp32 in a fixed order, or ``None`` when there is no weight or ``compute_dw`` is false.
    """
    x = _rows_ready(x)
    dy = _rows_ready(dy)
    m, n = x.shape
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    has_weight = weight is not None
    compute_dw = compute_dw and has_weight
    if m == 0 or n == 0:
        dw = torch.zeros_like(weight) if compute_dw else None
        if dresidual is not None and m > 0:
            dx.copy_(dresidual)
        return dx, dw
    if has_weight:
        weight = weight.contiguous()
    if dresidual is not None:
        dresidual = _rows_ready(dresidual)
    index, sms = _launch_device(x)
    cfg = config or _config_for("bwd", m, n, x.element_size(), sms)
    args = (dy, x, weight, rstd, dx, dresidual, compute_dw, m, n, float(offset), CASTING_CODES[casting_mode],
            cfg, sms)
    if index >= 0 and index != torch.cuda.current_device():
        with torch.cuda.device(index):
            dw_part = _launch_backward(*args)
    else:
        dw_part = _launch_backward(*args)
    dw = None
    if compute_dw:
        dw = dw_part.sum(dim=0)
        if dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
    return dx, dw


def _launch_backward(dy, x, weight, rstd, dx, dresidual, compute_dw, m, n, offset, casting, cfg, sms):
    """Launch the backward kernels; returns the fp32 dW partials (one row per program or row group)."""
    has_weight = weight is not None
    has_dres = dresidual is not None
    w_arg = weight if has_weight else x
    ds_arg, sds = (dresidual, dresidual.stride(0)) if has_dres else (dy, 0)
    if cfg.strategy == "tile":
        programs = _grid_size(triton.cdiv(m, cfg.block_m), cfg.programs_per_sm, sms)
        dw_part = torch.empty((programs, n) if compute_dw else (1,), dtype=torch.float32, device=x.device)
        _launch(
            _rmsnorm_bwd_tile_kernel, (programs,),
            (dy, dy.stride(0), x, x.stride(0), w_arg, rstd, dx, n, ds_arg, sds, dw_part, m, n, offset),
            cfg.num_warps,
            HAS_DRESIDUAL=has_dres, HAS_WEIGHT=has_weight, COMPUTE_DW=compute_dw, CASTING=casting,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PREFETCH=cfg.prefetch,
        )
        return dw_part
    if cfg.strategy == "split":
        split_n, num_splits = _split_layout(m, n, cfg, sms)
        part = torch.empty((m, num_splits), dtype=torch.float32, device=x.device)
        _launch(
            _rmsnorm_bwd_split_dot_kernel, (m, num_splits),
            (dy, dy.stride(0), x, x.stride(0), w_arg, rstd, part, m, n, offset, split_n, num_splits),
            cfg.num_warps,
            HAS_WEIGHT=has_weight, CASTING=casting, BLOCK_N=cfg.block_n,
        )
        chunks = triton.cdiv(n, cfg.block_n)
        groups = max(1, min(m, triton.cdiv(4 * sms, chunks)))
        rows_per_group = triton.cdiv(m, groups)
        groups = triton.cdiv(m, rows_per_group)
        dw_part = torch.empty((groups, n) if compute_dw else (1,), dtype=torch.float32, device=x.device)
        _launch(
            _rmsnorm_bwd_split_apply_kernel, (groups, chunks),
            (dy, dy.stride(0), x, x.stride(0), w_arg, rstd, part, dx, n, ds_arg, sds, dw_part, m, n,
             offset, rows_per_group, num_splits),
            cfg.num_warps,
            HAS_DRESIDUAL=has_dres, HAS_WEIGHT=has_weight, COMPUTE_DW=compute_dw, CASTING=casting,
            BLOCK_N=cfg.block_n, SPLITS_P2=triton.next_power_of_2(num_splits),
        )
        return dw_part
    raise ValueError(f"rmsnorm_backward: unknown strategy {cfg.strategy!r}")


def _elements_per_thread_ok(elements: int, num_warps: int, lo: int, hi: int) -> bool:
    return lo <= elements // (32 * num_warps) <= hi


def candidate_configs(
    direction: str, m: int, n: int, elt_bytes: int = 2, sms: int = 132
) -> list[RMSNormConfig]:
    """Launch configurations worth timing for ``direction`` (``"fwd"`` or ``"bwd"``) at ``(m, n)``.

    The benchmark's ``--sweep`` times these and prints the fastest, and the GPU tests run each
    compiled variant of them for correctness, so whatever the tables are tuned to is a tested
    configuration. The heuristic's own choice comes first.
    """
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    block_n = triton.next_power_of_2(max(n, 1))
    out: list[RMSNormConfig] = []
    tile_max = 32768 if direction == "fwd" else 16384
    # The grid size (programs per SM) does not change the compiled kernel: those variants cost
    # timing only. Prefetching pays only when a program loops over several tiles.
    grids = [(0, False)] if direction == "fwd" else []
    grids += [(pps, pf) for pps in ((2, 4) if direction == "fwd" else (1, 2, 4)) for pf in (False, True)]
    if block_n <= tile_max:
        for block_m in (1, 2, 4, 8, 16, 32):
            elements = block_m * block_n
            if block_m > 1 and (elements > 16384 or block_m > triton.next_power_of_2(max(m, 1))):
                continue
            for num_warps in (4, 8, 16, 32):
                if not _elements_per_thread_ok(elements, num_warps, 8, 32):
                    continue
                for pps, prefetch in grids:
                    out.append(RMSNormConfig("tile", block_n, num_warps, block_m, pps, prefetch))
    if block_n > 16384:
        chunks = (4096, 8192, 16384)
        if direction == "fwd" and m >= sms:
            for chunk in chunks:
                for num_warps in (8, 16, 32):
                    if not _elements_per_thread_ok(chunk, num_warps, 8, 16):
                        continue
                    for pps in (0, 1, 2):
                        for prefetch in (False, True):
                            out.append(RMSNormConfig("chunked", chunk, num_warps, 1, pps, prefetch))
        for chunk in chunks:
            for num_warps in (8, 16, 32):
                if _elements_per_thread_ok(chunk, num_warps, 8, 16):
                    out.append(RMSNormConfig("split", chunk, num_warps))
    pick = forward_config if direction == "fwd" else backward_config
    heuristic = pick(m, n, elt_bytes, sms)
    return [heuristic] + [c for c in out if c != heuristic]
