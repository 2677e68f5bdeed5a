"""Low-overhead kernel launches shared by every op family.

Triton's ``kernel[grid](...)`` re-derives the kernel's specialization from every argument on every
call, which costs several times the launch itself for small inputs (decode shapes, small batches).
:func:`launch` keeps the compiled kernel that Triton's own first launch returns and, for later calls
whose arguments specialize identically, launches it directly. The cache key holds everything
specialization reads, at a finer grain than Triton uses (so a hit can only be the same kernel): each
tensor's dtype and low address bits, each integer's low bits, whether it equals 1 and its width
class, the constexprs, the launch options and the device. Under the interpreter, on CPU tensors, or
if a direct launch is ever refused by this Triton version, every call takes Triton's ordinary path.
"""

from __future__ import annotations

import torch

__all__ = ["launch", "arg_key", "direct_launch_enabled"]

_COMPILED: dict[tuple, tuple] = {}
_direct_launch_ok = True


def direct_launch_enabled() -> bool:
    """Whether direct launches are still in use (False once this Triton refused one)."""
    return _direct_launch_ok


def arg_key(args: tuple) -> tuple:
    """The part of the cache key that depends on the runtime arguments."""
    return tuple(
        (a.dtype, a.data_ptr() & 15)
        if isinstance(a, torch.Tensor)
        # floats are passed as fp32 and never specialized on their value
        else (a == 1, a & 15, -2147483648 <= a <= 2147483647) if type(a) is int else None
        for a in args
    )


def launch(kernel, grid: tuple, args: tuple, num_warps: int, num_stages: int | None = None,
           **constexprs) -> None:
    """Launch ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)`` cheaply.

    Args:
        kernel: a ``@triton.jit`` function whose runtime arguments come first and constexprs last.
        grid: up to three grid dimensions.
        args: the runtime arguments, positionally (tensors, ints, floats, ``None``).
        num_warps, num_stages: launch options (``num_stages=None`` keeps Triton's default).
        **constexprs: the constexpr arguments, by name.
    """
    global _direct_launch_ok
    if len(grid) < 3:
        grid = tuple(grid) + (1,) * (3 - len(grid))  # compiled kernels index all three grid dimensions
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    device = args[0].get_device()
    if _direct_launch_ok and device >= 0:
        key = (kernel, device, num_warps, num_stages, tuple(constexprs.values()), arg_key(args))
        entry = _COMPILED.get(key)
        if entry is not None:
            compiled, tail = entry
            try:
                compiled[grid](*args, *tail)
                return
            except Exception:
                # Argument parsing failed before anything was launched: this Triton's compiled
                # kernels take a different calling convention. Stay on the ordinary path from now on.
                _direct_launch_ok = False
        compiled = kernel[grid](*args, **constexprs, **options)
        if _direct_launch_ok and compiled is not None and hasattr(compiled, "__getitem__"):
            names = kernel.arg_names[len(args):]
            _COMPILED[key] = (compiled, tuple(constexprs[name] for name in names))
        return
    kernel[grid](*args, **constexprs, **options)
