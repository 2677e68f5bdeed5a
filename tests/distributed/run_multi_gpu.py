"""rotalabs-accel under several processes: DDP, FSDP2, and every op on a GPU other than the current one.

Launch with ``torchrun`` (two processes; one GPU each on CUDA, gloo on CPU)::

    torchrun --nproc-per-node 2 tests/distributed/run_multi_gpu.py --out multi_gpu.json
    torchrun --nproc-per-node 2 tests/distributed/run_multi_gpu.py --device cpu

Checks (each prints PASS / FAIL / SKIP; ``--out`` writes them all as JSON; the exit status is non-zero
when one fails):

``optimize_model``
    A small Llama (``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` with random weights from a
    fixed seed: nothing is downloaded) converted by :func:`rotalabs_accel.optimize_model` must have its
    RMSNorms and SwiGLU MLPs converted, or the training comparisons below would compare the model with
    itself; a rotary function or residual-add norm left unconverted is noted in the detail.

``ddp/<dtype>``, ``fsdp2/<dtype>``
    The model and an identical copy converted by ``optimize_model`` are trained a few SGD steps on fixed
    per-rank data, wrapped in ``DistributedDataParallel`` or in FSDP2 (``fully_shard`` on every decoder
    layer, then on the root). The unconverted model in float64 under the same engine is the oracle. The
    converted model's per-step losses (mean over ranks), last-step gradients and parameter updates
    (final minus initial parameters) must each be within the tolerance rule of ``tests/helpers.py``:

        err(optimized) <= 2 * err(unconverted model in the same dtype) + half the dtype's unit roundoff

    with ``err`` the relative error against the oracle, per tensor. A wrong scale, a lost gradient or a
    gradient that is not reduced across ranks is off by orders of magnitude more than rounding.
    ``bf16`` means bf16 parameters under DDP, and FSDP2's mixed precision (bf16 compute, fp32 sharded
    parameters and gradient reduction) under FSDP2. DDP also checks that the ranks end with identical
    parameters; FSDP2 that every parameter of the converted model is sharded like the original's.

``device/<op>`` (CUDA only)
    Each rank makes its own GPU current and runs every op, module and the converted model with its
    tensors on the other rank's GPU (rank 0 runs on ``cuda:1`` from ``cuda:0``, rank 1 the reverse) with
    the Triton backend forced. The results (outputs and gradients) must equal those computed on the
    current GPU, be the op's value (within a loose bound of the float64 reference), leave the current
    device unchanged, and, when the profiler tells the GPUs apart, every kernel and copy of the call,
    the library's Triton kernels included, must have run on the tensors' GPU.

NCCL's NVLink multicast (NVLS) is kept off through the environment, before the process group starts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# NVLink multicast (NVLS) stays off in NCCL, PyTorch's symmetric memory and NVSHMEM: a program using
# it can take a host's GPUs out of service. Set before torch.distributed starts anything.
for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# This checkout's package, whether or not (or whichever version) is installed.
_SRC = Path(__file__).resolve().parents[2] / "src"
if (_SRC / "rotalabs_accel").is_dir():
    sys.path.insert(0, str(_SRC))

# The tolerance rule of tests/helpers.py, restated so that the script needs neither pytest nor the
# tests directory (tests/test_devices.py checks that the two agree).
FACTOR = 2.0
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def floor(dtype: torch.dtype) -> float:
    return 0.5 * UNIT_ROUNDOFF[dtype]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref|| / ||ref||`` in float64 (``||ref||`` of 0 counts as 1); non-finite ``a`` raises."""
    a = a.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if a.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(ref.shape)}")
    if ref.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(a).all()):
        raise ValueError("the result has NaN or Inf values")
    denom = ref.norm().item()
    return (a - ref).norm().item() / (denom if denom > 0 else 1.0)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

# The model: Llama-shaped, small enough that the float64 oracle and a CPU run take seconds.
MODEL_CONFIG = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
MODEL_SEED = 0
DATA_SEED = 1234
BATCH, SEQ = 2, 32


# --------------------------------------------------------------------------------------------------
# Arguments, process group, result records
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda (NCCL, one GPU per rank) or cpu (gloo); default cuda when available")
    p.add_argument("--out", type=Path, default=None, help="write the JSON summary here (rank 0)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per training run")
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--batch", type=int, default=BATCH, help="sequences per rank and step")
    p.add_argument("--seq", type=int, default=SEQ, help="tokens per sequence")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated from fp32,bf16; default fp32,bf16 on cuda and fp32 on cpu")
    p.add_argument("--checks", default="ddp,fsdp2,device",
                   help="comma-separated from ddp,fsdp2,device (device needs CUDA)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="backend of the converted model; default triton on cuda, auto on cpu (the PyTorch "
                        "reference); triton on cpu runs the kernels under Triton's interpreter (slow)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait")
    p.add_argument("--fault", choices=("none", "eps"), default="none",
                   help="eps: give the converted model's RMSNorms a wrong epsilon (proves the training "
                        "comparisons can fail)")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtypes is None:
        args.dtypes = "fp32,bf16" if args.device == "cuda" else "fp32"
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r} (choose from {', '.join(DTYPES)})")
    args.checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    for c in args.checks:
        if c not in ("ddp", "fsdp2", "device"):
            p.error(f"--checks: unknown check {c!r}")
    if args.backend is None:
        args.backend = "triton" if args.device == "cuda" else "auto"
    return args


