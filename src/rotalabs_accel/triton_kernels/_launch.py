"""Low-overhead kernel launches shared by every op family.

Triton's ``kernel[grid](...)`` re-derives the kernel's specialization from every argument on every
call, which costs several times the launch itself for small inputs (decode shapes, small batches)
and, in a training step, leaves the GPU idle between the forward and the backward kernels while the
host catches up. Two doors avoid that:

:func:`launch`
    The general entry. It keeps the compiled kernel that Triton's own first launch returns and, for
    later calls whose arguments specialize identically, launches it directly. The cache key holds
    everything specialization reads, at a finer grain than Triton uses (so a hit can only be the
    same kernel): each tensor's dtype and low address bits, each integer's low bits, whether it
    equals 1 and its width class, the type of every other argument (``None`` becomes a constexpr,
    a float does not), the constexprs by name, the launch options and the device; the grid is not
    part of it (a new row count reuses the compiled kernel).

:class:`KernelLaunch`
    For callers that launch one kernel many times with the same grid, options, constexprs and
    integer arguments (the op layers cache one per input shape). The caller passes a small key that
    summarizes what can still change between its calls (in practice the low address bits of the
    tensors), so a launch costs one dictionary lookup on top of Triton's own launcher. Its
    :meth:`~KernelLaunch.launch_ptrs` takes the tensors' addresses as integers instead, which the
    callers read for the key anyway: the C launcher then skips a ``data_ptr()`` call and a driver
    query per tensor.

Both keep, per compiled kernel and grid, the cheapest callable that launches it. With the Triton
version this was checked against (3.6, whose launcher's calling convention is verified before use;
see :func:`_c_launcher`) that is the compiled launcher's C entry called with the full argument list,
skipping the three Python frames Triton puts in front of it (grid runner, launch-metadata hook
check, scratch allocation); that matters because every microsecond of host time between a forward and
a backward launch can leave the GPU idle. Kernels that need global or profile scratch memory, launch
hooks installed when the kernel was first launched, and other Triton versions get Triton's runner.

Under the interpreter, on CPU tensors, or if a direct launch is ever refused by this Triton version,
every call takes Triton's ordinary path.
"""

from __future__ import annotations

import torch

__all__ = ["launch", "arg_key", "direct_launch_enabled", "KernelLaunch", "on_device", "current_device",
           "empty_template"]

# (kernel, device, options, constexprs, arg_key) -> [compiled, constexpr tail, last grid, its runner]
_COMPILED: dict[tuple, list] = {}
# Entries only ever accumulate, one per distinct specialization; a process that feeds an endless
# variety of them drops the lot now and then instead of growing without bound.
_MAX_ENTRIES = 4096
_direct_launch_ok = True
_Tensor = torch.Tensor
_U64_MIN = 1 << 63  # integers from here on are passed as u64
# What Triton's launcher itself calls to find the current stream; handing it over saves that lookup.
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
# The current CUDA device index. Callers hold a CUDA tensor, so CUDA is initialized and the C getter
# (what torch.cuda.current_device calls after its initialization check) answers directly.
current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def on_device(index: int, fn, *args):
    """``fn(*args)`` with CUDA device ``index`` current: Triton launches on the current device, so this
    switches only when the tensors live on another GPU (``index`` is -1 for CPU tensors)."""
    if index >= 0 and index != current_device():
        with torch.cuda.device(index):
            return fn(*args)
    return fn(*args)


