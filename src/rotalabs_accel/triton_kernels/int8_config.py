"""Launch configurations for the INT8 linear kernels, kept as data.

Nothing here imports Triton: the tables are plain dataclasses so the benchmark's sweep can print
entries in the same form and the tests can build configurations directly.

How a configuration is chosen for ``out[M, N] = x[M, K] @ W[N, K]^T``:

1. ``m_bucket(M)``: 1, 2-16, 17-64, 65-256, >256. A new batch size never triggers a new search; it
   falls in a bucket whose tiles are fixed.
2. The variant: the caller's ``kernel=`` override, else ``AUTO_KERNEL[bucket]``.
3. The tiles: ``TUNED[(variant, bucket, N, K)]`` when the exact weight shape was measured (the
   benchmark's ``--sweep`` prints lines in that form), else ``DEFAULTS[variant][bucket]``. The
   launchers remember the resolved plan per problem size: edit the tables before the first launch (or
   call ``rotalabs_accel.triton_kernels.int8_gemm.clear_plans()``).
4. ``split_k == 0`` in a table entry means "choose the split from the shape": the smallest power of two
   that gives the grid enough programs (decode is bound by how many weight bytes are in flight, so the
   grid must cover every SM), while the fp32 partial sums stay a small fraction of the weight's bytes.
5. Tiles are clamped to the problem (no 256-wide tile for N = 40) and to the group size (a K block never
   straddles two scale groups unless it covers whole groups).

The variants:

* ``gemv``: one row of ``x`` per program, the weight streamed through a software pipeline
  (``num_stages`` tiles in flight) with 16-byte loads, fp32 multiply-adds on CUDA cores; the decode
  kernel (M = 1), where the time is the weight's bytes over the memory bandwidth.
* ``splitk``: the tensor-core kernel with the K dimension shared by ``split_k`` programs, whose fp32
  partial sums the last program of each output tile adds up in a fixed order (one launch). Chosen
  automatically for small and medium M, where the output has too few tiles to occupy the GPU; its
  split is then 1 when the tiles suffice.
* ``gemm``: the tensor-core kernel with one program per output tile (prefill).
* ``dequant``: the int8 weight dequantized into a transient buffer in the activations' dtype (a
  memory-bound kernel: 1 byte read and 2 written per weight element), then multiplied by cuBLAS
  (``torch.addmm``). From ``DEQUANT_MIN_ROWS`` rows on, the product is compute-bound and cuBLAS's GEMM
  is faster than the register-dequantizing tensor-core kernel by more than the dequantization costs.
  The buffer covers at most ``DEQUANT_MAX_BUFFER_BYTES`` of weight at a time (a wider weight runs in
  column chunks), so a large ``lm_head`` never doubles in memory. The weight is rounded once to the
  activation dtype before the product (as a dequantize-then-matmul of torchao or torch.compile does);
  the other variants keep it exact in fp32. Chosen by ``"auto"`` only from ``DEQUANT_MIN_ROWS`` rows.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

__all__ = [
    "GemvConfig",
    "DotConfig",
    "DequantConfig",
    "QuantConfig",
    "M_BUCKETS",
    "DEQUANT_MIN_ROWS",
    "DEQUANT_MAX_BUFFER_BYTES",
    "W8A16_KERNELS",
    "m_bucket",
    "AUTO_KERNEL",
    "DEFAULTS",
    "W8A8_DEFAULTS",
    "TUNED",
    "choose_split_k",
    "group_block",
    "select_w8a16",
    "resolve_w8a16",
    "select_w8a8",
    "resolve_w8a8",
    "select_quant",
]

M_BUCKETS = ("1", "16", "64", "256", "big")
W8A16_KERNELS = ("gemv", "splitk", "gemm", "dequant")

# Programs per SM the split heuristic aims for. GEMV: several small programs per SM keep enough
# 16-byte loads in flight to cover the memory latency. Tensor-core kernels: two larger tiles per SM,
# each with a multi-stage pipeline of its own (small M, whose grid has few output tiles; the
# partial-sum bound below keeps larger M from splitting).
GEMV_FILL = 4
DOT_FILL = 2
MAX_SPLIT_K = 16
# Split-K writes and re-reads split x M x N fp32 partial sums: keep that traffic under a quarter of the
# weight's N x K bytes (split x M x 8 <= K / 4).
PARTIAL_TRAFFIC_FRACTION = 4
# The largest side of a TMA copy box, in elements (DotConfig.tma).
TMA_MAX_BOX = 256


@dataclass(frozen=True)
class GemvConfig:
    """Tiles of the GEMV kernel (elementwise multiply-accumulate on CUDA cores, one row of x each).

    Each program streams a ``[block_n, block_k]`` int8 tile per step through a ``num_stages``-deep
    pipeline; ``split_k`` programs share each row of W, their fp32 partial sums reduced in a fixed order
    by the tile's last program (0: chosen from the shape). Loads are 16 bytes wide when
    ``block_n * block_k >= 16 * 32 * num_warps``. ``tma`` copies each weight tile into shared memory
    with a TMA tensor descriptor (``num_stages`` copies in flight per program) instead of loading it
    into registers, under the rules of ``DotConfig.tma`` (both block sides at most 256).
    ``fast_convert`` turns each int8 weight into fp32 with one byte permute (inline PTX, four values
    per instance, the sign flip done once per four) where Triton's byte extraction and flip take two
    integer instructions per value; the values are the same, and Triton's interpreter runs the plain
    conversion. Off by default: the K loop has 13% fewer instructions with it, yet on an H100 the
    tuned decode tiles ran 1.5-16% slower with it and the best tile of a 28-tile neighbourhood was
    no faster (benchmarks/results/logs/gemv_fast_convert-h100-2026-12-07.txt): the GEMV is bound by
    its loads, not by issuing the conversion.
    """

    block_n: int
    block_k: int
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 4
    tma: bool = False
    fast_convert: bool = False


@dataclass(frozen=True)
class DotConfig:
    """Tiles of the tensor-core kernels (``tl.dot``).

    ``swap_ab`` computes ``out^T = W @ x^T``: the dequantized weight becomes the MMA's left operand,
    which Hopper's wgmma reads from registers, and M becomes the MMA's N dimension (any multiple of 8
    up to 256). Without it the converted weight tile is written to shared memory for the MMA's right
    operand: fewer instructions per weight element (the register fragment of a wgmma operand costs
    2-byte shared loads and byte permutes), one more shared-memory pass.
    ``group_m`` row blocks walk the weight's column blocks together so a weight tile is reused from L2.
    ``tma`` loads the x and W tiles through TMA tensor descriptors (Hopper's bulk tensor copies into
    shared memory) instead of per-thread pointer loads (W8A16 only). It applies where the device has
    TMA (compute capability 9.0+), every block side is at most 256 and the call's operands are 16-byte
    aligned (bases and row strides); anywhere else the same tiles run with pointer loads.
    ``fast_convert``: with fp16 activations, the weight's int8 values become fp16 by byte permutes and
    packed subtractions (inline PTX, four values per instance) instead of one quarter-rate
    integer-to-float conversion per value; the values are the same. bf16 needs no such option (Triton's
    own int8 -> bf16 conversion issues no such instruction per value); Triton's interpreter runs the
    plain conversion.
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False
    tma: bool = False
    fast_convert: bool = True


