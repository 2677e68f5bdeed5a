"""The multi-process script (tests/distributed/run_multi_gpu.py) on CPU: two gloo processes under torchrun.

What runs here is what the 2-GPU run does minus the GPUs: the small Llama and its ``optimize_model``
copy trained under DDP and under FSDP2 (``fully_shard``), compared with the float64 oracle by the
tolerance rule of tests/helpers.py, with

* the PyTorch reference backend (what a CPU user gets), in fp32 and bf16;
* the Triton kernels through Triton's interpreter (fp32 only: the interpreter truncates float32 to
  bfloat16 where GPUs round to nearest, which doubles bf16 errors that the GPU would not make);
* a deliberately wrong epsilon in the converted model's RMSNorms, which must fail the comparison
  (the rule is not vacuous).

The per-GPU device checks report SKIP here. Each run uses a free port, so the tests can run in
parallel (pytest -n 2).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytest.importorskip("transformers")

SCRIPT = Path(__file__).with_name("run_multi_gpu.py")
TIMEOUT_S = 240


def _fsdp2_missing() -> str | None:
    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # noqa: F401
        except ImportError:
            return "this torch has no FSDP2 (fully_shard)"
    return None


pytestmark = pytest.mark.skipif(_fsdp2_missing() is not None, reason=str(_fsdp2_missing()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, *args: str) -> tuple[int, dict | None, str]:
    """Run the script with 2 CPU processes; returns (exit status, JSON summary or None, output)."""
    out = tmp_path / "summary.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(SCRIPT), "--device", "cpu", "--out", str(out), *args,
    ]
    # One thread per process: two processes share this machine's cores with the other pytest worker.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the two workers it started
        output, _ = proc.communicate()
        pytest.fail(f"the script did not finish in {TIMEOUT_S} s:\n{output[-4000:]}")
    summary = json.loads(out.read_text()) if out.exists() else None
    return proc.returncode, summary, output


def _by_name(summary: dict) -> dict[str, dict]:
    return {c["name"]: c for c in summary["checks"]}


def test_ddp_and_fsdp2_reference_backend(tmp_path):
    rc, summary, output = _torchrun(tmp_path, "--dtypes", "fp32,bf16")
    assert rc == 0, output[-6000:]
    assert summary is not None and summary["ok"], output[-6000:]
    checks = _by_name(summary)
    for name in ("optimize_model", "ddp/fp32", "ddp/bf16", "fsdp2/fp32", "fsdp2/bf16-mixed"):
        assert checks[name]["status"] == "PASS", (name, checks[name]["detail"])
        assert set(checks[name]["ranks"]) == {"0", "1"}, name  # both ranks reported
    assert checks["device"]["status"] == "SKIP"
    assert summary["world_size"] == 2 and summary["env"]["NCCL_NVLS_ENABLE"] == "0"
    converted = checks["optimize_model"]["ranks"]["0"]["metrics"]["converted"]
    assert converted == {"rmsnorm": 5, "mlp": 2, "rope": 1, "residual_norm": 2}
    for name in ("ddp/fp32", "fsdp2/fp32"):
        metrics = checks[name]["ranks"]["0"]["metrics"]
        # The losses really were trained (they move) and the comparison ran on every kind of tensor.
        losses = metrics["losses"]["optimized"]
        assert len(losses) == 4 and len(set(losses)) == 4
        assert {"loss", "grad", "update"} <= set(metrics)
    assert checks["ddp/fp32"]["ranks"]["0"]["metrics"]["ranks_disagree"] == []
    assert checks["fsdp2/fp32"]["ranks"]["0"]["metrics"]["sharding_problems"] == []


_LOOP_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def _count(out, n):
    acc = 0
    for _ in range(0, n):
        acc += 1
    tl.store(out, acc)
o = torch.zeros(1, dtype=torch.int32)
_count[(1,)](o, 3)
assert int(o) == 3
"""


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run our kernels in this environment, or None.

    Some Triton releases' interpreters convert a loop bound with ``int()`` of a one-element array,
    which NumPy 2.x refuses; the kernels themselves compile fine for GPUs there.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _LOOP_PROBE], env=env, capture_output=True, text=True,
                         timeout=120)
    if run.returncode == 0:
        return None
    import numpy
    import triton

    last = (run.stderr.strip().splitlines() or ["?"])[-1]
    return (f"Triton {triton.__version__}'s interpreter cannot run a loop with a runtime bound under "
            f"NumPy {numpy.__version__}: {last}")


@pytest.mark.interpreter
def test_ddp_and_fsdp2_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    problem = _interpreter_problem()
    if problem is not None:
        pytest.skip(problem)
    rc, summary, output = _torchrun(
        tmp_path, "--backend", "triton", "--dtypes", "fp32", "--steps", "2", "--seq", "8",
        "--checks", "ddp,fsdp2",
    )
    assert rc == 0, output[-6000:]
    checks = _by_name(summary)
    assert summary["env"]["TRITON_INTERPRET"] == "1" and summary["backend_of_converted_model"] == "triton"
    for name in ("optimize_model", "ddp/fp32", "fsdp2/fp32"):
        assert checks[name]["status"] == "PASS", (name, checks[name]["detail"])


def test_a_wrong_epsilon_fails_the_comparison(tmp_path):
    rc, summary, output = _torchrun(tmp_path, "--fault", "eps", "--checks", "ddp", "--steps", "2",
                                    "--seq", "8")
    assert rc != 0, output[-6000:]
    assert summary is not None and not summary["ok"]
    check = _by_name(summary)["ddp/fp32"]
    assert check["status"] == "FAIL", check["detail"]
    failed = check["ranks"]["0"]["metrics"]["failed_tensors"]
    assert "loss/mean_over_ranks" in failed and any(k.startswith("grad/") for k in failed)
