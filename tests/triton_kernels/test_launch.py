"""The shared direct-launch helper (rotalabs_accel/triton_kernels/_launch.py).

The cache may reuse a compiled kernel only for arguments Triton would specialize identically; a
refused direct launch must fall back to Triton's own path for good. Stand-ins for Triton's kernel
objects check the mechanics on any machine; a real kernel checks the results under the interpreter
(CPU) or on CUDA, including tensors that are not 16-byte aligned.
"""

from __future__ import annotations

import pytest
import torch

from helpers import cuda_available, kernel_devices

launch_module = pytest.importorskip("rotalabs_accel.triton_kernels._launch")


def test_arg_key_separates_every_specialization():
    # Tensor dtype and 16-byte alignment, integers equal to 1, divisible by 16 or wide, and None (a
    # constexpr to Triton) against a float (a runtime fp32).
    key = launch_module.arg_key
    base = torch.empty(64, dtype=torch.bfloat16)
    keys = {
        key((base, 4096)),
        key((base[1:], 4096)),  # 2-byte offset: not 16-byte aligned
        key((base[4:], 4096)),  # 8-byte offset: finer than Triton's classes, still apart
        key((base.float(), 4096)),
        key((base, 1)),
        key((base, 17)),
        key((base, 2**31)),
        key((base, 2**63)),
        key((base, None)),
        key((base, 0.5)),
        key((base, True)),
    }
    assert len(keys) == 11
    # ... and the same key for arguments that specialize alike.
    assert key((base, 4096, 1e-6)) == key((base[8:], 8192, 3.0))
    assert key((base, 5)) == key((base, 21))


class _OnGpu:
    """Stands for a CUDA tensor as the first argument: only its device is read."""

    def get_device(self):
        return 0


class _Compiled:
    def __init__(self):
        self.calls, self.refuse = [], False

    def __getitem__(self, grid):
        def run(*args, stream=None):
            if self.refuse:
                raise TypeError("launcher takes a different argument list")
            self.calls.append((grid, args, stream))

        return run


class _Kernel:
    arg_names = ["X", "n", "A", "B"]

    def __init__(self):
        self.compiled, self.jit_calls = _Compiled(), []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            return self.compiled

        return run


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(launch_module, "_COMPILED", {})
    monkeypatch.setattr(launch_module, "_direct_launch_ok", True)
    monkeypatch.setattr(launch_module, "_current_stream", lambda device: 100 + device)
    return launch_module


def test_launch_reuses_the_compiled_kernel(fresh_cache):
    # The first call goes through `kernel[grid](...)`; later ones through the compiled kernel with the
    # constexprs appended in signature order and the device's current stream, on any grid.
    k = fresh_cache
    kernel, x = _Kernel(), _OnGpu()
    k.launch(kernel, (4,), (x, 16), 8, B=2, A=1)
    k.launch(kernel, (5, 2), (x, 32), 8, B=2, A=1)
    k.launch(kernel, [5, 2], (x, 48), 8, B=2, A=1)
    assert len(kernel.jit_calls) == 1 and kernel.jit_calls[0][2] == {"B": 2, "A": 1, "num_warps": 8}
    assert kernel.compiled.calls == [((5, 2, 1), (x, 32, 1, 2), 100), ((5, 2, 1), (x, 48, 1, 2), 100)]
    k.launch(kernel, (4,), (x, 17), 8, B=2, A=1)  # 17 specializes differently from 16: Triton's path
    k.launch(kernel, (4,), (x, 16), 8, B=2, A=1, num_stages=None)
    assert len(kernel.jit_calls) == 2
    k.launch(kernel, (4,), (x, 16), 4, B=2, A=1)  # other launch options: another compiled kernel
    k.launch(kernel, (4,), (x, 16), 8, A=2, B=1)  # same values under other names: another kernel
    assert len(kernel.jit_calls) == 4


def test_launch_falls_back_for_good_when_refused(fresh_cache):
    k = fresh_cache
    kernel, x = _Kernel(), _OnGpu()
    k.launch(kernel, (4,), (x, 16), 8, B=2, A=1)
    kernel.compiled.refuse = True
    k.launch(kernel, (4,), (x, 16), 8, B=2, A=1)
    assert not k.direct_launch_enabled() and len(kernel.jit_calls) == 2
    k.launch(kernel, (4,), (x, 16), 8, B=2, A=1)
    assert len(kernel.jit_calls) == 3 and not k._COMPILED


