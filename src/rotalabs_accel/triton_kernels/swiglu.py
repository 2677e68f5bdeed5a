"""Triton kernels for the SwiGLU activation ``y = silu(gate) * up`` and its backward.

Both kernels are elementwise over a 2-D ``[rows, cols]`` problem and tile it with ``BLOCK_M x BLOCK_N``
tiles. Every operand is a 2-D view with unit column stride and its own row stride, so one kernel serves

* separate ``gate`` / ``up`` tensors (any row strides, e.g. slices of wider buffers), and
* one packed tensor ``[rows, 2 * cols]`` holding ``gate | up`` side by side (two views of it, row
  stride ``2 * cols``), as a fused gate+up projection produces; the backward then writes
  ``grad_gate | grad_up`` into the two halves of one packed gradient.

Arithmetic is float32 whatever the storage dtype; results are rounded once on store.

Traffic per element: forward reads 2 values and writes 1; backward reads 3 (``grad_out``, ``gate``,
``up``) and writes 2 (plus 1 when it also stores the recomputed activation for a fused feed-forward
backward). The backward recomputes ``sigmoid(gate)`` instead of saving anything from the forward.

Launch configuration is data: :class:`SwiGLULaunchConfig` picked by :func:`forward_config` /
:func:`backward_config` from the tables below, never autotuned at run time.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "SwiGLULaunchConfig",
    "KERNEL_DTYPES",
    "forward_config",
    "backward_config",
    "swiglu_forward",
    "swiglu_backward",
]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(tile, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n_col_tiles = tl.cdiv(n_cols, BLOCK_N)
    tile_m = tile // n_col_tiles
    tile_n = tile % n_col_tiles
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
    tile, gate_ptr, up_ptr, out_ptr, n_rows, n_cols, stride_gate, stride_up, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, LOAD_POLICY: tl.constexpr,
):
    rows, cols, mask = _tile_offsets(tile, n_rows, n_cols, BLOCK_M, BLOCK_N)
    gate = _load(gate_ptr + rows * stride_gate + cols, mask, EVEN, LOAD_POLICY)
    up = _load(up_ptr + rows * stride_up + cols, mask, EVEN, LOAD_POLICY)
    _store(out_ptr + rows * stride_out + cols, gate * tl.sigmoid(gate) * up, mask, EVEN)


@triton.jit
def _swiglu_forward_kernel(
    gate_ptr, up_ptr, out_ptr, n_rows, n_cols, stride_gate, stride_up, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, LOAD_POLICY: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    if PERSISTENT:
        n_tiles = tl.cdiv(n_rows, BLOCK_M) * tl.cdiv(n_cols, BLOCK_N)
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _forward_tile(tile, gate_ptr, up_ptr, out_ptr, n_rows, n_cols, stride_gate, stride_up,
                          stride_out, BLOCK_M, BLOCK_N, EVEN, LOAD_POLICY)
    else:
        _forward_tile(tl.program_id(0), gate_ptr, up_ptr, out_ptr, n_rows, n_cols, stride_gate, stride_up,
                      stride_out, BLOCK_M, BLOCK_N, EVEN, LOAD_POLICY)


@triton.jit
def _backward_tile(
    tile, grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, h_ptr, n_rows, n_cols,
    stride_grad_out, stride_gate, stride_up, stride_grad_gate, stride_grad_up, stride_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, LOAD_POLICY: tl.constexpr,
    STORE_H: tl.constexpr,
):
    rows, cols, mask = _tile_offsets(tile, n_rows, n_cols, BLOCK_M, BLOCK_N)
    grad_out = _load(grad_out_ptr + rows * stride_grad_out + cols, mask, EVEN, LOAD_POLICY)
    gate = _load(gate_ptr + rows * stride_gate + cols, mask, EVEN, LOAD_POLICY)
    up = _load(up_ptr + rows * stride_up + cols, mask, EVEN, LOAD_POLICY)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu / d gate = sig + gate * sig * (1 - sig) = sig * (1 + gate * (1 - sig))
    grad_gate = grad_out * up * sig * (1.0 + gate * (1.0 - sig))
    # Each element is loaded and stored by the same program, so the outputs may alias the inputs
    # element for element (the fused feed-forward backward writes in place).
    _store(grad_gate_ptr + rows * stride_grad_gate + cols, grad_gate, mask, EVEN)
    _store(grad_up_ptr + rows * stride_grad_up + cols, grad_out * silu, mask, EVEN)
    if STORE_H:
        _store(h_ptr + rows * stride_h + cols, silu * up, mask, EVEN)


@triton.jit
def _swiglu_backward_kernel(
    grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, h_ptr, n_rows, n_cols,
    stride_grad_out, stride_gate, stride_up, stride_grad_gate, stride_grad_up, stride_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, LOAD_POLICY: tl.constexpr,
    STORE_H: tl.constexpr, PERSISTENT: tl.constexpr,
):
    if PERSISTENT:
        n_tiles = tl.cdiv(n_rows, BLOCK_M) * tl.cdiv(n_cols, BLOCK_N)
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _backward_tile(tile, grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, h_ptr, n_rows,
                           n_cols, stride_grad_out, stride_gate, stride_up, stride_grad_gate, stride_grad_up,
                           stride_h, BLOCK_M, BLOCK_N, EVEN, LOAD_POLICY, STORE_H)
    else:
        _backward_tile(tl.program_id(0), grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, h_ptr,
                       n_rows, n_cols, stride_grad_out, stride_gate, stride_up, stride_grad_gate,
                       stride_grad_up, stride_h, BLOCK_M, BLOCK_N, EVEN, LOAD_POLICY, STORE_H)


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
        evict_first: mark loads as streaming (``evict_first``): each input element is read once.
    """

    block_m: int
    block_n: int
    num_warps: int
    programs_per_sm: int = 0
    evict_first: bool = True

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"SwiGLULaunchConfig.{name} must be a power of two, got {value}")
        if self.programs_per_sm < 0:
            raise ValueError(f"SwiGLULaunchConfig.programs_per_sm must be >= 0, got {self.programs_per_sm}")


