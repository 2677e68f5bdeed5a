"""Triton kernels for INT8 linear layers: W8A16 (GEMV, split-K, tiled GEMM) and W8A8 dynamic.

Every kernel computes ``out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias)`` with the int8 weight stored
once, in the ``nn.Linear`` layout ``[N, K]``. Except in the ``dequant`` variant (large M only, see
``int8_config``: a transient dequantized copy of at most ``DEQUANT_MAX_BUFFER_BYTES`` multiplied by
cuBLAS), it is never materialized in floating point:

* W8A16: the int8 tile is converted in registers (exact: ``|q| <= 127`` fits fp16/bf16/fp32), multiplied
  with the activation tile with fp32 accumulation, and the fp32 per-channel scale is applied once in the
  epilogue (``sum_k x q s = s sum_k x q``). With per-group scales the partial product of each group is
  scaled before it is accumulated.
* W8A8: a row kernel quantizes the activations per token (int8 + fp32 row scales), then an
  int8 x int8 -> int32 tensor-core GEMM applies both scales (and the bias) in the epilogue.

Kernels, in the order the data meets them: GEMV (one row of x per program, the weight streamed through
a software pipeline, fp32 FMAs), the tensor-core kernel shared by split-K and GEMM, the weight
dequantizer of the dequant variant, the activation quantizer and the W8A8 GEMM. Launchers follow.

Split-K (the GEMV's and the tensor-core kernel's) runs in one launch. Each program stores its fp32
partial sums, then counts itself in at its output tile's arrival counter (an atomic add); the program
that arrives last adds the tile's partial sums in split order (0, 1, ..., SPLIT_K - 1, read back from
memory, its own included), applies scale and bias, stores the output and sets the counter back to
zero. The summation order never depends on which program finished last, so results are deterministic;
no program ever waits for another (nothing assumes the programs of a launch run at the same time).
The counters live in one zeroed buffer per device and stream (each launch leaves them zero again;
kernels of one stream run in order), or a fresh zeroed one per call while a CUDA graph is captured.

The launchers are on the decode path, where a call's Python time can exceed the kernel's: everything
that depends only on the problem size (variant, tiles, grid, constexprs) is resolved once per size and
kept in a plan holding one ``_launch.KernelLaunch`` per kernel, which calls Triton's compiled kernel
directly once the arguments' specialization (alignment, strides, bias dtype) has been seen. Inputs must
have unit stride along K (the functional layer guarantees it; the launchers copy otherwise); outputs
are fresh contiguous tensors.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..reference.int8 import AMAX_FLOOR, W8A8_MAX_K
from ..utils import is_triton_interpreter
from . import int8_config
from ._launch import KernelLaunch, _current_stream, current_device, empty_template, launch, on_device
from .int8_config import (
    DEFAULTS,
    DequantConfig,
    DotConfig,
    GemvConfig,
    QuantConfig,
    group_block,
    resolve_w8a8,
    resolve_w8a16,
    select_quant,
    select_w8a8,
    select_w8a16,
)

try:  # host-side TMA descriptors (Triton >= 3.3); without them DotConfig.tma falls back to pointer loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

__all__ = [
    "w8a16_linear",
    "dequantize_weight",
    "w8a16_gemv_group",
    "w8a8_linear",
    "w8a8_gemm",
    "quantize_rows",
    "clear_plans",
    "sm_count",
    "W8A8_MAX_K",
]

# SMs assumed by the split-K heuristic when kernels run on CPU tensors under the interpreter: small,
# so interpreter tests exercise splits on tiny shapes.
_INTERPRETER_SM_COUNT = 4


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


@triton.jit
def _int8_to_f32(w):
    # Exact int8 -> fp32 on the integer and FMA pipes: q + 128 (the byte with its sign bit flipped) in
    # the low mantissa bits of 2^23 is the float 2^23 + q + 128. Triton's own conversion issues one
    # I2F per element, a quarter-rate instruction that would bound the GEMV below the memory bandwidth.
    biased = w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080
    return biased.to(tl.float32, bitcast=True) - 8388736.0


# int8 -> fp32, four values per instance, for the GEMV on CUDA (GemvConfig.fast_convert, off by default):
# the same numbers as _int8_to_f32 with one byte permute per value placing the flipped byte (q + 128,
# the sign flip done once per four values) under the exponent byte of 2^23, where Triton's byte
# extraction and xor take two integer instructions. Fewer instructions, yet slower on an H100: the
# tuned decode tiles took 14.2 vs 12.3 us (4096 x 4096) and 30.1 vs 27.7 us (4096 x 14336) with it
# (benchmarks/results/logs/gemv_fast_convert-h100-2026-12-07.txt).
_INT8X4_TO_F32X4_BIASED = tl.constexpr("""{
.reg .b32 u;
xor.b32 u, $4, 0x80808080;
prmt.b32 $0, u, 0x4B000000, 0x7540;
prmt.b32 $1, u, 0x4B000000, 0x7541;
prmt.b32 $2, u, 0x4B000000, 0x7542;
prmt.b32 $3, u, 0x4B000000, 0x7543;
}""")


@triton.jit
def _int8_to_f32_prmt(w):
    """Exact int8 -> fp32 by one byte permute and one subtraction per value (CUDA only)."""
    biased = tl.inline_asm_elementwise(
        _INT8X4_TO_F32X4_BIASED, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4
    )
    return biased - 8388736.0


# int8 -> fp16, four values per instance, on the integer and half-precision pipes (exact: every int8
# value is an fp16): the byte with its sign bit flipped (q + 128) in the low mantissa bits of 1024 is
# the fp16 1152 + q, less 1152. Triton's own conversion issues a quarter-rate I2F per value for fp16;
# for bf16 it issues none (scripts/int8_sass_convert.py: sm_90 SASS, Triton 3.6 and 3.9), so bf16
# keeps it.
_INT8X4_TO_F16X4 = tl.constexpr("""{
.reg .b32 u, e0, e1, bias;
xor.b32 u, $2, 0x80808080;
prmt.b32 e0, u, 0x64646464, 0x4140;
prmt.b32 e1, u, 0x64646464, 0x4342;
mov.b32 bias, 0x64806480;
sub.f16x2 $0, e0, bias;
sub.f16x2 $1, e1, bias;
}""")


@triton.jit
def _int8_to_f16(w):
    """Exact int8 -> fp16 by byte permutes and one packed subtraction per two values (CUDA only)."""
    return tl.inline_asm_elementwise(_INT8X4_TO_F16X4, "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # GROUP_M row blocks sweep the weight's column blocks together: a weight tile loaded for one row
    # block is still in L2 when the next GROUP_M - 1 row blocks ask for it.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    return pid_m, pid_n


@triton.jit
def _store_output(
    acc,
    om,
    on,
    M,
    N,
    s_ptr,
    b_ptr,
    out_ptr,
    part_ptr,
    pid_k,
    stride_sn,
    PER_CHANNEL_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # acc[i, j] is out[om[i, j], on[i, j]]; om / on are broadcastable 2-D index tensors, so the same
    # epilogue serves the [M, N] and the swapped [N, M] accumulator orientations. The output (and the
    # split-K partial sums) are contiguous [M, N].
    mask = (om < M) & (on < N)
    offs = om.to(tl.int64) * N + on
    if SPLIT_K == 1:
        if PER_CHANNEL_SCALE:
            s = tl.load(s_ptr + on * stride_sn, mask=on < N, other=0.0)
            acc = acc * s
        if HAS_BIAS:
            b = tl.load(b_ptr + on, mask=on < N, other=0.0).to(tl.float32)
            acc = acc + b
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # fp32 partial sums of this K slice; _splitk_fixup applies scale and bias to their total
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)


@triton.jit
def _splitk_fixup(
    first_m,
    first_n,
    M,
    N,
    s_ptr,
    b_ptr,
    out_ptr,
    part_ptr,
    lock_ptr,
    stride_sn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PER_CHANNEL_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # Called by every program of a split-K launch once its partial sums of out[first_m:+BLOCK_M,
    # first_n:+BLOCK_N] are stored. The barrier orders all of this program's stores before its arrival,
    # which the atomic publishes GPU-wide (release) and, for the last program, orders the reads of the
    # other programs' partial sums after it (acquire).
    tl.debug_barrier()
    tile = tl.program_id(0)
    arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:
        # The sum runs over chunks of at most 2048 outputs, in a plain blocked layout with fresh
        # indices, not in the accumulator's MMA layout: registers then stay near the main loop's (ptxas,
        # sm_90, a 128 x 64 tile on 8 warps: 73 without the sum, 249 summing in the MMA layout, 110
        # summing the whole tile at once), so the sum costs the main loop no occupancy.
        SUB_M: tl.constexpr = max(1, min(BLOCK_M, 2048 // BLOCK_N))
        on = (first_n + tl.arange(0, BLOCK_N))[None, :]
        # the distance between split planes, in 64 bits (M or N is a plain int when specialized to 1)
        plane = (tl.program_id(0).to(tl.int64) * 0 + M) * N
        for r0 in tl.range(0, BLOCK_M, SUB_M, num_stages=1):
            om = (first_m + r0 + tl.arange(0, SUB_M))[:, None]
            mask = (om < M) & (on < N)
            ptrs = part_ptr + (om.to(tl.int64) * N + on)
            total = tl.zeros((SUB_M, BLOCK_N), dtype=tl.float32)
            # split order, one partial chunk in flight at a time; .cg: read at L2, where the other
            # SMs' stores are, never from this SM's L1
            for _ in tl.range(0, SPLIT_K, num_stages=1):
                total += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                ptrs += plane
            _store_output(
                total, om, on, M, N, s_ptr, b_ptr, out_ptr, part_ptr, 0, stride_sn,
                PER_CHANNEL_SCALE=PER_CHANNEL_SCALE, HAS_BIAS=HAS_BIAS, SPLIT_K=1,
            )
        tl.atomic_xchg(lock_ptr + tile, 0)  # zero again for the next launch on this stream


# --------------------------------------------------------------------------------------------------
# W8A16 GEMV: one row of x per program, the weight streamed once, CUDA-core FMAs
# --------------------------------------------------------------------------------------------------


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    part_ptr,
    lock_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_sg,
    GROUP_SIZE: tl.constexpr,
    SUB_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    USE_TMA: tl.constexpr,
    FAST_CVT: tl.constexpr,
):
    # Rows of x vary fastest over the grid: the programs that share a weight tile run together and
    # read it from L2 rather than from memory (only a forced GEMV at M > 1 has several rows).
    # USE_TMA: w_ptr is a host-side tensor descriptor of W [N, K] (block [BLOCK_N, BLOCK_K]); each
    # weight tile is one bulk copy into shared memory, rows past N and columns past K read as zeros.
    pid = tl.program_id(0)
    pid_m = pid % M
    pid_n = pid // M
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows re-read the last row (their results are never stored): no masks on the loads.
    rows = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    if not USE_TMA:
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + (k_start + offs_k)
    # The products are accumulated elementwise and reduced over K once after the loop: a reduction per
    # step would add shuffles to a loop whose only job is to keep the memory busy. With group scales,
    # each step reduces its products per group (SUB_K elements) and scales them.
    if GROUP_SIZE > 0:
        acc = tl.zeros((BLOCK_N, BLOCK_K // SUB_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # NUM_STAGES == 1 (the tuned decode entries): plain register loads, the weight bytes in flight
    # coming from the many resident programs; on an H100 this beats staging tiles through shared
    # memory with cp.async (NUM_STAGES >= 2) by 5-13% at M = 1 (scripts/gemv_variants.py). The
    # weight is read once: evict it first and keep the activation row, which every program reads.
    for k0 in tl.range(0, k_per_split, BLOCK_K, num_stages=NUM_STAGES):
        if USE_TMA:
            w = w_ptr.load([pid_n * BLOCK_N, k_start + k0])
            if EVEN_K:
                x = tl.load(x_ptrs, eviction_policy="evict_last")
            else:
                x = tl.load(x_ptrs, mask=offs_k < K - k_start - k0, other=0.0, eviction_policy="evict_last")
        elif EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptrs, eviction_policy="evict_last")
        else:
            k_in = offs_k < K - k_start - k0
            w = tl.load(w_ptrs, mask=k_in[None, :], other=0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=k_in, other=0.0, eviction_policy="evict_last")
        if FAST_CVT:
            wf = _int8_to_f32_prmt(w)
        else:
            wf = _int8_to_f32(w)
        prod = wf * x.to(tl.float32)[None, :]
        if GROUP_SIZE > 0:
            part = tl.sum(tl.reshape(prod, (BLOCK_N, BLOCK_K // SUB_K, SUB_K)), axis=2)
            # a block past K (the tail of the last split) loaded zeros: any valid group's scale will do
            groups = (k_start + k0 + tl.arange(0, BLOCK_K // SUB_K) * SUB_K) // GROUP_SIZE
            groups = tl.minimum(groups, tl.cdiv(K, GROUP_SIZE) - 1)
            s = tl.load(s_ptr + rows[:, None] * stride_sn + groups[None, :] * stride_sg)
            acc += part * s
        else:
            acc += prod
        if not USE_TMA:
            w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        if GROUP_SIZE == 0:
            out = out * tl.load(s_ptr + rows * stride_sn)
        if HAS_BIAS:
            out = out + tl.load(b_ptr + rows).to(tl.float32)
        tl.store(out_ptr + pid_m.to(tl.int64) * N + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)
    else:
        # fp32 partial sums of this K slice; the tile's last program adds them up
        om = (pid_m + tl.arange(0, 1))[:, None]
        on = offs_n[None, :]
        _store_output(
            out[None, :], om, on, M, N, s_ptr, b_ptr, out_ptr, part_ptr, pid_k, stride_sn,
            PER_CHANNEL_SCALE=GROUP_SIZE == 0, HAS_BIAS=HAS_BIAS, SPLIT_K=SPLIT_K,
        )
        _splitk_fixup(
            pid_m, pid_n * BLOCK_N, M, N, s_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, stride_sn,
            BLOCK_M=1, BLOCK_N=BLOCK_N, PER_CHANNEL_SCALE=GROUP_SIZE == 0, HAS_BIAS=HAS_BIAS, SPLIT_K=SPLIT_K,
        )


# --------------------------------------------------------------------------------------------------
# W8A16 group GEMV: several weights that read the same x (q/k/v, gate/up) in one launch
# --------------------------------------------------------------------------------------------------


@triton.jit
def _w8a16_gemv_group_kernel(
    x_ptr,
    w0_ptr,
    s0_ptr,
    b0_ptr,
    w1_ptr,
    s1_ptr,
    b1_ptr,
    w2_ptr,
    s2_ptr,
    b2_ptr,
    out_ptr,
    M,
    N0,
    N1,
    N2,
    K,
    stride_xm,
    stride_w0,
    stride_w1,
    stride_w2,
    stride_om,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    FAST_CVT: tl.constexpr,
):
    # The programs of weight 0 come first, then those of weight 1 and 2 (N2 = 0: none); each
    # writes its columns of the packed output [M, N0 + N1 + N2]. One launch streams all the weights:
    # at decode the small k/v projections alone leave most SMs idle and pay a launch each.
    pid = tl.program_id(0)
    pid_m = pid % M
    pid_n = pid // M
    blocks0 = tl.cdiv(N0, BLOCK_N)
    blocks1 = tl.cdiv(N1, BLOCK_N)
    if pid_n < blocks0:
        w_ptr, s_ptr, b_ptr, n, stride_wn = w0_ptr, s0_ptr, b0_ptr, N0, stride_w0
        first = pid_n * BLOCK_N
        col = N0 * 0
    elif pid_n < blocks0 + blocks1:
        w_ptr, s_ptr, b_ptr, n, stride_wn = w1_ptr, s1_ptr, b1_ptr, N1, stride_w1
        first = (pid_n - blocks0) * BLOCK_N
        col = N0
    else:
        w_ptr, s_ptr, b_ptr, n, stride_wn = w2_ptr, s2_ptr, b2_ptr, N2, stride_w2
        first = (pid_n - blocks0 - blocks1) * BLOCK_N
        col = N0 + N1
    offs_n = first + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, n - 1)  # out-of-range rows re-read the last one; never stored
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + offs_k
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptrs, eviction_policy="evict_last")
        else:
            k_in = offs_k < K - k0
            w = tl.load(w_ptrs, mask=k_in[None, :], other=0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=k_in, other=0.0, eviction_policy="evict_last")
        if FAST_CVT:
            wf = _int8_to_f32_prmt(w)
        else:
            wf = _int8_to_f32(w)
        acc += wf * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1) * tl.load(s_ptr + rows)
    if HAS_BIAS:
        out = out + tl.load(b_ptr + rows).to(tl.float32)
    dst = out_ptr + pid_m.to(tl.int64) * stride_om + col + offs_n
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=offs_n < n)


# --------------------------------------------------------------------------------------------------
# W8A16 tensor-core kernel (split-K when SPLIT_K > 1, tiled GEMM when SPLIT_K == 1)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _w8a16_dot_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    part_ptr,
    lock_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_sg,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCKED_SUM: tl.constexpr,
    USE_TMA: tl.constexpr,
    FAST_CVT: tl.constexpr,
):
    # USE_TMA: x_ptr and w_ptr are host-side tensor descriptors of x [M, K] (block [BLOCK_M, BLOCK_K])
    # and W [N, K] (block [BLOCK_N, BLOCK_K]); Hopper's tensor memory accelerator copies each tile to
    # shared memory with no per-element address arithmetic, and fills rows / columns outside the
    # tensor with zeros (no masks, any K).
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_wn = offs_n % N
    if not USE_TMA:
        offs_xm = offs_m % M
        x_ptrs = x_ptr + offs_xm.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_wn.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DOT_FP32:
        lost = tl.zeros_like(acc)  # the low-order bits the running fp32 sum has dropped so far
    for k0 in range(0, k_per_split, BLOCK_K):
        if USE_TMA:
            x = x_ptr.load([pid_m * BLOCK_M, k_start + k0])
            w = w_ptr.load([pid_n * BLOCK_N, k_start + k0])
        elif EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_in = offs_k < K - k0
            x = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_in[None, :], other=0)
        if DOT_FP32:
            # fp32 activations (IEEE products, as torch's default fp32 matmul); also bf16 under the
            # interpreter, whose dot multiplies bf16 bit patterns as integers.
            x = x.to(tl.float32)
            w = _int8_to_f32(w)
        elif FAST_CVT and x.dtype == tl.float16:
            w = _int8_to_f16(w)
        else:
            w = w.to(x.dtype)  # exact: every int8 value is representable in fp16 and bf16
        if SWAP_AB:
            a = w
            b = tl.trans(x)
        else:
            a = x
            b = tl.trans(w)
        if BLOCKED_SUM:
            # Each K block's product starts from zero and is then scaled (group scales) and added to
            # the total.
            if DOT_FP32:
                part = tl.dot(a, b, input_precision="ieee")
            else:
                part = tl.dot(a, b)
            if GROUP_SIZE > 0:
                group = tl.minimum((k_start + k0) // GROUP_SIZE, tl.cdiv(K, GROUP_SIZE) - 1)
                s = tl.load(s_ptr + offs_wn * stride_sn + group * stride_sg)
                if SWAP_AB:
                    part = part * s[:, None]
                else:
                    part = part * s[None, :]
            if DOT_FP32:
                # fp32 on FMA units: one FMA chain over all of K is several times less accurate than
                # cuBLAS's fp32 GEMM. Chains of BLOCK_K products, added with compensation (Kahan), leave
                # an error of about one BLOCK_K chain, below cuBLAS's.
                y = part - lost
                total = acc + y
                lost = (total - acc) - y
                acc = total
            else:
                acc += part
        else:
            acc = tl.dot(a, b, acc)
        if not USE_TMA:
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

    if SWAP_AB:
        om = offs_m[None, :]
        on = offs_n[:, None]
    else:
        om = offs_m[:, None]
        on = offs_n[None, :]
    _store_output(
        acc, om, on, M, N, s_ptr, b_ptr, out_ptr, part_ptr, pid_k, stride_sn,
        PER_CHANNEL_SCALE=GROUP_SIZE == 0, HAS_BIAS=HAS_BIAS, SPLIT_K=SPLIT_K,
    )
    if SPLIT_K > 1:
        _splitk_fixup(
            pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, s_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, stride_sn,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PER_CHANNEL_SCALE=GROUP_SIZE == 0, HAS_BIAS=HAS_BIAS,
            SPLIT_K=SPLIT_K,
        )


# --------------------------------------------------------------------------------------------------
# W8A16 dequant variant: the weight converted into a transient buffer, then cuBLAS
# --------------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_sg,
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[N, K] = (w * scale)`` in ``out``'s dtype: fp32 product, one rounding (the reference's)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < K)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    q = tl.load(w_ptr + r64 * stride_wn + cols[None, :], mask=mask, other=0)
    if GROUP_SIZE > 0:
        s = tl.load(s_ptr + r64 * stride_sn + (cols // GROUP_SIZE)[None, :] * stride_sg, mask=mask, other=0.0)
    else:
        s = tl.load(s_ptr + rows.to(tl.int64) * stride_sn, mask=row_ok, other=0.0)[:, None]
    value = q.to(tl.float32) * s
    tl.store(out_ptr + r64 * K + cols[None, :], value.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# W8A8: per-token activation quantization, then int8 x int8 -> int32 GEMM
# --------------------------------------------------------------------------------------------------

# The reference (``reference.int8.quantize_symmetric_reference``) computes, per row:
# amax = max(max|x|, AMAX_FLOOR), scale = amax / 127, q = clamp(round_half_even(x * (127 / amax))),
# and for a row whose max|x| is not finite (a NaN or an infinity in it) scale = NaN and q = 0.
# The kernel performs the same IEEE operations in the same order, so its output is bit-identical.
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


@triton.jit
def _max_propagate_nan(a, b):
    # tl.max / tl.maximum default to maxnum, which drops a NaN: a NaN row would get a finite scale
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _round_half_even(y):
    # |y| <= 127: adding 1.5 * 2**23 leaves no fraction bits, so the fp32 adder rounds to nearest even
    # (what torch.round does). Launched with fp fusion off, so x * inv and this add are not fused.
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    stride_xm,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * K
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.reduce(tl.abs(x), 0, _max_propagate_nan)
    else:
        amax_wide = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax_wide = _max_propagate_nan(amax_wide, tl.abs(xk))
        amax = tl.reduce(amax_wide, 0, _max_propagate_nan)
    # false for NaN and +inf: such a row has no int8 representation and gets a NaN scale (and q = 0),
    # so its output is NaN, as the reference's
    finite = amax < float("inf")
    # a zero row gets a tiny scale and quantizes to 0, no NaN
    amax = tl.where(finite, tl.maximum(amax, _AMAX_FLOOR), float("nan"))
    # IEEE divisions (as torch's), once per row; the per-element work is one multiply
    inv = tl.math.div_rn(127.0, amax)
    tl.store(s_ptr + row, tl.math.div_rn(amax, 127.0))
    if ONE_PASS:
        q = tl.minimum(tl.maximum(_round_half_even(x * inv), -127.0), 127.0)
        tl.store(q_row + offs, tl.where(finite, q, 0.0).to(tl.int8), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            # the second read of the row hits L2: one program's row is at most a few tens of KB
            xk = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_round_half_even(xk * inv), -127.0), 127.0)
            tl.store(q_row + k0 + offs, tl.where(finite, q, 0.0).to(tl.int8), mask=k0 + offs < K)


@triton.jit
def _w8a8_dot_kernel(
    xq_ptr,
    sx_ptr,
    w_ptr,
    sw_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_wn,
    stride_sn,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = xq_ptr + (offs_m % M).to(tl.int64)[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    # Both operands are K-major ([rows, K] with K contiguous): the layout int8 tensor-core MMAs need,
    # which is why the weight is used in its nn.Linear layout without a transposed copy.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_in = offs_k < K - k0
            a = tl.load(x_ptrs, mask=k_in[None, :], other=0)
            b = tl.load(w_ptrs, mask=k_in[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
    out = acc.to(tl.float32) * sx[:, None]
    _store_output(
        out, offs_m[:, None], offs_n[None, :], M, N, sw_ptr, b_ptr, out_ptr, out_ptr, 0, stride_sn,
        PER_CHANNEL_SCALE=True, HAS_BIAS=HAS_BIAS, SPLIT_K=1,
    )


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of ``device`` (a small constant for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _sms(index: int) -> int:
    return _cuda_sm_count(index) if index >= 0 else _INTERPRETER_SM_COUNT


# Resolved launch plans per problem size. Decode calls the same few sizes over and over: a dictionary
# hit replaces the table lookups, the config arithmetic and the constexpr dictionaries of every call.
_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 4096


def clear_plans() -> None:
    """Forget the resolved launch plans (after editing ``int8_config``'s tables at run time)."""
    _PLANS.clear()
    select_w8a16.cache_clear()
    select_w8a8.cache_clear()
    select_quant.cache_clear()


def _remember(key: tuple, plan: tuple) -> tuple:
    if len(_PLANS) >= _MAX_PLANS:  # prefill of ever-new lengths: keep memory bounded
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _split_plan(k: int, block_k: int, split: int) -> tuple[int, int, bool]:
    """(k_per_split, split actually used, whether every loaded K block is full)."""
    k_blocks = triton.cdiv(k, block_k)
    blocks_per_split = triton.cdiv(k_blocks, split)
    split = triton.cdiv(k_blocks, blocks_per_split)
    even_k = k % block_k == 0 and k_blocks % blocks_per_split == 0
    return blocks_per_split * block_k, split, even_k


@functools.cache
def tma_available(index: int) -> bool:
    """Whether the tensor-core kernel can load through TMA descriptors on device ``index``.

    Needs Triton's host-side ``TensorDescriptor`` and a GPU of compute capability 9.0 or newer (Hopper);
    the interpreter (``index`` -1, CPU tensors) emulates the descriptors, so CI runs that path too.
    """
    if TensorDescriptor is None:
        return False
    if index < 0:
        return is_triton_interpreter()
    return torch.cuda.get_device_capability(index)[0] >= 9


def _w8a16_plan(m, n, k, dtype, group_size, has_bias, kernel, config, index, tma_ok=False) -> tuple:
    """``(launch, k_per_split, split, tiles, tma)`` for one problem size on one device.

    ``launch`` is a ``KernelLaunch`` site with the grid, launch options and constexprs resolved;
    ``tiles`` the output tiles (arrival counters) of a split-K launch, 0 without a split; ``tma`` the
    descriptor blocks ``([block_m, block_k], [block_n, block_k])`` of x and W when the tensor-core
    kernel loads through TMA (``(None, [block_n, block_k])`` for the GEMV, which loads only W so)
    (the config asks for it, the device has it and ``tma_ok``: this call's
    operands meet the descriptors' 16-byte alignment rules), else ``None``. The dequant variant has no
    single launch: its plan is ``(None, DequantConfig, 0, 0, None)``.
    """
    fp32 = dtype == torch.float32
    sms = _sms(index)
    if config is None:
        variant, cfg = select_w8a16(m, n, k, group_size, kernel, sms, fp32)
    else:
        if kernel == "auto":
            raise ValueError(
                "an explicit config needs a named kernel ('gemv', 'splitk', 'gemm' or 'dequant')"
            )
        variant = kernel
        cfg = resolve_w8a16(variant, config, m, n, k, group_size=group_size, sm_count=sms, fp32=fp32)
    if variant == "dequant":
        return None, cfg, 0, 0, None
    gs = int(group_size or 0)
    tma = None
    k_per_split, split, even_k = _split_plan(k, cfg.block_k, cfg.split_k)
    if variant == "gemv":
        assert isinstance(cfg, GemvConfig)
        _, sub_k = group_block(cfg.block_k, group_size)
        if cfg.tma and tma_ok and tma_available(index):
            tma = (None, [cfg.block_n, cfg.block_k])  # the weight only: x is one L2-resident row
        site = KernelLaunch(
            _w8a16_gemv_kernel, (m * triton.cdiv(n, cfg.block_n), split), cfg.num_warps, cfg.num_stages,
            device=index, GROUP_SIZE=gs, SUB_K=sub_k, HAS_BIAS=has_bias, EVEN_K=even_k,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, NUM_STAGES=cfg.num_stages,
            USE_TMA=tma is not None, FAST_CVT=cfg.fast_convert and index >= 0,
        )
    else:
        assert isinstance(cfg, DotConfig)
        # the interpreter's dot multiplies bf16 bit patterns as integers: compute in fp32 there
        dot_fp32 = fp32 or (dtype == torch.bfloat16 and index < 0 and is_triton_interpreter())
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        if cfg.tma and tma_ok and tma_available(index):
            tma = ([cfg.block_m, cfg.block_k], [cfg.block_n, cfg.block_k])
        site = KernelLaunch(
            _w8a16_dot_kernel, grid, cfg.num_warps, cfg.num_stages, device=index,
            GROUP_SIZE=gs, HAS_BIAS=has_bias, EVEN_K=even_k,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
            GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab, DOT_FP32=dot_fp32, BLOCKED_SUM=gs > 0 or dot_fp32,
            USE_TMA=tma is not None, FAST_CVT=cfg.fast_convert and index >= 0 and dtype == torch.float16,
        )
    return site, k_per_split, split, site.grid[0] if split > 1 else 0, tma


# Arrival counters of split-K launches per (device index, stream): zeroed once, left zero by every
# launch (see the module docstring). Kernels of one stream run in order, so they can share one buffer;
# another stream's kernels may overlap them and get their own.
_LOCKS: dict[tuple[int, int], torch.Tensor] = {}
_MAX_LOCK_BUFFERS = 64
_stream_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)