class Context:
    """What every check needs: rank, world, this rank's device, the collective groups."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        timeout = datetime.timedelta(seconds=args.timeout)
        if args.device == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda: no CUDA device is visible")
            if torch.cuda.device_count() <= self.local_rank:
                raise SystemExit(
                    f"--device cuda: local rank {self.local_rank} needs a GPU of its own, "
                    f"but {torch.cuda.device_count()} are visible"
                )
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            dist.init_process_group("nccl", timeout=timeout, device_id=self.device)
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo", timeout=timeout)
        # Results travel over gloo: it keeps working after a CUDA error has poisoned this process's
        # context, so a failing GPU check still produces a summary. Its timeout covers one rank
        # finishing the per-GPU checks (kernel compilation included) well before the other.
        self.cpu_group = dist.new_group(backend="gloo", timeout=max(timeout, datetime.timedelta(hours=1)))

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)


def result(name: str, status: str, detail: str = "", **metrics) -> dict:
    return {"name": name, "status": status, "detail": detail, "metrics": metrics}


def run_check(ctx: Context, name: str, fn: Callable[[], list[dict] | dict]) -> list[dict]:
    """Run one check; an exception is a FAIL naming it. Prints each result as it comes."""
    start = time.perf_counter()
    try:
        out = fn()
        records = out if isinstance(out, list) else [out]
    except Exception as exc:  # a check that crashes is a failed check, reported with its traceback
        traceback.print_exc()
        records = [result(name, FAIL, f"{type(exc).__name__}: {exc}")]
    seconds = time.perf_counter() - start
    for r in records:
        r.setdefault("seconds", round(seconds / len(records), 3))
        print(f"[rank {ctx.rank}] {r['status']:<4} {r['name']}: {r['detail']}", flush=True)
    return records


def merge(per_rank: list[list[dict]]) -> list[dict]:
    """One record per check: FAIL if any rank failed, SKIP if every rank skipped, else PASS."""
    merged: dict[str, dict] = {}
    for rank, records in enumerate(per_rank):
        for r in records:
            entry = merged.setdefault(r["name"], {"name": r["name"], "ranks": {}})
            entry["ranks"][rank] = {k: r.get(k) for k in ("status", "detail", "metrics", "seconds")}
    for entry in merged.values():
        statuses = [v["status"] for v in entry["ranks"].values()]
        if FAIL in statuses:
            entry["status"] = FAIL
        elif all(s == SKIP for s in statuses):
            entry["status"] = SKIP
        else:
            entry["status"] = PASS
        details = {v["detail"] for v in entry["ranks"].values()}
        if len(details) == 1:
            entry["detail"] = details.pop()
        else:
            entry["detail"] = "; ".join(f"rank {k}: {v['detail']}" for k, v in entry["ranks"].items())
    return list(merged.values())


# --------------------------------------------------------------------------------------------------
# The model, its data and the tolerance rule
# --------------------------------------------------------------------------------------------------


def llama_config():
    from transformers import LlamaConfig

    # Eager attention: the same deterministic matmuls in every dtype (fused SDPA kernels differ by
    # dtype and may use atomics in backward).
    return LlamaConfig(**MODEL_CONFIG, attn_implementation="eager")


def build_model(dtype: torch.dtype, device: torch.device):
    """The model from a fixed seed, initialised in fp32 on the CPU then cast: identical in every run."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = LlamaForCausalLM(llama_config())
    return model.to(device=device, dtype=dtype)


def rank_batches(rank: int, steps: int, device: torch.device, batch: int = BATCH,
                 seq: int = SEQ) -> list[torch.Tensor]:
    """Token ids per step for one rank: fixed, and different on every rank."""
    gen = torch.Generator().manual_seed(DATA_SEED + rank)
    vocab = MODEL_CONFIG["vocab_size"]
    return [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(steps)]


def rope_patched() -> bool:
    from transformers.models.llama import modeling_llama

    return getattr(modeling_llama.apply_rotary_pos_emb, "_rotalabs_accel_original", None) is not None


def optimize(model, fault: str):
    """Convert ``model`` with optimize_model; returns ``(model, counts)`` of what was converted."""
    from rotalabs_accel import TritonRMSNorm, optimize_model

    model, report = optimize_model(model, report=True)
    counts = {kind: sum(1 for e in report.entries if e.kind == kind and e.changed)
              for kind in ("rmsnorm", "mlp", "rope", "residual_norm")}
    if fault == "eps":
        for m in model.modules():
            if isinstance(m, TritonRMSNorm):
                m.eps = 10 * m.eps
    return model, counts


def expected_counts() -> dict[str, int]:
    layers = MODEL_CONFIG["num_hidden_layers"]
    return {"rmsnorm": 2 * layers + 1, "mlp": layers, "rope": 1, "residual_norm": layers}


def compare_to_oracle(ours: dict, base: dict, oracle: dict, dtype: torch.dtype) -> tuple[bool, dict]:
    """Apply the tolerance rule to every tensor; returns (ok, metrics naming the worst tensors)."""
    worst: dict[str, tuple[float, str, float, float, float]] = {}
    failures = []
    for key, ref in oracle.items():
        group = key.split("/", 1)[0]
        if not bool(ref.ne(0).any()):
            # Every parameter gets a gradient and moves; a zero oracle would make the rule vacuous.
            failures.append(f"{key} (zero in the float64 oracle)")
            continue
        try:
            e_ours = rel_err(ours[key], ref)
            e_base = rel_err(base[key], ref)
        except ValueError as exc:  # NaN / Inf
            failures.append(f"{key} ({exc})")
            continue
        bound = FACTOR * e_base + floor(dtype)
        ratio = e_ours / bound
        if group not in worst or ratio > worst[group][0]:
            worst[group] = (ratio, key, e_ours, e_base, bound)
        if not e_ours <= bound:
            failures.append(key)
    metrics = {
        group: {"worst": key, "err_optimized": e_o, "err_unconverted": e_b, "bound": bound,
                "err_over_bound": ratio}
        for group, (ratio, key, e_o, e_b, bound) in worst.items()
    }
    metrics["failed_tensors"] = failures[:20]
    metrics["failed_count"] = len(failures)
    return not failures, metrics


