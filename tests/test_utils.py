"""Device and environment queries (rotalabs_accel.utils)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

from rotalabs_accel import get_device, get_device_properties, is_cuda_available, is_triton_available, utils


def test_get_device_explicit_and_default(monkeypatch):
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(torch.device("meta")) == torch.device("meta")
    assert get_device("cuda:1") == torch.device("cuda", 1)  # resolving a name touches no driver
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_device() == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_get_device_defaults_to_the_current_cuda_device():
    assert get_device() == torch.device("cuda", torch.cuda.current_device())


def test_is_cuda_available_follows_torch(monkeypatch):
    assert is_cuda_available() is torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert is_cuda_available() is False


def test_is_triton_available(monkeypatch):
    expected = importlib.util.find_spec("triton") is not None
    assert is_triton_available() is expected
    monkeypatch.setattr(utils, "_triton_state", None)
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    try:
        assert is_triton_available() is False
    finally:
        monkeypatch.undo()
        utils._triton_state = None
    assert is_triton_available() is expected


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("", False), ("true", True)])
def test_is_triton_interpreter(monkeypatch, value, expected):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert utils.is_triton_interpreter() is expected


def test_is_triton_interpreter_unset(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert utils.is_triton_interpreter() is False


def test_cpu_properties():
    props = get_device_properties("cpu")
    assert props["type"] == "cpu" and props["name"] == "cpu"
    assert props["num_threads"] == torch.get_num_threads()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_properties():
    props = get_device_properties(0)
    assert props["type"] == "cuda" and props["index"] == 0
    assert props["name"] == torch.cuda.get_device_name(0)
    assert props["compute_capability"] == torch.cuda.get_device_capability(0)
    assert props["total_memory_bytes"] > 0 and props["multi_processor_count"] > 0
    assert get_device_properties("cuda:0")["name"] == props["name"]
