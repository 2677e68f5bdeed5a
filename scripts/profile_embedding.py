"""Per-kernel GPU times of the embedding forward + backward (ours and PyTorch's) at the benchmark shapes.

    python scripts/profile_embedding.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from rotalabs_accel.functional.embedding import embedding  # noqa: E402


def main() -> None:
    for vocab in (32000, 128256):
        table = (torch.randn(vocab, 4096, device="cuda") * 0.02).bfloat16().requires_grad_()
        ids = torch.randint(0, vocab, (2, 4096), device="cuda")
        grad = torch.randn(2, 4096, 4096, device="cuda").bfloat16()
        for name, fn in (("ours", embedding), ("eager", F.embedding)):
            def step(fn=fn, ids=ids, table=table, grad=grad):
                return torch.autograd.grad(fn(ids, table), table, grad)

            for _ in range(5):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
            print(f"== {name}, vocab {vocab}, 8192 uniform ids (10 steps)")
            averages = prof.key_averages()
            print(averages.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
