"""SASS instruction counts of the W8A16 tensor-core kernel with and without ``FAST_CVT``, no GPU needed.

Compiles ``_w8a16_dot_kernel`` for sm_90 with Triton's bundled ptxas (pointer loads, per-channel
scales, 16-byte aligned arguments as the launcher specializes them) for bf16 and fp16 activations,
with the inline-PTX int8 -> fp16 conversion on and off, and prints the opcodes whose counts differ.
For bf16 the kernel does not use the inline PTX (``FAST_CVT`` applies to fp16 only): the plain
conversion is the reference there.

    PYTHONPATH=src python scripts/int8_sass_convert.py
"""

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rotalabs_accel.triton_kernels import int8_gemm as kernels  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ARGS = ["x_ptr", "w_ptr", "s_ptr", "b_ptr", "out_ptr", "part_ptr", "lock_ptr", "M", "N", "K", "k_per_split",
        "stride_xm", "stride_wn", "stride_sn", "stride_sg"]


def opcodes(fast: bool, tiles: tuple, dtype: str, fast_kernel_src: str = "") -> collections.Counter:
    bm, bn, bk, warps, stages, swap = tiles
    types = [f"*{dtype}", "*i8", "*fp32", f"*{dtype}", f"*{dtype}", "*fp32", "*i32"] + ["i32"] * 8
    sig = dict(zip(ARGS, types))
    consts = dict(GROUP_SIZE=0, HAS_BIAS=False, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1,
                  GROUP_M=8, SWAP_AB=swap, DOT_FP32=False, BLOCKED_SUM=False, USE_TMA=False, FAST_CVT=fast)
    sig.update({name: "constexpr" for name in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(13)}
    src = ASTSource(fn=kernels._w8a16_dot_kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    counts = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            counts[m.group(2)] += 1
    return counts


def main() -> None:
    print(f"# Triton {triton.__version__}, target sm_90; static SASS opcode counts of the whole kernel")
    print("# tiles: (block_m, block_n, block_k, num_warps, num_stages, swap_ab)")
    for tiles in [(16, 16, 256, 2, 6, True), (16, 64, 128, 4, 4, True), (128, 64, 128, 4, 3, True),
                  (256, 128, 64, 8, 3, True), (128, 256, 64, 8, 3, False)]:
        for dtype in ("bf16", "fp16"):
            plain, fast = opcodes(False, tiles, dtype), opcodes(True, tiles, dtype)
            diff = {k: (plain[k], fast[k]) for k in sorted(set(plain) | set(fast)) if plain[k] != fast[k]}
            print(f"{tiles} {dtype}: {sum(plain.values())} instructions plain, {sum(fast.values())} with "
                  f"FAST_CVT; I2F {plain['I2F']} -> {fast['I2F']}; differing opcodes (plain, fast): {diff}")


if __name__ == "__main__":
    main()
