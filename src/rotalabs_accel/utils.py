"""Device and environment queries.

Nothing here runs at import time: every function asks only when it is called, so importing
``rotalabs_accel`` never initialises a CUDA context on a machine without (or with) a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import torch

__all__ = [
    "get_device",
    "is_cuda_available",
    "is_triton_available",
    "is_triton_interpreter",
    "get_device_properties",
    "autocast_enabled",
]


def is_cuda_available() -> bool:
    """Return ``True`` when PyTorch sees at least one CUDA device.

    Example:
        >>> from rotalabs_accel import is_cuda_available
        >>> isinstance(is_cuda_available(), bool)
        True
    """
    return torch.cuda.is_available()


_triton_state: bool | None = None

# os.environ re-encodes the name and decodes the value on every lookup; the dispatch reads two
# variables per op call, so it reads the mapping os.environ keeps them in (kept in step by every
# os.environ / os.putenv-through-os.environ write, as monkeypatch.setenv does) when that is available.
_ENV_DATA = getattr(os.environ, "_data", None)
if not isinstance(_ENV_DATA, dict):
    _ENV_DATA = None


_ENV_KEYS: dict[str, Any] = {}  # name -> its key in _ENV_DATA, encoded once


def environ_get(name: str) -> str | None:
    """``os.environ.get(name)``, cheaper: the dispatch calls it on every op call."""
    if _ENV_DATA is None:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.environ.encodekey(name)
    value = _ENV_DATA.get(key)
    return None if value is None else os.environ.decodevalue(value)


def _triton_importable() -> bool:
    if "triton" in sys.modules:
        return True
    if torch.compiler.is_compiling():
        # dynamo imports triton itself when it is installed, and refuses to trace importlib
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401  (importing triton does not touch the GPU driver)
    except Exception:  # a broken install counts as absent
        return False
    return True


def is_triton_available() -> bool:
    """Return ``True`` when the ``triton`` package can be imported.

    This says nothing about a GPU: with ``TRITON_INTERPRET=1`` Triton kernels run on CPU tensors
    through Triton's interpreter.

    Example:
        >>> from rotalabs_accel import is_triton_available
        >>> isinstance(is_triton_available(), bool)
        True
    """
    global _triton_state
    if _triton_state is None:
        _triton_state = _triton_importable()
    return _triton_state


def is_triton_interpreter() -> bool:
    """Return ``True`` when ``TRITON_INTERPRET=1`` is set (kernels then run on CPU tensors)."""
    return environ_get("TRITON_INTERPRET") not in (None, "", "0")


def module_tensor(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """``getattr(module, name)`` for a registered parameter or buffer, read from the module's own dicts.

    ``Module.__getattr__`` (the lookup behind every parameter and buffer attribute) is Python code that
    costs more host time than the rest of a decode-sized forward's bookkeeping; the modules' forwards
    read their tensors through this instead. The same order as ``__getattr__`` (parameters, then
    buffers); ``torch.func.functional_call`` swaps these dict entries, so its tensors are seen. A name in
    neither dict (a parametrization moves it behind a property) goes through ``getattr``.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 3)
        >>> module_tensor(layer, "weight") is layer.weight
        True
    """
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; ``False`` for device types autocast does not know
    (``torch.is_autocast_enabled`` raises for those, e.g. ``"meta"``)."""
    if device_type not in ("cuda", "cpu") and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def get_device(device: str | torch.device | None = None) -> torch.device:
    """Resolve the device to use.

    Args:
        device: an explicit device (``"cuda:1"``, ``torch.device("cpu")``, ...). ``None`` picks the
            current CUDA device when one exists, else the CPU.

    Returns:
        A ``torch.device``.

    Example:
        >>> from rotalabs_accel import get_device
        >>> get_device("cpu")
        device(type='cpu')
    """
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_device_properties(device: str | torch.device | int | None = None) -> dict[str, Any]:
    """Describe a device as a plain dictionary.

    For a CUDA device: ``name``, ``compute_capability`` (tuple), ``total_memory_bytes``,
    ``multi_processor_count``, ``l2_cache_bytes`` (when PyTorch reports it). For the CPU:
    ``name="cpu"`` and the thread count torch uses.

    Example:
        >>> from rotalabs_accel import get_device_properties
        >>> get_device_properties("cpu")["type"]
        'cpu'
    """
    if isinstance(device, int):
        device = torch.device("cuda", device)
    dev = get_device(device)
    if dev.type != "cuda":
        return {"type": dev.type, "name": dev.type, "num_threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(dev)
    out: dict[str, Any] = {
        "type": "cuda",
        "index": dev.index if dev.index is not None else torch.cuda.current_device(),
        "name": props.name,
        "compute_capability": (props.major, props.minor),
        "total_memory_bytes": props.total_memory,
        "multi_processor_count": props.multi_processor_count,
    }
    l2 = getattr(props, "L2_cache_size", None)
    if l2 is not None:
        out["l2_cache_bytes"] = l2
    return out
