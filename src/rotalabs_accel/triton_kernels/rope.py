"""Triton kernel for rotary position embeddings: q and k rotated in one launch, forward and backward.

Work split. The kernel sees q as ``(batch, seq, heads_q, head_dim)`` and k as
``(batch, seq, heads_k, head_dim)`` with arbitrary strides except a unit stride in the last
dimension (so both memory layouts, and q/k sliced out of a fused qkv projection, run without a
copy). Heads of q and heads of k form one list of ``heads_q + heads_k`` heads per token. A program
owns a block of ``BLOCK_T`` tokens and a group of ``HEADS_PER_PROGRAM`` heads of that list; it reads
the tokens' positions and cos/sin rows once, then walks its q heads and then its k heads
``BLOCK_H`` at a time with ``(BLOCK_T, BLOCK_H, rotary_dim / 2)`` tiles (cos/sin broadcast over the
heads). q and k are walked in two loops rather than one tile that mixes both: selecting between
two base pointers per element hides their alignment from the compiler and costs the 16-byte vector
loads. Per pair of rotated features ``(x1, x2)``::

    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin

in fp32, rounded once to the input dtype. The backward pass is the rotation by the negative angle
(the transpose of a rotation), so it is the same kernel with ``sin`` negated (``BACKWARD``).

Launch configuration is data: :class:`RopeConfig`, chosen by :func:`rope_config` from a small table
keyed on the token count and the layout's head stride. No autotuning, so no first-call stalls. The
launcher, :func:`rope_apply`, reads both layouts through their strides (no transposed views), reads
position ids in place (no broadcast or dtype conversion) and keeps one
:class:`~rotalabs_accel.triton_kernels._launch.KernelLaunch` site per problem, so a repeated call (a
decode step) is two output allocations, a dictionary lookup and a direct launch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import KernelLaunch, current_device, launch

__all__ = ["RopeConfig", "rope_config", "rope_apply", "rope_forward", "SWEEP_CONFIGS"]


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, x_row, out_row, stride_h, stride_out_h, head_lo, head_hi, token_ok, cos, sin,
    HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, ROTARY_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
    PASS_BLOCK: tl.constexpr, INTERLEAVED: tl.constexpr, INPLACE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rotate heads [head_lo, head_hi) of one tensor for BLOCK_T tokens, BLOCK_H heads per tile.

    Tiles are (BLOCK_T, BLOCK_H, HALF_BLOCK): x_row / out_row are (BLOCK_T,) token offsets and
    cos / sin are (BLOCK_T, 1, HALF_BLOCK), so each token's cos/sin row serves all its heads.
    """
    pairs = tl.arange(0, HALF_BLOCK)
    col1 = pairs[None, None, :]
    col2 = (pairs + HALF)[None, None, :]
    heads = tl.arange(0, BLOCK_H)
    for head_start in range(head_lo, head_hi, BLOCK_H):
        head = head_start + heads
        mask = token_ok[:, None, None] & (head < head_hi)[None, :, None]
        if HALF_BLOCK != HALF:
            mask = mask & (pairs < HALF)[None, None, :]
        # 64-bit offsets: head * stride exceeds 2**31 for long sequences in (batch, heads, seq, dim) storage
        head64 = head.to(tl.int64)
        src = x_ptr + (x_row[:, None, None] + (head64 * stride_h)[None, :, None])
        if INPLACE:
            dst = src
        else:
            dst = out_ptr + (out_row[:, None, None] + (head64 * stride_out_h)[None, :, None])
        if INTERLEAVED:
            # Load whole rows (contiguous, vectorized) and split them into (even, odd) pairs in
            # registers, rather than two stride-2 loads.
            cols = tl.arange(0, 2 * HALF_BLOCK)[None, None, :]
            row_mask = token_ok[:, None, None] & (head < head_hi)[None, :, None]
            if HALF_BLOCK != HALF:
                row_mask = row_mask & (cols < ROTARY_DIM)
            x = tl.load(src + cols, mask=row_mask, other=0.0)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, HALF_BLOCK, 2)))
            x1f = x1.to(tl.float32)
            x2f = x2.to(tl.float32)
            y = tl.join((x1f * cos - x2f * sin).to(x.dtype), (x2f * cos + x1f * sin).to(x.dtype))
            tl.store(dst + cols, tl.reshape(y, (BLOCK_T, BLOCK_H, 2 * HALF_BLOCK)), mask=row_mask)
        else:
            x1 = tl.load(src + col1, mask=mask, other=0.0)
            x2 = tl.load(src + col2, mask=mask, other=0.0)
            x1f = x1.to(tl.float32)
            x2f = x2.to(tl.float32)
            tl.store(dst + col1, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
            tl.store(dst + col2, (x2f * cos + x1f * sin).to(x2.dtype), mask=mask)
        if PASS_BLOCK > 0:
            if not INPLACE:
                rest = ROTARY_DIM + tl.arange(0, PASS_BLOCK)
                rest_ok = (rest < HEAD_DIM)[None, None, :]
                rest_mask = token_ok[:, None, None] & (head < head_hi)[None, :, None] & rest_ok
                x_rest = tl.load(src + rest[None, None, :], mask=rest_mask, other=0.0)
                tl.store(dst + rest[None, None, :], x_rest, mask=rest_mask)


@triton.jit(do_not_specialize=["offset"])
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_qob, stride_qos, stride_qoh,
    stride_kob, stride_kos, stride_koh,
    stride_cos, stride_sin, stride_pb, stride_ps,
    seq_len, n_tokens, heads_q, heads_total, cache_len, offset,
    HALF: tl.constexpr,          # rotary_dim // 2: number of rotated pairs
    HALF_BLOCK: tl.constexpr,    # next power of two >= HALF
    ROTARY_DIM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PASS_BLOCK: tl.constexpr,    # next power of two >= HEAD_DIM - ROTARY_DIM (0: nothing passes through)
    INTERLEAVED: tl.constexpr,
    BACKWARD: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
    INPLACE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)

    token = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = token < n_tokens
    token = tl.where(token_ok, token, 0).to(tl.int64)
    b = token // seq_len
    s = token - b * seq_len

    if HAS_POSITIONS:
        pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps, mask=token_ok, other=0).to(tl.int64)
    else:
        pos = s + offset
    # An out-of-range position yields NaN (loud) rather than a read outside the cache.
    pos_ok = (pos >= 0) & (pos < cache_len)
    pos = tl.where(pos_ok, pos, 0)
    pairs = tl.arange(0, HALF_BLOCK)
    cs_mask = pos_ok[:, None]
    if HALF_BLOCK != HALF:
        cs_mask = cs_mask & (pairs < HALF)[None, :]
    cos = tl.load(cos_ptr + pos[:, None] * stride_cos + pairs[None, :], mask=cs_mask, other=float("nan"))
    sin = tl.load(sin_ptr + pos[:, None] * stride_sin + pairs[None, :], mask=cs_mask, other=float("nan"))
    cos = cos.to(tl.float32)[:, None, :]
    sin = sin.to(tl.float32)[:, None, :]
    if BACKWARD:
        sin = -sin

    # This program's heads in the joint list [q heads..., k heads...]: its q part, then its k part.
    head_lo = pid_h * HEADS_PER_PROGRAM
    head_hi = tl.minimum(head_lo + HEADS_PER_PROGRAM, heads_total)
    _rotate_heads(
        q_ptr, q_out_ptr, b * stride_qb + s * stride_qs, b * stride_qob + s * stride_qos,
        stride_qh, stride_qoh, head_lo, tl.minimum(head_hi, heads_q), token_ok, cos, sin,
        HALF, HALF_BLOCK, ROTARY_DIM, HEAD_DIM, PASS_BLOCK, INTERLEAVED, INPLACE, BLOCK_T, BLOCK_H,
    )
    _rotate_heads(
        k_ptr, k_out_ptr, b * stride_kb + s * stride_ks, b * stride_kob + s * stride_kos,
        stride_kh, stride_koh, tl.maximum(head_lo, heads_q) - heads_q, head_hi - heads_q, token_ok, cos, sin,
        HALF, HALF_BLOCK, ROTARY_DIM, HEAD_DIM, PASS_BLOCK, INTERLEAVED, INPLACE, BLOCK_T, BLOCK_H,
    )


