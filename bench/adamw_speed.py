"""AdamW's step alone on a GPU: ivr.adamw_kernel's Triton step against torch's fused AdamW (the anchor),
same parameters, gradients, clipping scale and settings, timed in the same run with CUDA events.

    python3 bench/adamw_speed.py [--models gpt2,smollm2] [--steps 100]

Prints ms per step and torch / Triton for each block size and warp count tried (a ratio above 1: the
Triton step is faster), and the bytes each step moves per ms (parameters, exp_avg and exp_avg_sq read and
written, gradients read: 28 bytes per element; torch's fused step also writes the gradients back when it
clips, 32)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from throughput_common import MODELS, NAMES, build_model  # noqa: E402

from ivr import adamw_kernel  # noqa: E402

CONFIGS = [(512, 2), (512, 4), (1024, 2), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8)]


def time_steps(optimizer, steps: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        optimizer.step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        optimizer.step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,smollm2")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"--models: choose from {','.join(MODELS)}")
        params = [p for p in build_model(name).cuda().parameters()]
        elements = sum(p.numel() for p in params)
        for p in params:
            p.grad = torch.randn_like(p)
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        scale = torch.tensor(1.7, device="cuda")

        def optimizer(cls):
            made = cls(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
            made.grad_scale = scale
            return made

        anchor = time_steps(optimizer(torch.optim.AdamW), args.steps)
        print(f"{NAMES[name]}: {len(params)} tensors, {elements / 1e6:.1f}M elements; "
              f"torch fused AdamW {anchor:.3f} ms ({32 * elements / anchor / 1e9:.2f} TB/s)")
        for block, warps in CONFIGS:
            adamw_kernel.BLOCK, adamw_kernel.WARPS = block, warps
            ours = time_steps(optimizer(adamw_kernel.TritonAdamW), args.steps)
            print(f"  Triton BLOCK {block:5d} warps {warps:2d}: {ours:.3f} ms ({28 * elements / ours / 1e9:.2f} TB/s), "
                  f"torch / Triton {anchor / ours:.3f}x")


if __name__ == "__main__":
    main()
