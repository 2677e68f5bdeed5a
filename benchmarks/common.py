"""Shared benchmark machinery: timing, ceilings, environment and result files.

Every benchmark script times this library beside its peers in ONE process on ONE device, with
``triton.testing.do_bench`` (CUDA events, median of many runs), and writes a JSON + Markdown file under
``benchmarks/results/`` carrying the device, versions, date and the command that produced it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Llama-3-8B-shaped transformers LlamaConfig arguments (random weights; the end-to-end benchmarks)
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)


@dataclass
class Row:
    op: str
    impl: str
    shape: list
    ms: float
    GBps: float | None = None
    TFLOPs: float | None = None
    pct_of_ceiling: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def gpu_slug() -> str:
    """The current CUDA device's name as a file-name slug, e.g. ``h100-80gb-hbm3``."""
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def bench_ms(fn: Callable[[], object], warmup: int = 50, rep: int = 200) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_replay_ms(fn: Callable[[], object], warmup: int = 50, rep: int = 200) -> float | None:
    """Median milliseconds of replaying ``fn``'s GPU work captured in a CUDA graph, or ``None`` when
    ``fn`` cannot be captured.

    A call timed with :func:`bench_ms` is the longer of its GPU time and the host time to issue it;
    for forward+backward steps of a few hundred microseconds the host side (Python, autograd, the
    launches) is comparable and varies between machines and runs. A graph replay issues the same
    kernels without any of that, so its time is the GPU's alone: what the step costs inside a
    training step whose host runs ahead. ``fn`` runs a few times on a side stream first (as capture
    requires) and once under capture; tensors it allocates come from the graph's private pool.
    """
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        ms = bench_ms(graph.replay, warmup=warmup, rep=rep)
        del graph
        return ms
    except Exception as exc:  # a step that cannot be captured is reported, not a crash
        print(f"graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", flush=True)
        try:
            torch.cuda.synchronize()
        except Exception:
            pass  # the failed capture's own stream may still refuse; the benchmark's stream does not
        return None


GRAPH_NOTE = "CUDA-graph replay of the same step: GPU time alone, no host cost"

# A benchmark row is one do_bench median; at tens of microseconds two runs of the same kernel differ by
# a few percent. Where ours and the fastest peer come within CLOSE_CALL of each other, the two are timed
# again in RECHECK_ROUNDS alternating rounds and the verdict note gives both medians and ranges.
CLOSE_CALL = 0.03
RECHECK_ROUNDS = 5


def alternating_rounds(
    fns: dict[str, Callable[[], object]], rounds: int, time_ms: Callable[[Callable[[], object]], float]
) -> dict[str, list[float]]:
    """Milliseconds of each of ``fns``, timed once per round by ``time_ms`` for ``rounds`` rounds.

    Every other round runs them in reverse order, so no implementation always runs right after the
    same other one (clocks and what L2 holds drift over a run)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(float(time_ms(fns[name])))
    return times


def recheck_close_call(
    rates: dict[str, float], fns: dict[str, Callable[[], object]], ours: str, is_peer: Callable[[str], bool],
    rounds: int, time_ms: Callable[[Callable[[], object]], float], nbytes: float,
) -> str | None:
    """Where ``ours`` and the fastest peer (an implementation ``is_peer`` accepts) of one row group lie
    within ``CLOSE_CALL`` of each other by ``rates`` (GB/s), time the two again in ``rounds``
    alternating rounds and return :func:`close_call_note`'s verdict; ``None`` for no close call."""
    peers = {name: rate for name, rate in rates.items() if name != ours and is_peer(name)}
    if ours not in rates or not peers:
        return None
    peer = max(peers, key=peers.get)
    if abs(rates[ours] / peers[peer] - 1) > CLOSE_CALL:
        return None
    times = alternating_rounds({ours: fns[ours], peer: fns[peer]}, rounds, time_ms)
    return close_call_note(times, ours, peer, nbytes)