def _split_locks(index: int, tiles: int, like: torch.Tensor) -> torch.Tensor:
    """Zeroed int32 counters, at least ``tiles`` of them, for a split-K launch on the current stream."""
    if index >= 0:
        if _stream_capturing is not None and _stream_capturing():
            # under CUDA-graph capture: a buffer of the graph's own, zeroed by each replay (another
            # graph captured on the same stream may be replayed concurrently with this one)
            return like.new_zeros((tiles,), dtype=torch.int32)
        stream = _current_stream(index) if _current_stream is not None else \
            torch.cuda.current_stream(index).cuda_stream
    else:
        stream = 0
    key = (index, stream)
    locks = _LOCKS.get(key)
    if locks is None or locks.numel() < tiles:
        if len(_LOCKS) >= _MAX_LOCK_BUFFERS:
            # A program that cycles through many streams: drop the others' buffers. Safe while their
            # kernels still run: each buffer was allocated on its own stream, so the caching allocator
            # hands its memory out again only to work ordered after those kernels.
            _LOCKS.clear()
        locks = like.new_zeros((max(tiles, 1024),), dtype=torch.int32)
        _LOCKS[key] = locks
    return locks


def _descriptor(tensor, shape: list, strides: list, block: list):
    """A ``TensorDescriptor`` without its constructor's checks, which ``w8a16_linear`` has made already
    (16-byte aligned base and row stride, unit inner stride, power-of-two blocks); the checks take
    about 2 us per descriptor in CPython, five times the bare object."""
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides = tensor, shape, strides
    desc.block_shape, desc.padding = block, "zero"
    return desc


