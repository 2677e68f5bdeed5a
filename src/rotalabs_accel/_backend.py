"""Backend dispatch: the one place that decides whether an op runs a Triton kernel or the PyTorch
reference.

Rules, in order:

1. The requested backend is the innermost :func:`use_backend` / :func:`set_backend` value, else the
   ``ROTALABS_ACCEL_BACKEND`` environment variable (``auto`` | ``triton`` | ``torch``), else ``auto``.
2. ``torch``: always the PyTorch reference.
3. ``auto``: Triton when it is importable, every tensor is on a CUDA device and the op has a kernel for
   the given arguments; otherwise the reference. Never raises.
4. ``triton``: Triton, or a clear error saying why it cannot run. CPU tensors are accepted only under
   ``TRITON_INTERPRET=1`` (Triton's interpreter; this is how CI without a GPU runs the kernels).
5. Whatever was requested, meta tensors take the reference (it computes their shapes and dtypes), and
   so does every call made while a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) or
   forward-mode AD (``torch.autograd.forward_ad.dual_level``) is active: the reference is plain
   PyTorch, which those transforms see through; a kernel would see neither batch dimensions nor
   tangents. A forced ``triton`` raises there instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.autograd import forward_ad as _forward_ad

from .utils import environ_get, is_triton_available, is_triton_interpreter

__all__ = [
    "BACKENDS", "get_backend", "set_backend", "use_backend", "select_backend", "kernels_unobstructed",
    "check_same_device",
]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "ROTALABS_ACCEL_BACKEND"

_override: str | None = None
_transforms_active = torch._C._are_functorch_transforms_active


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The requested backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Example:
        >>> from rotalabs_accel import get_backend, use_backend
        >>> with use_backend("torch"):
        ...     get_backend()
        'torch'
    """
    if _override is not None:
        return _override
    env = environ_get(ENV_VAR)
    if env is None or env == "":
        return "auto"
    env = env.strip().lower()
    if env not in BACKENDS:
        raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {env!r}")
    return env


def set_backend(name: str | None) -> None:
    """Force a backend for the whole process (``None`` returns control to the environment variable).

    Example:
        >>> from rotalabs_accel import set_backend, get_backend
        >>> set_backend("torch"); get_backend()
        'torch'
        >>> set_backend(None)
    """
    global _override
    _override = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager forcing a backend inside a block; restores the previous choice on exit.

    Example:
        >>> import torch
        >>> from rotalabs_accel import rmsnorm, use_backend
        >>> with use_backend("torch"):
        ...     y = rmsnorm(torch.randn(2, 8), torch.ones(8))
    """
    global _override
    previous = _override
    _override = _check_name(name)
    try:
        yield
    finally:
        _override = previous


def transform_reason() -> str | None:
    """Why a kernel cannot serve the current call, if a ``torch.func`` transform or forward-mode AD is
    active (eager only: under ``torch.compile`` the compiler traces the ops itself), else ``None``.

    Example:
        >>> import torch
        >>> transform_reason() is None
        True
        >>> torch.func.vmap(lambda t: torch.tensor(transform_reason() is not None))(torch.ones(2))
        tensor([True, True])
    """
    # the two cheap checks first: this runs on every kernel-eligible call
    dual = _forward_ad._current_level >= 0
    if not (dual or _transforms_active()) or torch.compiler.is_compiling():
        return None
    if dual:
        return "forward-mode AD (torch.autograd.forward_ad.dual_level) is active"
    return "a torch.func transform (vmap, grad, jacrev, ...) is active"


def kernels_unobstructed(on_cpu: bool = False) -> bool:
    """Whether nothing outside an op's own arguments keeps a call from its kernel, as
    :func:`select_backend` decides it for tensors that a kernel serves: the requested backend allows
    Triton, Triton imports, and no ``torch.func`` transform or forward-mode AD is active. CUDA
    tensors (``on_cpu=False``): backend ``triton``, or ``auto`` with Triton's interpreter off. CPU
    tensors: backend ``triton`` under the interpreter.

    For the ops' repeat paths, which already know their arguments qualify and are not being traced by
    ``torch.compile`` (the caller checks): where this is true, :func:`select_backend` answers
    ``"triton"`` for those arguments without raising.

    Example:
        >>> from rotalabs_accel import use_backend
        >>> with use_backend("torch"):
        ...     kernels_unobstructed()
        False
    """
    requested = _override if _override is not None else get_backend()
    if requested == "torch" or not is_triton_available():
        return False
    if on_cpu:
        if requested != "triton" or not is_triton_interpreter():
            return False
    elif requested == "auto" and is_triton_interpreter():
        return False
    return transform_reason() is None


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """Raise a ``ValueError`` naming the arguments when tensors live on different devices."""
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(
                f"{op}: all tensors must be on one device, but {first} is on {device} "
                f"and {name} is on {t.device}"
            )
    assert device is not None
    return device


def select_backend(op: str, *tensors: torch.Tensor | None, kernel_reason: str | None = None) -> str:
    """Decide ``"triton"`` or ``"torch"`` for one call of ``op``.

    Args:
        op: the op's name, used in error messages.
        *tensors: the op's tensor arguments (``None`` entries are ignored).
        kernel_reason: ``None`` when a Triton kernel exists for these arguments, otherwise a short
            sentence saying why not (for example ``"the interleaved layout has no kernel"``). Under
            ``auto`` such calls fall back quietly; under ``triton`` they raise.
    """
    requested = _override if _override is not None else get_backend()
    if requested == "torch":
        return "torch"
    all_cuda = True
    for t in tensors:
        if t is not None and not t.is_cuda:
            all_cuda = False
            break
    if requested == "auto":
        if all_cuda and kernel_reason is None and is_triton_available() and not is_triton_interpreter():
            return "torch" if transform_reason() is not None else "triton"
        return "torch"
    # requested == "triton"
    if not all_cuda and any(t is not None and t.is_meta for t in tensors):
        return "torch"
    reason = transform_reason()
    if reason is not None:
        raise RuntimeError(
            f"{op}: backend 'triton' was forced but {reason}: the kernels see neither its batch "
            "dimensions nor its tangents; use backend 'auto' or 'torch' (the PyTorch reference) there"
        )
    if not is_triton_available():
        raise RuntimeError(f"{op}: backend 'triton' was forced but the triton package cannot be imported")
    if kernel_reason is not None:
        raise NotImplementedError(f"{op}: backend 'triton' was forced but {kernel_reason}")
    if not all_cuda and not is_triton_interpreter():
        raise RuntimeError(
            f"{op}: backend 'triton' was forced on CPU tensors; set TRITON_INTERPRET=1 (before importing "
            "triton) to run the kernels through Triton's interpreter, or use backend 'auto'/'torch'"
        )
    return "triton"
