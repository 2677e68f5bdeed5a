r"""Triton kernels for cross-entropy over class logits: forward, backward, launchers, heuristics.

The math is that of :mod:`rotalabs_accel.reference.cross_entropy`. Both kernels take a 2-D ``(N, V)``
view of the logits whose rows may be strided (row stride >= V, e.g. a slice of a wider buffer) and
whose elements within a row are contiguous; they never write to the logits.

``forward``
    One program per row. It walks the row in ``BLOCK_V``-column chunks, keeping a running maximum
    (one scalar) and, per lane, a running sum of exponentials rescaled whenever the maximum grows
    (an online log-sum-exp: the row is read once, in its own dtype, and accumulated in fp32). It then
    loads the target logit and writes the row's loss and its ``lse`` (fp32, saved for the backward).
    Rows whose target is ``ignore_index`` read nothing and get loss 0. A target outside ``[0, V)``
    (and not ``ignore_index``) gives a ``nan`` loss: no host synchronisation is spent on checking it.
``backward``
    One program per row, one pass: re-reads the row and the saved ``lse`` and writes

    .. math::

        \frac{\partial L}{\partial x_j} = g\Bigl(p_j\,(1 + 2 z\,\mathrm{lse})
            - (1 - \varepsilon)\,[j = t] - \frac{\varepsilon}{V}\Bigr), \qquad p_j = e^{x_j - \mathrm{lse}}

    in the logits' dtype, where ``g`` is the gradient arriving at the row's loss (read with its own
    stride, so the stride-0 gradient of a sum or mean needs no copy). Ignored rows are written as zeros
    without reading the logits.

Traffic per logit: forward reads it once (2 bytes in bf16), backward reads it once and writes its
gradient once (4 bytes in bf16). The per-row vectors (targets, loss, lse) are negligible.

Exponentials are ``exp2((x - m) * log2(e))``: the difference first (exact near the maximum), then one
multiply and one ``ex2`` per element on the GPU.

Launch configuration is data: :class:`CrossEntropyConfig` picked from :data:`FORWARD_TABLE` /
:data:`BACKWARD_TABLE` by vocabulary size, never autotuned at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import current_device, launch

__all__ = [
    "KERNEL_DTYPES",
    "CrossEntropyConfig",
    "FORWARD_TABLE",
    "BACKWARD_TABLE",
    "forward_config",
    "backward_config",
    "candidate_configs",
    "cross_entropy_forward",
    "cross_entropy_backward",
]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_forward_kernel(
    logits_ptr, target_ptr, loss_ptr, lse_ptr, n_cols, stride_row, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr, SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr,
):
    row = tl.program_id(0)
    target = tl.load(target_ptr + row)
    if target == ignore_index:
        tl.store(loss_ptr + row, tl.zeros([], tl.float32))
        tl.store(lse_ptr + row, tl.zeros([], tl.float32))
    else:
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        cols = tl.arange(0, BLOCK_V)
        run_max = tl.full([], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_V], dtype=tl.float32)  # per lane: sum of exp(x - run_max)
        sum_x = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            in_row = offs < n_cols
            x = tl.load(row_ptr + offs, mask=in_row, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x, axis=0))
            # While every logit seen is -inf the max is -inf too; subtracting 0 instead keeps
            # exp(-inf - -inf) = nan out of the sums (they stay 0).
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            # exp(d) = exp2(d * log2(e)); the difference is taken first (exact near the max).
            rescale = tl.exp2((run_max - shift) * 1.4426950408889634)
            run_sum = run_sum * rescale + tl.exp2((x - shift) * 1.4426950408889634)
            run_max = new_max
            if SMOOTHING:
                sum_x += tl.where(in_row, x, 0.0)
        lse = run_max + tl.log2(tl.sum(run_sum, axis=0)) * 0.6931471805599453
        in_range = (target >= 0) & (target < n_cols)
        x_target = tl.load(row_ptr + tl.where(in_range, target, 0)).to(tl.float32)
        # Each term as a difference from lse first: lse - x_t is exact when x_t dominates the row.
        loss = lse - x_target
        if SMOOTHING:
            mean_x = tl.sum(sum_x, axis=0) / n_cols
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - mean_x)
        if Z_LOSS:
            loss += z_loss * lse * lse
        loss = tl.where(in_range, loss, float("nan"))
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)


@triton.jit
def _cross_entropy_backward_kernel(
    grad_loss_ptr, logits_ptr, target_ptr, lse_ptr, grad_ptr, n_cols, stride_row, stride_grad_row,
    stride_grad_loss, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr, SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr,
):
    row = tl.program_id(0)
    target = tl.load(target_ptr + row)
    grad_row_ptr = grad_ptr + row.to(tl.int64) * stride_grad_row
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            tl.store(grad_row_ptr + offs, zeros, mask=offs < n_cols)
    else:
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        scale = tl.load(grad_loss_ptr + row.to(tl.int64) * stride_grad_loss).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        p_scale = scale
        if Z_LOSS:
            p_scale = scale * (1.0 + 2.0 * z_loss * lse)
        # 32-bit column compare; an out-of-range target (its loss is nan) matches no column
        # (widened first, under a new name, as a branch may not retype a variable: an unsigned
        # target, uint8 say, cannot meet the -1)
        wide_target = target.to(tl.int64)
        target_col = tl.where((wide_target >= 0) & (wide_target < n_cols), wide_target, -1).to(tl.int32)
        on_target = scale
        if SMOOTHING:
            on_target = scale * (1.0 - label_smoothing)
            uniform = scale * label_smoothing / n_cols
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            in_row = offs < n_cols
            x = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            grad = tl.exp2((x - lse) * 1.4426950408889634) * p_scale
            if SMOOTHING:
                grad -= uniform
            grad = tl.where(offs == target_col, grad - on_target, grad)
            tl.store(grad_row_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


# --------------------------------------------------------------------------------------------------
# Launch configuration (data)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrossEntropyConfig:
    """How one cross-entropy kernel launch walks its rows.

    Attributes:
        block_v: columns per chunk (a power of two); a row of ``V`` logits takes ``ceil(V / block_v)``
            loop iterations.
        num_warps: warps per program (one program per row).
        num_stages: Triton's software-pipelining depth for the chunk loop; ``None`` keeps Triton's
            default.
    """

    block_v: int
    num_warps: int
    num_stages: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_v", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"CrossEntropyConfig.{name} must be a power of two, got {value}")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"CrossEntropyConfig.num_stages must be >= 1 or None, got {self.num_stages}")


# Rows: (max_vocab or None, block_v, num_warps[, num_stages]); the first row with vocab <= max_vocab
# wins and block_v is capped at the next power of two of the vocabulary (a small vocabulary is one
# chunk). Without a fourth entry Triton's default pipelining depth is used.
# Targets of the choice: at least 8 elements per thread (16-byte loads of bf16), chunks small enough
# that several programs fit on an SM (bytes in flight), large enough that the per-chunk maximum (a
# cross-warp reduction) is amortised. To be confirmed by `benchmarks/bench_cross_entropy.py --sweep`.
FORWARD_TABLE: tuple[tuple[int | None, ...], ...] = (
    (1024, 1024, 4),
    (8192, 2048, 8),
    (None, 4096, 8),
)
BACKWARD_TABLE: tuple[tuple[int | None, ...], ...] = (
    (1024, 1024, 4),
    (8192, 2048, 8),
    (None, 4096, 8),
)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pick(table, n_cols: int) -> CrossEntropyConfig:
    row = next(row for row in table if row[0] is None or n_cols <= row[0])
    block_v = min(row[1], _next_power_of_2(max(n_cols, 1)))
    # a chunk narrower than the warps' lanes would leave threads idle: fewer warps instead
    num_warps = max(1, min(row[2], block_v // 32))
    num_stages = row[3] if len(row) > 3 else None
    return CrossEntropyConfig(block_v=block_v, num_warps=num_warps, num_stages=num_stages)


def forward_config(n_cols: int) -> CrossEntropyConfig:
    """Launch configuration of the forward kernel for a vocabulary of ``n_cols`` classes."""
    return _pick(FORWARD_TABLE, n_cols)


def backward_config(n_cols: int) -> CrossEntropyConfig:
    """Launch configuration of the backward kernel for a vocabulary of ``n_cols`` classes."""
    return _pick(BACKWARD_TABLE, n_cols)


def candidate_configs(direction: str, n_cols: int) -> list[CrossEntropyConfig]:
    """Launch configurations worth timing for ``direction`` (``"fwd"`` or ``"bwd"``) at vocabulary ``n_cols``.

    The heuristic's own choice comes first. The benchmark's ``--sweep`` times these (and, for the
    fastest few, other pipelining depths) and prints the fastest.
    """
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    widest = _next_power_of_2(max(n_cols, 1))
    out = []
    for block_v in (1024, 2048, 4096, 8192, 16384, 32768):
        if block_v > max(widest, 1024):
            continue
        for num_warps in (2, 4, 8, 16, 32):
            per_thread = block_v // (32 * num_warps)
            if 4 <= per_thread <= 64:
                out.append(CrossEntropyConfig(block_v=block_v, num_warps=num_warps))
    heuristic = (forward_config if direction == "fwd" else backward_config)(n_cols)
    return [heuristic] + [c for c in out if c != heuristic]


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _check_logits(op: str, logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be a 2-D (N, V) tensor, got shape {tuple(logits.shape)}")
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError(
            f"{op}: logits must have at least one class (V >= 1), got shape {tuple(logits.shape)}"
        )
    if logits.stride(1) != 1 and logits.shape[1] > 1:
        # The kernels read rows with unit column stride; a transposed view is copied once.
        logits = logits.contiguous()
    return logits


def _check_target(op: str, target: torch.Tensor, n_rows: int) -> torch.Tensor:
    if target.shape != (n_rows,):
        raise ValueError(f"{op}: target must have shape ({n_rows},), got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{op}: target must hold integer class indices, got {target.dtype}")
    if n_rows > 1 and target.stride(0) != 1:
        target = target.contiguous()
    return target


def _run(kernel, grid: tuple, args: tuple, config: CrossEntropyConfig, label_smoothing: float,
         z_loss: float) -> None:
    device = args[0].get_device()
    meta = {"BLOCK_V": config.block_v, "SMOOTHING": label_smoothing != 0.0, "Z_LOSS": z_loss != 0.0}
    if device >= 0 and device != current_device():
        with torch.cuda.device(device):
            launch(kernel, grid, args, config.num_warps, config.num_stages, **meta)
    else:
        launch(kernel, grid, args, config.num_warps, config.num_stages, **meta)


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    config: CrossEntropyConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        logits: ``(N, V)`` float32 / float16 / bfloat16; any row stride, unit column stride (else copied).
        target: ``(N,)`` integer class indices (any integer dtype).
        ignore_index: target value of rows that take no part.
        label_smoothing: :math:`\\varepsilon` in ``[0, 1]``.
        z_loss: coefficient of the :math:`\\mathrm{lse}^2` term.
        config: overrides :func:`forward_config`.

    Returns:
        ``(loss, lse)``, both ``(N,)`` float32: the per-row loss (0 on ignored rows, ``nan`` for a
        target outside ``[0, V)``) and the row's log-sum-exp (0 on ignored rows). Nothing is launched
        when ``N == 0``.
    """
    op = "cross_entropy_forward"
    logits = _check_logits(op, logits)
    n_rows, n_cols = logits.shape
    target = _check_target(op, target, n_rows)
    loss = logits.new_empty((n_rows,), dtype=torch.float32)
    lse = logits.new_empty((n_rows,), dtype=torch.float32)
    if n_rows == 0:
        return loss, lse
    config = config or forward_config(n_cols)
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    args = (logits, target, loss, lse, n_cols, logits.stride(0), int(ignore_index), label_smoothing, z_loss)
    _run(_cross_entropy_forward_kernel, (n_rows,), args, config, label_smoothing, z_loss)
    return loss, lse


