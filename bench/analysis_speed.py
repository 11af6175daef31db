#!/usr/bin/env python3
"""Benchmark: corpus analysis vs tiktoken and HF tokenizers on the same documents, same tokenizer.

Prints the time of (1) our analysis (pre-tokenize, count, segment each distinct pre-token once,
write every output), (2) tiktoken's encode_ordinary_batch with the same number of threads and
GPT-2's ranks, each the best of --repeat runs, (3) HF tokenizers' encode_batch, with ratios against
tiktoken measured in the same run; then the analysis's peak memory on the corpus and on 4x as much distinct text (each document
repeated with a copy number appended), to show memory stays bounded as the corpus grows.

Needs the ingested splits (snakemake results/corpus/domain/train.jsonl) and the assets
gpt2_tokenizer and gpt2_tiktoken (fetched by the tests or scripts/fetch_assets.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_docs(paths: list[Path]) -> list[str]:
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            docs.extend(json.loads(line)["text"] for line in handle)
    return docs


def run_analysis(train: Path, heldout: Path, tokenizer: Path, threads: int, out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, largest process) of the analysis script in a subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "analyze_corpus.py"), "--tokenizer", str(tokenizer),
         "--train", str(train), "--heldout", str(heldout), "--out-dir", str(out), "--threads", str(threads)],
        check=True, env={**os.environ, "IVR_NO_PROGRESS": "1", "IVR_LOG_LEVEL": "WARNING"},
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", type=Path, default=ROOT / "results" / "corpus" / "domain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the analysis and of tiktoken; the best counts")
    args = parser.parse_args()
    train, heldout = args.splits / "train.jsonl", args.splits / "heldout.jsonl"
    tokenizer = ROOT / "resources" / "assets" / "gpt2_tokenizer"
    ranks_file = ROOT / "resources" / "assets" / "gpt2_tiktoken" / "gpt2.tiktoken"
    megabytes = (os.path.getsize(train) + os.path.getsize(heldout)) / 1e6
    print(f"{megabytes:.1f} MB of JSON lines, {args.threads} threads")

    ours_runs = []
    for run in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            seconds, peak_1x = run_analysis(train, heldout, tokenizer, args.threads, Path(tmp) / "a")
            stats = json.loads((Path(tmp) / "a" / "corpus_stats.json").read_text())
        ours_runs.append(seconds)
    ours = min(ours_runs)
    our_tokens = stats["train"]["tokens"] + stats["heldout"]["tokens"]

    # Memory first: ru_maxrss of a child counts the pages it had at fork, so the parent stays small here.
    if not args.skip_memory:
        with tempfile.TemporaryDirectory() as tmp:
            big = Path(tmp) / "train4x.jsonl"
            with open(train, encoding="utf-8") as src, open(big, "w", encoding="utf-8") as out:
                for line in src:
                    text = json.loads(line)["text"]
                    for copy in range(4):
                        out.write(json.dumps({"text": f"{text} (사본 {copy})"}, ensure_ascii=False) + "\n")
            seconds_4x, peak_4x = run_analysis(big, heldout, tokenizer, args.threads, Path(tmp) / "b")
        print(f"peak memory (largest process): {peak_1x:.0f} MiB on {megabytes:.0f} MB; "
              f"{peak_4x:.0f} MiB on 4x as much distinct text ({seconds_4x:.1f} s); ratio {peak_4x / peak_1x:.2f}")

    docs = load_docs([train, heldout])  # loaded only now, so the analysis children above start small
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"{len(docs)} documents, {megabytes:.1f} MB of text")
    import base64

    import tiktoken

    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in ranks_file.read_text().splitlines() if line)}
    enc = tiktoken.Encoding("gpt2", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})
    tik_runs = []
    for run in range(args.repeat):
        start = time.perf_counter()
        tik_tokens = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=args.threads)))
        tik_runs.append(time.perf_counter() - start)
    tik = min(tik_runs)

    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    from tokenizers import Tokenizer

    hf_tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    start = time.perf_counter()
    hf_tokens = sum(len(e.ids) for e in hf_tok.encode_batch(docs, add_special_tokens=False))
    hf = time.perf_counter() - start

    print(f"{'way':<40}{'seconds':>9}{'MB/s':>8}{'tokens':>12}{'vs tiktoken':>13}")
    for name, seconds, tokens in (
        ("analysis (all outputs written)", ours, our_tokens),
        ("tiktoken encode_ordinary_batch", tik, tik_tokens),
        ("HF tokenizers encode_batch", hf, hf_tokens),
    ):
        print(f"{name:<40}{seconds:>9.1f}{megabytes / seconds:>8.2f}{tokens:>12}{tik / seconds:>12.2f}x")
    print(f"all runs (s): analysis {', '.join(f'{t:.1f}' for t in ours_runs)}; "
          f"tiktoken {', '.join(f'{t:.1f}' for t in tik_runs)}; the table shows the best of each")
    assert our_tokens == hf_tokens == tik_tokens, "token counts differ"


if __name__ == "__main__":
    main()
