#!/usr/bin/env python3
"""Analyze an ingested corpus with the base tokenizer.

Cuts every document into words once, pre-tokenizes each distinct word once, segments each distinct
pre-token once with the base BPE (tiktoken's merger, checked against the tokenizer), and counts by
word: much faster than encoding every document, with the same result. Writes

  token_frequencies.parquet  id, token, readable, count (domain train), general_count
  pretokens.parquet          distinct pre-tokens of the training splits: pretoken (byte-level),
                             text, count, general_count, ids (base segmentation)
  train_ids.bin              base-tokenizer ids of the domain training split, little-endian,
                             documents back to back (train_ids.json: dtype, counts, offsets file)
  train_offsets.npy          int64 start of each document in train_ids.bin, plus the end
  corpus_stats.json          per split: documents, bytes, tokens, tokens_per_byte
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.analysis import analyze, keep_freed_memory  # noqa: E402
from ivr.cli import UserError, run_main  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="local HF folder, tokenizer.json, or hub id")
    parser.add_argument("--train", type=Path, required=True, help="training split (JSON lines from ingest)")
    parser.add_argument("--heldout", type=Path, required=True)
    parser.add_argument("--general-train", type=Path)
    parser.add_argument("--general-heldout", type=Path)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2, help="threads of the helper process that resolves new words into ids")
    parser.add_argument("--exact-pretokenizer", action="store_true", help="use the tokenizer's own (slower) pre-tokenizer")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    keep_freed_memory()
    splits = {"train": args.train, "heldout": args.heldout}
    if args.general_train:
        splits["general_train"] = args.general_train
    if args.general_heldout:
        splits["general_heldout"] = args.general_heldout
    for name, path in splits.items():
        if not path.exists():
            raise UserError(f"{path}: {name} split does not exist")
    if args.threads < 1:
        raise UserError(f"--threads (analysis.threads) must be 1 or more, not {args.threads}")
    analyze(args.tokenizer, splits, args.out_dir, args.threads, args.exact_pretokenizer, trust_remote_code=args.trust_remote_code)


if __name__ == "__main__":
    run_main(main)
