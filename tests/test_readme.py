"""The README's usage example runs as written (on the CPU here, through the PyTorch fallback)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    text = README.read_text()
    match = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S)
    assert match, "README has no '## Usage' python block"
    namespace: dict = {}
    exec(compile(match.group(1), str(README), "exec"), namespace)  # noqa: S102 - the project's own README
    from rotalabs_accel import TritonRMSNorm

    assert namespace["q_rot"].shape == namespace["q"].shape
    assert namespace["k_rot"].shape == namespace["k"].shape
    assert not torch.equal(namespace["q_rot"], namespace["q"])  # rotated, not passed through
    assert isinstance(namespace["model"][0], TritonRMSNorm)
    assert namespace["y"].shape == (2, 512, 4096)
