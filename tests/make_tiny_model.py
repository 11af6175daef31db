#!/usr/bin/env python3
"""Write a small randomly initialised GPT-2 (real GPT-2 tokenizer) for tests and quick runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def make_tiny_gpt2(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=256, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", type=Path, default=Path("resources/assets/gpt2_tokenizer"))
    parser.add_argument("--out", type=Path, default=Path("resources/models/tiny-gpt2"))
    args = parser.parse_args()
    make_tiny_gpt2(args.tokenizer, args.out)
