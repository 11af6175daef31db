#!/usr/bin/env python3
"""Ingest a corpus (files, folders of shards, or a Hugging Face dataset): read, NFC-normalise, drop empty and duplicate documents, split off held-out and dev sets.

Writes the training, dev and held-out splits as JSON lines ({"text": ...} per document) and a JSON
summary of what was read, dropped and kept. The split is decided by a seeded hash of each
document, so it does not depend on file order and every later stage sees the same held-out set.
The held-out split is only for the final report; the dev split (carved out of the training
documents, never trained on) is where training is watched and methods and settings are compared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_outputs, log, progress, run_main  # noqa: E402
from ivr.corpus import (  # noqa: E402
    DatasetSource,
    ReadOptions,
    clean,
    document_hash,
    expand_paths,
    read_dataset,
    read_documents,
    split_of,
)


def ingest(
    paths: list[str],
    opts: ReadOptions,
    outputs: dict[str, Path],
    heldout_fraction: float,
    seed: int,
    max_documents: int | None = None,
    dev_fraction: float = 0.0,
    dataset: DatasetSource | None = None,
) -> dict:
    """Stream every document of the files (or of the dataset, when one is given) into the train, dev or
    held-out file (`outputs` by split); return the counts."""
    files = [] if dataset else expand_paths(paths)
    documents = read_dataset(dataset, opts) if dataset else (doc for path in files for doc in read_documents(path, opts))
    seen: set[bytes] = set()
    counts = {"read": 0, "empty": 0, "duplicate": 0}
    kept = {split: [0, 0] for split in ("train", "dev", "heldout")}  # documents, bytes
    with contextlib.ExitStack() as stack:
        handles = {split: stack.enter_context(open(path, "w", encoding="utf-8")) for split, path in outputs.items()}
        bar = progress(unit=" docs", desc="ingest")
        for raw in documents:
            counts["read"] += 1
            bar.update()
            text = clean(raw)
            if not text:
                counts["empty"] += 1
                continue
            key = document_hash(text)
            if key in seen:
                counts["duplicate"] += 1
                continue
            seen.add(key)
            split = split_of(text, seed, heldout_fraction, dev_fraction)
            handles[split].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            kept[split][0] += 1
            kept[split][1] += len(text.encode("utf-8"))
            if max_documents and sum(n for n, _ in kept.values()) >= max_documents:
                break
        bar.close()
    if kept["train"][0] == 0:
        raise UserError(
            f"corpus is empty after cleaning: {counts['read']} documents read from "
            f"{dataset.name if dataset else ', '.join(map(str, paths))}, {counts['empty']} empty, "
            f"{counts['duplicate']} duplicates" + (", none left for training" if kept["heldout"][0] or kept["dev"][0] else "")
        )
    return {
        "files": [str(p) for p in files],
        **({"dataset": vars(dataset)} if dataset else {}),
        "documents_read": counts["read"],
        "dropped_empty": counts["empty"],
        "dropped_duplicate": counts["duplicate"],
        "heldout_fraction": heldout_fraction,
        "dev_fraction": dev_fraction,
        "seed": seed,
        **{split: {"documents": n, "bytes": size} for split, (n, size) in kept.items()},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="corpus files or folders (files may be .gz, .zst, .bz2 or .xz)")
    parser.add_argument("--dataset", help="read this Hugging Face dataset instead of files: a save_to_disk folder, "
                        "a folder of data files, or a hub id")
    parser.add_argument("--dataset-config", help="configuration of the dataset (load_dataset's name)")
    parser.add_argument("--dataset-split", default="train", help="split of the dataset")
    parser.add_argument("--format", default="auto", choices=["auto", "txt", "jsonl", "json", "parquet"])
    parser.add_argument("--txt-mode", default="line", choices=["line", "file"], help="one document per line or per file")
    parser.add_argument("--text-key", default="text", help="key of the text in .jsonl/.json records")
    parser.add_argument("--text-column", default="text", help="column of the text in .parquet files and datasets")
    parser.add_argument("--max-document-bytes", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--max-documents", type=int, default=0, help="stop after this many kept documents (0: all)")
    parser.add_argument("--heldout-fraction", type=float, default=0.05)
    parser.add_argument("--dev-fraction", type=float, default=0.0,
                        help="share of the documents taken out of training as the dev split")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train-out", type=Path, required=True)
    parser.add_argument("--dev-out", type=Path, required=True)
    parser.add_argument("--heldout-out", type=Path, required=True)
    parser.add_argument("--stats-out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not 0.0 < args.heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction must lie strictly between 0 and 1, got {args.heldout_fraction}")
    if not 0.0 <= args.dev_fraction < 1.0 - args.heldout_fraction:
        raise UserError(f"--dev-fraction must be at least 0 and leave documents for training, got {args.dev_fraction}")
    if bool(args.inputs) == bool(args.dataset):
        raise UserError("name corpus files or folders, or --dataset, not both" if args.inputs else
                        "nothing to read: name corpus files or folders, or --dataset")
    dataset = DatasetSource(args.dataset, args.dataset_config, args.dataset_split) if args.dataset else None
    opts = ReadOptions(args.format, args.txt_mode, args.text_key, args.text_column, args.max_document_bytes)
    with atomic_outputs(args.train_out, args.dev_out, args.heldout_out, args.stats_out) as (train, dev, heldout, stats_path):
        stats = ingest(args.inputs, opts, {"train": train, "dev": dev, "heldout": heldout}, args.heldout_fraction,
                       args.seed, args.max_documents or None, args.dev_fraction, dataset)
        stats_path.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    log.info(
        "kept %d train + %d dev + %d held-out documents of %d read (%d empty, %d duplicates dropped)",
        stats["train"]["documents"], stats["dev"]["documents"], stats["heldout"]["documents"],
        stats["documents_read"], stats["dropped_empty"], stats["dropped_duplicate"],
    )


if __name__ == "__main__":
    run_main(main)