def summary_line(ok: bool, metrics: dict) -> str:
    parts = []
    for group in ("loss", "grad", "update"):
        m = metrics.get(group)
        if m:
            parts.append(f"{group} err {m['err_optimized']:.2e} <= {m['bound']:.2e}"
                         if m["err_optimized"] <= m["bound"] else
                         f"{group} err {m['err_optimized']:.2e} > bound {m['bound']:.2e} ({m['worst']})")
    return ", ".join(parts) if ok else f"{metrics['failed_count']} tensors out of bounds: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Training under DDP / FSDP2
# --------------------------------------------------------------------------------------------------


def _fsdp_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


def _full(t: torch.Tensor) -> torch.Tensor:
    """A CPU float64 copy of the whole tensor (gathered from the ranks for an FSDP2 shard)."""
    if isinstance(t, _dtensor_type()):
        t = t.full_tensor()
    # A copy even when t is already a CPU float64 tensor: a live parameter must not be aliased.
    return t.detach().to("cpu", torch.float64, copy=True)


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, in float32 or the logits' dtype when wider.

    Hugging Face's own loss casts the logits to float32, which would cap the float64 oracle's loss
    at float32 precision.
    """
    logits = logits[:, :-1].flatten(0, 1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits, ids[:, 1:].flatten())


def train(ctx: Context, model, wrapped, batches: list[torch.Tensor], init: dict) -> dict:
    """SGD steps on this rank's batches; returns loss/step (mean over ranks), grad/<p>, update/<p>."""
    opt = torch.optim.SGD(wrapped.parameters(), lr=ctx.args.lr, momentum=0.9)
    losses = []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = causal_lm_loss(wrapped(input_ids=ids, use_cache=False).logits, ids)
        loss.backward()
        losses.append(loss.detach().to(torch.float64))
        opt.step()
    loss = torch.stack(losses)
    dist.all_reduce(loss)
    out = {"loss/mean_over_ranks": (loss / ctx.world).cpu()}
    for name, p in model.named_parameters():
        if p.grad is None:
            raise RuntimeError(f"parameter {name} has no gradient after backward")
        out[f"grad/{name}"] = _full(p.grad)
        out[f"update/{name}"] = _full(p) - init[name]
    return out


def ranks_agree(ctx: Context, model) -> list[str]:
    """Names of the parameters whose values differ from rank 0's."""
    differ = []
    for name, p in model.named_parameters():
        mine = p.detach()
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        if not torch.equal(mine, theirs):
            differ.append(name)
    return differ


@contextlib.contextmanager
def converted_backend(ctx: Context):
    from rotalabs_accel import use_backend

    with use_backend(ctx.args.backend):
        yield


def check_optimize_model(ctx: Context) -> dict:
    model = build_model(torch.float32, ctx.device)
    from rotalabs_accel.integration import revert_rope_patches

    try:
        with converted_backend(ctx):
            _, counts = optimize(model, "none")
    finally:
        revert_rope_patches()
    want = expected_counts()
    missing = {k: (counts[k], n) for k, n in want.items() if counts[k] != n}
    if counts["rmsnorm"] == 0 or counts["mlp"] == 0:
        return result("optimize_model", FAIL, f"nothing to compare: converted {counts}", converted=counts,
                      expected=want)
    if missing:
        # The training comparisons still hold, over fewer converted modules: say which are missing.
        detail = (f"converted {counts}; NOTE fewer than expected: "
                  + ", ".join(f"{k} {got}/{n}" for k, (got, n) in missing.items()))
        return result("optimize_model", PASS, detail, converted=counts, expected=want)
    return result("optimize_model", PASS, f"converted {counts}", converted=counts, expected=want)


