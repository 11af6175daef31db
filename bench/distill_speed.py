#!/usr/bin/env python3
"""Benchmark: time to distill a tokenizer against the time the base needs to encode the training split.

Runs scripts/distill_tokenizer.py (defaults of config/schema.yaml) in a subprocess on the analysis's
pretokens.parquet, then encodes the training split with HF tokenizers' encode_batch, once with the
base BPE and once with the distilled Unigram, in the same run. Prints the fit time over the base's
encode time (the goal is at most 10x) and the distilled tokenizer's throughput beside the BPE's.

Needs the ingested and analyzed corpus (snakemake results/analysis/pretokens.parquet), or the
--train and --pretokens of another analysis of the same tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_docs(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def encode_seconds(tokenizer_json: Path, docs: list[str], batch: int = 1024) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), batch):  # batches keep the Encoding objects of 80 MB of text out of memory
        tokens += sum(len(e.ids) for e in tok.encode_batch(docs[i : i + batch], add_special_tokens=False))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "resources" / "models" / "SmolLM2-135M-Instruct.Q4_1")
    parser.add_argument("--pretokens", type=Path, default=ROOT / "results" / "analysis" / "pretokens.parquet")
    parser.add_argument("--train", type=Path, default=ROOT / "results" / "corpus" / "domain" / "train.jsonl")
    parser.add_argument("--out", type=Path, help="keep the distilled tokenizer here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "distilled"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "distill_tokenizer.py"), "--tokenizer", str(args.tokenizer),
             "--pretokens", str(args.pretokens), "--out", str(out)],
            check=True, env={**os.environ, "IVR_NO_PROGRESS": "1", "IVR_LOG_LEVEL": "WARNING"},
        )
        fit = time.perf_counter() - start
        report = json.loads((out / "distillation.json").read_text())

        docs = load_docs(args.train)
        megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        base_json = args.tokenizer if args.tokenizer.is_file() else args.tokenizer / "tokenizer.json"
        base, base_tokens = encode_seconds(base_json, docs)
        distilled, distilled_tokens = encode_seconds(out / "tokenizer.json", docs)

    chosen = report["rounds"][report["chosen_round"]]
    print(f"{args.tokenizer.name}: {len(docs)} training documents, {megabytes:.1f} MB, {args.threads} threads")
    print(f"fit: {fit:.1f} s, {len(report['rounds'])} rounds, round {chosen['round']} kept "
          f"(agreement {chosen['fit_agreement']:.6f} on the fit, {chosen['dev_agreement']:.6f} on dev)")
    print(f"{'way':<36}{'seconds':>9}{'MB/s':>8}{'tokens':>12}")
    for name, seconds, tokens in (("base BPE encode_batch", base, base_tokens),
                                  ("distilled Unigram encode_batch", distilled, distilled_tokens)):
        print(f"{name:<36}{seconds:>9.1f}{megabytes / seconds:>8.2f}{tokens:>12}")
    print(f"fit time / base encode time of the training split: {fit / base:.2f}x (goal <= 10x)")
    print(f"distilled / BPE encode throughput: {base / distilled:.2f}")


if __name__ == "__main__":
    main()