def empty_template(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor expanded to ``shape``, kept by a launch plan: ``torch.empty_like`` of it
    allocates a fresh contiguous ``shape`` tensor of ``dtype`` on ``device`` (an expanded tensor is not
    dense, so its strides are not copied) with less argument parsing than ``torch.empty(shape, dtype=,
    device=)`` or ``Tensor.new_empty``: a fraction of a microsecond per output on every call.

    Example:
        >>> t = empty_template((2, 3), torch.float32, torch.device("cpu"))
        >>> torch.empty_like(t).stride()
        (3, 1)
    """
    return torch.empty((1,) * len(shape), dtype=dtype, device=device).expand(shape)


def direct_launch_enabled() -> bool:
    """Whether direct launches are still in use (False once this Triton refused one)."""
    return _direct_launch_ok


def arg_key(args: tuple) -> tuple:
    """The part of the cache key that depends on the runtime arguments."""
    key = []
    add = key.append
    for a in args:
        kind = type(a)
        if kind is int:
            # Triton specializes an integer on == 1, divisibility by 16 and its width (i32/i64/u64).
            add(a & 15 | (a == 1) << 4 | (-0x80000000 <= a <= 0x7FFFFFFF) << 5 | (a >= _U64_MIN) << 6)
        elif kind is float or a is None:
            add(kind)  # a float is never specialized on its value; None becomes a constexpr
        elif isinstance(a, _Tensor):
            add((a.dtype, a.data_ptr() & 15))
        else:
            add(kind)
    return tuple(key)


def _disable_direct_launch() -> None:
    # Argument parsing failed before anything was launched: this Triton's compiled kernels take a
    # different calling convention. Stay on the ordinary path from now on.
    global _direct_launch_ok
    _direct_launch_ok = False
    _COMPILED.clear()


def _first_launch(kernel, grid: tuple, args: tuple, options: dict, constexprs: dict):
    """Launch through Triton's ordinary path; return ``(compiled, tail)`` for direct relaunches or None."""
    compiled = kernel[grid](*args, **constexprs, **options)
    if not _direct_launch_ok or compiled is None or not hasattr(compiled, "__getitem__"):
        return None
    names = kernel.arg_names[len(args):]
    return compiled, tuple(constexprs[name] for name in names)


# Whether this Triton's launcher takes the calling convention _c_launcher relies on (None: not checked).
_c_launch_ok: bool | None = None
_C_LAUNCH_VERSIONS = ("3.6.",)
_C_LAUNCH_PARAMS = ("self", "gridX", "gridY", "gridZ", "stream", "function", "args")


def _check_c_launch_convention() -> bool:
    """Triton 3.6's ``CudaLauncher.__call__(gridX, gridY, gridZ, stream, function, *args)`` forwards to
    ``launch(gridX, gridY, gridZ, stream, function, cooperative, pdl, global_scratch, profile_scratch,
    *args)`` where ``args`` = ``(packed_metadata, launch_metadata, enter_hook, exit_hook, *kernel args)``.
    Only that version, with that signature, is called directly."""
    try:
        import inspect

        import triton
        from triton.backends.nvidia.driver import CudaLauncher

        if not triton.__version__.startswith(_C_LAUNCH_VERSIONS):
            return False
        params = inspect.signature(CudaLauncher.__call__).parameters.values()
        names = tuple(p.name for p in params)
        return names == _C_LAUNCH_PARAMS and list(params)[-1].kind is inspect.Parameter.VAR_POSITIONAL
    except Exception:
        return False


def _launch_hooks_installed() -> bool:
    """Whether a launch hook (a profiler's, say) is set. Triton 3.6 keeps each hook as a chain object
    that is never None; its runner builds launch metadata for the chain on every launch even when the
    chain is empty, which the direct entry skips."""
    from triton import knobs

    runtime = knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", None) != []:
            return True
    return False


_MAX_TENSOR_MAPS = 64


def _tensordesc_entry(entry):
    """``(c_entry, expand)`` for a launcher entry that expands TMA tensor descriptors, else None.

    Triton 3.6 wraps the C entry of a kernel with tensor-descriptor arguments in a Python function that
    turns every descriptor into its argument list (a ``CUtensorMap`` encoded by the driver, then the
    shape and strides) on each launch. The encoding depends only on the base address, shape, strides,
    block and element type, so ``expand`` keeps it per address, shape and strides (the block and
    element type are fixed per compiled kernel) and encodes a descriptor only the first time it meets
    it: a weight's map is encoded once, not per call.
    """
    code = getattr(entry, "__code__", None)
    if code is None or not entry.__closure__:
        return None
    cells = dict(zip(code.co_freevars, (cell.cell_contents for cell in entry.__closure__)))
    try:
        c_entry, indices, metas = cells["launcher"], cells["tensordesc_indices"], cells["tensordesc_meta"]
        from triton.backends.nvidia.driver import make_tensordesc_arg
    except (KeyError, ImportError):
        return None
    meta_of = {i: metas[j] for j, i in enumerate(sorted(indices))}
    maps: dict = {}

    def expand(args) -> list:
        out = []
        for i, a in enumerate(args):
            meta = meta_of.get(i, _NOT_A_DESCRIPTOR)
            if meta is _NOT_A_DESCRIPTOR:
                out.append(a)
            elif meta is None:  # lowered without TMA: base pointer, shape and strides, nothing to keep
                out.extend(make_tensordesc_arg(a, None))
            else:
                key = (i, a.base.data_ptr(), *a.shape, *a.strides)
                expanded = maps.get(key)
                if expanded is None:
                    if len(maps) >= _MAX_TENSOR_MAPS:
                        maps.clear()
                    expanded = maps[key] = make_tensordesc_arg(a, meta)
                out.extend(expanded)
        return out

    return c_entry, expand


_NOT_A_DESCRIPTOR = object()


def _c_launcher(compiled, grid: tuple, tail: tuple):
    """``fn(stream, args)`` calling the compiled launcher's entry directly, or None where unsupported."""
    global _c_launch_ok
    if _c_launch_ok is None:
        _c_launch_ok = _check_c_launch_convention()
    if not _c_launch_ok:
        return None
    try:
        compiled._init_handles()
        launcher = compiled.run
        if launcher.global_scratch_size or launcher.profile_scratch_size or _launch_hooks_installed():
            return None
        entry, function, metadata = launcher.launch, compiled.function, compiled.packed_metadata
        cooperative, pdl = launcher.launch_cooperative_grid, launcher.launch_pdl
    except Exception:
        return None
    gx, gy, gz = grid
    signature = getattr(getattr(compiled, "src", None), "signature", None) or {}
    if any(isinstance(ty, str) and ty.startswith("tensordesc") for ty in signature.values()):
        unwrapped = _tensordesc_entry(entry)
        if unwrapped is None:
            return None
        c_entry, expand = unwrapped

        def run_descriptors(stream, args):
            c_entry(gx, gy, gz, stream, function, cooperative, pdl, None, None, metadata, None, None, None,
                    *expand(args), *tail)

        return run_descriptors

    def run(stream, args):
        entry(gx, gy, gz, stream, function, cooperative, pdl, None, None, metadata, None, None, None,
              *args, *tail)

    # Triton 3.6's C entry reads an int pointer argument as the address (no data_ptr() call, no driver
    # check): KernelLaunch.launch_ptrs may pass addresses. The descriptor runner above expands its
    # arguments in Python and does not.
    run.takes_int_pointers = True
    return run


def _runner(compiled, grid: tuple, tail: tuple):
    """``fn(stream, args)`` launching ``compiled`` on ``grid`` with the constexpr ``tail`` appended."""
    grid = grid + (1,) * (3 - len(grid))  # compiled kernels index all three grid dimensions
    direct = _c_launcher(compiled, grid, tail)
    if direct is not None:
        return direct
    runner = compiled[grid]

    def run(stream, args):
        runner(*args, *tail, stream=stream)

    return run


def launch(kernel, grid: tuple, args: tuple, num_warps: int, num_stages: int | None = None,
           **constexprs) -> None:
    """Launch ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)`` cheaply.

    Args:
        kernel: a ``@triton.jit`` function whose runtime arguments come first and constexprs last.
        grid: up to three grid dimensions.
        args: the runtime arguments, positionally (tensors, ints, floats, ``None``); the first one is
            a tensor on the device to launch on.
        num_warps, num_stages: launch options (``num_stages=None`` keeps Triton's default).
        **constexprs: the constexpr arguments, by name.
    """
    device = args[0].get_device()
    if _direct_launch_ok and device >= 0 and _current_stream is not None:
        if type(grid) is not tuple:
            grid = tuple(grid)
        key = (kernel, device, num_warps, num_stages, tuple(constexprs.items()), arg_key(args))
        entry = _COMPILED.get(key)
        if entry is not None:
            # entry: [compiled, constexpr tail, grid of the cached runner, runner]
            try:
                if grid != entry[2]:
                    entry[3] = _runner(entry[0], grid, entry[1])
                    entry[2] = grid
                entry[3](_current_stream(device), args)
                return
            except Exception:
                _disable_direct_launch()
        options = {"num_warps": num_warps} if num_stages is None else \
            {"num_warps": num_warps, "num_stages": num_stages}
        first = _first_launch(kernel, grid, args, options, constexprs)
        if first is not None:
            if len(_COMPILED) >= _MAX_ENTRIES:
                _COMPILED.clear()
            _COMPILED[key] = [first[0], first[1], grid, _runner(first[0], grid, first[1])]
        return
    if num_stages is None:
        kernel[grid](*args, **constexprs, num_warps=num_warps)
    else:
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)