@dataclass(frozen=True)
class RopeConfig:
    """One launch configuration of the RoPE kernel.

    Attributes:
        block_t: tokens per program (a power of two).
        block_h: heads per tile (a power of two); a tile is ``(block_t, block_h, rotary_dim / 2)``.
        heads_per_program: heads of the joint q+k list one program walks (a multiple of ``block_h``);
            ``0`` means all of them: one program per token block, cos/sin read once per token.
        num_warps: warps per program; ``0`` sizes them so each thread moves 16 bytes per load.
    """

    block_t: int
    block_h: int
    heads_per_program: int = 0
    num_warps: int = 0

    def resolve(self, heads_total: int, half_block: int, itemsize: int) -> tuple[int, int, int]:
        """``(heads_per_program, head_groups, num_warps)`` for a problem."""
        hpp = self.heads_per_program or -(-heads_total // self.block_h) * self.block_h
        num_warps = self.num_warps
        if num_warps == 0:
            tile_bytes = self.block_t * self.block_h * half_block * itemsize
            num_warps = min(8, max(1, tile_bytes // (16 * 32)))
        return hpp, -(-heads_total // hpp), num_warps


# Heuristic table, first match wins: (minimum token count, storage order or None for either, config).
# "token-major" storage is (batch, seq, heads, head_dim) in memory: a token's heads are adjacent, so a
# program takes one token and walks all its heads 32 at a time (cos/sin read once per token).
# "head-major" storage (Hugging Face's contiguous (batch, heads, seq, head_dim)) puts a head's
# consecutive tokens next to each other, so a program takes one tile of 16 tokens of one head (no head
# loop: the most loads in flight; cos/sin rows come from L2). Both measured by the benchmark's sweep
# on an H100 (benchmarks/results/sweeps/rope-sweep-*: 120.1 us and 120.0 us against 124.2 us and
# 124.4 us for the previous entries, (1, 8, all heads) and (16, 1, 8 heads)). Decode-sized inputs
# split heads over programs so every SM gets work.
_TABLE: tuple[tuple[int, bool | None, RopeConfig], ...] = (
    (2048, True, RopeConfig(block_t=1, block_h=32, heads_per_program=0, num_warps=8)),
    (2048, False, RopeConfig(block_t=16, block_h=1, heads_per_program=1, num_warps=8)),
    (256, None, RopeConfig(block_t=2, block_h=4, heads_per_program=8)),
    (0, None, RopeConfig(block_t=1, block_h=8, heads_per_program=8)),
)

# Candidates the benchmark's --sweep mode times at the shapes. Token-major storage wants few
# tokens and many heads per tile (a token's heads are adjacent); head-major storage wants many tokens
# of few heads (a head's tokens are adjacent); decode (64 tokens) also splits heads over programs.
SWEEP_TOKEN_MAJOR: tuple[RopeConfig, ...] = tuple(
    RopeConfig(bt, bh, hpp, nw)
    for bt, bh in ((1, 8), (1, 16), (1, 32), (2, 8), (2, 16), (4, 8), (4, 16), (8, 8), (2, 32), (4, 32))
    for hpp in (0, 8)
    for nw in (0, 4, 8)
    if hpp == 0 or hpp % bh == 0
)
SWEEP_HEAD_MAJOR: tuple[RopeConfig, ...] = tuple(
    RopeConfig(bt, bh, hpp, nw)
    for bt, bh in ((8, 1), (16, 1), (16, 2), (32, 1), (32, 2), (64, 1))
    for hpp in (4, 8, 0)
    for nw in (0, 4, 8)
) + tuple(
    # one tile per program (no head loop), and tiles spanning several heads at once
    RopeConfig(bt, bh, hpp, nw)
    for bt, bh, hpp in ((16, 1, 1), (32, 1, 1), (64, 1, 1), (16, 2, 2), (32, 2, 2), (8, 4, 4), (16, 4, 4),
                        (8, 8, 8), (16, 8, 8), (4, 8, 8), (8, 4, 8), (16, 4, 8))
    for nw in (0, 4, 8)
)
SWEEP_DECODE: tuple[RopeConfig, ...] = tuple(
    RopeConfig(bt, bh, hpp, nw)
    for bt, bh, hpp in (
        (1, 4, 4), (1, 4, 8), (1, 8, 8), (1, 8, 16), (1, 8, 0), (2, 4, 8), (2, 8, 8), (4, 4, 4)
    )
    for nw in (0, 1, 2, 4)
)
SWEEP_CONFIGS: tuple[RopeConfig, ...] = tuple(
    dict.fromkeys(SWEEP_TOKEN_MAJOR + SWEEP_HEAD_MAJOR + SWEEP_DECODE)
)


@functools.lru_cache(maxsize=256)
def rope_config(n_tokens: int, heads_total: int, token_major: bool) -> RopeConfig:
    """Pick a :class:`RopeConfig` from the table.

    Args:
        n_tokens: ``batch * seq``.
        heads_total: ``heads_q + heads_k``.
        token_major: whether a token's heads are closer in memory than consecutive tokens of one head
            (``(batch, seq, heads, head_dim)`` storage) rather than the reverse.
    """
    for min_tokens, want_token_major, config in _TABLE:
        if n_tokens >= min_tokens and (want_token_major is None or want_token_major == token_major):
            return config
    return _TABLE[-1][2]


def _make_plan(
    n_tokens: int,
    heads_q: int,
    heads_k: int,
    token_major: bool,
    rotary_dim: int,
    head_dim: int,
    dtype: torch.dtype,
    interleaved: bool,
    backward: bool,
    has_positions: bool,
    inplace: bool,
    config: RopeConfig | None,
) -> tuple[tuple[int, int, int], int, dict]:
    """``(grid, num_warps, constexprs)`` of one launch."""
    heads_total = heads_q + heads_k
    if config is None:
        config = rope_config(n_tokens, heads_total, token_major)
    half = rotary_dim // 2
    half_block = 1 << max(0, half - 1).bit_length()
    hpp, groups, num_warps = config.resolve(heads_total, half_block, dtype.itemsize)
    rest = head_dim - rotary_dim
    meta = dict(
        HALF=half,
        HALF_BLOCK=half_block,
        ROTARY_DIM=rotary_dim,
        HEAD_DIM=head_dim,
        PASS_BLOCK=1 << max(0, rest - 1).bit_length() if rest > 0 else 0,
        INTERLEAVED=interleaved,
        BACKWARD=backward,
        HAS_POSITIONS=has_positions,
        INPLACE=inplace,
        BLOCK_T=config.block_t,
        BLOCK_H=config.block_h,
        HEADS_PER_PROGRAM=hpp,
    )
    return (-(-n_tokens // config.block_t), groups, 1), num_warps, meta


# Launch sites of the table's configurations (one per distinct problem: shapes, strides, dtypes,
# flags, device), so a repeated call (every decode step, every layer) costs one dictionary lookup and
# a direct launch. Bounded: cleared when a workload cycles through very many shapes.
_SITES: dict[tuple, KernelLaunch] = {}
_MAX_SITES = 4096


def _new_site(key: tuple, plan_key: tuple, device: int) -> KernelLaunch:
    grid, num_warps, meta = _make_plan(*plan_key, None)
    site = KernelLaunch(_rope_kernel, grid, num_warps, device=device, **meta)
    if len(_SITES) >= _MAX_SITES:
        _SITES.clear()
    _SITES[key] = site
    return site


def rope_apply(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    interleaved: bool,
    rotary_dim: int,
    head_major: bool = False,
    backward: bool = False,
    inplace: bool = False,
    config: RopeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel once for q and k given in either layout.

    Args:
        q: ``(batch, seq, heads_q, head_dim)``, or ``(batch, heads_q, seq, head_dim)`` when
            ``head_major``; any strides with a unit stride in the last dimension.
        k: the same layout with ``heads_k`` heads, same dtype, unit stride in the last dimension.
        cos, sin: ``(cache_len, rotary_dim // 2)`` with unit stride in the last dimension.
        position_ids: ``None``, or integer positions ``(batch, seq)``, ``(1, seq)`` or ``(seq,)``,
            any strides; read in place (no broadcast view, no dtype conversion).
        offset: first position when ``position_ids`` is ``None``.
        interleaved: pairs ``(2j, 2j+1)`` instead of ``(j, j + rotary_dim / 2)``.
        rotary_dim: rotated features (even, ``<= head_dim``); the rest are copied.
        head_major: the layout of ``q``/``k`` (see above). The kernel reads both layouts through
            their strides; no transposed view is created.
        backward: rotate by the negative angle (the gradient of the forward rotation).
        inplace: write the result into ``q`` and ``k`` (features past ``rotary_dim`` untouched).
        config: launch configuration; default from :func:`rope_config`, launched through a launch
            site memoized per problem (an explicit ``config`` goes through ``launch`` each time).

    Returns:
        ``(q_out, k_out)``: new tensors shaped like ``q``/``k`` (``torch.empty_like``: the strides of
        ``q``/``k`` when those are dense, else dense), or ``(q, k)`` themselves when ``inplace``.

    No validation happens here: the functional layer checks the arguments once. The only GPU work
    is the kernel launch (the outputs come from the caching allocator).
    """
    if head_major:
        batch, heads_q, seq, head_dim = q.shape
        heads_k = k.shape[1]
        sqb, sqh, sqs, _ = q.stride()
        skb, skh, sks, _ = k.stride()
    else:
        batch, seq, heads_q, head_dim = q.shape
        heads_k = k.shape[2]
        sqb, sqs, sqh, _ = q.stride()
        skb, sks, skh, _ = k.stride()
    if inplace:
        q_out, k_out = q, k
        sqob, sqos, sqoh, skob, skos, skoh = sqb, sqs, sqh, skb, sks, skh
    else:
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        if head_major:
            sqob, sqoh, sqos, _ = q_out.stride()
            skob, skoh, skos, _ = k_out.stride()
        else:
            sqob, sqos, sqoh, _ = q_out.stride()
            skob, skos, skoh, _ = k_out.stride()
    n_tokens = batch * seq
    heads_total = heads_q + heads_k
    if n_tokens == 0 or heads_total == 0:
        return q_out, k_out
    if position_ids is None:
        pos, stride_pb, stride_ps = q, 0, 0
    elif position_ids.dim() == 1:
        pos, stride_pb, stride_ps = position_ids, 0, position_ids.stride(0)
    else:
        pos = position_ids
        stride_pb, stride_ps = position_ids.stride()
        if position_ids.shape[0] == 1:
            stride_pb = 0  # one row of positions shared by the whole batch
    ints = (
        sqb, sqs, sqh, skb, sks, skh, sqob, sqos, sqoh, skob, skos, skoh,
        cos.stride(0), sin.stride(0), stride_pb, stride_ps,
        seq, n_tokens, heads_q, heads_total, cos.shape[0],
    )
    args = (q, k, q_out, k_out, cos, sin, pos, *ints, offset)
    has_positions = pos is not q
    device = q.get_device()
    if config is None:
        # Everything Triton specializes on is in the site key (the integers exactly, the dtypes) or in
        # the call key (the tensors' 16-byte alignment, the offset's width). The offset is the one
        # integer that may differ between calls of a site: the kernel does not specialize on it
        # (do_not_specialize), so decode steps at new offsets reuse one compiled kernel. The site key
        # also determines everything the plan reads (heads_k = heads_total - heads_q; the storage
        # order from the strides).
        key = (ints, rotary_dim, head_dim, q.dtype, cos.dtype, sin.dtype, pos.dtype, interleaved, backward,
               has_positions, inplace, device)
        site = _SITES.get(key)
        if site is None:
            plan_key = (n_tokens, heads_q, heads_k, sqh <= sqs, rotary_dim, head_dim, q.dtype, interleaved,
                        backward, has_positions, inplace)
            site = _new_site(key, plan_key, device)
        ptrs = (q.data_ptr(), k.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), cos.data_ptr(),
                sin.data_ptr(), pos.data_ptr())
        call_key = (
            (ptrs[0] & 15) | (ptrs[1] & 15) << 4 | (ptrs[2] & 15) << 8 | (ptrs[3] & 15) << 12
            | (ptrs[4] & 15) << 16 | (ptrs[5] & 15) << 20 | (ptrs[6] & 15) << 24 | (offset > 0x7FFFFFFF) << 28
        )
        if device >= 0 and device != current_device():
            with torch.cuda.device(device):
                if not site.launch_ptrs((*ptrs, *ints, offset), call_key):
                    site(args, call_key)
        elif not site.launch_ptrs((*ptrs, *ints, offset), call_key):
            site(args, call_key)
        return q_out, k_out
    grid, num_warps, meta = _make_plan(n_tokens, heads_q, heads_k, sqh <= sqs, rotary_dim, head_dim, q.dtype,
                                       interleaved, backward, has_positions, inplace, config)
    if device >= 0 and device != current_device():
        with torch.cuda.device(device):
            launch(_rope_kernel, grid, args, num_warps, **meta)
    else:
        launch(_rope_kernel, grid, args, num_warps, **meta)
    return q_out, k_out


def rope_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    interleaved: bool,
    rotary_dim: int,
    backward: bool = False,
    inplace: bool = False,
    config: RopeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel once for q and k viewed as ``(batch, seq, heads, head_dim)``.

    Args:
        q: ``(batch, seq, heads_q, head_dim)`` view, unit stride in the last dimension.
        k: ``(batch, seq, heads_k, head_dim)`` view, same dtype, unit stride in the last dimension.
        cos, sin: ``(cache_len, rotary_dim // 2)`` with unit stride in the last dimension.
        position_ids: ``None`` or a ``(batch, seq)``, ``(1, seq)`` or ``(seq,)`` integer tensor
            (broadcast strides allowed).
        offset: first position when ``position_ids`` is ``None``.
        interleaved: pairs ``(2j, 2j+1)`` instead of ``(j, j + rotary_dim / 2)``.
        rotary_dim: rotated features (even, ``<= head_dim``); the rest are copied.
        backward: rotate by the negative angle (the gradient of the forward rotation).
        inplace: write the result into ``q`` and ``k`` (features past ``rotary_dim`` untouched).
        config: launch configuration; default from :func:`rope_config`.

    Returns:
        ``(q_out, k_out)``: new tensors with the strides of ``q``/``k`` when those are dense
        (``torch.empty_like``), or ``(q, k)`` themselves when ``inplace``.

    No validation happens here: the functional layer checks the arguments once. Same launch as
    :func:`rope_apply` with ``head_major=False``.
    """
    return rope_apply(q, k, cos, sin, position_ids, offset, interleaved, rotary_dim, False, backward, inplace,
                      config)