def run_engine(ctx: Context, engine: str) -> list[dict]:
    """Train the oracle, then per dtype the unconverted and the converted model, under one engine."""
    from rotalabs_accel.integration import revert_rope_patches

    fully_shard, MixedPrecisionPolicy = _fsdp_api()
    mesh = None
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(ctx.device.type, (ctx.world,))

    def wrap(model, mixed_bf16: bool):
        if engine == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            return DDP(model, device_ids=ids)
        kw = {"mesh": mesh}
        if mixed_bf16:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model

    def run(dtype_name: str | None, converted: bool) -> tuple[dict, object]:
        # dtype_name None: the float64 oracle.
        if rope_patched():
            raise RuntimeError("apply_rotary_pos_emb is still patched: the unconverted runs would use it")
        mixed = engine == "fsdp2" and dtype_name == "bf16"
        if dtype_name is None:
            param_dtype = torch.float64
        else:
            param_dtype = torch.float32 if mixed else DTYPES[dtype_name]
        model = build_model(param_dtype, ctx.device)
        batches = rank_batches(ctx.rank, ctx.args.steps, ctx.device, ctx.args.batch, ctx.args.seq)
        init = {name: _full(p) for name, p in model.named_parameters()}
        if not converted:
            wrapped = wrap(model, mixed)
            return train(ctx, model, wrapped, batches, init), model
        try:
            with converted_backend(ctx):
                model, _ = optimize(model, ctx.args.fault)
                wrapped = wrap(model, mixed)
                return train(ctx, model, wrapped, batches, init), model
        finally:
            revert_rope_patches()

    records = []
    oracle, _ = run(None, False)
    for dtype_name in ctx.args.dtypes:
        label = "bf16-mixed" if engine == "fsdp2" and dtype_name == "bf16" else dtype_name
        name = f"{engine}/{label}"

        def one(dtype_name=dtype_name, name=name) -> dict:
            base, base_model = run(dtype_name, False)
            ours, our_model = run(dtype_name, True)
            ok, metrics = compare_to_oracle(ours, base, oracle, DTYPES[dtype_name])
            detail = summary_line(ok, metrics)
            metrics["losses"] = {
                "oracle": oracle["loss/mean_over_ranks"].tolist(),
                "unconverted": base["loss/mean_over_ranks"].tolist(),
                "optimized": ours["loss/mean_over_ranks"].tolist(),
            }
            if engine == "ddp":
                differ = ranks_agree(ctx, our_model)
                metrics["ranks_disagree"] = differ
                if differ:
                    ok = False
                    detail += f"; ranks hold different values of {len(differ)} parameters ({differ[:3]})"
            else:
                problems = sharding_problems(base_model, our_model)
                metrics["sharding_problems"] = problems
                if problems:
                    ok = False
                    detail += f"; sharding differs: {problems[:3]}"
                else:
                    detail += "; every parameter sharded as in the unconverted model"
            return result(name, PASS if ok else FAIL, detail, **metrics)

        records += run_check(ctx, name, one)
    return records


def sharding_problems(base_model, our_model) -> list[str]:
    """Differences between the two FSDP2 models' parameters: names, DTensor-ness, placements, shards."""
    DTensor = _dtensor_type()
    base = dict(base_model.named_parameters())
    ours = dict(our_model.named_parameters())
    problems = []
    if set(base) != set(ours):
        problems.append(f"parameter names differ: {sorted(set(base) ^ set(ours))[:5]}")
    for name in sorted(set(base) & set(ours)):
        b, o = base[name], ours[name]
        if not isinstance(o, DTensor):
            problems.append(f"{name} is not sharded ({type(o).__name__})")
            continue
        if o.placements != b.placements or o.to_local().shape != b.to_local().shape:
            problems.append(f"{name}: {o.placements} {tuple(o.to_local().shape)} vs "
                            f"{b.placements} {tuple(b.to_local().shape)}")
    return problems


# --------------------------------------------------------------------------------------------------
# Every op on the other GPU
# --------------------------------------------------------------------------------------------------


def _inputs(gen: torch.Generator, *shape: int, dtype, device, upcast: bool, scale: float = 1.0,
            shift: float = 0.0, grad: bool = False) -> torch.Tensor:
    """Random values rounded to ``dtype`` (then to float64 for the reference), on ``device``."""
    t = (torch.randn(*shape, generator=gen) * scale + shift).to(dtype)
    if upcast:
        t = t.to(torch.float64)
    t = t.to(device)
    return t.requires_grad_() if grad else t


def _grads(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"d{name}": t.grad for name, t in named.items() if t.grad is not None}


def case_rmsnorm(rows: int, n: int, dtype):
    def run(device, upcast):
        from rotalabs_accel import rmsnorm

        g = torch.Generator().manual_seed(1)
        x = _inputs(g, rows, n, dtype=dtype, device=device, upcast=upcast, grad=True)
        w = _inputs(g, n, dtype=dtype, device=device, upcast=upcast, scale=0.1, shift=1.0, grad=True)
        dy = _inputs(g, rows, n, dtype=dtype, device=device, upcast=upcast)
        y = rmsnorm(x, w)
        y.backward(dy)
        return {"y": y, **_grads({"x": x, "w": w})}

    return run


def case_rmsnorm_residual(rows: int, n: int, dtype):
    def run(device, upcast):
        from rotalabs_accel import rmsnorm_residual_fused

        g = torch.Generator().manual_seed(2)
        x = _inputs(g, 3, rows, n, dtype=dtype, device=device, upcast=upcast, grad=True)
        r = _inputs(g, 3, rows, n, dtype=dtype, device=device, upcast=upcast, grad=True)
        w = _inputs(g, n, dtype=dtype, device=device, upcast=upcast, scale=0.1, shift=1.0, grad=True)
        dy = _inputs(g, 3, rows, n, dtype=dtype, device=device, upcast=upcast)
        ds = _inputs(g, 3, rows, n, dtype=dtype, device=device, upcast=upcast)
        y, s = rmsnorm_residual_fused(x, r, w)
        torch.autograd.backward((y, s), (dy, ds))
        return {"y": y, "s": s, **_grads({"x": x, "r": r, "w": w})}

    return run


def case_swiglu(rows: int, n: int, dtype, packed: bool):
    def run(device, upcast):
        from rotalabs_accel import swiglu_fused

        g = torch.Generator().manual_seed(3)
        dy = _inputs(g, rows, n, dtype=dtype, device=device, upcast=upcast)
        if packed:
            gu = _inputs(g, rows, 2 * n, dtype=dtype, device=device, upcast=upcast, grad=True)
            y = swiglu_fused(gu)
            y.backward(dy)
            return {"y": y, **_grads({"gate_up": gu})}
        gate = _inputs(g, rows, n, dtype=dtype, device=device, upcast=upcast, grad=True)
        up = _inputs(g, rows, n, dtype=dtype, device=device, upcast=upcast, grad=True)
        y = swiglu_fused(gate, up)
        y.backward(dy)
        return {"y": y, **_grads({"gate": gate, "up": up})}

    return run


