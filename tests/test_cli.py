"""The command line (info, bench, demo) on this machine, and the benchmark report generator."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rotalabs_accel import cli
from rotalabs_accel._backend import ENV_VAR

ROOT = Path(__file__).resolve().parents[1]
ON_CPU = not torch.cuda.is_available()


def _run(args, capsys):
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_info_reports_versions_and_a_backend_per_op(capsys, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    code, out, _ = _run(["info"], capsys)
    assert code == 0
    assert f"torch         {torch.__version__}" in out
    assert "triton" in out and "Backend per op" in out
    for what in (
        "rmsnorm / TritonRMSNorm",
        "rmsnorm_residual_fused",
        "swiglu_fused / SwiGLU",
        "apply_rope / RotaryEmbedding",
        "int8_gemm / Int8Linear",
        "cross_entropy / causal_lm_loss",
        "embedding / TritonEmbedding",
    ):
        line = next(line for line in out.splitlines() if line.strip().startswith(what))
        if ON_CPU:
            assert " torch " in line and "tensors on CPU" in line, line
    if ON_CPU:
        assert "every op runs the PyTorch fallback" in out


def test_info_explains_a_forced_backend(capsys, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    _, out, _ = _run(["info"], capsys)
    assert f"backend forced to 'torch' ({ENV_VAR}=torch)" in out
    if ON_CPU and importlib.util.find_spec("triton") is not None:
        monkeypatch.setenv(ENV_VAR, "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        _, out, _ = _run(["info"], capsys)
        assert "error" in out and "TRITON_INTERPRET=1" in out


def test_demo_matches_and_says_which_backend_ran(capsys):
    original_rope = cli.apply_rotary_pos_emb
    code, out, _ = _run(["demo"], capsys)
    assert code == 0, out
    assert "Result: outputs and gradients match" in out
    assert "RMSNorm: 5 replaced" in out and "SwiGLU MLP: 2 replaced" in out
    assert "rotary: 1 patched" in out and "residual add + RMSNorm: 2 fused" in out
    assert "MISMATCH" not in out
    if ON_CPU:
        assert "No CUDA GPU found" in out
        assert out.count("PyTorch fallback") >= 4
    # The demo undoes its rotary patch.
    assert cli.apply_rotary_pos_emb is original_rope


def test_bench_json_on_this_machine(capsys):
    code, out, _ = _run(
        ["bench", "rmsnorm", "add_rmsnorm", "swiglu", "rope", "--json", "--no-compile", "--shapes", "small"],
        capsys,
    )
    result = json.loads(out)
    assert code == 0
    assert {"env", "ceilings", "rows", "notes"} <= result.keys()
    assert result["ceilings"]["copy_GBps"] > 0 and result["ceilings"]["matrix_TFLOPs"] > 0
    ops = {r["op"] for r in result["rows"]}
    assert ops == {"rmsnorm", "add_rmsnorm", "swiglu", "rope"}
    ours = [r for r in result["rows"] if r["impl"] == "rotalabs-accel"]
    assert len(ours) == len({(r["op"], r["shape"]) for r in result["rows"]})
    for r in ours:
        assert r["check"] == "ok", r
        assert r["ms"] > 0 and r["GBps"] > 0 and r["pct_of_ceiling"] > 0 and r["speedup"] > 0
    assert result["env"]["shapes"] == "small"
    assert result["env"]["command"].startswith("rotalabs-accel bench rmsnorm add_rmsnorm")
    if ON_CPU:
        assert any("No CUDA device" in n for n in result["notes"])


def test_bench_table_backward_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    code, out, err = _run(
        [
            "bench",
            "swiglu",
            "int8_linear",
            "--backward",
            "--no-compile",
            "--shapes",
            "small",
            "--plot",
            str(plot),
        ],
        capsys,
    )
    assert code == 0, out
    assert "forward+backward" in out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    for col in ("ms", "GB/s", "TFLOP/s", "% ceiling", "speedup", "check"):
        assert col in header
    assert "rotalabs-accel" in out and "int8_linear is inference only" in out
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if ON_CPU:
        assert "timing the PyTorch fallback on CPU" in err


def test_bench_rejects_unknown_ops(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "layernorm"])
    assert exc.value.code == 2
    assert "unknown op(s) layernorm" in capsys.readouterr().err


def test_agreement_check_flags_a_wrong_implementation():
    x = torch.randn(8, 16)

    def reference():
        return (x.double() * 2,)

    good = cli._Impl("eager", lambda: x * 2, lambda: x * 2)
    bad = cli._Impl("rotalabs-accel", lambda: x * 2.01, lambda: x * 2.01)
    case = cli._Case("op", "8x16", 1.0, None, [good, bad], reference, "memory")
    checks = cli._check(case, torch.float32)
    assert checks["eager"][0] == "ok"
    assert checks["rotalabs-accel"][0].startswith("MISMATCH")


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().out


def test_python_m_entry_point_without_importing_triton():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    code = textwrap.dedent(
        """
        import runpy, sys
        sys.argv = ["rotalabs-accel", "info"]
        try:
            runpy.run_module("rotalabs_accel", run_name="__main__")
        except SystemExit as exc:
            print("exit", exc.code)
        print("triton-imported", "triton" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "exit 0" in out.stdout and "Backend per op" in out.stdout
    if ON_CPU:
        assert "triton-imported False" in out.stdout


# --------------------------------------------------------------------------------------------------
# scripts/gen_benchmarks.py: BENCHMARKS.md and docs/performance.md from benchmarks/results/*.json
# --------------------------------------------------------------------------------------------------


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_benchmarks", ROOT / "scripts" / "gen_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE = {
    "env": {
        "date": "2026-11-24T10:00:00Z",
        "python": "3.11.7",
        "torch": "2.11.0+cu130",
        "triton": "3.6.0",
        "liger_kernel": "0.8.5",
        "gpu": "NVIDIA H100 80GB HBM3",
        "cuda": "13.0",
        "command": "python benchmarks/bench_rmsnorm.py",
        "git_commit": "abc1234",
    },
    "ceilings": {"copy": 3018.0},
    "rows": [
        {
            "op": "rmsnorm_fwd",
            "impl": "rotalabs-accel",
            "shape": [16384, 4096],
            "ms": 0.09,
            "GBps": 2900.0,
            "TFLOPs": None,
            "pct_of_ceiling": 96.1,
            "note": "",
            "extra": {},
        },
        {
            "op": "rmsnorm_fwd",
            "impl": "liger-kernel",
            "shape": [16384, 4096],
            "ms": 0.095,
            "GBps": 2832.0,
            "TFLOPs": None,
            "pct_of_ceiling": 93.8,
            "note": "peer",
            "extra": {},
        },
    ],
    "notes": ["a note from the run"],
}


def test_gen_benchmarks_renders_results(tmp_path):
    gen = _gen_module()
    results = tmp_path / "results"
    results.mkdir()
    (results / "rmsnorm-h100-2026-11-24.json").write_text(json.dumps(SAMPLE))
    (results / "rmsnorm-h100-2026-11-24.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    outputs = gen.generate(results, tmp_path / "BENCHMARKS.md", tmp_path / "docs")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    page = (tmp_path / "docs" / "performance.md").read_text()
    assert len(outputs) >= 2
    for doc in (text, page):
        assert "NVIDIA H100 80GB HBM3" in doc and "torch 2.11.0+cu130" in doc and "2026-11-24" in doc
        assert "| rmsnorm_fwd | rotalabs-accel | 16384x4096 |" in doc and "2,900" in doc
        assert "liger-kernel" in doc and "a note from the run" in doc
        assert "python benchmarks/bench_rmsnorm.py" in doc
    assert (tmp_path / "docs" / "assets" / "benchmarks" / "rmsnorm-h100-2026-11-24.png").exists()
    assert "assets/benchmarks/rmsnorm-h100-2026-11-24.png" in page


def test_gen_benchmarks_without_results(tmp_path):
    gen = _gen_module()
    (tmp_path / "results").mkdir()
    gen.generate(tmp_path / "results", tmp_path / "BENCHMARKS.md", tmp_path / "docs")
    assert "No results committed yet" in (tmp_path / "BENCHMARKS.md").read_text()
    assert "No results committed yet" in (tmp_path / "docs" / "performance.md").read_text()


def test_committed_benchmark_pages_are_up_to_date(tmp_path):
    gen = _gen_module()
    gen.generate(ROOT / "benchmarks" / "results", tmp_path / "BENCHMARKS.md", tmp_path / "docs")
    assert (ROOT / "BENCHMARKS.md").read_text() == (tmp_path / "BENCHMARKS.md").read_text(), (
        "BENCHMARKS.md is stale: run `python scripts/gen_benchmarks.py`"
    )
    assert (ROOT / "docs" / "performance.md").read_text() == (
        tmp_path / "docs" / "performance.md"
    ).read_text(), "docs/performance.md is stale: run `python scripts/gen_benchmarks.py`"


# --------------------------------------------------------------------------------------------------
# The documentation site: every public name has an API entry, every nav page exists
# --------------------------------------------------------------------------------------------------


def test_api_reference_covers_every_public_name():
    import rotalabs_accel

    text = (ROOT / "docs" / "api.md").read_text()
    documented = {line.split()[1].rsplit(".", 1)[-1] for line in text.splitlines() if line.startswith("::: ")}
    public = set(rotalabs_accel.__all__) - {"__version__"}
    assert public <= documented, f"missing from docs/api.md: {sorted(public - documented)}"
    for line in text.splitlines():
        if line.startswith("::: "):
            path = line.split()[1]
            module, name = path.rsplit(".", 1)
            assert hasattr(importlib.import_module(module), name), path


def test_every_nav_page_exists():
    nav = re.findall(r"^\s+- [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert "modules.md" in nav and "performance.md" in nav and "api.md" in nav
    for page in nav:
        assert (ROOT / "docs" / page).exists(), page


@pytest.mark.parametrize("page", ["index.md", "getting-started.md", "functional.md", "quantization.md"])
def test_documentation_examples_run(page, tmp_path, monkeypatch, capsys):
    """Every ```python block of these pages runs as written (```py marks illustrative fragments)."""
    monkeypatch.chdir(tmp_path)  # the quantization page writes a safetensors file
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)
    assert blocks
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/{page}[{i}]", "exec"), {})