@dataclass(frozen=True)
class DequantConfig:
    """Tiles of the weight dequantization kernel of the ``dequant`` variant.

    Each program converts a ``[block_n, block_k]`` int8 tile to the activation dtype (``q * scale``
    in fp32, rounded once).
    """

    block_n: int
    block_k: int
    num_warps: int = 4


@dataclass(frozen=True)
class QuantConfig:
    """Per-token activation quantization: one program per row, ``block_k`` elements per step."""

    block_k: int
    num_warps: int = 4


# "auto" picks the dequant variant from this many rows on, and the transient buffer of dequantized
# weight holds at most this many bytes (a wider weight runs in column chunks, whole multiples of 256
# columns and never fewer). From 1536 rows on the
# dequant variant was faster than the tensor-core kernel at all three benchmark weight shapes, at 1024
# at one of three (H100, bf16; benchmarks/results/sweeps/int8-dequant-crossover-h100-80gb-hbm3-2026-12-06).
DEQUANT_MIN_ROWS = 1536
DEQUANT_MAX_BUFFER_BYTES = 256 << 20

AUTO_KERNEL: dict[str, str] = {
    "1": "gemv",
    "16": "splitk",
    "64": "splitk",
    "256": "splitk",
    "big": "gemm",
}

# Defaults per variant and M bucket (every variant works for every M, so tests can force each one).
DEFAULTS: dict[str, dict[str, GemvConfig | DotConfig]] = {
    "gemv": {
        # 4 x 1024 int8 per step: 16-byte loads for 4 warps, register loads (no shared-memory
        # pipeline: faster at M = 1 on an H100), N / 4 programs (1024 for N = 4096: about 8 per SM,
        # all resident at once, which is what keeps the weight bytes in flight)
        "1": GemvConfig(block_n=4, block_k=1024, split_k=0, num_warps=4, num_stages=1),
        "16": GemvConfig(block_n=4, block_k=1024, split_k=0, num_warps=4, num_stages=1),
        # a forced GEMV at larger M (one program per row): wider tiles, fewer programs
        "64": GemvConfig(block_n=16, block_k=512, split_k=1, num_warps=4, num_stages=3),
        "256": GemvConfig(block_n=64, block_k=256, split_k=1, num_warps=4, num_stages=3),
        "big": GemvConfig(block_n=64, block_k=256, split_k=1, num_warps=4, num_stages=3),
    },
    # M <= 64: x rows are the MMA's M side and the converted weight tile is staged in shared memory
    # for the MMA's B operand (swap_ab=False). Counted in the compiled SASS (Triton 3.9, sm_90): about
    # 4 instructions per weight element in the main loop, against about 7 when the weight is the
    # register operand of a wgmma (swap_ab=True). At M <= 64 the kernel streams the weight, so the
    # instructions per weight element are what matter.
    "splitk": {
        "1": DotConfig(16, 32, 256, split_k=0, num_warps=4, num_stages=4),
        "16": DotConfig(16, 32, 256, split_k=0, num_warps=4, num_stages=4),
        "64": DotConfig(64, 32, 128, split_k=0, num_warps=4, num_stages=4),
        "256": DotConfig(128, 64, 64, split_k=0, num_warps=4, num_stages=4, swap_ab=True),
        "big": DotConfig(128, 128, 64, split_k=0, num_warps=8, num_stages=3, swap_ab=True),
    },
    "gemm": {
        "1": DotConfig(16, 32, 256, num_warps=4, num_stages=4),
        "16": DotConfig(16, 32, 256, num_warps=4, num_stages=4),
        "64": DotConfig(64, 32, 128, num_warps=4, num_stages=4),
        "256": DotConfig(128, 64, 64, num_warps=4, num_stages=4, swap_ab=True),
        "big": DotConfig(256, 128, 64, group_m=8, num_warps=8, num_stages=3, swap_ab=True),
    },
}