def test_kernel_launch_mechanics(fresh_cache):
    k = fresh_cache
    kernel, x = _Kernel(), _OnGpu()
    site = k.KernelLaunch(kernel, (3,), 4, num_stages=2, device=1, B=5, A=6)
    site((x, 16), key=0)
    site((x, 16), key=0)
    site((x, 16), key=("other alignment",))
    assert [c[2] for c in kernel.jit_calls] == [{"B": 5, "A": 6, "num_warps": 4, "num_stages": 2}] * 2
    assert kernel.compiled.calls == [((3, 1, 1), (x, 16, 6, 5), 101)]
    kernel.compiled.refuse = True
    site((x, 16), key=0)
    assert not k.direct_launch_enabled() and len(kernel.jit_calls) == 3
    # CPU tensors (the interpreter) always take Triton's path.
    cpu_kernel = _Kernel()
    k.KernelLaunch(cpu_kernel, (1,), 4, device=-1, A=0, B=0)((x, 1))
    assert len(cpu_kernel.jit_calls) == 1


def _copy_kernel():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def copy_scaled(X, Y, n, scale, BLOCK: tl.constexpr, NEGATE: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + cols, mask=cols < n, other=0.0)
        if NEGATE:
            x = -x
        tl.store(Y + cols, x * scale, mask=cols < n)

    return copy_scaled


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_real_kernel_through_both_doors(device):
    # Alternate aligned and misaligned inputs and outputs: every launch computes the right thing.
    kernel = _copy_kernel()
    base = torch.randn(300, device=device)
    out = torch.zeros(300, device=device)
    index = base.get_device()
    cases = [(0, 256), (1, 255), (3, 97), (4, 256), (0, 1)]
    # One KernelLaunch per size (its integer arguments are fixed), reused across alignments.
    sites = {n: launch_module.KernelLaunch(kernel, ((n + 63) // 64,), 4, device=index, BLOCK=64, NEGATE=True)
             for _, n in cases}
    for _ in range(2):
        for start, n in cases:
            x, y = base[start:start + n], out[start:start + n]
            launch_module.launch(kernel, ((n + 63) // 64,), (x, y, n, 2.0), 4, BLOCK=64, NEGATE=False)
            torch.testing.assert_close(y, 2.0 * x)
            key = (x.data_ptr() & 15, y.data_ptr() & 15)
            sites[n]((x, y, n, 0.5), key)
            torch.testing.assert_close(y, -0.5 * x)
            # The same launch with the addresses as integers, where the site has a C entry for them.
            y.fill_(7.0)
            if sites[n].launch_ptrs((x.data_ptr(), y.data_ptr(), n, 0.25), key):
                torch.testing.assert_close(y, -0.25 * x)
            else:
                assert (y == 7.0).all()  # declined: nothing was launched
    if cuda_available():
        assert launch_module.direct_launch_enabled(), "this Triton refused the direct launch"
    if cuda_available() and launch_module._check_c_launch_convention():
        # On the Triton version whose launcher convention was verified, repeated launches call the
        # compiled launcher's C entry directly (the results above prove it passes the right arguments).
        assert launch_module._c_launch_ok
        runs = [site._entries[key] for site in sites.values() for key in site._entries]
        assert runs and all(run.__qualname__.startswith("_c_launcher") for run in runs)
        # ... and every one of them takes integer addresses (the second round's launch_ptrs ran them).
        assert all(site._ptr_entries == site._entries for site in sites.values())


class _CLauncher:
    """Stands for Triton 3.6's CudaLauncher: records what its C entry receives."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self):
        self.calls, self.refuse = [], False

    def launch(self, *args):
        if self.refuse:
            raise TypeError("launcher takes a different argument list")
        self.calls.append(args)


class _CompiledWithLauncher(_Compiled):
    function, packed_metadata = 0xF00, ("meta",)

    def __init__(self, scratch=0):
        super().__init__()
        self.run = _CLauncher()
        self.run.global_scratch_size = scratch
        self.handles = 0

    def _init_handles(self):
        self.handles += 1


class _KernelWithLauncher(_Kernel):
    def __init__(self, scratch=0):
        super().__init__()
        self.compiled = _CompiledWithLauncher(scratch)


def test_c_entry_gets_triton_36_argument_order(fresh_cache, monkeypatch):
    # Grid, stream, function, cooperative / PDL flags, no scratch, packed metadata, no launch metadata
    # and no hooks, then the runtime arguments and the constexprs in signature order.
    k = fresh_cache
    monkeypatch.setattr(k, "_c_launch_ok", True)
    monkeypatch.setattr(k, "_launch_hooks_installed", lambda: False)
    kernel, x = _KernelWithLauncher(), _OnGpu()
    k.launch(kernel, (4,), (x, 16), 8, B=2, A=1)
    k.launch(kernel, (5, 2), (x, 32), 8, B=2, A=1)
    site = k.KernelLaunch(kernel, (3,), 4, device=0, B=5, A=6)
    site((x, 16))
    site((x, 16))
    assert kernel.compiled.calls == []  # Triton's runner was never used for the relaunches
    assert kernel.compiled.run.calls == [
        (5, 2, 1, 100, 0xF00, False, True, None, None, ("meta",), None, None, None, x, 32, 1, 2),
        (3, 1, 1, 100, 0xF00, False, True, None, None, ("meta",), None, None, None, x, 16, 6, 5),
    ]


def test_launch_ptrs_only_through_the_c_entry(fresh_cache, monkeypatch):
    # Integer addresses go only to a C entry that a call with the same key set up; anything else
    # declines without launching, and the caller makes the ordinary call.
    k = fresh_cache
    monkeypatch.setattr(k, "_c_launch_ok", True)
    monkeypatch.setattr(k, "_launch_hooks_installed", lambda: False)
    kernel, x = _KernelWithLauncher(), _OnGpu()
    site = k.KernelLaunch(kernel, (3,), 4, device=0, B=5, A=6)
    assert not site.launch_ptrs((0xA000, 16))  # no call with this key yet
    site((x, 16))
    assert not site.launch_ptrs((0xA000, 16), key=1)  # another key
    assert site.launch_ptrs((0xA000, 16))
    assert kernel.compiled.run.calls == [
        (3, 1, 1, 100, 0xF00, False, True, None, None, ("meta",), None, None, None, 0xA000, 16, 6, 5),
    ]
    assert len(kernel.jit_calls) == 1 and kernel.compiled.calls == []
    # A C entry that refuses the arguments: nothing launched, direct launches off for good.
    kernel.compiled.run.refuse = True
    assert not site.launch_ptrs((0xA000, 16))
    assert not k.direct_launch_enabled()
    assert not site.launch_ptrs((0xA000, 16))


@pytest.mark.parametrize("case", ["scratch", "hooks", "other_triton", "cpu"])
def test_launch_ptrs_declined_without_a_c_entry(fresh_cache, monkeypatch, case):
    # Triton's own runner (scratch, hooks, an unverified Triton) and the interpreter get tensors only.
    k = fresh_cache
    monkeypatch.setattr(k, "_c_launch_ok", case != "other_triton")
    monkeypatch.setattr(k, "_launch_hooks_installed", lambda: case == "hooks")
    kernel, x = _KernelWithLauncher(scratch=64 if case == "scratch" else 0), _OnGpu()
    site = k.KernelLaunch(kernel, (3,), 4, device=-1 if case == "cpu" else 0, B=5, A=6)
    site((x, 16))
    site((x, 16))
    assert not site.launch_ptrs((0xA000, 16))
    assert kernel.compiled.run.calls == []
    assert all(args[0] is x for _, args, _ in kernel.compiled.calls)


@pytest.mark.parametrize("case", ["scratch", "hooks", "other_triton"])
def test_c_entry_declined_keeps_tritons_runner(fresh_cache, monkeypatch, case):
    # Scratch memory to allocate, launch hooks to call, or an unverified Triton: Triton's own runner.
    k = fresh_cache
    monkeypatch.setattr(k, "_c_launch_ok", False if case == "other_triton" else True)
    monkeypatch.setattr(k, "_launch_hooks_installed", lambda: case == "hooks")
    kernel, x = _KernelWithLauncher(scratch=64 if case == "scratch" else 0), _OnGpu()
    k.launch(kernel, (4,), (x, 16), 8, B=2, A=1)
    k.launch(kernel, (4,), (x, 16), 8, B=2, A=1)
    assert kernel.compiled.run.calls == []
    assert kernel.compiled.calls == [((4, 1, 1), (x, 16, 1, 2), 100)]


def test_c_launch_convention_is_checked_once_per_process(monkeypatch):
    # An unverified Triton (the check runs against the installed one) is never called directly.
    triton = pytest.importorskip("triton")
    verified = triton.__version__.startswith(launch_module._C_LAUNCH_VERSIONS)
    if not verified:
        assert launch_module._check_c_launch_convention() is False
    monkeypatch.setattr(launch_module, "_c_launch_ok", None)
    monkeypatch.setattr(launch_module, "_check_c_launch_convention", lambda: False)
    assert launch_module._c_launcher(_CompiledWithLauncher(), (1, 1, 1), ()) is None
    assert launch_module._c_launch_ok is False


def test_empty_hook_chains_count_as_no_hooks(monkeypatch):
    # Triton 3.6 keeps launch hooks as (possibly empty) chains rather than None.
    knobs = pytest.importorskip("triton.knobs")

    class Chain:
        def __init__(self, calls):
            self.calls = calls

    runtime = knobs.runtime
    monkeypatch.setattr(runtime, "launch_enter_hook", Chain([]), raising=False)
    monkeypatch.setattr(runtime, "launch_exit_hook", None, raising=False)
    assert not launch_module._launch_hooks_installed()
    monkeypatch.setattr(runtime, "launch_exit_hook", Chain([print]), raising=False)
    assert launch_module._launch_hooks_installed()
    monkeypatch.setattr(runtime, "launch_exit_hook", print, raising=False)
    assert launch_module._launch_hooks_installed()


def _tensordesc_wrapper(launcher, tensordesc_indices, tensordesc_meta):
    """Stands for Triton 3.6's wrap_handle_tensordesc: a closure over the C entry, the descriptor
    positions and their metadata (the names the direct launch reads)."""

    def inner(*args):  # never called by the direct launch
        raise AssertionError((launcher, tensordesc_indices, tensordesc_meta))

    return inner


class _Desc:
    def __init__(self, base, shape, strides):
        self.base, self.shape, self.strides, self.block_shape = base, shape, strides, [16, 32]


def test_c_entry_encodes_each_tensor_map_once(fresh_cache, monkeypatch):
    # A kernel with a TMA descriptor argument: the C entry gets the descriptor's expansion (tensor map,
    # shape, strides) in its place. A map is encoded the first time its address, shape and strides
    # are seen, and reused after (a weight's map, launch after launch); a new address, shape or
    # stride is encoded anew.
    driver = pytest.importorskip("triton.backends.nvidia.driver")
    k = fresh_cache
    monkeypatch.setattr(k, "_c_launch_ok", True)
    monkeypatch.setattr(k, "_launch_hooks_installed", lambda: False)
    encoded = []

    def encode(desc, meta):
        encoded.append((desc.base.data_ptr(), tuple(desc.shape), tuple(desc.strides), meta))
        return [f"map{len(encoded)}", *desc.shape, *desc.strides]

    monkeypatch.setattr(driver, "make_tensordesc_arg", encode)
    c_calls = []
    kernel = _KernelWithLauncher()
    kernel.arg_names = ["X", "D", "n", "A"]
    compiled = kernel.compiled
    compiled.src = type("Src", (), {"signature": {"X": "*bf16", "D": "tensordesc<i8[16, 32]>", "n": "i32",
                                                  "A": "constexpr"}})()
    compiled.run.launch = _tensordesc_wrapper(lambda *a: c_calls.append(a), {1}, [{"swizzle": 128}])
    x, w, w2 = _OnGpu(), torch.empty(64, 32, dtype=torch.int8), torch.empty(64, 32, dtype=torch.int8)
    site = k.KernelLaunch(kernel, (3,), 4, device=0, A=7)
    site((x, _Desc(w, [64, 32], [32, 1]), 5))  # Triton's own path, compiles
    for desc in (_Desc(w, [64, 32], [32, 1]), _Desc(w, [64, 32], [32, 1]), _Desc(w2, [64, 32], [32, 1]),
                 _Desc(w, [32, 32], [32, 1]), _Desc(w, [64, 32], [32, 1])):
        site((x, desc, 5))
    meta = {"swizzle": 128}
    assert encoded == [(w.data_ptr(), (64, 32), (32, 1), meta), (w2.data_ptr(), (64, 32), (32, 1), meta),
                       (w.data_ptr(), (32, 32), (32, 1), meta)]
    base = (3, 1, 1, 100, 0xF00, False, True, None, None, ("meta",), None, None, None)
    assert [c[len(base):] for c in c_calls] == [
        (x, "map1", 64, 32, 32, 1, 5, 7), (x, "map1", 64, 32, 32, 1, 5, 7), (x, "map2", 64, 32, 32, 1, 5, 7),
        (x, "map3", 32, 32, 32, 1, 5, 7), (x, "map1", 64, 32, 32, 1, 5, 7),
    ]
    assert all(c[:len(base)] == base for c in c_calls)
    assert not site.launch_ptrs((x, _Desc(w, [64, 32], [32, 1]), 5))  # descriptors expand in Python