def case_rope(layout: str, dtype, inplace: bool = False):
    def run(device, upcast):
        from rotalabs_accel import apply_rope, build_rope_cache

        g = torch.Generator().manual_seed(4)
        b, s, hq, hk, d = 2, 24, 4, 2, 64
        q_shape = (b, s, hq, d) if layout == "bshd" else (b, hq, s, d)
        k_shape = (b, s, hk, d) if layout == "bshd" else (b, hk, s, d)
        cos, sin = build_rope_cache(64, d, device=device)
        if upcast:
            cos, sin = cos.double(), sin.double()
        pos = (torch.arange(s).unsqueeze(0) + torch.tensor([[0], [7]])).to(device)
        q = _inputs(g, *q_shape, dtype=dtype, device=device, upcast=upcast, grad=not inplace)
        k = _inputs(g, *k_shape, dtype=dtype, device=device, upcast=upcast, grad=not inplace)
        if inplace:
            with torch.no_grad():
                apply_rope(q, k, cos, sin, position_ids=pos, layout=layout, inplace=True)
            return {"q": q, "k": k}
        dq = _inputs(g, *q_shape, dtype=dtype, device=device, upcast=upcast)
        dk = _inputs(g, *k_shape, dtype=dtype, device=device, upcast=upcast)
        q_rot, k_rot = apply_rope(q, k, cos, sin, position_ids=pos, layout=layout)
        torch.autograd.backward((q_rot, k_rot), (dq, dk))
        return {"q_rot": q_rot, "k_rot": k_rot, **_grads({"q": q, "k": k})}

    return run


def case_int8(rows: int, n: int, k: int, dtype, kernel: str, group_size: int | None = None):
    def run(device, upcast):
        from rotalabs_accel import int8_gemm, quantize_weight_per_channel
        from rotalabs_accel.quantization.symmetric import quantize_symmetric

        g = torch.Generator().manual_seed(5)
        w = torch.randn(n, k, generator=g) * 0.05
        if group_size is None:
            q, s = quantize_weight_per_channel(w)
        else:
            q, s = quantize_symmetric(w, group_size=group_size)
        q, s = q.to(device), s.to(device)
        x = _inputs(g, rows, k, dtype=dtype, device=device, upcast=upcast, grad=True)
        bias = _inputs(g, n, dtype=dtype, device=device, upcast=upcast, scale=0.1, grad=True)
        dy = _inputs(g, rows, n, dtype=dtype, device=device, upcast=upcast)
        y = int8_gemm(x, q, s, bias, group_size=group_size, kernel="auto" if upcast else kernel,
                      mode="w8a8" if kernel == "w8a8" else "w8a16")
        y.backward(dy)
        return {"y": y, **_grads({"x": x, "bias": bias})}

    return run


def _module_case(seed: int, build: Callable, call: Callable, dtype):
    def run(device, upcast):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = build()
        module = module.to(dtype)  # round the parameters to the dtype first, as the inputs
        if upcast:
            module = module.double()
        module = module.to(device)
        g = torch.Generator().manual_seed(seed + 1)
        outputs = call(module, g, device, upcast)
        grads = {f"d{name}": p.grad for name, p in module.named_parameters() if p.grad is not None}
        return {**outputs, **grads}

    return run


def case_module_rmsnorm(dtype):
    from rotalabs_accel import TritonRMSNorm

    def build():
        m = TritonRMSNorm(384, eps=1e-6)
        with torch.no_grad():
            m.weight.normal_(1.0, 0.1)
        return m

    def call(m, g, device, upcast):
        x = _inputs(g, 2, 9, 384, dtype=dtype, device=device, upcast=upcast, grad=True)
        y = m(x)
        y.backward(_inputs(g, 2, 9, 384, dtype=dtype, device=device, upcast=upcast))
        return {"y": y, "dx": x.grad}

    return _module_case(11, build, call, dtype)


def case_module_swiglu(dtype, fused_gate_up: bool):
    from rotalabs_accel import SwiGLU

    def call(m, g, device, upcast):
        x = _inputs(g, 2, 9, 128, dtype=dtype, device=device, upcast=upcast, grad=True)
        y = m(x)
        y.backward(_inputs(g, 2, 9, 128, dtype=dtype, device=device, upcast=upcast))
        return {"y": y, "dx": x.grad}

    return _module_case(12, lambda: SwiGLU(128, 344, fused_gate_up=fused_gate_up), call, dtype)


def case_module_rotary(dtype):
    from rotalabs_accel import RotaryEmbedding

    def call(m, g, device, upcast):
        q = _inputs(g, 2, 24, 4, 64, dtype=dtype, device=device, upcast=upcast, grad=True)
        k = _inputs(g, 2, 24, 2, 64, dtype=dtype, device=device, upcast=upcast, grad=True)
        q_rot, k_rot = m(q, k, offset=5)
        (q_rot.float().square().sum() + (k_rot.float() * 1.5).sum()).backward()
        return {"q_rot": q_rot, "k_rot": k_rot, "dq": q.grad, "dk": k.grad}

    # The cache is built on the CPU and follows the module (or the inputs) to the GPU.
    return _module_case(13, lambda: RotaryEmbedding(64, max_seq_len=16), call, dtype)