def cross_entropy_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    config: CrossEntropyConfig | None = None,
) -> torch.Tensor:
    """Launch the backward kernel.

    Args:
        grad_loss: ``(N,)`` gradient of the per-row losses, any dtype and any stride (the stride-0
            expansion of a scalar gradient is read in place).
        logits, target, ignore_index, label_smoothing, z_loss: as in the forward.
        lse: ``(N,)`` float32 from :func:`cross_entropy_forward`.
        config: overrides :func:`backward_config`.

    Returns:
        ``(N, V)`` contiguous gradient of the logits, in the logits' dtype (zeros on ignored rows).
    """
    op = "cross_entropy_backward"
    logits = _check_logits(op, logits)
    n_rows, n_cols = logits.shape
    target = _check_target(op, target, n_rows)
    if grad_loss.shape != (n_rows,) or lse.shape != (n_rows,):
        raise ValueError(
            f"{op}: grad_loss and lse must have shape ({n_rows},), got {tuple(grad_loss.shape)} and "
            f"{tuple(lse.shape)}"
        )
    if lse.dtype != torch.float32:
        raise TypeError(f"{op}: lse must be float32 (from cross_entropy_forward), got {lse.dtype}")
    grad = logits.new_empty((n_rows, n_cols))
    if n_rows == 0:
        return grad
    if n_rows > 1 and lse.stride(0) != 1:
        lse = lse.contiguous()
    config = config or backward_config(n_cols)
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    args = (grad_loss, logits, target, lse, grad, n_cols, logits.stride(0), grad.stride(0),
            grad_loss.stride(0) if n_rows > 1 else 0, int(ignore_index), label_smoothing, z_loss)
    _run(_cross_entropy_backward_kernel, (n_rows,), args, config, label_smoothing, z_loss)
    return grad