class KernelLaunch:
    """One kernel with a fixed grid, launch options and constexprs, launched many times.

    The caller promises that every call passes the same integer arguments and argument types (it
    keeps one ``KernelLaunch`` per input shape) and hands :meth:`__call__` a ``key`` that captures
    whatever else can change how Triton would specialize the arguments: the tensors' low address
    bits (``data_ptr() & 15``) and, if they vary, their dtypes. Calls with a key seen before launch the
    compiled kernel directly; others go through Triton's ordinary path once.

    Args:
        kernel: a ``@triton.jit`` function whose runtime arguments come first and constexprs last.
        grid: up to three grid dimensions.
        num_warps, num_stages: launch options (``num_stages=None`` keeps Triton's default).
        device: the CUDA device index the arguments live on, ``-1`` for CPU tensors (interpreter).
        **constexprs: the constexpr arguments, by name.

    Example:
        >>> # site = KernelLaunch(my_kernel, (rows,), 8, device=0, BLOCK=1024)
        >>> # site((x, y, n), x.data_ptr() & 15 | (y.data_ptr() & 15) << 4)
    """

    __slots__ = ("kernel", "grid", "options", "constexprs", "device", "direct", "_entries", "_ptr_entries")

    def __init__(self, kernel, grid: tuple, num_warps: int, num_stages: int | None = None,
                 device: int = -1, **constexprs) -> None:
        self.kernel = kernel
        self.grid = tuple(grid)
        self.options = {"num_warps": num_warps} if num_stages is None else \
            {"num_warps": num_warps, "num_stages": num_stages}
        self.constexprs = constexprs
        self.device = device
        self.direct = device >= 0 and _current_stream is not None
        self._entries: dict = {}
        self._ptr_entries: dict = {}  # the entries whose runner takes pointers as integers

    def launch_ptrs(self, args: tuple, key=0) -> bool:
        """Launch with every tensor argument given as its ``data_ptr()`` (an ``int``; ``None`` stays
        ``None``) if a call with this ``key`` went through :meth:`__call__` before and its runner is the
        compiled launcher's C entry; ``False`` (nothing launched) otherwise, and the caller then makes
        the ordinary call with the tensors.

        The C entry takes an integer as the device address itself, where for a tensor it calls
        ``data_ptr()`` and asks the driver to check the address on every launch; the caller, which reads
        the addresses anyway for ``key``, saves both. The caller vouches for what the check covered:
        the tensors live on this site's device.
        """
        run = self._ptr_entries.get(key)
        if run is None or not _direct_launch_ok:
            return False
        try:
            run(_current_stream(self.device), args)
            return True
        except Exception:
            _disable_direct_launch()
            return False

    def __call__(self, args: tuple, key=0) -> None:
        run = self._entries.get(key)
        if run is not None and _direct_launch_ok:
            try:
                run(_current_stream(self.device), args)
                return
            except Exception:
                _disable_direct_launch()
        if not (self.direct and _direct_launch_ok):
            self.kernel[self.grid](*args, **self.constexprs, **self.options)
            return
        first = _first_launch(self.kernel, self.grid, args, self.options, self.constexprs)
        if first is not None:
            run = self._entries[key] = _runner(first[0], self.grid, first[1])
            if getattr(run, "takes_int_pointers", False):
                self._ptr_entries[key] = run
