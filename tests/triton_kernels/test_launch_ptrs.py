"""The launchers that hand a launch site the tensors' addresses as integers (``KernelLaunch.launch_ptrs``).

Where a site launches through the compiled launcher's C entry (a CUDA GPU with Triton 3.6), the
integer tuple is all the kernel gets, so it must be the ordinary call's arguments with every tensor
replaced by its ``data_ptr()`` and nothing else changed. Here every site declines the integers (as
one without a C entry does), so each launch is a pair: the integer tuple offered, then the ordinary
call with the tensors; the test checks the pair position by position. That runs on any machine with
kernels (the interpreter on CPU), and covers every family that offers integers: RMSNorm forward
(with and without residual, rstd), backward (direct dW and per-program partials with the reduction),
SwiGLU forward and backward, RoPE, and the INT8 pointer-load kernels.
"""

from __future__ import annotations

import pytest
import torch

import rotalabs_accel
from helpers import kernel_devices, randn

launch_module = pytest.importorskip("rotalabs_accel.triton_kernels._launch")


@pytest.fixture
def offered(monkeypatch):
    """Records ("ptrs" | "call", site, args, key) for every launch-site call, declining the integers."""
    records = []
    real_call = launch_module.KernelLaunch.__call__

    def launch_ptrs(site, args, key=0):
        records.append(("ptrs", site, args, key))
        return False

    def call(site, args, key=0):
        records.append(("call", site, args, key))
        return real_call(site, args, key)

    monkeypatch.setattr(launch_module.KernelLaunch, "launch_ptrs", launch_ptrs)
    monkeypatch.setattr(launch_module.KernelLaunch, "__call__", call)
    return records


def _addresses(args: tuple) -> tuple:
    return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)


def _check_pairs(records) -> set:
    """Every integer offer is followed by the ordinary call of the same site and key with the same
    arguments, tensors for addresses; returns the kernels that were offered integers."""
    kernels = set()
    for i, (kind, site, args, key) in enumerate(records):
        if kind != "ptrs":
            continue
        assert i + 1 < len(records), "an integer offer with no call after it"
        kind2, site2, args2, key2 = records[i + 1]
        assert kind2 == "call" and site2 is site and key2 == key
        assert len(args) == len(args2)
        assert all(not isinstance(a, torch.Tensor) for a in args), "a tensor among the integer arguments"
        assert args == _addresses(args2), f"{site.kernel}: {args} != {_addresses(args2)}"
        kernels.add(site.kernel.__name__ if hasattr(site.kernel, "__name__") else repr(site.kernel))
    return kernels


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("rows", [1, 40])
def test_rmsnorm_offers_its_arguments(device, offered, rows):
    from rotalabs_accel import rmsnorm, rmsnorm_residual_fused
    from rotalabs_accel.triton_kernels import rmsnorm as kernels

    n = 96
    x = randn(rows, n, dtype=torch.bfloat16, device=device).requires_grad_()
    r = randn(rows, n, dtype=torch.bfloat16, device=device).requires_grad_()
    w = randn(n, dtype=torch.bfloat16, device=device).requires_grad_()
    with rotalabs_accel.use_backend("triton"):
        with torch.no_grad():
            rmsnorm(x, w)
            rmsnorm(x, w)  # the repeat path
            rmsnorm_residual_fused(x, r, w)
        rmsnorm(x, w).sum().backward()
        y, s = rmsnorm_residual_fused(x, r, w)
        (y.float().sum() + s.float().sum()).backward()
    names = _check_pairs(offered)
    expected = {"_rmsnorm_fwd_tile_kernel", "_rmsnorm_bwd_tile_kernel"}
    sms = kernels._sm_count(x.get_device())
    cfg = kernels.backward_config(rows, n, 2, sms)
    programs = kernels._grid_size(kernels._cdiv(rows, cfg.block_m), cfg.programs_per_sm, sms)
    assert cfg.strategy == "tile" and (programs > 1) == (rows > 1)
    if programs > 1:
        expected.add("_rmsnorm_dw_reduce_kernel")  # per-program dW partials, then their reduction
    assert expected <= names
    assert sum(kind == "ptrs" for kind, *_ in offered) >= 7


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_swiglu_offers_its_arguments(device, offered):
    from rotalabs_accel import swiglu_fused

    gate = randn(5, 80, dtype=torch.float16, device=device).requires_grad_()
    up = randn(5, 80, dtype=torch.float16, device=device).requires_grad_()
    packed = randn(3, 2 * 48, dtype=torch.float16, device=device)
    with rotalabs_accel.use_backend("triton"):
        swiglu_fused(gate, up).float().sum().backward()
        with torch.no_grad():
            swiglu_fused(packed)  # gate and up side by side: a column offset for up
    names = _check_pairs(offered)
    assert {"_swiglu_forward_kernel", "_swiglu_backward_kernel"} <= names


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
def test_rope_offers_its_arguments(device, offered):
    from rotalabs_accel import apply_rope, build_rope_cache

    q = randn(2, 3, 4, 16, dtype=torch.bfloat16, device=device)
    k = randn(2, 3, 2, 16, dtype=torch.bfloat16, device=device)
    cos, sin = build_rope_cache(8, 16, device=device)
    pos = torch.tensor([[5, 1, 2], [0, 7, 3]], device=device)
    with rotalabs_accel.use_backend("triton"):
        apply_rope(q, k, cos, sin, layout="bshd")
        apply_rope(q, k, cos, sin, position_ids=pos, layout="bshd")
    names = _check_pairs(offered)
    assert "_rope_kernel" in names


@pytest.mark.interpreter
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("kernel", ["gemv", "splitk", "gemm"])
def test_int8_offers_its_arguments(device, offered, kernel):
    from rotalabs_accel import int8_gemm
    from rotalabs_accel.quantization.symmetric import quantize_weight_per_channel

    m = 1 if kernel == "gemv" else 5
    x = randn(m, 64, dtype=torch.bfloat16, device=device)
    q, scale = quantize_weight_per_channel(randn(40, 64, device=device))
    bias = randn(40, dtype=torch.bfloat16, device=device)
    with rotalabs_accel.use_backend("triton"):
        int8_gemm(x, q, scale, bias, mode="w8a16", kernel=kernel)
        int8_gemm(x, q, scale, None, mode="w8a16", kernel=kernel)
    names = _check_pairs(offered)
    assert names and all("w8a16" in name for name in names)
    assert sum(kind == "ptrs" for kind, *_ in offered) == 2