def close_call_note(times: dict[str, list[float]], ours: str, peer: str, nbytes: float) -> str:
    """The verdict of alternating rounds (:func:`alternating_rounds`) between ``ours`` and ``peer``:
    each one's median rate and range in GB/s of ``nbytes``, the lead of ours by the medians, and
    whether the two ranges overlap (then this run does not separate them)."""
    def rates(name):
        ms = times[name]
        return gbps(nbytes, statistics.median(ms)), gbps(nbytes, max(ms)), gbps(nbytes, min(ms))

    (o_med, o_lo, o_hi), (p_med, p_lo, p_hi) = rates(ours), rates(peer)
    lead = 100 * (o_med / p_med - 1)
    overlap = "ranges overlap" if o_lo <= p_hi and p_lo <= o_hi else "ranges apart"
    verdict = "ahead" if lead >= 0 else "BEHIND"
    return (f"{len(times[ours])} alternating rounds: {ours} median {o_med:,.0f} GB/s "
            f"({o_lo:,.0f}-{o_hi:,.0f}), {peer} {p_med:,.0f} ({p_lo:,.0f}-{p_hi:,.0f}): "
            f"{verdict} by {lead:+.1f}%, {overlap}")


def copy_ceiling_gbps(nbytes: int = 2 * 1024**3) -> tuple[float, float]:
    """Device-to-device copy rate (bytes read + written per second, in GB/s) and its time in ms."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * n * 2 / ms / 1e6, ms


def gemm_ceiling_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = bench_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e6


def environment() -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        from importlib.metadata import version

        env["liger_kernel"] = version("liger-kernel")
    except Exception:
        env["liger_kernel"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["sm_count"] = props.multi_processor_count
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
        except Exception:
            env["driver"] = None
    # A copy of the tree without its history (the GPU machine's) names its commit in this variable.
    env["git_commit"] = os.environ.get("ROTALABS_ACCEL_COMMIT") or _git_commit()
    return env


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except Exception:
        return None


def write_diagnostic(stem: str, records: list, out_dir: Path, **extra) -> Path:
    """Write a diagnostic script's ``<stem>-<gpu>-<date>.json`` (environment, ``extra``, records)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}-{gpu_slug()}-{_dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"env": environment(), **extra, "records": records}, indent=1))
    return path


def write_records(out_dir: Path, stem: str, script: str, argv: list[str] | None, records: list) -> Path:
    """Write a script's raw ``records`` with the environment and the command that made them to
    ``<out_dir>/<stem>-<gpu>-<date>.json``; returns the path."""
    env = environment()
    env["command"] = f"python3 {script} " + " ".join(argv if argv is not None else sys.argv[1:])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}-{gpu_slug()}-{env['date'][:10]}.json"
    path.write_text(json.dumps({"env": env, "records": records}, indent=1))
    print("wrote", path)
    return path


def write_results(name: str, rows: list[Row], ceilings: dict, notes: list[str] | None = None,
                  out_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` and ``<name>.md``; returns the JSON path."""
    out_dir = Path(out_dir or os.environ.get("ROTALABS_BENCH_OUT", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    payload = {"env": env, "ceilings": ceilings, "rows": [asdict(r) for r in rows], "notes": notes or []}
    jpath = out_dir / f"{name}.json"
    jpath.write_text(json.dumps(payload, indent=1))
    (out_dir / f"{name}.md").write_text(markdown_table(payload))
    return jpath


def markdown_table(payload: dict) -> str:
    env, ceil = payload["env"], payload["ceilings"]
    lines = [
        f"Device: {env.get('gpu', 'cpu')} · torch {env['torch']} · Triton {env.get('triton')} · "
        f"liger-kernel {env.get('liger_kernel')} · {env['date']} · commit {env.get('git_commit')}",
        "",
        f"Command: `{env['command']}`",
        "",
        "Ceilings measured in the same run: "
        + ", ".join(f"{k} {v:,.0f}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in ceil.items()),
        "",
        "| op | impl | shape | ms | GB/s | TFLOP/s | % of ceiling | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        gb = f"{r['GBps']:,.0f}" if r.get("GBps") else ""
        tf = f"{r['TFLOPs']:,.1f}" if r.get("TFLOPs") else ""
        pct = f"{r['pct_of_ceiling']:.0f}%" if r.get("pct_of_ceiling") else ""
        shape = "x".join(str(s) for s in r["shape"])
        cells = [r["op"], r["impl"], shape, f"{r['ms']:.4f}", gb, tf, pct, r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    if payload.get("notes"):
        lines += ["", *[f"- {n}" for n in payload["notes"]]]
    return "\n".join(lines) + "\n"


def try_liger():
    """Return the ``liger_kernel`` module when installed, else ``None``."""
    try:
        import liger_kernel  # noqa: F401

        return liger_kernel
    except Exception:
        return None
