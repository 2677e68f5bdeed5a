"""Triton kernels for the SwiGLU activation ``y = silu(gate) * up`` and its backward.

Both kernels are elementwise over a 2-D ``[rows, cols]`` problem and tile it with ``BLOCK_M x BLOCK_N``
tiles. Every operand is addressed as a base tensor, a row stride and (for ``up`` and ``grad_up``) a
column offset, with unit column stride, so one kernel serves

* separate ``gate`` / ``up`` tensors (any row strides, e.g. slices of wider buffers), and
* one packed tensor ``[rows, 2 * cols]`` holding ``gate | up`` side by side: the same base tensor for
  both, row stride ``2 * cols`` and ``up`` starting ``cols`` columns in, as a fused gate+up projection
  produces; the backward then writes ``grad_gate | grad_up`` into the two halves of one packed gradient.
  No view of the halves is created on the host.

Arithmetic is float32 whatever the storage dtype; results are rounded once on store.

Traffic per element: forward reads 2 values and writes 1; backward reads 3 (``grad_out``, ``gate``,
``up``) and writes 2 (plus 1 when it also stores the recomputed activation for a fused feed-forward
backward). The backward recomputes ``sigmoid(gate)`` instead of saving anything from the forward.

Launch configuration is data: :class:`SwiGLULaunchConfig` picked by :func:`forward_config` /
:func:`backward_config` from the tables below, never autotuned at run time. The resulting launch
(grid, warps, compile-time arguments) is memoized per problem as a
:class:`~rotalabs_accel.triton_kernels._launch.KernelLaunch` site, so a repeated shape costs a
dictionary lookup and a direct launch of the compiled kernel; an explicit configuration (benchmark
sweeps, tests) goes through :func:`~rotalabs_accel.triton_kernels._launch.launch`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._launch import KernelLaunch, current_device, launch

__all__ = [
    "SwiGLULaunchConfig",
    "KERNEL_DTYPES",
    "forward_config",
    "backward_config",
    "swiglu_forward",
    "swiglu_backward",
    "swiglu_forward_rows",
    "swiglu_backward_rows",
]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _split_tile(tile, n_cols, BLOCK_N: tl.constexpr):
    # A linear tile index as (row tile, column tile), column tiles fastest (1-D grids). A 2-D grid
    # (SwiGLULaunchConfig.grid_2d) skips this division; on an H100 that changed nothing measurable.
    n_col_tiles = tl.cdiv(n_cols, BLOCK_N)
    return tile // n_col_tiles, tile % n_col_tiles


@triton.jit
def _tile_offsets(tile_m, tile_n, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    # Row offsets in int64: rows * row_stride passes 2**31 elements for large activations.
    return rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def _load(ptrs, mask, EVEN: tl.constexpr, LOAD_POLICY: tl.constexpr):
    # EVEN tiles (shape divisible by the tile) need no mask, which spares the predicate math.
    if EVEN:
        value = tl.load(ptrs, eviction_policy=LOAD_POLICY)
    else:
        value = tl.load(ptrs, mask=mask, eviction_policy=LOAD_POLICY)
    return value.to(tl.float32)


@triton.jit
def _store(ptrs, value, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty))
    else:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _forward_tile(
    tile_m, tile_n, gate_ptr, up_ptr, out_ptr, n_rows, n_cols, stride_gate, stride_up, stride_out, up_col,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, LOAD_POLICY: tl.constexpr,
):
    rows, cols, mask = _tile_offsets(tile_m, tile_n, n_rows, n_cols, BLOCK_M, BLOCK_N)
    gate = _load(gate_ptr + rows * stride_gate + cols, mask, EVEN, LOAD_POLICY)
    up = _load(up_ptr + up_col + rows * stride_up + cols, mask, EVEN, LOAD_POLICY)
    _store(out_ptr + rows * stride_out + cols, gate * tl.sigmoid(gate) * up, mask, EVEN)


@triton.jit
def _swiglu_forward_kernel(
    gate_ptr, up_ptr, out_ptr, n_rows, n_cols, stride_gate, stride_up, stride_out, up_col,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, LOAD_POLICY: tl.constexpr,
    PERSISTENT: tl.constexpr, GRID_2D: tl.constexpr,
):
    # GRID_2D: one program per tile, column tiles on the grid's first axis and row tiles on its second
    if PERSISTENT:
        n_tiles = tl.cdiv(n_rows, BLOCK_M) * tl.cdiv(n_cols, BLOCK_N)
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            tile_m, tile_n = _split_tile(tile, n_cols, BLOCK_N)
            _forward_tile(tile_m, tile_n, gate_ptr, up_ptr, out_ptr, n_rows, n_cols, stride_gate, stride_up,
                          stride_out, up_col, BLOCK_M, BLOCK_N, EVEN, LOAD_POLICY)
    else:
        if GRID_2D:
            tile_m, tile_n = tl.program_id(1), tl.program_id(0)
        else:
            tile_m, tile_n = _split_tile(tl.program_id(0), n_cols, BLOCK_N)
        _forward_tile(tile_m, tile_n, gate_ptr, up_ptr, out_ptr, n_rows, n_cols, stride_gate, stride_up,
                      stride_out, up_col, BLOCK_M, BLOCK_N, EVEN, LOAD_POLICY)


@triton.jit
def _backward_tile(
    tile_m, tile_n, grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, h_ptr, n_rows, n_cols,
    stride_grad_out, stride_gate, stride_up, stride_grad_gate, stride_grad_up, stride_h, up_col, grad_up_col,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, LOAD_POLICY: tl.constexpr,
    STORE_H: tl.constexpr,
):
    rows, cols, mask = _tile_offsets(tile_m, tile_n, n_rows, n_cols, BLOCK_M, BLOCK_N)
    grad_out = _load(grad_out_ptr + rows * stride_grad_out + cols, mask, EVEN, LOAD_POLICY)
    gate = _load(gate_ptr + rows * stride_gate + cols, mask, EVEN, LOAD_POLICY)
    up = _load(up_ptr + up_col + rows * stride_up + cols, mask, EVEN, LOAD_POLICY)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu / d gate = sig + gate * sig * (1 - sig) = sig * (1 + gate * (1 - sig))
    grad_gate = grad_out * up * sig * (1.0 + gate * (1.0 - sig))
    # Each element is loaded and stored by the same program, so the outputs may alias the inputs
    # element for element (the fused feed-forward backward writes in place).
    _store(grad_gate_ptr + rows * stride_grad_gate + cols, grad_gate, mask, EVEN)
    _store(grad_up_ptr + grad_up_col + rows * stride_grad_up + cols, grad_out * silu, mask, EVEN)
    if STORE_H:
        _store(h_ptr + rows * stride_h + cols, silu * up, mask, EVEN)


@triton.jit
def _swiglu_backward_kernel(
    grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, h_ptr, n_rows, n_cols,
    stride_grad_out, stride_gate, stride_up, stride_grad_gate, stride_grad_up, stride_h, up_col, grad_up_col,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, LOAD_POLICY: tl.constexpr,
    STORE_H: tl.constexpr, PERSISTENT: tl.constexpr, GRID_2D: tl.constexpr,
):
    if PERSISTENT:
        n_tiles = tl.cdiv(n_rows, BLOCK_M) * tl.cdiv(n_cols, BLOCK_N)
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            tile_m, tile_n = _split_tile(tile, n_cols, BLOCK_N)
            _backward_tile(tile_m, tile_n, grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, h_ptr,
                           n_rows, n_cols, stride_grad_out, stride_gate, stride_up, stride_grad_gate,
                           stride_grad_up, stride_h, up_col, grad_up_col, BLOCK_M, BLOCK_N, EVEN, LOAD_POLICY,
                           STORE_H)
    else:
        if GRID_2D:
            tile_m, tile_n = tl.program_id(1), tl.program_id(0)
        else:
            tile_m, tile_n = _split_tile(tl.program_id(0), n_cols, BLOCK_N)
        _backward_tile(tile_m, tile_n, grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, h_ptr,
                       n_rows, n_cols, stride_grad_out, stride_gate, stride_up, stride_grad_gate,
                       stride_grad_up, stride_h, up_col, grad_up_col, BLOCK_M, BLOCK_N, EVEN, LOAD_POLICY,
                       STORE_H)


# --------------------------------------------------------------------------------------------------
# Launch configuration (data)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwiGLULaunchConfig:
    """How one SwiGLU kernel launch tiles its ``[rows, cols]`` problem.

    Attributes:
        block_m: rows per tile (power of two).
        block_n: columns per tile (power of two).
        num_warps: warps per program.
        programs_per_sm: ``0`` launches one program per tile; ``k > 0`` launches at most
            ``k x (number of SMs)`` programs that loop over the tiles (a persistent grid).
        evict_first: mark loads as streaming (``evict_first``). Off by default: on an H100 the hint
            cost 2-3% of bandwidth at every tile size measured.
        flat: when every operand is contiguous (row stride = cols, no column offsets) and the
            problem has under 2**31 elements, tile it as one row of ``rows * cols`` elements with
            ``block_m * block_n``-element tiles: no partial column tiles. Otherwise ignored.
        grid_2d: a grid of one program per tile (not persistent) is laid out in two dimensions,
            column tiles by row tiles, so a program reads its tile's coordinates off the grid instead
            of dividing a linear index (up to 65535 row tiles; beyond that the grid is 1-D). Off by
            default: on an H100 it moved the table's tiles by -0.5% to +0.4% forward and -0.7% to
            +0.2% backward (benchmarks/results/logs/swiglu_grid_variants-h100-2026-12-07.txt); the
            division is not what keeps the 4096x11008 forward below a minimal 1-D kernel.
    """

    block_m: int
    block_n: int
    num_warps: int
    programs_per_sm: int = 0
    evict_first: bool = False
    flat: bool = False
    grid_2d: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"SwiGLULaunchConfig.{name} must be a power of two, got {value}")
        if self.programs_per_sm < 0:
            raise ValueError(f"SwiGLULaunchConfig.programs_per_sm must be >= 0, got {self.programs_per_sm}")


# Rows: (max_cols or None, min_elements, widest BLOCK_N, elements per tile, num_warps, flat); the first
# row whose bounds hold (cols <= max_cols, rows * cols >= min_elements) wins. ``flat``: contiguous
# operands are tiled as one long row of ``elements``-element tiles (no partial column tiles); strided
# ones use the row's 2-D tiles. From launch-configuration sweeps on an H100 (bf16,
# `benchmarks/bench_swiglu.py --sweep`, and `scripts/store_hint_variants.py`):
#   forward  16384x14336: 16x512 tiles, 16 warps  (3,039 GB/s; 8192-element tiles on 16 warps all
#            within 0.1%);  4096x11008: 2x1024 tiles, 8 warps (2,848 GB/s, partial last column tile;
#            tiled flat, 2048-element tiles on 8 warps measured the same in the library's kernel:
#            2,831 vs 2,832 GB/s, results of 2026-12-06 in the history, though a minimal 1-D kernel of
#            the same tiling reached 2,857-2,860, sweeps/store-hint-variants-h100-80gb-hbm3-2026-12-06;
#            in scripts/swiglu_grid_variants.py's run the table's tiles took 95.0 us, 2,848 GB/s, the
#            minimal kernel 94.6 us, torch.add of the same bytes 94.8 and torch.compile 94.9).
#   backward 16384x14336: 4x4096 tiles, 16 warps (3,031 GB/s);  4096x11008: 4x2048, 16 warps (2,923).
# Large activations take bigger tiles (fewer programs, more bytes in flight per thread); medium ones
# smaller tiles, so the grid still has many waves of programs. BACKWARD_H_TABLE serves the backward
# that also stores the recomputed activation (the feed-forward block's: 3 reads, 3 writes, in place).
LARGE_ELEMENTS = 1 << 26
TableRow = tuple[int | None, int, int, int, int, bool]
FORWARD_TABLE: tuple[TableRow, ...] = (
    (256, 0, 256, 2048, 4, False),
    (1024, 0, 1024, 4096, 4, False),
    (None, LARGE_ELEMENTS, 512, 8192, 16, False),
    (None, 0, 1024, 2048, 8, False),
)
BACKWARD_TABLE: tuple[TableRow, ...] = (
    (256, 0, 256, 2048, 4, False),
    (1024, 0, 1024, 4096, 4, False),
    (None, LARGE_ELEMENTS, 4096, 16384, 16, False),
    (None, 0, 2048, 8192, 16, False),
)
# With the recomputed activation stored too, a 4 x 4096 tile on 16 warps (32 elements per thread) hits
# the 128-register cap of 512-thread programs and spills (ptxas, sm_90): 2,585 GB/s at the feed-forward
# block's 8192x14336 against 2,983 for 4 x 2048 (2,989 over a packed gate|up buffer), which keeps 16
# elements per thread (benchmarks/results/sweeps/swiglu-sweep-bwd-h-h100-80gb-hbm3-2026-12-06).
BACKWARD_H_TABLE: tuple[TableRow, ...] = (
    (256, 0, 256, 2048, 4, False),
    (1024, 0, 1024, 4096, 4, False),
    (None, LARGE_ELEMENTS, 2048, 8192, 16, False),
    (None, 0, 2048, 8192, 16, False),
)
# BLOCK_N starts at the table's width (capped by the row) and is halved, down to MIN_BLOCK_N, while a
# partial last column tile would leave more than MAX_COLUMN_WASTE of the lanes idle. Masked lanes move
# no data; the sweeps found partial tiles of up to 1/7 idle lanes (14336 = 3.5 x 4096) no slower.
MIN_BLOCK_N = 256
MAX_COLUMN_WASTE = 1 / 6
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pick(table, n_rows: int, n_cols: int) -> SwiGLULaunchConfig:
    size = n_rows * n_cols
    _, _, widest, elements, num_warps, flat = next(
        row for row in table if (row[0] is None or n_cols <= row[0]) and size >= row[1]
    )
    block_n = min(widest, _next_power_of_2(n_cols))
    while block_n > MIN_BLOCK_N and _cdiv(n_cols, block_n) * block_n > n_cols * (1 + MAX_COLUMN_WASTE):
        block_n //= 2
    block_m = max(1, min(elements // block_n, _next_power_of_2(n_rows)))
    if flat and block_m * block_n != elements:  # a short problem's clamped tile: keep its size
        flat = False
    return SwiGLULaunchConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, flat=flat)


def forward_config(n_rows: int, n_cols: int) -> SwiGLULaunchConfig:
    """Launch configuration of the forward kernel for a ``[n_rows, n_cols]`` activation.

    Example:
        >>> c = forward_config(16384, 14336)
        >>> (c.block_m, c.block_n, c.num_warps, c.flat)
        (16, 512, 16, False)
    """
    return _pick(FORWARD_TABLE, n_rows, n_cols)


def backward_config(n_rows: int, n_cols: int, store_h: bool = False) -> SwiGLULaunchConfig:
    """Launch configuration of the backward kernel for a ``[n_rows, n_cols]`` activation; ``store_h``:
    the variant that also stores the recomputed activation (``BACKWARD_H_TABLE``)."""
    return _pick(BACKWARD_H_TABLE if store_h else BACKWARD_TABLE, n_rows, n_cols)


# --------------------------------------------------------------------------------------------------
# Launch plans (memoized per shape) and launchers
# --------------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device_index: int) -> int:
    if device_index >= 0:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 1  # interpreter: one "SM", so a persistent grid really loops


def _make_plan(config: SwiGLULaunchConfig, n_rows: int, n_cols: int, device_index: int,
               store_h: bool | None) -> tuple[tuple[int, int, int], int, dict]:
    """``(grid, num_warps, constexprs)`` of one launch; ``store_h`` is ``None`` for the forward kernel."""
    row_tiles, col_tiles = _cdiv(n_rows, config.block_m), _cdiv(n_cols, config.block_n)
    n_tiles = row_tiles * col_tiles
    grid, persistent = (n_tiles, 1, 1), False
    if config.programs_per_sm:
        programs = config.programs_per_sm * _sm_count(device_index)
        if programs < n_tiles:
            grid, persistent = (programs, 1, 1), True
    grid_2d = config.grid_2d and not persistent and row_tiles <= MAX_GRID_Y
    if grid_2d:
        grid = (col_tiles, row_tiles, 1)
    meta = {
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "EVEN": n_rows % config.block_m == 0 and n_cols % config.block_n == 0,
        "LOAD_POLICY": "evict_first" if config.evict_first else "",
    }
    if store_h is not None:
        meta["STORE_H"] = store_h
    meta["PERSISTENT"] = persistent
    meta["GRID_2D"] = grid_2d
    return grid, config.num_warps, meta


# Launch sites of the table's configurations, one per distinct problem (kernel kind, shape, strides,
# column offsets, dtypes, device), each with the integer arguments it is launched with (a flat site's
# differ from the caller's): a repeated call costs one dictionary lookup and a direct launch. Table
# configurations are never persistent, so a plan does not depend on the SM count. Bounded: cleared
# when a workload cycles through very many shapes.
_SITES: dict[tuple, tuple[KernelLaunch, tuple]] = {}
_MAX_SITES = 4096


def _new_site(key: tuple, kernel, store_h: bool | None, ints: tuple, contiguous: bool,
              device: int) -> tuple[KernelLaunch, tuple]:
    """``(site, integer arguments)`` for the table's configuration; ``store_h`` is ``None`` for the
    forward kernel; ``ints`` starts with ``(n_rows, n_cols)``, then the row strides and column offsets.

    ``contiguous``: every operand has row stride ``n_cols`` and no column offset, so a ``flat``
    configuration tiles the problem as one row: the integer arguments become ``(1, n_rows * n_cols)``
    followed by the unchanged strides (a single row never uses them) and offsets (zero)."""
    n_rows, n_cols = ints[:2]
    config = forward_config(n_rows, n_cols) if store_h is None else backward_config(n_rows, n_cols, store_h)
    if config.flat and contiguous:
        config, n_rows, n_cols = _flattened(config, n_rows, n_cols)
        ints = (n_rows, n_cols, *ints[2:])
    grid, num_warps, meta = _make_plan(config, n_rows, n_cols, device, store_h)
    entry = (KernelLaunch(kernel, grid, num_warps, device=device, **meta), ints)
    if len(_SITES) >= _MAX_SITES:
        _SITES.clear()
    _SITES[key] = entry
    return entry


def _flattened(config: SwiGLULaunchConfig, n_rows: int, n_cols: int) -> tuple[SwiGLULaunchConfig, int, int]:
    """``(config, rows, cols)`` of a contiguous problem tiled as one long row (``config.flat``)."""
    size = n_rows * n_cols
    if size >= 2**31:  # column offsets are 32-bit
        return config, n_rows, n_cols
    tile = config.block_m * config.block_n
    return replace(config, block_m=1, block_n=tile, flat=False), 1, size


def swiglu_forward_rows(
    gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, n_rows: int, n_cols: int,
    stride_gate: int, stride_up: int, stride_out: int, up_col: int = 0,
    config: SwiGLULaunchConfig | None = None,
) -> None:
    """Launch the forward kernel on operands given as base tensors, row strides and column offsets.

    Element ``(i, j)`` of ``gate`` is ``gate.data_ptr()[i * stride_gate + j]``, of ``up``
    ``up.data_ptr()[up_col + i * stride_up + j]``, of ``out`` ``out.data_ptr()[i * stride_out + j]``
    (in elements). Nothing is checked here: callers (the op layer, :func:`swiglu_forward`) have
    validated shapes, dtypes, devices and strides. Nothing is launched for an empty problem.
    """
    if n_rows == 0 or n_cols == 0:
        return
    device = gate.get_device()
    switch = device >= 0 and device != current_device()
    if config is None:
        ints = (n_rows, n_cols, stride_gate, stride_up, stride_out, up_col)
        key = (None, ints, gate.dtype, up.dtype, out.dtype, device)
        entry = _SITES.get(key)
        if entry is None:
            contiguous = up_col == 0 and stride_gate == stride_up == stride_out == n_cols
            entry = _new_site(key, _swiglu_forward_kernel, None, ints, contiguous, device)
        site, ints = entry
        pg, pu, po = gate.data_ptr(), up.data_ptr(), out.data_ptr()
        # the rest of what Triton specializes on: the operands' 16-byte alignment
        align = (pg & 15) | (pu & 15) << 4 | (po & 15) << 8
        if switch:
            with torch.cuda.device(device):
                if not site.launch_ptrs((pg, pu, po, *ints), align):
                    site((gate, up, out, *ints), align)
        elif not site.launch_ptrs((pg, pu, po, *ints), align):
            site((gate, up, out, *ints), align)
        return
    if config.flat and up_col == 0 and stride_gate == stride_up == stride_out == n_cols:
        config, n_rows, n_cols = _flattened(config, n_rows, n_cols)
    grid, num_warps, meta = _make_plan(config, n_rows, n_cols, device, None)
    args = (gate, up, out, n_rows, n_cols, stride_gate, stride_up, stride_out, up_col)
    if switch:
        with torch.cuda.device(device):
            launch(_swiglu_forward_kernel, grid, args, num_warps, **meta)
    else:
        launch(_swiglu_forward_kernel, grid, args, num_warps, **meta)


def swiglu_backward_rows(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, grad_gate: torch.Tensor,
    grad_up: torch.Tensor, h_out: torch.Tensor, n_rows: int, n_cols: int, stride_grad_out: int,
    stride_gate: int, stride_up: int, stride_grad_gate: int, stride_grad_up: int, stride_h: int,
    up_col: int = 0, grad_up_col: int = 0, store_h: bool = False,
    config: SwiGLULaunchConfig | None = None,
) -> None:
    """Launch the backward kernel on operands given as base tensors, row strides and column offsets.

    Addressing as in :func:`swiglu_forward_rows`; ``up_col`` offsets ``up`` and ``grad_up_col``
    offsets ``grad_up``. ``h_out`` is written only when ``store_h`` (pass any tensor otherwise).
    Nothing is checked here. Nothing is launched for an empty problem.
    """
    if n_rows == 0 or n_cols == 0:
        return
    device = gate.get_device()
    switch = device >= 0 and device != current_device()
    if config is None:
        ints = (n_rows, n_cols, stride_grad_out, stride_gate, stride_up, stride_grad_gate, stride_grad_up,
                stride_h, up_col, grad_up_col)
        key = (store_h, ints, grad_out.dtype, gate.dtype, up.dtype, grad_gate.dtype, grad_up.dtype,
               h_out.dtype, device)
        entry = _SITES.get(key)
        if entry is None:
            strides = (stride_grad_out, stride_gate, stride_up, stride_grad_gate, stride_grad_up)
            contiguous = (
                up_col == grad_up_col == 0
                and all(stride == n_cols for stride in strides)
                and (stride_h == n_cols or not store_h)
            )
            entry = _new_site(key, _swiglu_backward_kernel, store_h, ints, contiguous, device)
        site, ints = entry
        ptrs = (grad_out.data_ptr(), gate.data_ptr(), up.data_ptr(), grad_gate.data_ptr(), grad_up.data_ptr(),
                h_out.data_ptr())
        align = (
            (ptrs[0] & 15) | (ptrs[1] & 15) << 4 | (ptrs[2] & 15) << 8 | (ptrs[3] & 15) << 12
            | (ptrs[4] & 15) << 16 | (ptrs[5] & 15) << 20
        )
        if switch:
            with torch.cuda.device(device):
                if not site.launch_ptrs((*ptrs, *ints), align):
                    site((grad_out, gate, up, grad_gate, grad_up, h_out, *ints), align)
        elif not site.launch_ptrs((*ptrs, *ints), align):
            site((grad_out, gate, up, grad_gate, grad_up, h_out, *ints), align)
        return
    if (
        config.flat
        and up_col == grad_up_col == 0
        and stride_grad_out == stride_gate == stride_up == stride_grad_gate == stride_grad_up == n_cols
        and (stride_h == n_cols or not store_h)
    ):
        config, n_rows, n_cols = _flattened(config, n_rows, n_cols)
    grid, num_warps, meta = _make_plan(config, n_rows, n_cols, device, store_h)
    args = (grad_out, gate, up, grad_gate, grad_up, h_out, n_rows, n_cols, stride_grad_out, stride_gate,
            stride_up, stride_grad_gate, stride_grad_up, stride_h, up_col, grad_up_col)
    if switch:
        with torch.cuda.device(device):
            launch(_swiglu_backward_kernel, grid, args, num_warps, **meta)
    else:
        launch(_swiglu_backward_kernel, grid, args, num_warps, **meta)


def _check_operand(name: str, t: torch.Tensor, shape: tuple[int, int]) -> None:
    if t.dim() != 2 or tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected a 2-D tensor of shape {list(shape)}, got {list(t.shape)}")
    if t.stride(1) != 1 and shape[1] > 1 and shape[0] > 0:  # an empty tensor's strides address nothing
        raise ValueError(f"{name}: expected unit stride along the last dimension, got strides {t.stride()}")
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: the kernel supports {KERNEL_DTYPES}, got {t.dtype}")


def swiglu_forward(
    gate: torch.Tensor,
    up: torch.Tensor,
    out: torch.Tensor | None = None,
    config: SwiGLULaunchConfig | None = None,
) -> torch.Tensor:
    """Launch the forward kernel: ``out = silu(gate) * up``.

    Args:
        gate: ``[M, N]`` with unit column stride, any row stride.
        up: ``[M, N]``, same dtype, unit column stride, any row stride.
        out: optional ``[M, N]`` destination (unit column stride); a new contiguous tensor otherwise.
        config: launch configuration; :func:`forward_config` when ``None``.

    Returns:
        ``out``. Nothing is launched when ``M * N == 0``.
    """
    n_rows, n_cols = gate.shape
    _check_operand("gate", gate, (n_rows, n_cols))
    _check_operand("up", up, (n_rows, n_cols))
    if out is None:
        out = gate.new_empty((n_rows, n_cols))
    _check_operand("out", out, (n_rows, n_cols))
    swiglu_forward_rows(gate, up, out, n_rows, n_cols, gate.stride(0), up.stride(0), out.stride(0),
                        config=config)
    return out


def swiglu_backward(
    grad_out: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    grad_gate: torch.Tensor | None = None,
    grad_up: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
    *,
    store_h: bool = False,
    config: SwiGLULaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel.

    Computes, with ``s = sigmoid(gate)``: ``grad_gate = grad_out * up * s * (1 + gate * (1 - s))``,
    ``grad_up = grad_out * gate * s`` and, when ``store_h``, ``h_out = gate * s * up`` (the forward
    output, recomputed).

    Args:
        grad_out: ``[M, N]``, unit column stride, any row stride (0 included).
        gate: ``[M, N]``, unit column stride, any row stride.
        up: ``[M, N]``, same dtype as ``gate``, unit column stride, any row stride.
        grad_gate: optional destination (a new contiguous tensor otherwise).
        grad_up: optional destination (a new contiguous tensor otherwise).
        h_out: optional destination of the recomputed activation (used when ``store_h``).
        store_h: also write the recomputed activation to ``h_out``.
        config: launch configuration; :func:`backward_config` when ``None``.

    Each destination may be the very same view as an input (same data pointer and strides): every
    element is read before it is written, by the same program, so ``grad_gate=gate, grad_up=up,
    h_out=grad_out`` computes the backward in place. Partial overlaps are not allowed.

    Returns:
        ``(grad_gate, grad_up, h_out)``; ``h_out`` is ``None`` unless ``store_h``.
    """
    n_rows, n_cols = gate.shape
    shape = (n_rows, n_cols)
    _check_operand("grad_out", grad_out, shape)
    _check_operand("gate", gate, shape)
    _check_operand("up", up, shape)
    if grad_gate is None:
        grad_gate = gate.new_empty(shape)
    if grad_up is None:
        grad_up = gate.new_empty(shape)
    _check_operand("grad_gate", grad_gate, shape)
    _check_operand("grad_up", grad_up, shape)
    if store_h:
        if h_out is None:
            h_out = gate.new_empty(shape)
        _check_operand("h_out", h_out, shape)
    else:
        h_out = None
    h_arg = h_out if h_out is not None else grad_gate  # never written when STORE_H is False
    swiglu_backward_rows(
        grad_out, gate, up, grad_gate, grad_up, h_arg, n_rows, n_cols, grad_out.stride(0), gate.stride(0),
        up.stride(0), grad_gate.stride(0), grad_up.stride(0), h_arg.stride(0), store_h=bool(store_h),
        config=config,
    )
    return grad_gate, grad_up, h_out