def case_module_int8(dtype, mode: str):
    from rotalabs_accel import QuantizedLinear

    def call(m, g, device, upcast):
        x = _inputs(g, 5, 256, dtype=dtype, device=device, upcast=upcast, grad=True)
        y = m(x)
        y.backward(_inputs(g, 5, 192, dtype=dtype, device=device, upcast=upcast))
        return {"y": y, "dx": x.grad}

    def build():
        return QuantizedLinear.from_linear(torch.nn.Linear(256, 192), mode=mode)

    return _module_case(14, build, call, dtype)


def case_model(dtype, quantize: str | None):
    """The converted Llama: loss, logits and every gradient (or, INT8, logits and input-embedding grads)."""

    def run(device, upcast):
        from rotalabs_accel import optimize_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(MODEL_SEED)
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM(llama_config())
        model = model.to(dtype)
        if upcast:
            model = model.double()
        model = model.to(device)
        # Converted where it lives, under the caller's backend (the check runs there too).
        model = optimize_model(model, quantize=quantize, verify=False)
        ids = rank_batches(0, 1, device)[0]
        out = model(input_ids=ids, use_cache=False)
        causal_lm_loss(out.logits, ids).backward()
        grads = {f"d{name}": p.grad for name, p in model.named_parameters() if p.grad is not None}
        # The loss is left out: one number's rounding error is a single sample, the logits hold it.
        return {"logits": out.logits, **grads}

    return run


def device_cases() -> list[tuple[str, torch.dtype, Callable, float]]:
    """``(name, dtype, run, tol_units)``: ``run(device, upcast)`` returns the outputs and gradients.

    ``tol_units``: how far (relative, in units of the dtype's roundoff) a result on the other GPU may
    be from the current GPU's; whole models run cuBLAS GEMMs, whose algorithm is not ours to fix.
    """
    bf16, fp32 = torch.bfloat16, torch.float32
    op = 1.0
    model = 16.0
    return [
        ("rmsnorm/tile/bf16", bf16, case_rmsnorm(37, 300, bf16), op),
        ("rmsnorm/tile/fp32", fp32, case_rmsnorm(37, 300, fp32), op),
        ("rmsnorm/split/bf16", bf16, case_rmsnorm(4, 20000, bf16), op),
        ("rmsnorm/chunked/bf16", bf16, case_rmsnorm(264, 20000, bf16), op),
        ("rmsnorm_residual_fused/bf16", bf16, case_rmsnorm_residual(37, 300, bf16), op),
        ("rmsnorm_residual_fused/split/fp32", fp32, case_rmsnorm_residual(2, 20000, fp32), op),
        ("swiglu_fused/pair/bf16", bf16, case_swiglu(37, 300, bf16, packed=False), op),
        ("swiglu_fused/packed/bf16", bf16, case_swiglu(37, 300, bf16, packed=True), op),
        ("swiglu_fused/pair/fp32", fp32, case_swiglu(1000, 1376, fp32, packed=False), op),
        ("apply_rope/bshd/bf16", bf16, case_rope("bshd", bf16), op),
        ("apply_rope/bhsd/fp32", fp32, case_rope("bhsd", fp32), op),
        ("apply_rope/inplace/bf16", bf16, case_rope("bshd", bf16, inplace=True), op),
        ("int8_gemm/gemv/bf16", bf16, case_int8(1, 384, 512, bf16, "gemv"), op),
        ("int8_gemm/splitk/bf16", bf16, case_int8(16, 384, 4096, bf16, "splitk"), op),
        ("int8_gemm/gemm/bf16", bf16, case_int8(96, 384, 512, bf16, "gemm"), op),
        ("int8_gemm/gemm-group128/fp32", fp32, case_int8(96, 384, 512, fp32, "gemm", group_size=128), op),
        ("int8_gemm/w8a8/bf16", bf16, case_int8(64, 384, 512, bf16, "w8a8"), op),
        ("TritonRMSNorm/bf16", bf16, case_module_rmsnorm(bf16), op),
        ("SwiGLU/bf16", bf16, case_module_swiglu(bf16, fused_gate_up=False), model),
        ("SwiGLU/fused_gate_up/bf16", bf16, case_module_swiglu(bf16, fused_gate_up=True), model),
        ("RotaryEmbedding/bf16", bf16, case_module_rotary(bf16), op),
        ("QuantizedLinear/w8a16/bf16", bf16, case_module_int8(bf16, "w8a16"), op),
        ("QuantizedLinear/w8a8/bf16", bf16, case_module_int8(bf16, "w8a8"), op),
        ("optimized Llama/bf16", bf16, case_model(bf16, None), model),
        ("optimized Llama/fp32", fp32, case_model(fp32, None), model),
        ("optimized Llama/int8/bf16", bf16, case_model(bf16, "int8"), model),
    ]


def library_kernel_names() -> set[str]:
    import importlib

    names = set()
    for mod in ("rmsnorm", "swiglu", "rope", "int8_gemm"):
        module = importlib.import_module(f"rotalabs_accel.triton_kernels.{mod}")
        for name, obj in vars(module).items():
            if type(obj).__name__ == "JITFunction":
                names.add(name)
    return names


def _gpu_kernels(prof, copies: bool = False) -> list[tuple[str, int]]:
    """(name, device index) of the GPU kernels the profiler recorded (and copies/fills if ``copies``)."""
    from torch.autograd import DeviceType

    return [
        (evt.name, evt.device_index)
        for evt in prof.events()
        if evt.device_type == DeviceType.CUDA and (copies or not evt.name.startswith(("Memcpy", "Memset")))
    ]