def _empty_result(x, weight, bias):
    m, n = x.shape[0], weight.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m and n:  # K = 0: the empty sum, plus the bias
        if bias is None:
            out.zero_()
        else:
            out.copy_(bias.expand(m, n))
    return out


def w8a16_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
    kernel: str = "auto",
    config: GemvConfig | DotConfig | None = None,
) -> torch.Tensor:
    """``x[M, K] @ (weight[N, K] * scale)^T + bias`` in ``x.dtype`` with a W8A16 kernel.

    Args:
        x: activations ``[M, K]`` (fp16, bf16 or fp32; any row stride).
        weight: int8 ``[N, K]``.
        scale: fp32 ``[N]`` (per channel) or ``[N, ceil(K / group_size)]`` (per group).
        bias: ``[N]`` or ``None``.
        group_size: size of the K groups of ``scale`` (a multiple of 16), or ``None``.
        kernel: ``"auto"``, ``"gemv"``, ``"splitk"``, ``"gemm"`` or ``"dequant"`` (the module
            ``int8_config`` describes each).
        config: explicit tiles for ``kernel`` (the benchmark sweep and the tests use this);
            requires a named kernel.

    Returns:
        A contiguous ``[M, N]`` tensor in ``x.dtype``.
    """
    m, k = x.shape
    n = weight.shape[0]
    if m == 0 or n == 0 or k == 0:
        return _empty_result(x, weight, bias)
    stride_xm, stride_xk = x.stride()
    if stride_xk != 1:
        x = x.contiguous()
        stride_xm = k
    stride_wn, stride_wk = weight.stride()
    if stride_wk != 1:
        weight = weight.contiguous()
        stride_wn = k
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    index = x.get_device()
    px, pw = x.data_ptr(), weight.data_ptr()
    x_align = px & 15
    w_align = pw & 15
    # TMA descriptors need 16-byte aligned bases and row strides
    tma_ok = not (x_align | w_align | (stride_xm * x.element_size()) & 15 | stride_wn & 15)
    key = (m, n, k, x.dtype, group_size, bias is None, kernel, config, index, tma_ok)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _w8a16_plan(m, n, k, x.dtype, group_size, bias is not None, kernel, config, index, tma_ok)
        out_like = part_like = None
        if plan[0] is not None:  # templates of the output and of the split-K partials
            out_like = empty_template((m, n), x.dtype, x.device)
            if plan[2] > 1:
                part_like = empty_template((plan[2], m, n), torch.float32, x.device)
        plan = _remember(key, (*plan, out_like, part_like))
    site, k_per_split, split, tiles, tma, out_like, part_like = plan
    if site is None:  # the dequant variant: k_per_split holds its DequantConfig
        return _dequant_linear(x, weight, scale, bias, group_size, k_per_split)
    out = torch.empty_like(out_like)
    if split > 1:
        part = torch.empty_like(part_like)
        locks = _split_locks(index, tiles, x)
    else:
        part = locks = out
    if scale.dim() == 2:
        stride_sn, stride_sg = scale.stride()
    else:
        stride_sn, stride_sg = scale.stride(0), 0
    b_arg = bias if bias is not None else scale
    ps, pb = scale.data_ptr(), b_arg.data_ptr()
    # What can change Triton's specialization between calls of one plan (out and part are fresh,
    # hence aligned): the inputs' alignment, the strides and the bias dtype.
    spec = (x_align, w_align, ps & 15, pb & 15, b_arg.dtype, stride_xm, stride_wn, stride_sn, stride_sg)
    ints = (m, n, k, k_per_split, stride_xm, stride_wn, stride_sn, stride_sg)
    switch = index >= 0 and index != current_device()
    if tma is None:
        # pointer loads: the addresses as integers where the site launches through the C entry
        ptrs = (px, pw, ps, pb, out.data_ptr(), part.data_ptr(), locks.data_ptr(), *ints)
        if switch:
            with torch.cuda.device(index):  # Triton launches on the current device
                if not site.launch_ptrs(ptrs, spec):
                    site((x, weight, scale, b_arg, out, part, locks, *ints), spec)
        elif not site.launch_ptrs(ptrs, spec):
            site((x, weight, scale, b_arg, out, part, locks, *ints), spec)
        return out
    x_arg = x if tma[0] is None else _descriptor(x, [m, k], [stride_xm, 1], tma[0])
    w_arg = _descriptor(weight, [n, k], [stride_wn, 1], tma[1])
    args = (x_arg, w_arg, scale, b_arg, out, part, locks, *ints)
    if switch:
        with torch.cuda.device(index):
            site(args, spec)
    else:
        site(args, spec)
    return out