DEQUANT_DEFAULT = DequantConfig(block_n=8, block_k=1024, num_warps=4)
DEFAULTS["dequant"] = {bucket: DEQUANT_DEFAULT for bucket in M_BUCKETS}

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
# ready to paste here. Entries below: H100 80GB HBM3, Triton 3.6, benchmarks/bench_int8_linear.py
# --sweep, tensor-core kernels and W8A8. Left out: that sweep's GEMV entries (an earlier GEMV kernel)
# and its "auto" choices at M <= 16, whose timings included Triton's own per-launch Python work (two
# launches for split-K) rather than the kernels alone.
TUNED: dict[tuple[str, str, int, int], tuple[str, GemvConfig | DotConfig]] = {
    # Measured on an H100 80GB HBM3 (torch 2.11, Triton 3.6) by `benchmarks/bench_int8_linear.py --sweep-only`:
    # sweep 2 = benchmarks/results/sweeps/int8_linear-sweep-h100-80gb-hbm3-2026-11-25.json (current kernels),
    # sweep 1 = the earlier sweep of the same day, kept only for keys sweep 2 did not cover.
# sweep 3 = benchmarks/results/sweeps/int8_linear-sweep-m16-narrow-* (M = 16 only, with 16-wide weight
# tiles, 512-deep K steps and 2 warps among the candidates); sweep 4 = ...-sweep-m128-* (M = 128 only,
# with deeper pipelines, 256-deep K steps and 8-warp 128-row tiles among the candidates); sweep 5 =
# ...-sweep-splitk-one-launch-* (split-K only, M = 16 and 128, after split-K became one launch).
# sweep 6 = ...-sweep-m1-gemv-prefetch-* (M = 1, GEMV only, 2026-12-06; also timed a variant that loaded
# the next K block into registers before the current block's multiply-adds: slower than the plain
# loop at all three shapes, 12.5 / 27.9 / 28.1 us against 12.2 / 27.0 / 27.4, so the kernel does not
# have it); sweep 7 = ...-sweep-m128-splitk-wide-* (M = 128, split-K only, with 128 x 128 and
# 128 x 256 tiles and splits up to 8 among the candidates); sweep 8 = ...-sweep-m128-tma-* (M = 128,
# split-K and GEMM, after DotConfig.tma: every pointer-load candidate of sweeps 4-7 beside TMA-fed
# ones, in one run; TMA won at all three shapes); sweep 9 = ...-sweep-m1-gemv-bk4096-* (M = 1, GEMV,
# with whole-K 4096 steps among the candidates: 2-6 us slower than the entries below, which it
# re-measured within 0.4 us of their earlier times, so they stay); sweep 10 = ...-sweep-m16-tma-* (M = 16,
# split-K and GEMM, 2026-12-07: the TMA-fed 16-row candidates beside each key's previous entry; TMA won
# only at 4096x4096 (GEMM 14.4 us, split-K 15.4) and for the forced GEMM at 4096x14336, by less than the
# run-to-run spread; at 4096x4096 the auto and GEMM keys keep pointer loads, see their comments).
# ...-sweep-m4096-tma-* (M = 4096, GEMM, same day): TMA-fed large tiles lost to the pointer-load
# entries at all three shapes (252.8 / 920.4 / 885.9 us against 227.1 / 856.6 / 872.7), so no M = 4096
# entry changed.
# "gemv structure run" = `scripts/gemv_variants.py` (benchmarks/results/sweeps/gemv-variants-*.json): the
# GEMV with register loads and cache hints, whose structure replaced the pipelined one.
    ("auto", "1", 4096, 4096): ("gemv", GemvConfig(block_n=2, block_k=1024, split_k=1, num_warps=2, num_stages=1)),  # 12.3 us (gemv structure run)
    ("auto", "1", 4096, 14336): ("gemv", GemvConfig(block_n=2, block_k=2048, split_k=1, num_warps=4, num_stages=1)),  # 27.8 us (gemv structure run)
    ("auto", "1", 14336, 4096): ("gemv", GemvConfig(block_n=4, block_k=512, split_k=1, num_warps=2, num_stages=1)),  # 27.0 us (sweep 6; the earlier entry, 4 x 1024 on 4 warps: 28.0 us there)
    ("auto", "16", 4096, 4096): ("gemm", DotConfig(block_m=16, block_n=16, block_k=256, split_k=1, group_m=8, num_warps=2, num_stages=6, swap_ab=True)),  # 14.7 us (sweep 3); 15.1 us in sweep 10, whose TMA-fed entry took 14.4 us there but 15.3 us in the benchmark that followed (auto and forced GEMM), where this entry took 14.5-15.2 us in the next run
    ("auto", "16", 4096, 14336): ("splitk", DotConfig(block_m=16, block_n=32, block_k=256, split_k=2, group_m=8, num_warps=4, num_stages=4, swap_ab=False, tma=False, fast_convert=True)),  # 34.7 us (sweep 10)
    ("auto", "16", 14336, 4096): ("gemm", DotConfig(block_m=16, block_n=16, block_k=256, split_k=1, group_m=8, num_warps=2, num_stages=3, swap_ab=False, tma=False, fast_convert=True)),  # 33.0 us (sweep 10)
    ("auto", "256", 4096, 4096): ("splitk", DotConfig(block_m=128, block_n=64, block_k=128, split_k=2, group_m=8, num_warps=4, num_stages=4, swap_ab=True, tma=True)),  # 21.9 us (sweep 8; best with pointer loads there: 24.2 us)
    ("auto", "256", 4096, 14336): ("splitk", DotConfig(block_m=128, block_n=128, block_k=128, split_k=4, group_m=8, num_warps=8, num_stages=4, swap_ab=True, tma=True)),  # 47.6 us (sweep 8; best with pointer loads there: 54.4 us)
    ("auto", "256", 14336, 4096): ("gemm", DotConfig(block_m=128, block_n=64, block_k=128, split_k=1, group_m=8, num_warps=4, num_stages=3, swap_ab=True, tma=True)),  # 45.1 us (sweep 8; the same tiles with pointer loads: 48.4 us)
    ("auto", "big", 4096, 4096): ("gemm", DotConfig(block_m=256, block_n=128, block_k=64, split_k=1, group_m=8, num_warps=8, num_stages=3, swap_ab=True)),  # 232.0 us (sweep 2)
    ("auto", "big", 4096, 14336): ("gemm", DotConfig(block_m=256, block_n=128, block_k=64, split_k=1, group_m=8, num_warps=8, num_stages=4, swap_ab=True)),  # 763.4 us (sweep 2)
    ("auto", "big", 14336, 4096): ("gemm", DotConfig(block_m=256, block_n=128, block_k=64, split_k=1, group_m=8, num_warps=8, num_stages=4, swap_ab=True)),  # 780.4 us (sweep 2)
    ("gemm", "1", 4096, 4096): ("gemm", DotConfig(block_m=16, block_n=64, block_k=128, split_k=1, group_m=8, num_warps=4, num_stages=4, swap_ab=True)),  # 40.9 us (sweep 1)
    ("gemm", "1", 4096, 14336): ("gemm", DotConfig(block_m=16, block_n=64, block_k=128, split_k=1, group_m=8, num_warps=4, num_stages=4, swap_ab=False)),  # 55.8 us (sweep 1)
    ("gemm", "1", 14336, 4096): ("gemm", DotConfig(block_m=16, block_n=64, block_k=256, split_k=1, group_m=8, num_warps=4, num_stages=3, swap_ab=False)),  # 49.1 us (sweep 1)
    ("gemm", "16", 4096, 4096): ("gemm", DotConfig(block_m=16, block_n=16, block_k=256, split_k=1, group_m=8, num_warps=2, num_stages=6, swap_ab=True)),  # 14.7 us (sweep 3); 15.1 us in sweep 10, whose TMA-fed entry took 14.4 us there but 15.3 us in the benchmark that followed (auto and forced GEMM), where this entry took 14.5-15.2 us in the next run
    ("gemm", "16", 4096, 14336): ("gemm", DotConfig(block_m=16, block_n=16, block_k=256, split_k=1, group_m=8, num_warps=2, num_stages=6, swap_ab=False, tma=True, fast_convert=True)),  # 35.2 us (sweep 10)
    ("gemm", "16", 14336, 4096): ("gemm", DotConfig(block_m=16, block_n=16, block_k=256, split_k=1, group_m=8, num_warps=2, num_stages=3, swap_ab=False, tma=False, fast_convert=True)),  # 33.0 us (sweep 10)
    ("gemm", "256", 4096, 4096): ("gemm", DotConfig(block_m=64, block_n=64, block_k=256, split_k=1, group_m=8, num_warps=4, num_stages=3, swap_ab=False)),  # 24.5 us (sweep 4)
    ("gemm", "256", 4096, 14336): ("gemm", DotConfig(block_m=64, block_n=64, block_k=256, split_k=1, group_m=8, num_warps=4, num_stages=3, swap_ab=False)),  # 66.1 us (sweep 4)
    ("gemm", "256", 14336, 4096): ("gemm", DotConfig(block_m=128, block_n=64, block_k=128, split_k=1, group_m=8, num_warps=4, num_stages=3, swap_ab=True, tma=True)),  # 45.1 us (sweep 8)
    ("gemm", "big", 4096, 4096): ("gemm", DotConfig(block_m=256, block_n=128, block_k=64, split_k=1, group_m=8, num_warps=8, num_stages=3, swap_ab=True)),  # 232.0 us (sweep 2)
    ("gemm", "big", 4096, 14336): ("gemm", DotConfig(block_m=256, block_n=128, block_k=64, split_k=1, group_m=8, num_warps=8, num_stages=4, swap_ab=True)),  # 763.4 us (sweep 2)
    ("gemm", "big", 14336, 4096): ("gemm", DotConfig(block_m=256, block_n=128, block_k=64, split_k=1, group_m=8, num_warps=8, num_stages=4, swap_ab=True)),  # 780.4 us (sweep 2)
    ("gemv", "1", 4096, 4096): ("gemv", GemvConfig(block_n=4, block_k=512, split_k=1, num_warps=4, num_stages=3)),  # 12.7 us (sweep 2)
    ("gemv", "1", 4096, 14336): ("gemv", GemvConfig(block_n=4, block_k=512, split_k=1, num_warps=4, num_stages=4)),  # 31.5 us (sweep 2)
    ("gemv", "1", 14336, 4096): ("gemv", GemvConfig(block_n=8, block_k=256, split_k=1, num_warps=2, num_stages=3)),  # 31.2 us (sweep 2)
    ("gemv", "16", 4096, 4096): ("gemv", GemvConfig(block_n=8, block_k=512, split_k=1, num_warps=4, num_stages=4)),  # 70.7 us (sweep 2)
    ("gemv", "16", 4096, 14336): ("gemv", GemvConfig(block_n=8, block_k=512, split_k=1, num_warps=4, num_stages=4)),  # 204.0 us (sweep 2)
    ("gemv", "16", 14336, 4096): ("gemv", GemvConfig(block_n=8, block_k=512, split_k=1, num_warps=4, num_stages=4)),  # 230.7 us (sweep 2)
    ("splitk", "1", 4096, 4096): ("splitk", DotConfig(block_m=16, block_n=128, block_k=128, split_k=2, group_m=8, num_warps=4, num_stages=4, swap_ab=True)),  # 46.0 us (sweep 1)
    ("splitk", "1", 4096, 14336): ("splitk", DotConfig(block_m=16, block_n=128, block_k=128, split_k=4, group_m=8, num_warps=4, num_stages=4, swap_ab=True)),  # 77.1 us (sweep 1)
    ("splitk", "1", 14336, 4096): ("splitk", DotConfig(block_m=16, block_n=128, block_k=128, split_k=8, group_m=8, num_warps=4, num_stages=4, swap_ab=True)),  # 77.6 us (sweep 1)
    ("splitk", "16", 4096, 4096): ("splitk", DotConfig(block_m=16, block_n=32, block_k=256, split_k=2, group_m=8, num_warps=2, num_stages=4, swap_ab=True, tma=True, fast_convert=True)),  # 15.4 us (sweep 10)
    ("splitk", "16", 4096, 14336): ("splitk", DotConfig(block_m=16, block_n=32, block_k=256, split_k=2, group_m=8, num_warps=4, num_stages=4, swap_ab=False, tma=False, fast_convert=True)),  # 34.7 us (sweep 10)
    ("splitk", "16", 14336, 4096): ("splitk", DotConfig(block_m=16, block_n=32, block_k=128, split_k=2, group_m=8, num_warps=4, num_stages=3, swap_ab=True, tma=False, fast_convert=True)),  # 35.3 us (sweep 10)
    ("splitk", "256", 4096, 4096): ("splitk", DotConfig(block_m=128, block_n=64, block_k=128, split_k=2, group_m=8, num_warps=4, num_stages=4, swap_ab=True, tma=True)),  # 21.9 us (sweep 8)
    ("splitk", "256", 4096, 14336): ("splitk", DotConfig(block_m=128, block_n=128, block_k=128, split_k=4, group_m=8, num_warps=8, num_stages=4, swap_ab=True, tma=True)),  # 47.6 us (sweep 8)
    ("splitk", "256", 14336, 4096): ("splitk", DotConfig(block_m=128, block_n=128, block_k=64, split_k=2, group_m=8, num_warps=8, num_stages=4, swap_ab=False, tma=True)),  # 48.6 us (sweep 8)
    ("w8a8", "256", 4096, 4096): ("w8a8", DotConfig(block_m=64, block_n=64, block_k=128, split_k=1, group_m=8, num_warps=4, num_stages=4, swap_ab=False)),  # 21.9 us (sweep 2)
    ("w8a8", "256", 4096, 14336): ("w8a8", DotConfig(block_m=64, block_n=128, block_k=256, split_k=1, group_m=8, num_warps=4, num_stages=3, swap_ab=False)),  # 58.6 us (sweep 2)
    ("w8a8", "256", 14336, 4096): ("w8a8", DotConfig(block_m=64, block_n=128, block_k=128, split_k=1, group_m=8, num_warps=4, num_stages=4, swap_ab=False)),  # 39.2 us (sweep 2)
    ("w8a8", "big", 4096, 4096): ("w8a8", DotConfig(block_m=256, block_n=128, block_k=128, split_k=1, group_m=8, num_warps=8, num_stages=3, swap_ab=False)),  # 155.4 us (sweep 2)
    ("w8a8", "big", 4096, 14336): ("w8a8", DotConfig(block_m=256, block_n=128, block_k=128, split_k=1, group_m=8, num_warps=8, num_stages=3, swap_ab=False)),  # 483.9 us (sweep 2)
    ("w8a8", "big", 14336, 4096): ("w8a8", DotConfig(block_m=256, block_n=128, block_k=128, split_k=1, group_m=8, num_warps=8, num_stages=3, swap_ab=False)),  # 476.1 us (sweep 2)
}


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
    programs: int,
    k_blocks: int,
    sm_count: int,
    *,
    fill: int = DOT_FILL,
    m: int = 1,
    k: int = 0,
    at_least: int = 1,
) -> int:
    """Smallest power-of-two split giving about ``fill`` programs per SM (at least three quarters).

    Args:
        programs: programs of the grid without a split.
        k_blocks: K blocks of the tile (each split keeps at least 2 of them).
        sm_count: streaming multiprocessors of the device.
        fill: programs per SM to aim for.
        m, k: the problem's rows and K, bounding the partial sums' traffic to a quarter of the
            weight's (``k=0`` skips that bound).
        at_least: the smallest split to return (a forced split-K variant asks for 2).
    """
    cap = MAX_SPLIT_K
    if k:
        cap = max(at_least, min(cap, k // (8 * PARTIAL_TRAFFIC_FRACTION * max(1, m))))
    split = max(1, at_least)
    # three quarters: 128 programs on 132 SMs count as a full wave (a split would add partial-sum
    # traffic and a reduction to gain 3% more programs)
    while split * 2 <= cap and 4 * programs * split < 3 * fill * sm_count and k_blocks >= 2 * (split * 2):
        split *= 2
    return max(1, min(split, k_blocks))


def _clamp_k_block(block_k: int, k: int, group_size: int | None, minimum: int) -> int:
    block_k = min(block_k, max(minimum, _next_pow2(k)))
    if group_size:
        # A K block must lie inside one scale group so one scale multiplies the whole partial product.
        block_k = min(block_k, _largest_pow2_divisor(group_size))
    return block_k


def group_block(block_k: int, group_size: int | None) -> tuple[int, int]:
    """GEMV tiles with group scales: ``(block_k, sub_k)``, ``sub_k`` K elements sharing one scale.

    A power-of-two group size lets a K block cover several whole groups (``sub_k = group_size``);
    any other size (a multiple of 16) shrinks the block to a divisor of the group (``sub_k = block_k``).
    Without groups ``sub_k`` is ``block_k``.
    """
    if not group_size:
        return block_k, block_k
    pow2 = _largest_pow2_divisor(group_size)
    if pow2 == group_size:
        return block_k, min(block_k, group_size)
    block_k = min(block_k, pow2)
    return block_k, block_k


@functools.lru_cache(maxsize=4096)
def select_w8a16(
    m: int,
    n: int,
    k: int,
    group_size: int | None,
    kernel: str,
    sm_count: int,
    fp32: bool,
) -> tuple[str, GemvConfig | DotConfig | DequantConfig]:
    """Pick the W8A16 variant and its tiles for one problem size.

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
    if kernel == "auto" and m >= DEQUANT_MIN_ROWS:
        variant, cfg = "dequant", DEFAULTS["dequant"][bucket]
    elif tuned is not None:
        variant, cfg = tuned
    else:
        variant = AUTO_KERNEL[bucket] if kernel == "auto" else kernel
        cfg = DEFAULTS[variant][bucket]
    resolved = resolve_w8a16(
        variant, cfg, m, n, k, group_size=group_size, sm_count=sm_count, fp32=fp32,
        forced_split=kernel == "splitk",
    )
    return variant, resolved


def resolve_w8a16(
    variant: str,
    cfg: GemvConfig | DotConfig | DequantConfig,
    m: int,
    n: int,
    k: int,
    *,
    group_size: int | None,
    sm_count: int,
    fp32: bool,
    forced_split: bool = True,
) -> GemvConfig | DotConfig | DequantConfig:
    """Clamp a table entry to the problem and fill in ``split_k`` (also used for configs passed in).

    ``forced_split``: a ``splitk`` entry whose split is chosen from the shape splits at least in two
    (a caller who forces the variant, the tests among them, wants the reduction exercised); the
    dispatcher's own ``splitk`` choice splits only when the grid needs more programs.
    """
    if variant == "dequant":
        assert isinstance(cfg, DequantConfig)
        return dataclasses.replace(cfg, block_n=min(cfg.block_n, _next_pow2(n)),
                                   block_k=min(cfg.block_k, max(16, _next_pow2(k))))
    if variant == "gemv":
        assert isinstance(cfg, GemvConfig)
        block_n = min(cfg.block_n, _next_pow2(n))
        block_k = min(cfg.block_k, max(16, _next_pow2(k)))
        block_k, _ = group_block(block_k, group_size)
        k_blocks = -(-k // block_k)
        programs = m * -(-n // block_n)
        split = cfg.split_k or choose_split_k(programs, k_blocks, sm_count, fill=GEMV_FILL, m=m, k=k)
        split = max(1, min(split, k_blocks))
        tma = cfg.tma and max(block_n, block_k) <= TMA_MAX_BOX
        return dataclasses.replace(cfg, block_n=block_n, block_k=block_k, split_k=split, tma=tma)
    assert isinstance(cfg, DotConfig)
    block_m = min(cfg.block_m, max(16, _next_pow2(m)))
    block_n = min(cfg.block_n, max(16, _next_pow2(n)))
    block_k = _clamp_k_block(cfg.block_k, k, group_size, 16)
    num_stages = cfg.num_stages
    num_warps = cfg.num_warps
    if fp32:
        # IEEE fp32 dots run on FMA units with both operands in registers: large tiles spill.
        block_m, block_n, block_k = min(block_m, 64), min(block_n, 64), min(block_k, 32)
        num_stages = min(num_stages, 2)
        num_warps = min(num_warps, 4)
    elif group_size:
        # Group scales keep a second accumulator (each K block's product, scaled before it is added):
        # at most 64 fp32 values per thread for each, or the registers spill (a 256 x 128 tile on
        # 8 warps spills about 60 registers per thread).
        while block_m * block_n > 64 * 32 * num_warps and max(block_m, block_n) > 16:
            if block_m >= block_n:
                block_m //= 2
            else:
                block_n //= 2
    k_blocks = -(-k // block_k)
    programs = -(-m // block_m) * -(-n // block_n)
    if variant == "gemm":
        split = 1
    elif cfg.split_k:
        split = cfg.split_k
    else:
        split = choose_split_k(
            programs, k_blocks, sm_count, fill=DOT_FILL, m=m, k=k, at_least=2 if forced_split else 1
        )
    split = max(1, min(split, k_blocks))
    # a TMA box has at most 256 elements per side
    tma = cfg.tma and max(block_m, block_n, block_k) <= TMA_MAX_BOX
    return dataclasses.replace(
        cfg, block_m=block_m, block_n=block_n, block_k=block_k, split_k=split,
        num_stages=num_stages, num_warps=num_warps, tma=tma,
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
        tma=False,
    )


@functools.lru_cache(maxsize=1024)
def select_quant(k: int) -> QuantConfig:
    """Row quantization: the whole row in one step up to 4096 elements, else 2048-element steps."""
    if k <= 4096:
        return QuantConfig(block_k=max(16, _next_pow2(k)), num_warps=4 if k <= 2048 else 8)
    return QuantConfig(block_k=2048, num_warps=8)
