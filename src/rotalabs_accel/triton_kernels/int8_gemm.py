"""Triton kernels for INT8 linear layers: W8A16 (GEMV, split-K, tiled GEMM) and W8A8 dynamic.

Every kernel computes ``out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias)`` with the int8 weight stored
once, in the ``nn.Linear`` layout ``[N, K]``, and never materialized in floating point:

* W8A16: the int8 tile is converted in registers (exact: ``|q| <= 127`` fits fp16/bf16), multiplied
  with the activation tile with fp32 accumulation, and the fp32 per-channel scale is applied once in the
  epilogue (``sum_k x q s = s sum_k x q``). With per-group scales each K block lies inside one group and
  its partial product is scaled before it is accumulated.
* W8A8: a row kernel quantizes the activations per token (int8 + fp32 row scales), then an
  int8 x int8 -> int32 tensor-core GEMM applies both scales (and the bias) in the epilogue.

Kernels, in the order the data meets them: GEMV (M of a few rows, elementwise FMAs over wide int8
loads), the tensor-core kernel shared by split-K and GEMM (split-K partial sums are reduced by a second
kernel in a fixed order, so results are deterministic; no atomics), the split-K reduction, the activation
quantizer and the W8A8 GEMM. Launchers and the launch heuristics (``int8_config``) follow.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..reference.int8 import AMAX_FLOOR, W8A8_MAX_K
from ..utils import is_triton_interpreter
from .int8_config import (
    DotConfig,
    GemvConfig,
    QuantConfig,
    resolve_w8a8,
    resolve_w8a16,
    select_quant,
    select_w8a8,
    select_w8a16,
)

__all__ = ["w8a16_linear", "w8a8_linear", "quantize_rows", "W8A8_MAX_K"]

# SMs assumed by the split-K heuristic when kernels run on CPU tensors under the interpreter: small,
# so interpreter tests exercise splits on tiny shapes.
_INTERPRETER_SM_COUNT = 4


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


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
    stride_om,
    stride_on,
    PER_CHANNEL_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # acc[i, j] is out[om[i, j], on[i, j]]; om / on are broadcastable 2-D index tensors, so the same
    # epilogue serves the [M, N] and the swapped [N, M] accumulator orientations.
    mask = (om < M) & (on < N)
    if SPLIT_K == 1:
        if PER_CHANNEL_SCALE:
            s = tl.load(s_ptr + on * stride_sn, mask=on < N, other=0.0)
            acc = acc * s
        if HAS_BIAS:
            b = tl.load(b_ptr + on, mask=on < N, other=0.0).to(tl.float32)
            acc = acc + b
        out_ptrs = out_ptr + om.to(tl.int64) * stride_om + on.to(tl.int64) * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # fp32 partial sums of this K slice; the reduction kernel applies scale and bias
        plane = pid_k.to(tl.int64) * M * N
        tl.store(part_ptr + plane + om.to(tl.int64) * N + on, acc, mask=mask)


# --------------------------------------------------------------------------------------------------
# W8A16 GEMV: a few rows of x, weight streamed once with wide int8 loads, CUDA-core FMAs
# --------------------------------------------------------------------------------------------------


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    part_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_om,
    stride_on,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # Tiles are [BLOCK_M, BLOCK_N, BLOCK_K // 8, 8]. With 8 contiguous K elements per thread for both
    # the int8 weights (8-byte loads) and the 16-bit activations (16-byte loads), both loads get the same
    # register layout: the weight tile is multiplied where it lands. (As plain [BLOCK_N, BLOCK_K] tiles
    # the int8 load takes 16 elements per thread, the activation load 8, and the compiler reshuffles the
    # whole weight tile through shared memory on every step.)
    VEC: tl.constexpr = 8
    # Row blocks of x vary fastest over the grid: the programs that share a weight tile run together
    # and read it from L2 rather than from memory.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    offs_k = k_start + tl.arange(0, BLOCK_K // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    # Out-of-range rows wrap onto valid ones (their results are never stored), so the hot loop's loads
    # need no row mask.
    offs_wn = offs_n % N
    m4 = (offs_m % M)[:, None, None, None]
    n4 = offs_wn[None, :, None, None]
    k4 = offs_k[None, None, :, :]
    # Each operand's pointers are broadcast over the other's rows; the compiler loads them once.
    x_ptrs = x_ptr + (m4.to(tl.int64) * stride_xm + n4 * 0) + k4 * stride_xk
    w_ptrs = w_ptr + (n4.to(tl.int64) * stride_wn + m4 * 0) + k4 * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Per-channel scales: accumulate the products elementwise and reduce once after the loop; reducing
    # every step would add shuffles to a loop whose only job is to keep memory busy.
    acc_wide = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // VEC, VEC), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            k_in = k4 < K - k0
            w = tl.load(w_ptrs, mask=k_in, other=0)
            x = tl.load(x_ptrs, mask=k_in, other=0.0)
        prod = w.to(tl.float32) * x.to(tl.float32)
        if GROUP_SIZE > 0:
            # a block past K (the tail of the last split) loaded zeros: any valid group's scale will do
            group = tl.minimum((k_start + k0) // GROUP_SIZE, tl.cdiv(K, GROUP_SIZE) - 1)
            s = tl.load(s_ptr + offs_wn * stride_sn + group * stride_sg)
            acc += tl.sum(tl.sum(prod, axis=3), axis=2) * s[None, :]
        else:
            acc_wide += prod
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
    if GROUP_SIZE == 0:
        acc = tl.sum(tl.sum(acc_wide, axis=3), axis=2)

    _store_output(
        acc, offs_m[:, None], offs_n[None, :], M, N, s_ptr, b_ptr, out_ptr, part_ptr, pid_k,
        stride_sn, stride_om, stride_on,
        PER_CHANNEL_SCALE=GROUP_SIZE == 0, HAS_BIAS=HAS_BIAS, SPLIT_K=SPLIT_K,
    )


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
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_om,
    stride_on,
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
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_xm = offs_m % M
    offs_wn = offs_n % N
    x_ptrs = x_ptr + offs_xm.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_wn.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
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
            w = w.to(tl.float32)
        else:
            w = w.to(x.dtype)  # exact: every int8 value is representable in fp16 and bf16
        if SWAP_AB:
            a = w
            b = tl.trans(x)
        else:
            a = x
            b = tl.trans(w)
        if GROUP_SIZE > 0:
            if DOT_FP32:
                part = tl.dot(a, b, input_precision="ieee")
            else:
                part = tl.dot(a, b)
            group = tl.minimum((k_start + k0) // GROUP_SIZE, tl.cdiv(K, GROUP_SIZE) - 1)
            s = tl.load(s_ptr + offs_wn * stride_sn + group * stride_sg)
            if SWAP_AB:
                acc += part * s[:, None]
            else:
                acc += part * s[None, :]
        else:
            if DOT_FP32:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if SWAP_AB:
        om = offs_m[None, :]
        on = offs_n[:, None]
    else:
        om = offs_m[:, None]
        on = offs_n[None, :]
    _store_output(
        acc, om, on, M, N, s_ptr, b_ptr, out_ptr, part_ptr, pid_k, stride_sn, stride_om, stride_on,
        PER_CHANNEL_SCALE=GROUP_SIZE == 0, HAS_BIAS=HAS_BIAS, SPLIT_K=SPLIT_K,
    )


@triton.jit
def _splitk_reduce_kernel(
    part_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    split_stride,
    stride_sn,
    stride_om,
    stride_on,
    SPLIT_K: tl.constexpr,
    PER_CHANNEL_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = part_ptr + pid_m.to(tl.int64) * N + offs_n
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # a fixed summation order: the result does not depend on which split finished first
    for _ in tl.static_range(SPLIT_K):
        acc += tl.load(row, mask=offs_n < N, other=0.0)
        row += split_stride
    om = (pid_m + tl.arange(0, 1))[:, None]
    _store_output(
        acc[None, :], om, offs_n[None, :], M, N, s_ptr, b_ptr, out_ptr, part_ptr, 0,
        stride_sn, stride_om, stride_on,
        PER_CHANNEL_SCALE=PER_CHANNEL_SCALE, HAS_BIAS=HAS_BIAS, SPLIT_K=1,
    )


# --------------------------------------------------------------------------------------------------
# W8A8: per-token activation quantization, then int8 x int8 -> int32 GEMM
# --------------------------------------------------------------------------------------------------

# The reference (``reference.int8.quantize_symmetric_reference``) computes, per row:
# amax = max(max|x|, AMAX_FLOOR), scale = amax / 127, q = clamp(round_half_even(x * (127 / amax))).
# The kernel performs the same IEEE operations in the same order, so its output is bit-identical.
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


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
    stride_xk,
    stride_qm,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        amax_wide = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax_wide = tl.maximum(amax_wide, tl.abs(xk))
        amax = tl.max(amax_wide, axis=0)
    amax = tl.maximum(amax, _AMAX_FLOOR)  # a zero row gets a tiny scale and quantizes to 0, no NaN
    # IEEE divisions (as torch's), once per row; the per-element work is one multiply
    inv = tl.math.div_rn(127.0, amax)
    tl.store(s_ptr + row, tl.math.div_rn(amax, 127.0))
    if ONE_PASS:
        q = tl.minimum(tl.maximum(_round_half_even(x * inv), -127.0), 127.0)
        tl.store(q_row + offs, q.to(tl.int8), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            # the second read of the row hits L2: one program's row is at most a few tens of KB
            xk = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_round_half_even(xk * inv), -127.0), 127.0)
            tl.store(q_row + k0 + offs, q.to(tl.int8), mask=k0 + offs < K)


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
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_om,
    stride_on,
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
    x_ptrs = xq_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
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
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
    out = acc.to(tl.float32) * sx[:, None]
    _store_output(
        out, offs_m[:, None], offs_n[None, :], M, N, sw_ptr, b_ptr, out_ptr, out_ptr, 0,
        stride_sn, stride_om, stride_on,
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


def _on_device(t: torch.Tensor):
    # launch on the tensor's own GPU; entering a device context only when it is not the current one
    # saves microseconds per call at decode
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _scale_strides(scale: torch.Tensor) -> tuple[int, int]:
    return (scale.stride(0), scale.stride(1)) if scale.dim() == 2 else (scale.stride(0), 0)


def _split_plan(k: int, block_k: int, split: int) -> tuple[int, int, bool]:
    """(k_per_split, split actually used, whether every loaded K block is full)."""
    k_blocks = triton.cdiv(k, block_k)
    blocks_per_split = triton.cdiv(k_blocks, split)
    split = triton.cdiv(k_blocks, blocks_per_split)
    even_k = k % block_k == 0 and k_blocks % blocks_per_split == 0
    return blocks_per_split * block_k, split, even_k


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
        x: activations ``[M, K]`` (fp16, bf16 or fp32; any strides).
        weight: int8 ``[N, K]``.
        scale: fp32 ``[N]`` (per channel) or ``[N, ceil(K / group_size)]`` (per group).
        bias: ``[N]`` or ``None``.
        group_size: size of the K groups of ``scale`` (a multiple of 16), or ``None``.
        kernel: ``"auto"``, ``"gemv"``, ``"splitk"`` or ``"gemm"``.
        config: explicit tiles for ``kernel`` (the benchmark sweep and the tests use this);
            requires a named kernel.
    """
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    fp32 = x.dtype == torch.float32
    sms = sm_count(x.device)
    if config is None:
        variant, cfg = select_w8a16(m, n, k, group_size=group_size, kernel=kernel, sm_count=sms, fp32=fp32)
    else:
        if kernel == "auto":
            raise ValueError("an explicit config needs a named kernel ('gemv', 'splitk' or 'gemm')")
        variant = kernel
        cfg = resolve_w8a16(variant, config, m, n, k, group_size=group_size, sm_count=sms, fp32=fp32)
    gs = int(group_size or 0)
    k_per_split, split, even_k = _split_plan(k, cfg.block_k, cfg.split_k)
    part = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else out
    b_arg = bias if bias is not None else scale
    stride_sn, stride_sg = _scale_strides(scale)
    common = (
        m, n, k, k_per_split,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), stride_sn, stride_sg,
        out.stride(0), out.stride(1),
    )
    with _on_device(x):
        if variant == "gemv":
            assert isinstance(cfg, GemvConfig)
            grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
            _w8a16_gemv_kernel[grid](
                x, weight, scale, b_arg, out, part, *common,
                GROUP_SIZE=gs, HAS_BIAS=bias is not None, EVEN_K=even_k,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        else:
            assert isinstance(cfg, DotConfig)
            dot_fp32 = fp32 or (x.dtype == torch.bfloat16 and is_triton_interpreter())
            grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
            _w8a16_dot_kernel[grid](
                x, weight, scale, b_arg, out, part, *common,
                GROUP_SIZE=gs, HAS_BIAS=bias is not None, EVEN_K=even_k,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
                GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab, DOT_FP32=dot_fp32,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        if split > 1:
            # small column blocks: at decode (M = 1) the reduction must still spread over many SMs
            block_n = min(256, triton.next_power_of_2(n))
            _splitk_reduce_kernel[(m, triton.cdiv(n, block_n))](
                part, scale, b_arg, out, m, n, part.stride(0), stride_sn, out.stride(0), out.stride(1),
                SPLIT_K=split, PER_CHANNEL_SCALE=gs == 0, HAS_BIAS=bias is not None, BLOCK_N=block_n,
                num_warps=2,
            )
    return out


def quantize_rows(x: torch.Tensor, config: QuantConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of ``x[M, K]``: int8 ``[M, K]`` and fp32 scales ``[M]``.

    Bit-identical to ``reference.int8.quantize_symmetric_reference(x, dim=-1)``.
    """
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=torch.int8)
    s = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0:
        return q, s
    cfg = config or select_quant(k)
    with _on_device(x):
        _quantize_rows_kernel[(m,)](
            x, q, s, k, x.stride(0), x.stride(1), q.stride(0),
            BLOCK_K=cfg.block_k, ONE_PASS=k <= cfg.block_k,
            num_warps=cfg.num_warps, enable_fp_fusion=False,
        )
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
        ``[M, N]`` in ``x.dtype``.
    """
    m, k = x.shape
    n = weight.shape[0]
    assert k <= W8A8_MAX_K, "int32 accumulation would overflow"
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    xq, sx = quantize_rows(x, quant_config)
    cfg = resolve_w8a8(config, m, n, k) if config is not None else select_w8a8(m, n, k)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    with _on_device(x):
        _w8a8_dot_kernel[grid](
            xq, sx, weight, scale, bias if bias is not None else scale, out, m, n, k,
            xq.stride(0), xq.stride(1), weight.stride(0), weight.stride(1), scale.stride(0),
            out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out