def dequantize_weight(
    weight: torch.Tensor,
    scale: torch.Tensor,
    group_size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    config: DequantConfig | None = None,
) -> torch.Tensor:
    """``weight[N, K] * scale`` in ``dtype`` with one memory-bound kernel (1 byte read, 2 written).

    Args:
        weight: int8 ``[N, K]`` with unit stride along K (any row stride).
        scale: fp32 ``[N]`` (per channel) or ``[N, ceil(K / group_size)]`` (per group).
        group_size: the K-group size of ``scale``, or ``None``.
        dtype: fp16, bf16 or fp32; each value is ``q * s`` in fp32 rounded once to ``dtype``, as
            ``reference.int8.dequantize_weight_reference(weight, scale, group_size).to(dtype)``.
        out: optional contiguous ``[N, K]`` destination of ``dtype``.
        config: tiles; ``int8_config.DEQUANT_DEFAULT`` clamped to the shape when ``None``.

    Returns:
        ``out`` or a new contiguous ``[N, K]`` tensor.

    Example:
        >>> # w = dequantize_weight(q, s, dtype=torch.bfloat16)    # q: int8 [N, K] on a GPU
    """
    n, k = weight.shape
    if out is None:
        out = torch.empty((n, k), device=weight.device, dtype=dtype)
    if n == 0 or k == 0:
        return out
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    cfg = resolve_w8a16("dequant", config or DEFAULTS["dequant"]["big"], 1, n, k, group_size=group_size,
                        sm_count=1, fp32=False)
    if scale.dim() == 2:
        stride_sn, stride_sg = scale.stride()
    else:
        stride_sn, stride_sg = scale.stride(0), 0
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))
    args = (weight, scale, out, n, k, weight.stride(0), stride_sn, stride_sg)
    meta = {"GROUP_SIZE": int(group_size or 0), "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
    index = weight.get_device()
    if index >= 0 and index != current_device():
        with torch.cuda.device(index):
            launch(_dequantize_kernel, grid, args, cfg.num_warps, **meta)
    else:
        launch(_dequantize_kernel, grid, args, cfg.num_warps, **meta)
    return out


def _dequant_linear(x, weight, scale, bias, group_size, cfg: DequantConfig) -> torch.Tensor:
    """The dequant variant: the weight dequantized in column chunks of at most
    ``DEQUANT_MAX_BUFFER_BYTES`` into one reused buffer, each chunk multiplied by cuBLAS into its
    columns of the output (``addmm`` with the bias, in ``x``'s dtype)."""
    m, k = x.shape
    n = weight.shape[0]
    # Chunks of whole multiples of 256 columns: a chunk's output columns then start 512-byte aligned;
    # cuBLAS slowed 3-8x on unaligned column slices (K = 14336 with 16-64 MiB buffers, H100,
    # benchmarks/results/sweeps/int8-dequant-experiments-h100-80gb-hbm3-2026-12-06).
    rows = int8_config.DEQUANT_MAX_BUFFER_BYTES // max(1, k * x.element_size())
    chunk = min(n, max(256, rows // 256 * 256))
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if chunk >= n:
        w = dequantize_weight(weight, scale, group_size, x.dtype, config=cfg)
        return torch.nn.functional.linear(x, w, bias)
    out = x.new_empty((m, n))
    buf = x.new_empty((chunk, k))
    for n0 in range(0, n, chunk):
        n1 = min(n, n0 + chunk)
        w = dequantize_weight(weight[n0:n1], scale[n0:n1], group_size, x.dtype, out=buf[: n1 - n0],
                              config=cfg)
        if bias is None:
            torch.mm(x, w.t(), out=out[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1], x, w.t(), out=out[:, n0:n1])
    return out


def w8a16_gemv_group(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    scales: list[torch.Tensor],
    biases: list[torch.Tensor | None] | None = None,
    fast_convert: bool = False,
) -> torch.Tensor:
    """``[x @ (w_i * s_i)^T + b_i for each i]`` side by side, ``[M, sum N_i]``, in one launch.

    For two or three weights of one input (q/k/v, gate/up) at small M: the GEMV of
    :func:`w8a16_linear` over all of them at once. Per-channel fp32 scales ``[N_i]``; ``biases``
    all tensors of one dtype, all ``None``, or ``None``. ``fast_convert`` as in ``GemvConfig`` (CUDA
    only; the same values either way; 15.4 vs 15.5 us for q/k/v and 49.3 vs 50.3 us for gate/up of
    4096 -> 2 x 14336 on an H100, within run-to-run spread, so off by default).
    """
    if biases is not None and all(b is None for b in biases):
        biases = None
    if not 2 <= len(weights) <= 3 or len(scales) != len(weights):
        raise ValueError(f"w8a16_gemv_group: 2 or 3 weights with one scale each, got {len(weights)} "
                         f"weights and {len(scales)} scales")
    m, k = x.shape
    ns = [w.shape[0] for w in weights]
    total = sum(ns)
    out = x.new_empty((m, total))
    if m == 0 or total == 0:
        return out
    if k == 0:
        return out.zero_() if biases is None else out.copy_(torch.cat(list(biases)).expand(m, total))
    if x.stride(1) != 1:
        x = x.contiguous()
    weights = [w if w.stride(1) == 1 else w.contiguous() for w in weights]
    scales = [s if s.stride(0) == 1 else s.contiguous() for s in scales]
    has_bias = biases is not None
    if has_bias:
        biases = [b if b.stride(0) == 1 else b.contiguous() for b in biases]
    while len(weights) < 3:  # an empty third weight: no programs
        weights, scales, ns = weights + [weights[-1]], scales + [scales[-1]], ns + [0]
        if has_bias:
            biases = biases + [biases[-1]]
    bs = biases if has_bias else scales
    # Register loads, 16+ bytes per thread per step (scripts/gemv_variants.py on an H100: the small
    # tiles win at N <= 8192, the 4-row ones beyond).
    block_n = 2 if total <= 8192 else 4
    block_k = min(1024, triton.next_power_of_2(k))
    num_warps = 2 if block_n * block_k <= 2048 else 4
    grid = (m * sum(triton.cdiv(n, block_n) for n in ns),)
    args = (x, weights[0], scales[0], bs[0], weights[1], scales[1], bs[1], weights[2], scales[2], bs[2], out,
            m, ns[0], ns[1], ns[2], k, x.stride(0), weights[0].stride(0), weights[1].stride(0),
            weights[2].stride(0), out.stride(0))
    index = x.get_device()
    constexprs = {"HAS_BIAS": has_bias, "EVEN_K": k % block_k == 0, "BLOCK_N": block_n, "BLOCK_K": block_k,
                  "NUM_STAGES": 1, "FAST_CVT": fast_convert and index >= 0}
    on_device(index, lambda: launch(_w8a16_gemv_group_kernel, grid, args, num_warps, 1, **constexprs))
    return out


def quantize_rows(x: torch.Tensor, config: QuantConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of ``x[M, K]``: int8 ``[M, K]`` and fp32 scales ``[M]``.

    Bit-identical to ``reference.int8.quantize_symmetric_reference(x, dim=-1)``, including a row that
    holds a NaN or an infinity: NaN scale, zeros in ``q`` (so the W8A8 output row is NaN).
    """
    m, k = x.shape
    q = x.new_empty((m, k), dtype=torch.int8)
    s = x.new_empty((m,), dtype=torch.float32)
    if m == 0:
        return q, s
    stride_xm, stride_xk = x.stride()
    if stride_xk != 1:
        x = x.contiguous()
        stride_xm = k
    index = x.get_device()
    key = ("quant", m, k, config, index)
    site = _PLANS.get(key)
    if site is None:
        cfg = config or select_quant(k)
        # enable_fp_fusion=False is a compile option (passed through to Triton's first launch): x * inv
        # and the rounding add must stay two IEEE operations to match torch bit for bit
        site = _remember(key, KernelLaunch(
            _quantize_rows_kernel, (m,), cfg.num_warps, None, device=index,
            BLOCK_K=cfg.block_k, ONE_PASS=k <= cfg.block_k, enable_fp_fusion=False,
        ))
    on_device(index, site, (x, q, s, k, stride_xm), (x.data_ptr() & 15, x.dtype, stride_xm))
    return q, s


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: DotConfig | None = None,
    quant_config: QuantConfig | None = None,
) -> torch.Tensor:
    """W8A8 dynamic: quantize ``x[M, K]`` per token, then ``(xq @ weight^T) * sx * scale + bias``.

    Args:
        x: activations ``[M, K]`` (fp16, bf16 or fp32).
        weight: int8 ``[N, K]``; ``K <= W8A8_MAX_K`` (int32 accumulation stays exact).
        scale: fp32 per-channel weight scales ``[N]``.
        bias: ``[N]`` or ``None``.
        config, quant_config: explicit tiles (benchmark sweep and tests).

    Returns:
        A contiguous ``[M, N]`` tensor in ``x.dtype``.
    """
    m, k = x.shape
    n = weight.shape[0]
    assert k <= W8A8_MAX_K, "int32 accumulation would overflow"
    if m == 0 or n == 0 or k == 0:
        return _empty_result(x, weight, bias)
    xq, sx = quantize_rows(x, quant_config)
    return w8a8_gemm(xq, sx, weight, scale, bias, x.dtype, config)


def w8a8_gemm(
    xq: torch.Tensor,
    sx: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: DotConfig | None = None,
) -> torch.Tensor:
    """The W8A8 GEMM alone on quantized activations: ``(xq @ weight^T) * sx * scale + bias``.

    Args:
        xq: contiguous int8 ``[M, K]`` and ``sx`` its fp32 row scales ``[M]`` (from :func:`quantize_rows`).
        weight, scale, bias: as in :func:`w8a8_linear`.
        out_dtype: dtype of the result.
        config: explicit tiles.
    """
    m, k = xq.shape
    n = weight.shape[0]
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    index = xq.get_device()
    key = ("w8a8", m, n, k, bias is None, config, index)
    site = _PLANS.get(key)
    if site is None:
        cfg = resolve_w8a8(config, m, n, k) if config is not None else select_w8a8(m, n, k)
        site = _remember(key, KernelLaunch(
            _w8a8_dot_kernel, (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),), cfg.num_warps,
            cfg.num_stages, device=index, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        ))
    out = xq.new_empty((m, n), dtype=out_dtype)
    b_arg = bias if bias is not None else scale
    args = (xq, sx, weight, scale, b_arg, out, m, n, k, weight.stride(0), scale.stride(0))
    spec = (xq.data_ptr() & 15, sx.data_ptr() & 15, weight.data_ptr() & 15, scale.data_ptr() & 15,
            b_arg.data_ptr() & 15, b_arg.dtype, out_dtype, weight.stride(0), scale.stride(0))
    on_device(index, site, args, spec)
    return out
