"""Launch configurations for the INT8 linear kernels, kept as data.

Nothing here imports Triton: the tables are plain dataclasses so the benchmark's sweep can print
entries in the same form and the tests can build configurations directly.

How a configuration is chosen for ``out[M, N] = x[M, K] @ W[N, K]^T``:

1. ``m_bucket(M)``: 1, 2-16, 17-64, 65-256, >256. A new batch size never triggers a new search; it
   falls in a bucket whose tiles are fixed.
2. The variant: the caller's ``kernel=`` override, else ``AUTO_KERNEL[bucket]``.
3. The tiles: ``TUNED[(variant, bucket, N, K)]`` when the exact weight shape was measured (the
   benchmark's ``--sweep`` prints lines in that form), else ``DEFAULTS[variant][bucket]``. Selections
   are cached per problem size: edit the tables before the first launch (or call
   ``select_w8a16.cache_clear()``).
4. ``split_k == 0`` in a table entry means "choose the split from the shape": the smallest power of two
   that gives at least ``FILL_WAVES`` programs per SM (decode is bound by how many weight bytes are in
   flight, so the grid must cover every SM several times).
5. Tiles are clamped to the problem (no 256-wide tile for N = 40) and to the group size (a K block never
   straddles two scale groups).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

__all__ = [
    "GemvConfig",
    "DotConfig",
    "QuantConfig",
    "M_BUCKETS",
    "W8A16_KERNELS",
    "m_bucket",
    "AUTO_KERNEL",
    "DEFAULTS",
    "W8A8_DEFAULTS",
    "TUNED",
    "choose_split_k",
    "select_w8a16",
    "select_w8a8",
    "select_quant",
]

M_BUCKETS = ("1", "16", "64", "256", "big")
W8A16_KERNELS = ("gemv", "splitk", "gemm")

# Programs per SM the split-K heuristic aims for: three 4-warp programs per SM keep about
# 3 x 128 threads x 64 B of int8 loads in flight, near the H100's latency-bandwidth product per SM.
FILL_WAVES = 3
MAX_SPLIT_K = 16
# Split-K writes and re-reads split x M x N fp32 partial sums: keep that traffic under a quarter of the
# weight's N x K bytes (split x M x 8 <= K / 4).
PARTIAL_TRAFFIC_FRACTION = 4


@dataclass(frozen=True)
class GemvConfig:
    """Tiles of the GEMV kernel (elementwise multiply-accumulate, no tensor cores).

    ``block_m`` rows of x share each weight tile; ``split_k`` programs share each row of W, their fp32
    partial sums reduced in a fixed order by a second kernel (0: chosen from the shape).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class DotConfig:
    """Tiles of the tensor-core kernels (``tl.dot``).

    ``swap_ab`` computes ``out^T = W @ x^T``: the dequantized weight becomes the MMA's left operand,
    which Hopper's wgmma can read straight from registers (no shared-memory round trip for the int8 to
    bf16 conversion), and a small M becomes the MMA's narrow N dimension.
    ``group_m`` row blocks walk the weight's column blocks together so a weight tile is reused from L2.
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False


@dataclass(frozen=True)
class QuantConfig:
    """Per-token activation quantization: one program per row, ``block_k`` elements per step."""

    block_k: int
    num_warps: int = 4


AUTO_KERNEL: dict[str, str] = {
    "1": "gemv",
    "16": "splitk",
    "64": "splitk",
    "256": "gemm",
    "big": "gemm",
}

# Defaults per variant and M bucket (every variant works for every M, so tests can force each one).
DEFAULTS: dict[str, dict[str, GemvConfig | DotConfig]] = {
    "gemv": {
        "1": GemvConfig(block_m=1, block_n=16, block_k=512, split_k=0, num_warps=4),
        "16": GemvConfig(block_m=4, block_n=8, block_k=256, split_k=0, num_warps=4),
        "64": GemvConfig(block_m=4, block_n=8, block_k=256, split_k=0, num_warps=4),
        "256": GemvConfig(block_m=4, block_n=8, block_k=256, split_k=1, num_warps=4),
        "big": GemvConfig(block_m=4, block_n=8, block_k=256, split_k=1, num_warps=4),
    },
    "splitk": {
        "1": DotConfig(16, 64, 128, split_k=0, num_warps=4, num_stages=4, swap_ab=True),
        "16": DotConfig(16, 64, 128, split_k=0, num_warps=4, num_stages=4, swap_ab=True),
        "64": DotConfig(64, 64, 128, split_k=0, num_warps=4, num_stages=4, swap_ab=True),
        "256": DotConfig(64, 128, 64, split_k=0, num_warps=4, num_stages=4, swap_ab=True),
        "big": DotConfig(128, 128, 64, split_k=0, num_warps=8, num_stages=3, swap_ab=True),
    },
    "gemm": {
        "1": DotConfig(16, 64, 128, num_warps=4, num_stages=4, swap_ab=True),
        "16": DotConfig(16, 64, 128, num_warps=4, num_stages=4, swap_ab=True),
        "64": DotConfig(64, 64, 128, num_warps=4, num_stages=4, swap_ab=True),
        "256": DotConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=4, swap_ab=True),
        "big": DotConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3, swap_ab=True),
    },
}

W8A8_DEFAULTS: dict[str, DotConfig] = {
    "1": DotConfig(16, 64, 128, num_warps=4, num_stages=4),
    "16": DotConfig(16, 64, 128, num_warps=4, num_stages=4),
    "64": DotConfig(64, 64, 128, num_warps=4, num_stages=4),
    "256": DotConfig(64, 128, 128, num_warps=4, num_stages=4),
    "big": DotConfig(128, 256, 128, group_m=8, num_warps=8, num_stages=3),
}

# Measured entries for exact weight shapes: (variant, M bucket, N, K) -> (kernel, config). The kernel
# name lets a tuned "auto" entry pick another variant than AUTO_KERNEL. ``variant`` is "auto" for the
# dispatcher's own choice, or a forced W8A16 variant, or "w8a8". The benchmark's --sweep prints lines
# ready to paste here.
TUNED: dict[tuple[str, str, int, int], tuple[str, GemvConfig | DotConfig]] = {}


def m_bucket(m: int) -> str:
    """The M bucket a number of rows falls in: ``"1"``, ``"16"``, ``"64"``, ``"256"`` or ``"big"``."""
    if m <= 1:
        return "1"
    if m <= 16:
        return "16"
    if m <= 64:
        return "64"
    if m <= 256:
        return "256"
    return "big"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def choose_split_k(
    tiles: int, k_blocks: int, sm_count: int, *, m: int = 1, k: int = 0, at_least: int = 1
) -> int:
    """Smallest power-of-two split giving ``FILL_WAVES`` programs per SM.

    Each split keeps at least 2 K blocks, and the partial sums' traffic stays under a quarter of the
    weight's (for ``m`` rows and ``k`` columns; ``k=0`` skips that bound).
    """
    cap = MAX_SPLIT_K
    if k:
        cap = max(at_least, min(cap, k // (8 * PARTIAL_TRAFFIC_FRACTION * max(1, m))))
    split = max(1, at_least)
    while split * 2 <= cap and tiles * split < FILL_WAVES * sm_count and k_blocks >= 2 * (split * 2):
        split *= 2
    return max(1, min(split, k_blocks))


def _clamp_k_block(block_k: int, k: int, group_size: int | None, minimum: int) -> int:
    block_k = min(block_k, max(minimum, _next_pow2(k)))
    if group_size:
        # A K block must lie inside one scale group so one scale multiplies the whole partial product.
        block_k = min(block_k, _largest_pow2_divisor(group_size))
    return block_k


@functools.lru_cache(maxsize=4096)  # called on every launch: keep the per-call Python work small
def select_w8a16(
    m: int,
    n: int,
    k: int,
    *,
    group_size: int | None,
    kernel: str,
    sm_count: int,
    fp32: bool,
) -> tuple[str, GemvConfig | DotConfig]:
    """Pick the W8A16 variant and its tiles for one call.

    Args:
        m, n, k: the problem, ``out[m, n] = x[m, k] @ W[n, k]^T``.
        group_size: K-group size of the weight scales, or ``None`` for per-channel scales.
        kernel: ``"auto"`` or a variant of ``W8A16_KERNELS``.
        sm_count: streaming multiprocessors of the device (drives the split-K choice).
        fp32: the activations are float32 (the tensor-core kernels then run IEEE fp32 FMA dots,
            which need smaller tiles to stay in registers).

    Returns:
        ``(variant, config)`` with every field resolved (no zero ``split_k``).
    """
    bucket = m_bucket(m)
    tuned = TUNED.get((kernel, bucket, n, k))
    if tuned is not None:
        variant, cfg = tuned
    else:
        variant = AUTO_KERNEL[bucket] if kernel == "auto" else kernel
        cfg = DEFAULTS[variant][bucket]
    return variant, resolve_w8a16(variant, cfg, m, n, k, group_size=group_size, sm_count=sm_count, fp32=fp32)


def resolve_w8a16(
    variant: str,
    cfg: GemvConfig | DotConfig,
    m: int,
    n: int,
    k: int,
    *,
    group_size: int | None,
    sm_count: int,
    fp32: bool,
) -> GemvConfig | DotConfig:
    """Clamp a table entry to the problem and fill in ``split_k`` (also used for configs passed in)."""
    if variant == "gemv":
        assert isinstance(cfg, GemvConfig)
        block_m = min(cfg.block_m, _next_pow2(m))
        block_n = min(cfg.block_n, max(8, _next_pow2(n)))
        block_k = _clamp_k_block(cfg.block_k, k, group_size, 16)
        k_blocks = -(-k // block_k)
        tiles = -(-m // block_m) * -(-n // block_n)
        split = cfg.split_k or choose_split_k(tiles, k_blocks, sm_count, m=m, k=k)
        split = max(1, min(split, k_blocks))
        return dataclasses.replace(cfg, block_m=block_m, block_n=block_n, block_k=block_k, split_k=split)
    assert isinstance(cfg, DotConfig)
    block_m = min(cfg.block_m, max(16, _next_pow2(m)))
    block_n = min(cfg.block_n, max(16, _next_pow2(n)))
    block_k = _clamp_k_block(cfg.block_k, k, group_size, 16)
    num_stages = cfg.num_stages
    if fp32:
        # IEEE fp32 dots run on FMA units with both operands in registers: large tiles spill.
        block_m, block_n, block_k = min(block_m, 64), min(block_n, 64), min(block_k, 32)
        num_stages = min(num_stages, 2)
    k_blocks = -(-k // block_k)
    tiles = -(-m // block_m) * -(-n // block_n)
    if variant == "gemm":
        split = 1
    elif cfg.split_k:
        split = cfg.split_k
    else:
        # a forced split-K variant always splits when K allows it, so tests exercise the reduction
        split = choose_split_k(tiles, k_blocks, sm_count, m=m, k=k, at_least=2)
    split = max(1, min(split, k_blocks))
    return dataclasses.replace(
        cfg, block_m=block_m, block_n=block_n, block_k=block_k, split_k=split, num_stages=num_stages
    )


@functools.lru_cache(maxsize=4096)
def select_w8a8(m: int, n: int, k: int) -> DotConfig:
    """Tiles of the int8 x int8 kernel (no split-K: W8A8 is the large-M path)."""
    bucket = m_bucket(m)
    tuned = TUNED.get(("w8a8", bucket, n, k))
    cfg = tuned[1] if tuned else W8A8_DEFAULTS[bucket]
    assert isinstance(cfg, DotConfig)
    return resolve_w8a8(cfg, m, n, k)


def resolve_w8a8(cfg: DotConfig, m: int, n: int, k: int) -> DotConfig:
    """Clamp a W8A8 config to the problem. int8 MMAs consume K in steps of 32."""
    return dataclasses.replace(
        cfg,
        block_m=min(cfg.block_m, max(16, _next_pow2(m))),
        block_n=min(cfg.block_n, max(16, _next_pow2(n))),
        block_k=_clamp_k_block(cfg.block_k, k, None, 32),
        split_k=1,
        swap_ab=False,
    )


@functools.lru_cache(maxsize=1024)
def select_quant(k: int) -> QuantConfig:
    """Row quantization: the whole row in one step up to 4096 elements, else 2048-element steps."""
    if k <= 4096:
        return QuantConfig(block_k=max(16, _next_pow2(k)), num_warps=4 if k <= 2048 else 8)
    return QuantConfig(block_k=2048, num_warps=8)
