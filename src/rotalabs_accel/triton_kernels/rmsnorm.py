"""Triton kernels for RMSNorm and fused residual-add RMSNorm: forward, backward, launchers, heuristics.

Every kernel works on a 2-D view ``(M, N)`` whose rows may be strided (row stride != N) but whose
elements within a row are contiguous. Math and casting modes are those of
:mod:`rotalabs_accel.reference.rmsnorm`; reductions accumulate in fp32.

Strategies (chosen by :func:`forward_config` / :func:`backward_config` from the tables below):

``tile``
    The whole row lives in registers. With ``programs_per_sm == 0`` each program owns one tile of
    ``BLOCK_M`` rows (no loop); otherwise a persistent grid of ``programs_per_sm * SMs`` programs
    walks the row tiles (``range(pid, num_tiles, num_programs)``). Forward reads x once and writes y
    once; backward reads x and dy once, writes dx once, and keeps its partial dW in registers for all
    of its rows, storing one fp32 row of partials per program at the end.
``chunked`` (forward only, large N, many rows)
    One row per loop iteration, walked in ``BLOCK_N`` chunks twice: once for the sum of squares,
    once (in reverse order, so the most recently read chunks come first while they are still in
    L2) to normalize. The first pass loads with ``evict_last`` and the second with ``evict_first``
    so the row tends to be served from L2 the second time (at 4096x65536 bf16 on an H100 the kernel
    reads 1.02x the input's bytes from DRAM). With ``prefetch`` each chunk's successor is loaded
    before the chunk is used, and the second pass's first chunk is loaded before the row's sum is
    reduced.
``lookback`` (forward only, rows too wide for one per SM to stay in L2: the default there)
    Rows are cut into column splits of ``split_n``; every ``(row, split)`` is one work item, taken
    in the order given by a ticket counter (an atomic increment, so the order is the order in which
    programs actually run). Items come in groups of ``group_rows`` rows: the partial sums of squares
    of group ``g + 1`` are computed before group ``g`` is normalized, and a normalizing item waits
    (spinning on a per-row counter) until the partial sums of its row are in. A program only ever
    waits for items with smaller tickets, which are already running, so the wait always ends, on
    any number of SMs. The re-read of a row happens shortly after its first read, from L2: HBM sees
    x once and y once even when the rows are far larger than L2 can hold all at once.
``coop`` (forward only, large N; GPU only)
    Rows are cut into ``block_n``-wide slices, one program per ``(row, slice)`` in ticket order. A
    program loads its slice, publishes its partial sum of squares, waits (spinning on a per-row
    counter) for the row's other slices, which hold the neighbouring tickets and so are running or
    done, then normalizes the slice it still holds in registers: x is read once, with no second
    pass. Triton's interpreter runs programs one at a time, so there the wait would never end: the
    strategy is refused off the GPU and never chosen there. A sweep candidate only: on the H100 it
    lost to chunked and lookback at every wide shape swept (best 2,444 vs 2,764 GB/s at 4096x65536,
    2,373 vs 2,539 at 1024x262144; benchmarks/results/sweeps/rmsnorm-sweep-coop-*).
``split`` (large N)
    Rows are cut into column splits across programs. Forward: one kernel writes per-split partial
    sums of squares, a second one reduces them (fixed order) and normalizes. Backward: one kernel
    writes per-split partial dot products, a second one computes dx for a ``(row group, chunk)``
    tile and one fp32 row of dW partials per row group.

dW is always reduced deterministically: each program writes its own fp32 partial row (no atomics)
and a small kernel sums the partials in a fixed order, writing dW in the weight's dtype (a single
program writes dW directly).

Host cost: every distinct input signature (shape, strides, dtypes, flags) gets a launch plan the
first time it is seen, holding the chosen configuration and one
:class:`~rotalabs_accel.triton_kernels._launch.KernelLaunch` per kernel; a repeated call costs the
output allocations, a dictionary lookup and the compiled launcher's C entry (Triton's runner on
versions whose launcher convention is not verified). The aim: in a training step the
host reaches the backward launch before the forward kernel ends, so the GPU need not wait for
Python between the two.

Only long-standing Triton features are used (masked ``tl.load``/``tl.store`` with eviction and
cache hints, ``tl.sum``, ``tl.sqrt_rn``/``tl.div_rn``, scalar atomics with ``sem``,
``tl.debug_barrier``, constexpr flags, runtime-bounded loops), so the kernels build with Triton
3.6 through 3.9 and run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import KernelLaunch, current_device, empty_template

__all__ = [
    "CASTING_CODES",
    "RMSNormConfig",
    "FWD_TILE_TABLE",
    "BWD_TILE_TABLE",
    "FWD_WIDE",
    "FWD_WIDER",
    "FWD_WIDE_FEW_ROWS",
    "BWD_WIDE",
    "forward_config",
    "backward_config",
    "candidate_configs",
    "rmsnorm_forward",
    "rmsnorm_backward",
    "inference_plan",
    "launch_planned",
]

# Casting modes as kernel constants: 0 llama, 1 gemma, 2 none (see reference/rmsnorm.py).
CASTING_CODES = {"llama": 0, "gemma": 1, "none": 2}

# ---------------------------------------------------------------------------------------------
# Launch heuristics: data only. Tune these from `python benchmarks/bench_rmsnorm.py --sweep`, which
# prints the winning entries in these formats.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RMSNormConfig:
    """One launch configuration.

    Attributes:
        strategy: ``"tile"``, ``"chunked"``, ``"lookback"``, ``"coop"`` or ``"split"`` (module
            docstring).
        block_n: tile: the padded row width (a power of two >= N); coop: the slice each program
            holds; otherwise the chunk width.
        num_warps: warps per program.
        block_m: tile only: rows per program iteration.
        programs_per_sm: tile/chunked: ``0`` launches one program per row tile (tile: no loop);
            ``k > 0`` launches ``min(tiles, k * SMs)`` programs that loop over the tiles (persistent).
        prefetch: tile/chunked: issue the loads of the next row tile (or chunk) before reducing the
            current one, so that each program keeps two in flight (costs registers; pays off with
            persistent grids and long chunk loops).
        split_n: split/lookback: columns each work item covers (a multiple of ``block_n``); 0 derives
            it from the shape.
        group_rows: lookback only: rows per ordering group; 0 takes as many rows as fit in
            ``LOOKBACK_GROUP_BYTES``.
    """

    strategy: str
    block_n: int
    num_warps: int
    block_m: int = 1
    programs_per_sm: int = 0
    prefetch: bool = False
    split_n: int = 0
    group_rows: int = 0


# Row-in-registers forward, per element size in bytes of the input. Each entry is
# (largest padded hidden size, largest row count or 0 for any, rows per program, num_warps,
# programs per SM, prefetch); the first entry whose sizes cover the input wins, so an entry with a
# row bound goes before the unbounded one of the same hidden size. Programs per SM 0 = one program per
# row tile, no loop. Chosen so that nothing spills on sm_90 and each SM keeps >= 16K elements of
# reads in flight; tune from `bench_rmsnorm.py --sweep`.
FWD_TILE_TABLE: dict[int, tuple[tuple[int, int, int, int, int, bool], ...]] = {
    2: (
        (128, 0, 16, 4, 0, False),
        (256, 0, 16, 4, 0, False),
        (512, 0, 8, 4, 0, False),
        (1024, 0, 4, 4, 0, False),
        (2048, 0, 2, 4, 0, False),
        # up to 4096 rows (a grid of one or two waves, where the tail shows): persistent programs of
        # two rows with the next tile's loads in flight; 2,402 vs 2,348 GB/s at 4096x4096
        # (benchmarks/results/sweeps/rmsnorm-sweep-tiles-h100-80gb-hbm3-2026-11-25); in 7 alternating
        # rounds 2,675 GB/s against 2,583 for one row per program on 8 warps, torch.compile's kernel
        # 2,383 and a copy of the same bytes 2,651 (logs/rmsnorm_ab-h100-2026-12-07-1fa236b.txt)
        (4096, 4096, 2, 8, 4, True),
        (4096, 0, 1, 8, 0, False),
        (8192, 0, 1, 16, 0, False),
        (16384, 0, 1, 32, 0, False),
    ),
    4: (
        (128, 0, 16, 4, 0, False),
        (256, 0, 8, 4, 0, False),
        (512, 0, 4, 4, 0, False),
        (1024, 0, 2, 4, 0, False),
        (2048, 0, 1, 4, 0, False),
        (4096, 0, 1, 8, 0, False),
        (8192, 0, 1, 16, 0, False),
        (16384, 0, 1, 32, 0, False),
    ),
}

# Row-in-registers backward: same columns. Persistent grids (programs per SM > 0, at most what fits
# on an SM) let each program carry its dW partial in registers over many rows and keep the partial
# buffer small (programs x N fp32). The backward holds ~6 fp32 values per element (x, dy, weight,
# dW, two temporaries), hence fewer elements per thread than the forward.
BWD_TILE_TABLE: dict[int, tuple[tuple[int, int, int, int, int, bool], ...]] = {
    2: (
        (128, 0, 8, 4, 4, False),
        (256, 0, 4, 4, 4, False),
        (512, 0, 2, 4, 4, False),
        (1024, 0, 1, 4, 8, False),
        (2048, 0, 1, 8, 4, False),
        (4096, 0, 1, 16, 2, False),
        (8192, 0, 1, 32, 1, True),
        (16384, 0, 1, 32, 1, False),
    ),
    4: (
        (128, 0, 8, 4, 4, False),
        (256, 0, 4, 4, 4, False),
        (512, 0, 2, 4, 4, False),
        (1024, 0, 1, 4, 8, False),
        (2048, 0, 1, 8, 4, False),
        (4096, 0, 1, 16, 2, False),
        (8192, 0, 1, 32, 1, True),
        (16384, 0, 1, 32, 1, False),
    ),
}

# Forward above the tile range with at least one row per SM.
FWD_WIDE = RMSNormConfig("chunked", block_n=8192, num_warps=32, programs_per_sm=1, prefetch=True)
# The same for 2-byte rows wider than 65536 (up to the lookback bound below): twice the chunk. H100,
# bf16, 2048x131072, this kernel: 2,502 GB/s against 2,325 with FWD_WIDE's chunks
# (benchmarks/results/sweeps/rmsnorm-wide-variants-after-*; 2,536 against 2,337 in the experiment
# before, rmsnorm-wide-variants-*).
FWD_WIDER = RMSNormConfig("chunked", block_n=16384, num_warps=32, programs_per_sm=1, prefetch=True)
# The same rows with a residual to add (twice the bytes per row): one program per row with wider
# chunks. Sweep (H100, bf16, 4096x65536 + residual): 2,982 GB/s vs FWD_WIDE's 2,722; without a
# residual those chunks lose (2,646 vs 2,764) (benchmarks/results/sweeps/rmsnorm-sweep-coop-*).
FWD_WIDE_ADD = RMSNormConfig("chunked", block_n=16384, num_warps=32, prefetch=True)
# Forward of rows so wide that one row per SM no longer fits in L2 (the chunked path's second read
# would come from HBM): at least one row per SM and rows x SMs above LOOKBACK_MIN_BYTES_IN_FLIGHT.
# Sweep (H100, bf16): 1024x262144 lookback 2,527 GB/s vs chunked 2,036; 4096x65536 chunked 2,752 vs
# lookback 2,560 (benchmarks/results/sweeps/rmsnorm-sweep-*).
FWD_VERY_WIDE = RMSNormConfig("lookback", block_n=4096, num_warps=8, split_n=16384)
LOOKBACK_MIN_BYTES_IN_FLIGHT = 40 << 20
# Forward above the tile range with fewer rows than SMs.
FWD_WIDE_FEW_ROWS = RMSNormConfig("split", block_n=4096, num_warps=8)
# The whole backward above the tile range.
BWD_WIDE = RMSNormConfig("split", block_n=4096, num_warps=8)

# Lookback groups: rows whose bytes fit this budget are summed before the previous group is
# normalized; two groups in flight stay well inside an H100's 50 MB L2.
LOOKBACK_GROUP_BYTES = 8 << 20

# Under Triton's interpreter (CPU tensors) grids stay tiny; this stands in for the SM count.
_INTERPRETER_SMS = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _table_entry(table: dict, m: int, n: int, elt_bytes: int) -> tuple | None:
    block_n = _next_pow2(n)
    for entry in table[2 if elt_bytes <= 2 else 4]:
        if block_n <= entry[0] and (entry[1] == 0 or m <= entry[1]):
            return entry
    return None


def _tile_config(entry: tuple, m: int, n: int) -> RMSNormConfig:
    _, _, block_m, num_warps, pps, prefetch = entry
    return RMSNormConfig("tile", _next_pow2(n), num_warps, min(block_m, _next_pow2(m)), pps, prefetch)


def forward_config(m: int, n: int, elt_bytes: int, num_sms: int, residual: bool = False) -> RMSNormConfig:
    """Pick the forward launch configuration for an ``(m, n)`` input of ``elt_bytes``-byte elements
    (``residual``: the fused residual-add forward).

    Example:
        >>> forward_config(16384, 4096, 2, 132).strategy
        'tile'
    """
    entry = _table_entry(FWD_TILE_TABLE, m, n, elt_bytes)
    if entry is not None:
        return _tile_config(entry, m, n)
    if m < num_sms:
        return FWD_WIDE_FEW_ROWS
    if n * elt_bytes * num_sms > LOOKBACK_MIN_BYTES_IN_FLIGHT:
        return FWD_VERY_WIDE
    if residual:
        return FWD_WIDE_ADD
    return FWD_WIDER if elt_bytes <= 2 and n > 65536 else FWD_WIDE


def backward_config(m: int, n: int, elt_bytes: int, num_sms: int) -> RMSNormConfig:
    """Pick the backward launch configuration for an ``(m, n)`` input of ``elt_bytes``-byte elements.

    Example:
        >>> backward_config(16384, 4096, 2, 132).programs_per_sm
        2
    """
    entry = _table_entry(BWD_TILE_TABLE, m, n, elt_bytes)
    if entry is not None:
        return _tile_config(entry, m, n)
    return BWD_WIDE


@functools.cache
def _sm_count(device_index: int) -> int:
    if device_index < 0:
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid_size(tiles: int, programs_per_sm: int, sms: int) -> int:
    if programs_per_sm <= 0:
        return tiles
    return max(1, min(tiles, programs_per_sm * sms))


def _split_layout(m: int, n: int, cfg: RMSNormConfig, sms: int, target_per_sm: int = 2) -> tuple[int, int]:
    """(split_n, num_splits) for the partial-sum kernels: enough programs to fill the GPU."""
    chunks = _cdiv(n, cfg.block_n)
    if cfg.split_n > 0:
        split_n = max(cfg.block_n, cfg.split_n // cfg.block_n * cfg.block_n)
    else:
        want = max(1, min(chunks, _cdiv(target_per_sm * sms, max(m, 1))))
        split_n = _cdiv(chunks, want) * cfg.block_n
    return split_n, _cdiv(n, split_n)


def _lookback_layout(m: int, n: int, elt_bytes: int, cfg: RMSNormConfig) -> tuple[int, int, int, int]:
    """(split_n, num_splits, group_rows, num_groups) of the lookback forward."""
    if cfg.split_n > 0:
        split_n = max(cfg.block_n, cfg.split_n // cfg.block_n * cfg.block_n)
    else:
        split_n = max(cfg.block_n, 16384 // cfg.block_n * cfg.block_n)
    num_splits = _cdiv(n, split_n)
    group_rows = cfg.group_rows or max(1, LOOKBACK_GROUP_BYTES // max(1, n * elt_bytes))
    group_rows = min(group_rows, m)
    return split_n, num_splits, group_rows, _cdiv(m, group_rows)


def _reduce_layout(n: int, sms: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_P) of the dW reduction: about one program per SM, <= 4096 partials per step."""
    block_n = min(256, max(16, _next_pow2(_cdiv(n, sms))))
    return block_n, 4096 // block_n


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
def _fwd_tile_finish(
    x, r, w, rows, cols, col_mask, M, N, eps, Y, stride_y, S, stride_s, RSTD,
    X_TY: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, CASTING: tl.constexpr,
    STORE_RSTD: tl.constexpr,
):
    """Normalize one loaded ``[BLOCK_M, BLOCK_N]`` tile and store it (and the residual sum, rstd)."""
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X_TY)
        tl.store(S + rows64[:, None] * stride_s + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = _rstd(tl.sum(xf * xf, axis=1), N, eps)
    if STORE_RSTD:
        tl.store(RSTD + rows64, rstd, mask=row_mask)
    y = _normalized(xf, rstd[:, None], X_TY, CASTING)
    if HAS_WEIGHT:
        y = y * w
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_fwd_tile_kernel(
    X, stride_x, R, stride_r, W, Y, stride_y, S, stride_s, RSTD,
    M, N, eps, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, CASTING: tl.constexpr, STORE_RSTD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERSISTENT: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_RESIDUAL:
        x_ty = S.dtype.element_ty
    else:
        x_ty = X.dtype.element_ty
    if not PERSISTENT:
        # One tile per program, no loop: the row loads go out first, then the (L2-resident) weight.
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        x = _load_tile(X, stride_x, rows, M, cols, col_mask)
        if HAS_RESIDUAL:
            r = _load_tile(R, stride_r, rows, M, cols, col_mask)
        else:
            r = x
        if HAS_WEIGHT:
            w = _load_scale(W, cols, col_mask, offset, CASTING)[None, :]
        else:
            w = 1.0
        _fwd_tile_finish(x, r, w, rows, cols, col_mask, M, N, eps, Y, stride_y, S, stride_s, RSTD,
                         x_ty, HAS_RESIDUAL, HAS_WEIGHT, CASTING, STORE_RSTD)
    else:
        num_programs = tl.num_programs(0)
        if HAS_WEIGHT:
            w = _load_scale(W, cols, col_mask, offset, CASTING)[None, :]
        else:
            w = 1.0
        num_tiles = tl.cdiv(M, BLOCK_M)
        step = num_programs * BLOCK_M
        if PREFETCH:
            # Loads for the program's next tile are issued before this tile's reduction, so each
            # program keeps two tiles of reads in flight.
            first = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            x_next = _load_tile(X, stride_x, first, M, cols, col_mask)
            if HAS_RESIDUAL:
                r_next = _load_tile(R, stride_r, first, M, cols, col_mask)
            else:
                r_next = x_next
        for tile in range(pid, num_tiles, num_programs):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            if PREFETCH:
                x = x_next
                r = r_next
                x_next = _load_tile(X, stride_x, rows + step, M, cols, col_mask)
                if HAS_RESIDUAL:
                    r_next = _load_tile(R, stride_r, rows + step, M, cols, col_mask)
                else:
                    r_next = x_next
            else:
                x = _load_tile(X, stride_x, rows, M, cols, col_mask)
                if HAS_RESIDUAL:
                    r = _load_tile(R, stride_r, rows, M, cols, col_mask)
                else:
                    r = x
            _fwd_tile_finish(x, r, w, rows, cols, col_mask, M, N, eps, Y, stride_y, S, stride_s, RSTD,
                             x_ty, HAS_RESIDUAL, HAS_WEIGHT, CASTING, STORE_RSTD)


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
        # Pass 1: sum of squares. Without a residual, x is read again in pass 2: keep it in L2.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        if PREFETCH:
            x_next = tl.load(x_row + offs, mask=offs < N, other=0.0, eviction_policy="evict_last")
            if HAS_RESIDUAL:
                r_next = tl.load(R + row64 * stride_r + offs, mask=offs < N, other=0.0,
                                 eviction_policy="evict_first")
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            mask = cols < N
            if PREFETCH:
                x = x_next
                x_next = tl.load(x_row + cols + BLOCK_N, mask=cols + BLOCK_N < N, other=0.0,
                                 eviction_policy="evict_last")
                if HAS_RESIDUAL:
                    r = r_next
                    r_next = tl.load(R + row64 * stride_r + cols + BLOCK_N, mask=cols + BLOCK_N < N,
                                     other=0.0, eviction_policy="evict_first")
            else:
                x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_last")
                if HAS_RESIDUAL:
                    r = tl.load(R + row64 * stride_r + cols, mask=mask, other=0.0,
                                eviction_policy="evict_first")
            if HAS_RESIDUAL:
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ty)
                tl.store(S + row64 * stride_s + cols, x, mask=mask, eviction_policy="evict_last")
            xf = x.to(tl.float32)
            acc += xf * xf
        # Pass 2, in reverse: the chunks read last in pass 1 are the likeliest still in L2.
        last = (num_chunks - 1) * BLOCK_N + offs
        if PREFETCH and not HAS_RESIDUAL:
            # Pass 2's first chunk does not depend on the row's sum: its load is on its way while the
            # sum is reduced (4096x65536 bf16 on an H100: 2,766 GB/s in the benchmark against 2,702
            # with the load after the reduction; scripts/rmsnorm_wide_variants.py's copy of the kernel,
            # 2,831 against 2,706).
            x_next = tl.load(x_row + last, mask=last < N, other=0.0, eviction_policy="evict_first")
        rstd = _rstd(tl.sum(acc, axis=0), N, eps)
        if STORE_RSTD:
            tl.store(RSTD + row64, rstd)
        if HAS_RESIDUAL:
            src_row = S + row64 * stride_s
        else:
            src_row = x_row
        if PREFETCH and HAS_RESIDUAL:
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
def _rmsnorm_fwd_lookback_kernel(
    X, stride_x, R, stride_r, W, Y, stride_y, S, stride_s, RSTD, PART, COUNT, TICKET,
    M, N, eps, offset, SPLIT_N, NUM_SPLITS, GROUP_ROWS, NUM_GROUPS,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, CASTING: tl.constexpr, STORE_RSTD: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    # Work items in ticket order, in blocks of GROUP_ROWS * NUM_SPLITS items:
    #   sum(0), sum(1), norm(0), sum(2), norm(1), ..., sum(G-1), norm(G-2), norm(G-1)
    # (the last group is padded to GROUP_ROWS rows; items past row M do nothing).
    ticket = tl.atomic_add(TICKET, 1)
    items = GROUP_ROWS * NUM_SPLITS
    block = ticket // items
    item = ticket % items
    last_block = 2 * NUM_GROUPS - 1
    b1 = block - 1
    odd = (b1 % 2) == 0  # between the first and the last block, odd blocks sum and even ones normalize
    is_sum = (block == 0) | ((block != last_block) & odd)
    group = tl.where(block == 0, 0, tl.where(block == last_block, NUM_GROUPS - 1, b1 // 2 + odd.to(tl.int32)))
    row = group * GROUP_ROWS + item // NUM_SPLITS
    split = item % NUM_SPLITS
    if HAS_RESIDUAL:
        x_ty = S.dtype.element_ty
    else:
        x_ty = X.dtype.element_ty
    offs = tl.arange(0, BLOCK_N)
    start0 = split * SPLIT_N
    row64 = tl.cast(row, tl.int64)
    if row < M:
        if is_sum:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(start0, start0 + SPLIT_N, BLOCK_N):
                cols = start + offs
                mask = cols < N
                # Read again by this row's normalizing items shortly: keep it in L2.
                x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0, eviction_policy="evict_last")
                if HAS_RESIDUAL:
                    r = tl.load(R + row64 * stride_r + cols, mask=mask, other=0.0,
                                eviction_policy="evict_first")
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ty)
                    tl.store(S + row64 * stride_s + cols, x, mask=mask, eviction_policy="evict_last")
                xf = x.to(tl.float32)
                acc += xf * xf
            tl.store(PART + row64 * NUM_SPLITS + split, tl.sum(acc, axis=0))
            # Every thread's stores are done before the count says so (the atomic is one thread's).
            tl.debug_barrier()
            tl.atomic_add(COUNT + row64, 1, sem="release")
        else:
            done = tl.atomic_add(COUNT + row64, 0, sem="acquire")
            while done < NUM_SPLITS:
                done = tl.atomic_add(COUNT + row64, 0, sem="acquire")
            splits = tl.arange(0, SPLITS_P2)
            # Written by other programs: read through L2 (".cg"), never a stale L1 line.
            parts = tl.load(PART + row64 * NUM_SPLITS + splits, mask=splits < NUM_SPLITS, other=0.0,
                            cache_modifier=".cg")
            rstd = _rstd(tl.sum(parts, axis=0), N, eps)
            if STORE_RSTD:
                if split == 0:
                    tl.store(RSTD + row64, rstd)
            for start in range(start0, start0 + SPLIT_N, BLOCK_N):
                cols = start + offs
                mask = cols < N
                if HAS_RESIDUAL:
                    # ptxas refuses ".cg" together with an eviction policy; the ordering matters more.
                    xf = tl.load(S + row64 * stride_s + cols, mask=mask, other=0.0, cache_modifier=".cg")
                else:
                    xf = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0,
                                 eviction_policy="evict_first")
                y = _normalized(xf.to(tl.float32), rstd, x_ty, CASTING)
                if HAS_WEIGHT:
                    y = y * _load_scale(W, cols, mask, offset, CASTING)
                tl.store(Y + row64 * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask,
                         eviction_policy="evict_first")


@triton.jit
def _rmsnorm_fwd_coop_kernel(
    X, stride_x, R, stride_r, W, Y, stride_y, S, stride_s, RSTD, PART, COUNT, TICKET,
    M, N, eps, offset, NUM_SPLITS,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, CASTING: tl.constexpr, STORE_RSTD: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    # One program per (row, split) in ticket order: the splits of a row hold consecutive tickets.
    ticket = tl.atomic_add(TICKET, 1)
    row = ticket // NUM_SPLITS
    split = ticket % NUM_SPLITS
    if HAS_RESIDUAL:
        x_ty = S.dtype.element_ty
    else:
        x_ty = X.dtype.element_ty
    cols = split * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    row64 = tl.cast(row, tl.int64)
    # The slice stays in registers from its load to its store: x is read from HBM once.
    x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0, eviction_policy="evict_first")
    if HAS_RESIDUAL:
        r = tl.load(R + row64 * stride_r + cols, mask=mask, other=0.0, eviction_policy="evict_first")
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ty)
        tl.store(S + row64 * stride_s + cols, x, mask=mask, eviction_policy="evict_first")
    xf = x.to(tl.float32)
    tl.store(PART + row64 * NUM_SPLITS + split, tl.sum(xf * xf, axis=0))
    # Every thread's part of the sum is stored before the count says so (the atomic is one thread's).
    tl.debug_barrier()
    tl.atomic_add(COUNT + row64, 1, sem="release")
    # Only the row's own splits are waited for. Tickets are taken by running programs in order, so
    # every row before the last one with a ticket out has all its splits running or done and ends
    # without waiting on anything else; its programs then free their places for the next tickets.
    # The wait therefore always ends when NUM_SPLITS programs fit on the GPU at once.
    done = tl.atomic_add(COUNT + row64, 0, sem="acquire")
    while done < NUM_SPLITS:
        done = tl.atomic_add(COUNT + row64, 0, sem="acquire")
    splits = tl.arange(0, SPLITS_P2)
    # Written by other programs: read through L2 (".cg"), never a stale L1 line. Every split sums
    # the same partials in the same order, so they all apply the same rstd.
    parts = tl.load(PART + row64 * NUM_SPLITS + splits, mask=splits < NUM_SPLITS, other=0.0,
                    cache_modifier=".cg")
    rstd = _rstd(tl.sum(parts, axis=0), N, eps)
    if STORE_RSTD:
        if split == 0:
            tl.store(RSTD + row64, rstd)
    y = _normalized(xf, rstd, x_ty, CASTING)
    if HAS_WEIGHT:
        y = y * _load_scale(W, cols, mask, offset, CASTING)
    tl.store(Y + row64 * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask, eviction_policy="evict_first")


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
    DY, stride_dy, X, stride_x, W, RSTD, DX, stride_dx, DS, stride_ds, DW_PART, DW,
    M, N, offset,
    HAS_DRESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, DW_DIRECT: tl.constexpr,
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
                # d/dw of w * normalized(x): the normalized value as the forward rounded it.
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
        part = tl.sum(dw_acc, axis=0)
        if DW_DIRECT:
            tl.store(DW + cols, part.to(DW.dtype.element_ty), mask=col_mask)
        else:
            tl.store(DW_PART + pid * N + cols, part, mask=col_mask)


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
    DY, stride_dy, X, stride_x, W, RSTD, PART, DX, stride_dx, DS, stride_ds, DW_PART, DW,
    M, N, offset, ROWS_PER_GROUP, NUM_SPLITS,
    HAS_DRESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, DW_DIRECT: tl.constexpr,
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
        if DW_DIRECT:
            tl.store(DW + cols, dw_acc.to(DW.dtype.element_ty), mask=mask)
        else:
            tl.store(DW_PART + tl.cast(group, tl.int64) * N + cols, dw_acc, mask=mask)