def profiler_device_id(device: torch.device) -> int | None:
    """The device index the profiler reports for kernels on ``device`` (None: it reports none).

    Measured rather than assumed, so that a renumbering between CUDA and the profiler cannot be
    mistaken for a launch on the wrong GPU.
    """
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    x = torch.ones(1024, device=device)
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        (x * 2).sum()
        torch.cuda.synchronize(device)
    ids = {d for _, d in _gpu_kernels(prof)}
    return ids.pop() if len(ids) == 1 else None


def _to_cpu(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in out.items()}


def check_device_case(name: str, dtype: torch.dtype, run: Callable, own: torch.device, other: torch.device,
                      kernel_names: set[str], backend: str = "triton", tol_units: float = 1.0,
                      other_profiler_id: int | None = None, verify_placement: bool = True) -> dict:
    """Run one case on ``other`` (twice) and on ``own`` (current) and judge the results; returns a record.

    ``backend`` is the backend of those runs (the reference runs always use ``"torch"``);
    ``other_profiler_id`` the index the profiler gives ``other`` (see :func:`profiler_device_id`;
    default ``other.index``); ``verify_placement=False`` when the profiler cannot tell the GPUs apart.
    On CPU devices (a dry run of the case code) the device and profiler checks are skipped.
    """
    from rotalabs_accel import use_backend
    from rotalabs_accel.integration import revert_rope_patches

    expected_id = other.index if other_profiler_id is None else other_profiler_id

    cuda = other.type == "cuda"
    problems = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(other)

    if cuda:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        profiler = torch.profiler.profile(activities=activities)
    else:
        profiler = contextlib.nullcontext()
    try:
        with use_backend(backend):
            cold = run(other, False)  # the first launch of each kernel on the other GPU compiles there
            sync()
            mine = _to_cpu(run(own, False))
            sync()
            with profiler as prof:
                warm = run(other, False)
                sync()
        with use_backend("torch"):
            baseline = _to_cpu(run(own, False))  # PyTorch in the same dtype
            ref = _to_cpu(run(torch.device("cpu"), True))  # float64 from the same rounded inputs
    finally:
        revert_rope_patches()
    if cuda and torch.cuda.current_device() != own.index:
        problems.append(f"the current device changed to cuda:{torch.cuda.current_device()}")
    for label, out in (("first call", cold), ("second call", warm)):
        wrong = sorted(k for k, v in out.items() if v.device != other)
        if wrong:
            problems.append(f"{label}: {wrong} not on {other}")
    cold, warm = _to_cpu(cold), _to_cpu(warm)
    if not set(cold) == set(warm) == set(mine):
        problems.append(f"different outputs: {sorted(set(cold) ^ set(mine))}")
    bitwise = True
    worst_vs_own = 0.0
    worst_vs_ref = (0.0, "")
    tol = tol_units * UNIT_ROUNDOFF[dtype]
    for key in sorted(set(mine) & set(cold) & set(warm)):
        runs = (("first call", cold[key]), ("second call", warm[key]), (str(own), mine[key]))
        bad = [label for label, t in runs if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            problems.append(f"{key} has NaN or Inf values ({', '.join(bad)})")
            continue
        for label, out in (("first call", cold), ("second call", warm)):
            if not torch.equal(out[key], mine[key]):
                bitwise = False
                e = rel_err(out[key], mine[key])
                worst_vs_own = max(worst_vs_own, e)
                # Same kernels, inputs and GPU model: equal bits, unless a reduction uses atomics or
                # a library picks another algorithm; a launch on the wrong GPU gives garbage or a crash.
                if not e <= tol:
                    problems.append(f"{label} {key} differs from {own}'s by {e:.2e} (> {tol:.1e})")
        # Loose on purpose: the unit tests hold each op to the accuracy rule; this catches a result
        # that is wrong on every device alike.
        e_ref = rel_err(warm[key], ref[key])
        bound = 4 * rel_err(baseline[key], ref[key]) + UNIT_ROUNDOFF[dtype]
        if e_ref / bound >= worst_vs_ref[0]:
            worst_vs_ref = (e_ref / bound, key)
        if not e_ref <= bound:
            problems.append(f"{key} is {e_ref:.2e} from the float64 reference (bound {bound:.2e})")
    activity = _gpu_kernels(prof, copies=True) if cuda else []
    kernels = [(n, d) for n, d in activity if not n.startswith(("Memcpy", "Memset"))]
    ours = sorted({n for n, _ in kernels if any(k in n for k in kernel_names)})
    verified = bool(kernels) and verify_placement
    # Everything in the profiled call works on the other GPU's tensors: any GPU activity elsewhere,
    # the library's kernels or a PyTorch op it called with the wrong device, is the bug looked for.
    off = sorted({f"{n} on profiler device {d}" for n, d in activity if d != expected_id}) if verified else []
    if off:
        problems.append(f"GPU work ran off {other} (profiler device {expected_id}): {off[:6]}")
    metrics = {
        "own": str(own), "other": str(other), "bitwise_equal": bitwise, "max_rel_diff_vs_own": worst_vs_own,
        "worst_vs_reference": {"ratio_to_bound": worst_vs_ref[0], "tensor": worst_vs_ref[1]},
        "library_kernels": ours, "gpu_kernels_recorded": len(kernels), "kernel_devices_verified": verified,
        "gpu_activity_off_device": off[:20],
    }
    if problems:
        return result(name, FAIL, "; ".join(problems), **metrics)
    detail = f"on {other} from {own}: " + ("bitwise equal" if bitwise else f"max diff {worst_vs_own:.1e}")
    if verified:
        detail += f", all {len(kernels)} GPU kernels on {other}"
        if backend == "triton":
            # Forcing the backend already rules out a fallback; a name mismatch only weakens the report.
            detail += (f" ({len(ours)} of the library's)" if ours
                       else " (NOTE: none recognised by name as the library's)")
    elif cuda:
        why = "no GPU kernel was recorded" if not kernels else "the profiler does not tell the GPUs apart"
        detail += f", kernel placement not verified ({why})"
    return result(name, PASS, detail, **metrics)


def run_device_checks(ctx: Context) -> list[dict]:
    if ctx.device.type != "cuda":
        return [result("device", SKIP, "needs CUDA: every op on a GPU other than the current one")]
    count = torch.cuda.device_count()
    if count < 2:
        return [result("device", SKIP, f"needs 2 GPUs in this process's view, found {count}")]
    other = torch.device("cuda", (ctx.device.index + 1) % count)
    kernel_names = library_kernel_names()
    records = []
    ids = {}

    def calibrate() -> dict:
        ids["own"], ids["other"] = profiler_device_id(ctx.device), profiler_device_id(other)
        if ids["other"] is None or ids["own"] == ids["other"]:
            return result("device/profiler", PASS, "the profiler does not tell the GPUs apart here: "
                          "kernel placement will not be verified (results still are)", **ids)
        return result("device/profiler", PASS, f"the profiler numbers {ctx.device} as {ids['own']} and "
                      f"{other} as {ids['other']}", **ids)

    records += run_check(ctx, "device/profiler", calibrate)
    distinct = ids.get("other") is not None and ids.get("own") != ids.get("other")
    for name, dtype, run, tol_units in device_cases():
        full = f"device/{name}"
        records += run_check(ctx, full, lambda full=full, dtype=dtype, run=run, tol_units=tol_units:
                             check_device_case(full, dtype, run, ctx.device, other, kernel_names,
                                               tol_units=tol_units, other_profiler_id=ids["other"],
                                               verify_placement=distinct))
    return records


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "rotalabs_accel"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception as exc:  # a missing package is reported, not fatal
            out[name] = f"unavailable ({type(exc).__name__})"
    return out


def git_state() -> dict[str, str | bool | None]:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=30).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                                timeout=30).stdout
    except (OSError, subprocess.SubprocessError):  # no git here: the summary says so
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip()) if commit else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel modules are first imported
    ctx = Context(args)
    started = time.perf_counter()
    if ctx.rank == 0:
        print(f"world size {ctx.world}, device {args.device}, converted model's backend {args.backend}, "
              f"versions {versions()}", flush=True)
    records: list[dict] = []
    if "ddp" in args.checks or "fsdp2" in args.checks:
        records += run_check(ctx, "optimize_model", lambda: check_optimize_model(ctx))
    for engine in ("ddp", "fsdp2"):
        if engine in args.checks:
            try:
                records += run_engine(ctx, engine)
            except Exception as exc:  # the oracle or the engine set-up failed: every dtype fails
                traceback.print_exc()
                records += run_check(ctx, engine, lambda exc=exc, engine=engine: result(
                    engine, FAIL, f"{type(exc).__name__}: {exc}"))
            ctx.barrier()
    if "device" in args.checks:
        # Last: a kernel launched on the wrong GPU can leave this process's CUDA context unusable.
        records += run_device_checks(ctx)

    gathered: list = [None] * ctx.world if ctx.rank == 0 else []
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    mine = {"records": records, "device": str(ctx.device), "device_name": device_name}
    dist.gather_object(mine, gathered if ctx.rank == 0 else None, dst=0, group=ctx.cpu_group)
    ok = [True]
    if ctx.rank == 0:
        checks = merge([g["records"] for g in gathered])
        ok[0] = all(c["status"] != FAIL for c in checks) and any(c["status"] == PASS for c in checks)
        summary = {
            "ok": ok[0],
            "command": "torchrun --nproc-per-node {} {}".format(ctx.world, " ".join(sys.argv)),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "world_size": ctx.world,
            "device": args.device,
            "ranks": {i: {"device": g["device"], "device_name": g["device_name"]}
                      for i, g in enumerate(gathered)},
            "backend_of_converted_model": args.backend,
            "dtypes": args.dtypes,
            "steps": args.steps,
            "lr": args.lr,
            "fault": args.fault,
            "model": {**MODEL_CONFIG, "batch_per_rank": args.batch, "seq": args.seq},
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                   "NVSHMEM_DISABLE_NVLS", "TRITON_INTERPRET")},
            "versions": versions(),
            "git": git_state(),
            "seconds": round(time.perf_counter() - started, 1),
            "checks": checks,
        }
        print("\n==== summary ====")
        for c in checks:
            print(f"{c['status']:<4} {c['name']}: {c['detail']}")
        counts = {s: sum(c["status"] == s for c in checks) for s in (PASS, FAIL, SKIP)}
        print(f"{'PASS' if ok[0] else 'FAIL'}: {counts[PASS]} passed, {counts[FAIL]} failed, "
              f"{counts[SKIP]} skipped in {summary['seconds']} s", flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            print(f"wrote {args.out}")
    dist.broadcast_object_list(ok, src=0, group=ctx.cpu_group)
    dist.destroy_process_group()
    return 0 if ok[0] else 1


if __name__ == "__main__":
    sys.exit(main())