# Columns-per-row buckets -> (widest BLOCK_N, elements per tile, num_warps). A tile of 4096 elements on
# 4 warps gives each thread 32 elements: four 16-byte vectors per bf16 operand in flight, which keeps
# HBM busy without spilling; the backward carries three operands and more arithmetic, so it gets more
# warps per tile. Bucket keys are upper bounds on ``cols`` (None: no bound).
FORWARD_TABLE: tuple[tuple[int | None, int, int, int], ...] = (
    (256, 256, 2048, 4),
    (1024, 1024, 4096, 4),
    (None, 2048, 4096, 4),
)
BACKWARD_TABLE: tuple[tuple[int | None, int, int, int], ...] = (
    (256, 256, 2048, 4),
    (1024, 1024, 4096, 4),
    (None, 2048, 4096, 8),
)
# BLOCK_N is the widest power of two (down to MIN_BLOCK_N) dividing the row; failing that, narrowed
# until a partial last column tile wastes under MAX_COLUMN_WASTE of the lanes.
MIN_BLOCK_N = 256
MAX_COLUMN_WASTE = 1 / 16


def _pick(table, n_rows: int, n_cols: int) -> SwiGLULaunchConfig:
    _, widest, elements, num_warps = next(row for row in table if row[0] is None or n_cols <= row[0])
    block_n = min(widest, triton.next_power_of_2(max(n_cols, 1)))
    exact = block_n
    while exact > MIN_BLOCK_N and n_cols % exact:
        exact //= 2
    if n_cols % exact == 0:
        block_n = exact  # no partial column tile: the unmasked (EVEN) kernel when rows divide too
    while block_n > MIN_BLOCK_N and triton.cdiv(n_cols, block_n) * block_n > n_cols * (1 + MAX_COLUMN_WASTE):
        block_n //= 2
    block_m = max(1, min(elements // block_n, triton.next_power_of_2(max(n_rows, 1))))
    return SwiGLULaunchConfig(block_m=block_m, block_n=block_n, num_warps=num_warps)


def forward_config(n_rows: int, n_cols: int) -> SwiGLULaunchConfig:
    """Launch configuration of the forward kernel for a ``[n_rows, n_cols]`` activation."""
    return _pick(FORWARD_TABLE, n_rows, n_cols)


def backward_config(n_rows: int, n_cols: int) -> SwiGLULaunchConfig:
    """Launch configuration of the backward kernel for a ``[n_rows, n_cols]`` activation."""
    return _pick(BACKWARD_TABLE, n_rows, n_cols)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: one "SM", so a persistent grid really loops


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grid(config: SwiGLULaunchConfig, n_rows: int, n_cols: int, device: torch.device) -> tuple[int, bool]:
    n_tiles = triton.cdiv(n_rows, config.block_m) * triton.cdiv(n_cols, config.block_n)
    if config.programs_per_sm == 0:
        return n_tiles, False
    programs = config.programs_per_sm * _sm_count(device)
    return (n_tiles, False) if programs >= n_tiles else (programs, True)


def _check_operand(name: str, t: torch.Tensor, shape: tuple[int, int]) -> None:
    if t.dim() != 2 or tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected a 2-D tensor of shape {list(shape)}, got {list(t.shape)}")
    if t.stride(1) != 1 and shape[1] > 1:
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
        out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    _check_operand("out", out, (n_rows, n_cols))
    if n_rows == 0 or n_cols == 0:
        return out
    config = config or forward_config(n_rows, n_cols)
    grid, persistent = _grid(config, n_rows, n_cols, gate.device)
    even = n_rows % config.block_m == 0 and n_cols % config.block_n == 0
    with _device_guard(gate.device):
        _swiglu_forward_kernel[(grid,)](
            gate, up, out, n_rows, n_cols, gate.stride(0), up.stride(0), out.stride(0),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, EVEN=even,
            LOAD_POLICY="evict_first" if config.evict_first else "", PERSISTENT=persistent,
            num_warps=config.num_warps,
        )
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
        grad_gate = torch.empty(shape, dtype=gate.dtype, device=gate.device)
    if grad_up is None:
        grad_up = torch.empty(shape, dtype=gate.dtype, device=gate.device)
    _check_operand("grad_gate", grad_gate, shape)
    _check_operand("grad_up", grad_up, shape)
    if store_h:
        if h_out is None:
            h_out = torch.empty(shape, dtype=gate.dtype, device=gate.device)
        _check_operand("h_out", h_out, shape)
    else:
        h_out = None
    if n_rows == 0 or n_cols == 0:
        return grad_gate, grad_up, h_out
    config = config or backward_config(n_rows, n_cols)
    grid, persistent = _grid(config, n_rows, n_cols, gate.device)
    even = n_rows % config.block_m == 0 and n_cols % config.block_n == 0
    h_arg = h_out if h_out is not None else grad_gate  # never written when STORE_H is False
    with _device_guard(gate.device):
        _swiglu_backward_kernel[(grid,)](
            grad_out, gate, up, grad_gate, grad_up, h_arg, n_rows, n_cols,
            grad_out.stride(0), gate.stride(0), up.stride(0), grad_gate.stride(0), grad_up.stride(0),
            h_arg.stride(0),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, EVEN=even,
            LOAD_POLICY="evict_first" if config.evict_first else "", STORE_H=store_h,
            PERSISTENT=persistent, num_warps=config.num_warps,
        )
    return grad_gate, grad_up, h_out