@triton.jit
def _rmsnorm_dw_reduce_kernel(PART, DW, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """dW[cols] = sum of the P partial rows, in a fixed order, cast to the weight's dtype."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_mask[None, :]
        acc += tl.load(PART + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------
# Launch plans: one per input signature, built once
# ---------------------------------------------------------------------------------------------


class _Plan:
    """What a call needs besides its tensors: a strategy runner, its kernels and fixed sizes."""

    __slots__ = ("run", "sites", "sizes", "device", "out_dtype", "s_dtype", "y_like", "s_like", "rstd_like",
                 "part_like")

    def __init__(self, run, sites, sizes, device, out_dtype=None, s_dtype=None):
        self.run = run
        self.sites = sites
        self.sizes = sizes
        self.device = device
        self.out_dtype = out_dtype
        self.s_dtype = s_dtype
        # templates of the buffers a call allocates (empty_template): torch.empty_like(plan.y_like), ...
        self.y_like = self.s_like = self.rstd_like = self.part_like = None


# Plans accumulate per distinct signature (shape, strides, dtypes, flags); a workload with an endless
# variety of row counts drops them now and then instead of growing without bound.
_PLAN_LIMIT = 2048
_FWD_PLANS: dict[tuple, _Plan] = {}
_BWD_PLANS: dict[tuple, _Plan] = {}


def _ptr_bits(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr() & 15


def _forward_plan(key: tuple, x, weight, residual, config) -> _Plan:
    m, n, stride_x, x_dtype, device, _, _, out_dtype, store_rstd, casting_mode, _ = key
    sms = _sm_count(device)
    s_dtype = x_dtype if residual is None else torch.promote_types(x_dtype, residual.dtype)
    elt = s_dtype.itemsize
    cfg = config or forward_config(m, n, elt, sms, residual is not None)
    flags = dict(HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
                 CASTING=CASTING_CODES[casting_mode], STORE_RSTD=store_rstd)
    stride_r = 0 if residual is None else residual.stride(0)
    if cfg.strategy == "tile":
        grid = (_grid_size(_cdiv(m, cfg.block_m), cfg.programs_per_sm, sms),)
        site = KernelLaunch(_rmsnorm_fwd_tile_kernel, grid, cfg.num_warps, device=device, **flags,
                            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PERSISTENT=cfg.programs_per_sm > 0,
                            PREFETCH=cfg.prefetch)
        plan = _Plan(_forward_rows, (site,), (m, n, stride_x, stride_r), device)
    elif cfg.strategy == "chunked":
        grid = (_grid_size(m, cfg.programs_per_sm, sms),)
        site = KernelLaunch(_rmsnorm_fwd_chunked_kernel, grid, cfg.num_warps, device=device, **flags,
                            BLOCK_N=cfg.block_n, PREFETCH=cfg.prefetch)
        plan = _Plan(_forward_rows, (site,), (m, n, stride_x, stride_r), device)
    elif cfg.strategy == "lookback":
        split_n, num_splits, group_rows, num_groups = _lookback_layout(m, n, elt, cfg)
        grid = (2 * num_groups * group_rows * num_splits,)
        site = KernelLaunch(_rmsnorm_fwd_lookback_kernel, grid, cfg.num_warps, device=device, **flags,
                            BLOCK_N=cfg.block_n, SPLITS_P2=_next_pow2(num_splits))
        sizes = (m, n, stride_x, stride_r, split_n, num_splits, group_rows, num_groups)
        plan = _Plan(_forward_lookback, (site,), sizes, device)
    elif cfg.strategy == "coop":
        if device < 0:
            raise ValueError("rmsnorm_forward: the 'coop' strategy needs a GPU (its programs wait for "
                             "each other, and Triton's interpreter runs them one at a time)")
        num_splits = _cdiv(n, cfg.block_n)
        site = KernelLaunch(_rmsnorm_fwd_coop_kernel, (m * num_splits,), cfg.num_warps, device=device,
                            **flags, BLOCK_N=cfg.block_n, SPLITS_P2=_next_pow2(num_splits))
        plan = _Plan(_forward_coop, (site,), (m, n, stride_x, stride_r, num_splits), device)
    elif cfg.strategy == "split":
        split_n, num_splits = _split_layout(m, n, cfg, sms)
        sumsq = KernelLaunch(_rmsnorm_fwd_split_sumsq_kernel, (m, num_splits), cfg.num_warps, device=device,
                             HAS_RESIDUAL=residual is not None, BLOCK_N=cfg.block_n)
        del flags["HAS_RESIDUAL"]
        apply = KernelLaunch(_rmsnorm_fwd_split_apply_kernel, (m, num_splits), cfg.num_warps, device=device,
                             **flags, BLOCK_N=cfg.block_n, SPLITS_P2=_next_pow2(num_splits))
        plan = _Plan(_forward_split, (sumsq, apply), (m, n, stride_x, stride_r, split_n, num_splits), device)
    else:
        raise ValueError(f"rmsnorm_forward: unknown strategy {cfg.strategy!r}")
    plan.out_dtype = out_dtype or s_dtype
    plan.s_dtype = s_dtype
    plan.y_like = empty_template((m, n), plan.out_dtype, x.device)
    if residual is not None:
        plan.s_like = empty_template((m, n), s_dtype, x.device)
    if store_rstd:
        plan.rstd_like = empty_template((m,), torch.float32, x.device)
    if len(_FWD_PLANS) >= _PLAN_LIMIT:
        _FWD_PLANS.clear()
    _FWD_PLANS[key] = plan
    return plan


def _forward_rows(plan, x, w, r, y, s, rstd, eps, offset):
    """tile and chunked: one launch, the row kernels' argument list."""
    m, n, stride_x, stride_r = plan.sizes
    px, py = x.data_ptr(), y.data_ptr()
    key = px & 15 | (py & 15) << 4
    pw = pr = ps = pt = None
    if w is not None:
        pw = w.data_ptr()
        key |= (pw & 15) << 8
    if r is not None:
        pr, ps = r.data_ptr(), s.data_ptr()
        key |= (pr & 15) << 12 | (ps & 15) << 16
    if rstd is not None:
        pt = rstd.data_ptr()
        key |= (pt & 15) << 20
    site = plan.sites[0]
    if not site.launch_ptrs((px, stride_x, pr, stride_r, pw, py, n, ps, n, pt, m, n, eps, offset), key):
        site((x, stride_x, r, stride_r, w, y, n, s, n, rstd, m, n, eps, offset), key)


def _forward_lookback(plan, x, w, r, y, s, rstd, eps, offset):
    m, n, stride_x, stride_r, split_n, num_splits, group_rows, num_groups = plan.sizes
    part = torch.empty((m, num_splits), dtype=torch.float32, device=x.device)
    counters = torch.zeros((m + 1,), dtype=torch.int32, device=x.device)  # per-row counts, then the ticket
    args = (x, stride_x, r, stride_r, w, y, n, s, n, rstd, part, counters, counters[m:],
            m, n, eps, offset, split_n, num_splits, group_rows, num_groups)
    key = (_ptr_bits(x), _ptr_bits(r), _ptr_bits(w), _ptr_bits(y), _ptr_bits(s), _ptr_bits(rstd),
           _ptr_bits(part), _ptr_bits(counters[m:]))
    plan.sites[0](args, key)


def _forward_coop(plan, x, w, r, y, s, rstd, eps, offset):
    m, n, stride_x, stride_r, num_splits = plan.sizes
    part = torch.empty((m, num_splits), dtype=torch.float32, device=x.device)
    counters = torch.zeros((m + 1,), dtype=torch.int32, device=x.device)  # per-row counts, then the ticket
    args = (x, stride_x, r, stride_r, w, y, n, s, n, rstd, part, counters, counters[m:],
            m, n, eps, offset, num_splits)
    key = (_ptr_bits(x), _ptr_bits(r), _ptr_bits(w), _ptr_bits(y), _ptr_bits(s), _ptr_bits(rstd),
           _ptr_bits(part), _ptr_bits(counters[m:]))
    plan.sites[0](args, key)


def _forward_split(plan, x, w, r, y, s, rstd, eps, offset):
    m, n, stride_x, stride_r, split_n, num_splits = plan.sizes
    part = torch.empty((m, num_splits), dtype=torch.float32, device=x.device)
    sumsq, apply = plan.sites
    key = (_ptr_bits(x), _ptr_bits(r), _ptr_bits(s), _ptr_bits(part))
    sumsq((x, stride_x, r, stride_r, s, n, part, m, n, split_n, num_splits), key)
    src, src_stride = (x, stride_x) if r is None else (s, n)
    key = (_ptr_bits(src), _ptr_bits(w), _ptr_bits(y), _ptr_bits(rstd), _ptr_bits(part))
    apply((src, src_stride, w, y, n, rstd, part, m, n, eps, offset, split_n, num_splits), key)


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    # Kernels take any row stride but need unit stride inside a row.
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


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
    m, n = x.shape
    stride_x, stride_col = x.stride()
    if stride_col != 1 and n > 1:
        x = x.contiguous()
        stride_x = n
    device = x.get_device()
    if residual is not None:
        residual = _rows_ready(residual)
        key_r = (residual.dtype, residual.stride(0))
    else:
        key_r = None
    if weight is not None:
        if weight.stride(0) != 1 and n > 1:
            weight = weight.contiguous()
        key_w = weight.dtype
    else:
        key_w = None
    key = (m, n, stride_x, x.dtype, device, key_w, key_r, out_dtype, store_rstd, casting_mode, config)
    plan = _FWD_PLANS.get(key)
    if plan is None:
        if m == 0 or n == 0:
            return _empty_forward(x, residual, m, n, eps, out_dtype, store_rstd)
        plan = _forward_plan(key, x, weight, residual, config)
    y = torch.empty_like(plan.y_like)
    new_residual = None if residual is None else torch.empty_like(plan.s_like)
    rstd = torch.empty_like(plan.rstd_like) if store_rstd else None
    if type(eps) is not float:
        eps = float(eps)
    if type(offset) is not float:
        offset = float(offset)
    # Triton launches on the current device: switch only when the tensor lives elsewhere.
    if device >= 0 and device != current_device():
        with torch.cuda.device(device):
            plan.run(plan, x, weight, residual, y, new_residual, rstd, eps, offset)
    else:
        plan.run(plan, x, weight, residual, y, new_residual, rstd, eps, offset)
    return y, new_residual, rstd


def inference_plan(x: torch.Tensor, weight: torch.Tensor | None, casting_mode: str,
                   out_dtype: torch.dtype, residual: torch.Tensor | None = None,
                   shape: tuple | None = None) -> _Plan | None:
    """The launch plan :func:`rmsnorm_forward` uses for an inference call on ``x`` (no ``rstd``), for
    :func:`launch_planned` to launch again; ``None`` for an empty ``x``.

    ``x`` (and ``residual``, when the call adds one) is ``(M, N)`` with unit column stride and
    ``weight`` (if any) has unit stride: the plan holds the sizes and row strides, so it serves every
    later call with tensors of the same layouts, dtypes and device (and any contiguous tensors whose
    rows collapse to these). ``shape`` (default ``(M, N)``) is the shape of the outputs
    :func:`launch_planned` allocates: the caller's tensors' own shape, when their rows collapse to ``x``.
    """
    m, n = x.shape
    if m == 0 or n == 0:
        return None
    key_r = None if residual is None else (residual.dtype, residual.stride(0))
    key = (m, n, x.stride(0), x.dtype, x.get_device(), None if weight is None else weight.dtype, key_r,
           out_dtype, False, casting_mode, None)
    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = _forward_plan(key, x, weight, residual, None)
    if shape is None or tuple(shape) == (m, n):
        return plan
    shaped = _Plan(plan.run, plan.sites, plan.sizes, plan.device, plan.out_dtype, plan.s_dtype)
    shaped.y_like = empty_template(tuple(shape), plan.out_dtype, x.device)
    if residual is not None:
        shaped.s_like = empty_template(tuple(shape), plan.s_dtype, x.device)
    return shaped


def launch_planned(plan: _Plan, x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float,
                   residual: torch.Tensor | None = None):
    """Launch a plan of :func:`inference_plan`: the normalized output (contiguous, in the plan's
    ``shape``), or with a ``residual`` the pair ``(normed, x + residual)``.

    The tensors have the plan's layouts (or are contiguous with the plan's row count and width), live
    on the current device, ``weight`` has unit stride, and ``eps`` and ``offset`` are floats. Nothing is
    checked here: the caller (the functional layer's repeat path) has.
    """
    y = torch.empty_like(plan.y_like)
    if residual is None:
        plan.run(plan, x, weight, None, y, None, None, eps, offset)
        return y
    new_residual = torch.empty_like(plan.s_like)
    plan.run(plan, x, weight, residual, y, new_residual, None, eps, offset)
    return y, new_residual


def _empty_forward(x, residual, m, n, eps, out_dtype, store_rstd):
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((m, n), dtype=out_dtype or s_dtype, device=x.device)
    new_residual = None if residual is None else torch.empty((m, n), dtype=s_dtype, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device) if store_rstd else None
    if n == 0 and rstd is not None:
        rstd.fill_(float(eps) ** -0.5 if eps > 0 else float("inf"))  # 1 / sqrt(0 + eps)
    return y, new_residual, rstd


def _backward_plan(key: tuple, dy, x, weight, dresidual, compute_dw, config) -> _Plan:
    m, n, stride_dy, stride_x, x_dtype, _, device, _, _, _, casting_mode, _ = key
    sms = _sm_count(device)
    cfg = config or backward_config(m, n, x.element_size(), sms)
    flags = dict(HAS_DRESIDUAL=dresidual is not None, HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw)
    stride_ds = 0 if dresidual is None else dresidual.stride(0)
    casting = CASTING_CODES[casting_mode]
    if cfg.strategy == "tile":
        programs = _grid_size(_cdiv(m, cfg.block_m), cfg.programs_per_sm, sms)
        direct = programs == 1
        site = KernelLaunch(_rmsnorm_bwd_tile_kernel, (programs,), cfg.num_warps, device=device, **flags,
                            DW_DIRECT=direct, CASTING=casting, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                            PREFETCH=cfg.prefetch)
        sites = (site,)
        sizes = (m, n, stride_dy, stride_x, stride_ds, programs, direct)
        run = _backward_tile
    elif cfg.strategy == "split":
        split_n, num_splits = _split_layout(m, n, cfg, sms)
        chunks = _cdiv(n, cfg.block_n)
        groups = max(1, min(m, _cdiv(4 * sms, chunks)))
        rows_per_group = _cdiv(m, groups)
        groups = _cdiv(m, rows_per_group)
        direct = groups == 1
        dot = KernelLaunch(_rmsnorm_bwd_split_dot_kernel, (m, num_splits), cfg.num_warps, device=device,
                           HAS_WEIGHT=weight is not None, CASTING=casting, BLOCK_N=cfg.block_n)
        apply = KernelLaunch(_rmsnorm_bwd_split_apply_kernel, (groups, chunks), cfg.num_warps, device=device,
                             **flags, DW_DIRECT=direct, CASTING=casting, BLOCK_N=cfg.block_n,
                             SPLITS_P2=_next_pow2(num_splits))
        sites = (dot, apply)
        sizes = (m, n, stride_dy, stride_x, stride_ds, groups, direct, split_n, num_splits, rows_per_group)
        run = _backward_split
    else:
        raise ValueError(f"rmsnorm_backward: unknown strategy {cfg.strategy!r}")
    if compute_dw and not direct:
        block_n, block_p = _reduce_layout(n, sms)
        block_p = min(block_p, _next_pow2(sizes[5]))
        sites += (KernelLaunch(_rmsnorm_dw_reduce_kernel, (_cdiv(n, block_n),), 4, device=device,
                               BLOCK_P=block_p, BLOCK_N=block_n),)
    plan = _Plan(run, sites, sizes, device)
    if compute_dw and not direct and cfg.strategy == "tile":
        plan.part_like = empty_template((sizes[5], n), torch.float32, x.device)  # per-program dW partials
    if len(_BWD_PLANS) >= _PLAN_LIMIT:
        _BWD_PLANS.clear()
    _BWD_PLANS[key] = plan
    return plan


def _reduce_dw(plan, part, programs, n, w):
    """dW from the fp32 partials, allocated here: the main kernel is already on its way."""
    dw = torch.empty_like(w)  # w is 1-D and contiguous; empty_like is the cheapest allocation call
    pp, pd = part.data_ptr(), dw.data_ptr()
    site, key = plan.sites[-1], pp & 15 | (pd & 15) << 4
    if not site.launch_ptrs((pp, pd, programs, n), key):
        site((part, dw, programs, n), key)
    return dw


def _backward_tile(plan, dy, x, w, rstd, dx, ds, compute_dw, offset):
    m, n, stride_dy, stride_x, stride_ds, programs, direct = plan.sizes
    part = dw = None
    if compute_dw:
        if direct:
            dw = torch.empty_like(w)
        else:
            part = torch.empty_like(plan.part_like)
    pdy, px, pt, pdx = dy.data_ptr(), x.data_ptr(), rstd.data_ptr(), dx.data_ptr()
    key = pdy & 15 | (px & 15) << 4 | (pt & 15) << 8 | (pdx & 15) << 12
    pw = pds = pp = pdw = None
    if w is not None:
        pw = w.data_ptr()
        key |= (pw & 15) << 16
    if ds is not None:
        pds = ds.data_ptr()
        key |= (pds & 15) << 20
    if dw is not None:
        pdw = dw.data_ptr()
        key |= (pdw & 15) << 24
    if part is not None:
        pp = part.data_ptr()
        key |= (pp & 15) << 28
    site = plan.sites[0]
    ptrs = (pdy, stride_dy, px, stride_x, pw, pt, pdx, n, pds, stride_ds, pp, pdw, m, n, offset)
    if not site.launch_ptrs(ptrs, key):
        site((dy, stride_dy, x, stride_x, w, rstd, dx, n, ds, stride_ds, part, dw, m, n, offset), key)
    if part is not None:
        dw = _reduce_dw(plan, part, programs, n, w)
    return dw


def _backward_split(plan, dy, x, w, rstd, dx, ds, compute_dw, offset):
    m, n, stride_dy, stride_x, stride_ds, groups, direct, split_n, num_splits, rows_per_group = plan.sizes
    dot, apply = plan.sites[:2]
    part = dx.new_empty((m, num_splits), dtype=torch.float32)
    key = (_ptr_bits(dy), _ptr_bits(x), _ptr_bits(w), _ptr_bits(rstd), _ptr_bits(part))
    dot((dy, stride_dy, x, stride_x, w, rstd, part, m, n, offset, split_n, num_splits), key)
    dw_part = dw = None
    if compute_dw:
        if direct:
            dw = torch.empty_like(w)
        else:
            dw_part = dx.new_empty((groups, n), dtype=torch.float32)
    key = (key, _ptr_bits(dx), _ptr_bits(ds), _ptr_bits(dw_part), _ptr_bits(dw))
    apply((dy, stride_dy, x, stride_x, w, rstd, part, dx, n, ds, stride_ds, dw_part, dw, m, n, offset,
           rows_per_group, num_splits), key)
    if dw_part is not None:
        dw = _reduce_dw(plan, dw_part, groups, n, w)
    return dw


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
    m, n = x.shape
    stride_x, stride_col = x.stride()
    if stride_col != 1 and n > 1:
        x = x.contiguous()
        stride_x = n
    stride_dy, stride_col = dy.stride()
    if stride_col != 1 and n > 1:
        dy = dy.contiguous()
        stride_dy = n
    device = x.get_device()
    compute_dw = compute_dw and weight is not None
    if weight is not None and weight.stride(0) != 1 and n > 1:
        weight = weight.contiguous()
    key_ds = None
    if dresidual is not None:
        dresidual = _rows_ready(dresidual)
        key_ds = (dresidual.dtype, dresidual.stride(0))
    key = (m, n, stride_dy, stride_x, x.dtype, dy.dtype, device,
           None if weight is None else weight.dtype, key_ds, compute_dw, casting_mode, config)
    plan = _BWD_PLANS.get(key)
    if plan is None:
        if m == 0 or n == 0:
            dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
            if dresidual is not None and m > 0:
                dx.copy_(dresidual)
            return dx, (torch.zeros_like(weight) if compute_dw else None)
        plan = _backward_plan(key, dy, x, weight, dresidual, compute_dw, config)
    dx = torch.empty_like(x)
    if type(offset) is not float:
        offset = float(offset)
    if device >= 0 and device != current_device():
        with torch.cuda.device(device):
            dw = plan.run(plan, dy, x, weight, rstd, dx, dresidual, compute_dw, offset)
    else:
        dw = plan.run(plan, dy, x, weight, rstd, dx, dresidual, compute_dw, offset)
    return dx, dw


# ---------------------------------------------------------------------------------------------
# Sweep candidates
# ---------------------------------------------------------------------------------------------


def _elements_per_thread_ok(elements: int, num_warps: int, lo: int, hi: int) -> bool:
    return lo <= elements // (32 * num_warps) <= hi


def candidate_configs(
    direction: str, m: int, n: int, elt_bytes: int = 2, sms: int = 132, residual: bool = False
) -> list[RMSNormConfig]:
    """Launch configurations worth timing for ``direction`` (``"fwd"`` or ``"bwd"``) at ``(m, n)``.

    The benchmark's ``--sweep`` times these and prints the fastest, and the GPU tests run each
    compiled variant of them for correctness, so whatever the tables are tuned to is a tested
    configuration. The heuristic's own choice comes first.
    """
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    block_n = _next_pow2(max(n, 1))
    out: list[RMSNormConfig] = []
    tile_max = 32768 if direction == "fwd" else 16384
    # The grid size (programs per SM) does not change a persistent kernel: those variants cost
    # timing only. Prefetching pays only when a program loops over several tiles. Forward grids with
    # 0 programs per SM are the loop-free one-tile-per-program kernel.
    grids = [(0, False)] if direction == "fwd" else []
    grids += [(pps, pf) for pps in ((1, 2, 4) if direction == "fwd" else (1, 2, 4)) for pf in (False, True)]
    if block_n <= tile_max:
        for block_m in (1, 2, 4, 8, 16, 32):
            elements = block_m * block_n
            if block_m > 1 and (elements > 16384 or block_m > _next_pow2(max(m, 1))):
                continue
            for num_warps in (2, 4, 8, 16, 32):
                if not _elements_per_thread_ok(elements, num_warps, 8, 32):
                    continue
                for pps, prefetch in grids:
                    out.append(RMSNormConfig("tile", block_n, num_warps, block_m, pps, prefetch))
    if block_n > 16384:
        chunks = (4096, 8192, 16384)
        if direction == "fwd":
            if m >= sms:
                for chunk in chunks:
                    for num_warps in (8, 16, 32):
                        if not _elements_per_thread_ok(chunk, num_warps, 8, 16):
                            continue
                        for pps in (0, 1, 2):
                            for prefetch in (False, True):
                                out.append(RMSNormConfig("chunked", chunk, num_warps, 1, pps, prefetch))
            for chunk in (4096, 8192):
                for num_warps in (4, 8, 16):
                    if not _elements_per_thread_ok(chunk, num_warps, 8, 32):
                        continue
                    for split_n in (chunk, 16384, 32768):
                        if split_n >= chunk and split_n < 2 * n:
                            out.append(RMSNormConfig("lookback", chunk, num_warps, split_n=split_n))
            if sms != _INTERPRETER_SMS:
                # coop's programs wait for each other: GPU only (see RMSNormConfig)
                for chunk in (4096, 8192, 16384):
                    for num_warps in (8, 16, 32):
                        if _elements_per_thread_ok(chunk, num_warps, 8, 32):
                            out.append(RMSNormConfig("coop", chunk, num_warps))
        for chunk in chunks:
            for num_warps in (8, 16, 32):
                if _elements_per_thread_ok(chunk, num_warps, 8, 16):
                    out.append(RMSNormConfig("split", chunk, num_warps))
    if direction == "fwd":
        heuristic = forward_config(m, n, elt_bytes, sms, residual)
    else:
        heuristic = backward_config(m, n, elt_bytes, sms)
    seen = {heuristic}
    ordered = [heuristic]
    for c in out:
        if c not in seen:
            seen.add(c)
            ordered.append(c)
    return ordered
