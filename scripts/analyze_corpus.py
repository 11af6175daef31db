#!/usr/bin/env python3
"""Analyze an ingested corpus with the base tokenizer.

Pre-tokenizes every document once, segments each distinct pre-token once with the base BPE, and
counts by pre-token: much faster than encoding every document, with the same result. Writes

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
import json
import multiprocessing as mp
import os
import sys
from collections.abc import Iterator
from collections import defaultdict
from itertools import count, islice
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_outputs, log, progress, run_main  # noqa: E402
from ivr.tokenization import (  # noqa: E402
    check_byte_level_bpe,
    compile_pretokenizer,
    load_tokenizer_json,
    readable,
    to_bytelevel,
    token_bytes,
)

SPECIAL = "\x00"  # prefix of keys standing for an added token met in the text (NUL never occurs in documents)


class Growing:
    """An int64 numpy array that grows by amortised doubling."""

    def __init__(self, dtype=np.int64) -> None:
        self.data = np.zeros(1024, dtype=dtype)
        self.size = 0

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self.data.dtype)
        need = self.size + len(values)
        if need > len(self.data):
            grown = np.zeros(max(need, 2 * len(self.data)), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : need] = values
        self.size = need

    def view(self) -> np.ndarray:
        return self.data[: self.size]

    def add_at(self, index: np.ndarray, values: np.ndarray) -> None:
        if len(index) and index.max() >= self.size:
            self.extend(np.zeros(index.max() + 1 - self.size))
        np.add.at(self.data, index, values)


# ---- worker side -------------------------------------------------------------------------
# Phase 1 (parallel): pre-tokenize chunks of documents, giving each distinct piece a worker-local
# index. Phase 2 (parallel): segment every distinct piece once with the base BPE. Phase 3: expand
# the training split's piece sequence into token ids. Counting by piece is exact and much cheaper
# than encoding every document.

_W: dict = {}


def _worker_init(spec_json: str, exact: bool) -> None:
    from tokenizers import Tokenizer

    import regex

    spec = json.loads(spec_json)
    tok = Tokenizer.from_str(spec_json)
    _W["tok"] = tok
    _W["normalize"] = tok.normalizer.normalize_str if tok.normalizer else None
    fast = None if exact else compile_pretokenizer(spec)
    if fast is None:
        pre = tok.pre_tokenizer
        fast = (lambda text: [to_text(p) for p, _ in pre.pre_tokenize_str(text)]) if pre else (lambda text: [text])
    _W["pretokenize"] = fast
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    _W["added"] = added
    _W["added_re"] = regex.compile("(" + "|".join(map(regex.escape, sorted(added, key=len, reverse=True))) + ")")
    _W["index"] = defaultdict(count().__next__)  # piece -> worker-local index, new pieces numbered on sight


def to_text(bytelevel_piece: str) -> str:
    return token_bytes(bytelevel_piece).decode("utf-8", errors="surrogateescape")


def _pieces(text: str) -> list[str]:
    if _W["normalize"]:
        text = _W["normalize"](text)
    if not any(a in text for a in _W["added"]):
        return _W["pretokenize"](text)
    out: list[str] = []
    for i, part in enumerate(_W["added_re"].split(text)):
        if i % 2:
            out.append(SPECIAL + part)
        elif part:
            out.extend(_W["pretokenize"](part))
    return out


def _index_chunk(task: tuple[list[str], bool]):
    """Phase 1: pieces of a chunk of JSON lines as worker-local indices (or their counts)."""
    lines, keep_sequence = task
    index = _W["index"]
    before = len(index)
    lookup = index.__getitem__
    occurrences: list[int] = []
    doc_pieces = np.zeros(len(lines), dtype=np.int64)
    n_bytes = 0
    for i, line in enumerate(lines):
        doc = json.loads(line)["text"]
        pieces = _pieces(doc)
        occurrences.extend(map(lookup, pieces))
        doc_pieces[i] = len(pieces)
        n_bytes += len(doc.encode("utf-8"))
    local = np.asarray(occurrences, dtype=np.int64)
    payload = local if keep_sequence else np.bincount(local, minlength=len(index))
    return os.getpid(), list(islice(index, before, None)), payload, doc_pieces, n_bytes


def _segment_many(keys: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Phase 2: base segmentation of distinct pieces, as (lengths, flat ids, byte-level forms)."""
    forms = [k if k.startswith(SPECIAL) else to_bytelevel(k) for k in keys]
    tokenize, added = _W["tok"].model.tokenize, _W["added"]
    segs = [[added[k[1:]]] if k.startswith(SPECIAL) else [t.id for t in tokenize(f)] for k, f in zip(keys, forms)]
    lens = np.fromiter(map(len, segs), dtype=np.int64, count=len(segs))
    flat = np.fromiter((i for s in segs for i in s), dtype=np.int64, count=int(lens.sum()))
    return lens, flat, forms


# ---- main side -----------------------------------------------------------------------------


class PieceTable:
    """Distinct pieces, numbered globally in order of first sight, and later their segmentations."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.gid: dict[str, int] = {}
        self.local_to_global: dict[int, Growing] = {}
        self.seg_lens = self.seg_starts = self.seg_flat = np.zeros(0, dtype=np.int64)
        self.forms: list[str] = []  # byte-level form of each piece

    def absorb(self, pid: int, new: list[str]) -> np.ndarray:
        """Register a worker's new pieces; return its local->global translation array."""
        gid, keys = self.gid, self.keys
        ids = []
        for key in new:
            g = gid.get(key)
            if g is None:
                g = gid[key] = len(keys)
                keys.append(key)
            ids.append(g)
        trans = self.local_to_global.setdefault(pid, Growing())
        trans.extend(ids)
        return trans.view()

    def segment(self, pool, parts: int) -> None:
        step = -(-len(self.keys) // parts) or 1
        slices = [self.keys[i : i + step] for i in range(0, len(self.keys), step)]
        results = pool.map(_segment_many, slices)
        self.seg_lens = np.concatenate([r[0] for r in results] or [np.zeros(0, np.int64)])
        self.seg_flat = np.concatenate([r[1] for r in results] or [np.zeros(0, np.int64)])
        self.seg_starts = np.cumsum(self.seg_lens) - self.seg_lens
        self.forms = [f for r in results for f in r[2]]

    def expand(self, gids: np.ndarray) -> np.ndarray:
        """Token ids of a sequence of pieces."""
        lens = self.seg_lens[gids]
        offsets = np.cumsum(lens) - lens
        positions = np.repeat(self.seg_starts[gids] - offsets, lens) + np.arange(int(lens.sum()))
        return self.seg_flat[positions]


def _chunks(path: Path, chunk_bytes: int, keep_sequence: bool) -> Iterator[tuple[list[str], bool]]:
    lines, size = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            lines.append(line)
            size += len(line)
            if size >= chunk_bytes:
                yield lines, keep_sequence
                lines, size = [], 0
    if lines:
        yield lines, keep_sequence


def analyze(
    tokenizer: str,
    splits: dict[str, Path],
    out_dir: Path,
    threads: int = 2,
    exact: bool = False,
    chunk_bytes: int = 1 << 20,
    trust_remote_code: bool = False,
) -> dict:
    """Analyze the splits (keys: train, heldout, general_train, general_heldout) into out_dir."""
    spec = load_tokenizer_json(tokenizer, trust_remote_code)
    check_byte_level_bpe(spec, tokenizer)
    spec_json = json.dumps(spec)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(spec_json)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    table = PieceTable()
    counts = {name: Growing() for name in splits}
    stats: dict[str, dict] = {}
    names = (
        "train_ids.bin", "train_offsets.npy", "train_ids.json",
        "token_frequencies.parquet", "pretokens.parquet", "corpus_stats.json",
    )
    ctx = mp.get_context("fork")
    with atomic_outputs(*(out_dir / n for n in names)) as paths, ctx.Pool(
        max(1, threads), initializer=_worker_init, initargs=(spec_json, exact)
    ) as pool:
        bin_path, offsets_path, meta_path, freq_path, pretokens_path, stats_path = paths
        sequence_path = bin_path.with_name("pieces.tmp")
        doc_pieces_all: list[np.ndarray] = []
        with open(sequence_path, "wb") as sequence:
            for name, path in splits.items():
                keep = name == "train"
                n_docs = n_bytes = 0
                bar = progress(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"pre-tokenize {name}")
                for pid, new, payload, doc_pieces, chunk_utf8 in pool.imap(_index_chunk, _chunks(path, chunk_bytes, keep)):
                    trans = table.absorb(pid, new)
                    if keep:
                        gids = trans[payload]
                        sequence.write(gids.astype(np.int32).tobytes())
                        doc_pieces_all.append(doc_pieces)
                        counts[name].add_at(gids, np.ones(len(gids), dtype=np.int64))
                    else:
                        nz = np.nonzero(payload)[0]
                        counts[name].add_at(trans[nz], payload[nz])
                    n_docs += len(doc_pieces)
                    n_bytes += chunk_utf8
                    bar.update(chunk_utf8)
                bar.close()
                stats[name] = {"documents": n_docs, "bytes": n_bytes}
        log.info("segmenting %d distinct pieces", len(table.keys))
        table.segment(pool, 8 * max(1, threads))
        offsets = _write_ids(table, sequence_path, doc_pieces_all, bin_path, dtype)
        sequence_path.unlink()
        np.save(offsets_path, offsets)
        for name in splits:
            c = counts[name].view()
            n_tokens = int((c * table.seg_lens[: len(c)]).sum())
            stats[name]["tokens"] = n_tokens
            stats[name]["tokens_per_byte"] = round(n_tokens / stats[name]["bytes"], 6) if stats[name]["bytes"] else None
            log.info("%s: %d documents, %d bytes, %d tokens", name, stats[name]["documents"], stats[name]["bytes"], n_tokens)
        _guard(tok, splits["train"], bin_path, offsets, dtype)
        meta = {
            "dtype": np.dtype(dtype).name,
            "byteorder": "little",
            "tokens": int(offsets[-1]),
            "documents": len(offsets) - 1,
            "vocab_size": vocab_size,
            "offsets": "train_offsets.npy",
        }
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        _write_tables(table, counts, tok, spec, freq_path, pretokens_path)
        stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _write_ids(table: PieceTable, sequence_path: Path, doc_pieces_all: list[np.ndarray], bin_path: Path, dtype) -> np.ndarray:
    """Phase 3: turn the training split's piece sequence into token ids, chunk by chunk."""
    sequence = np.memmap(sequence_path, dtype=np.int32, mode="r") if sequence_path.stat().st_size else np.zeros(0, np.int32)
    offsets = [np.zeros(1, dtype=np.int64)]
    pos = 0
    with open(bin_path, "wb") as out:
        for doc_pieces in doc_pieces_all:
            gids = np.asarray(sequence[pos : pos + int(doc_pieces.sum())], dtype=np.int64)
            pos += len(gids)
            out.write(table.expand(gids).astype(dtype).tobytes())
            tokens_so_far = np.concatenate([[0], np.cumsum(table.seg_lens[gids])])
            offsets.append(offsets[-1][-1] + tokens_so_far[np.cumsum(doc_pieces)])
    return np.concatenate(offsets)


def _guard(tok, train: Path, bin_path: Path, offsets: np.ndarray, dtype, every: int = 128) -> None:
    """Every n-th training document is encoded by the tokenizer itself and must match exactly."""
    ids = np.memmap(bin_path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
    with open(train, encoding="utf-8") as handle:
        sample = [(n, json.loads(line)["text"]) for n, line in enumerate(handle) if n % every == 0]
    for number, text in sample:
        expected = tok.encode(text, add_special_tokens=False).ids
        if ids[offsets[number] : offsets[number + 1]].tolist() != expected:
            raise RuntimeError(
                f"{train}: document {number + 1}: the fast pre-tokenizer disagrees with the tokenizer; "
                "rerun with --exact-pretokenizer and report this document"
            )


def _write_tables(table: PieceTable, counts: dict[str, Growing], tok, spec: dict, freq_path: Path, pretokens_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(table.keys)

    def full(name: str) -> np.ndarray:
        arr = np.zeros(n, dtype=np.int64)
        if name in counts:
            v = counts[name].view()
            arr[: len(v)] = v
        return arr

    domain, general = full("train"), full("general_train")
    lens = table.seg_lens
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    token_count = np.bincount(table.seg_flat, weights=np.repeat(domain, lens), minlength=vocab_size).astype(np.int64)
    token_general = np.bincount(table.seg_flat, weights=np.repeat(general, lens), minlength=vocab_size).astype(np.int64)
    tokens = [tok.id_to_token(i) or "" for i in range(vocab_size)]
    special = {t["id"] for t in spec.get("added_tokens", [])}
    freq = pa.table(
        {
            "id": pa.array(np.arange(vocab_size), pa.int32()),
            "token": tokens,
            "readable": [t if i in special else readable(t) for i, t in enumerate(tokens)],
            "count": token_count,
            "general_count": token_general,
        }
    )
    pq.write_table(freq, freq_path)

    is_special = np.fromiter((k.startswith(SPECIAL) for k in table.keys), dtype=bool, count=n)
    keep = np.nonzero(~is_special & ((domain > 0) | (general > 0)))[0]
    keep = keep[np.lexsort((keep, -general[keep], -domain[keep]))]  # by count, then first sight
    keep_lens = lens[keep]
    pre = pa.table(
        {
            "pretoken": [table.forms[g] for g in keep],
            "text": [table.keys[g] for g in keep],
            "count": pa.array(domain[keep], pa.int64()),
            "general_count": pa.array(general[keep], pa.int64()),
            "ids": pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(keep_lens)]), pa.int32()),
                pa.array(table.expand(keep), pa.int32()),
            ),
        }
    )
    pq.write_table(pre, pretokens_path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="local HF folder, tokenizer.json, or hub id")
    parser.add_argument("--train", type=Path, required=True, help="training split (JSON lines from ingest)")
    parser.add_argument("--heldout", type=Path, required=True)
    parser.add_argument("--general-train", type=Path)
    parser.add_argument("--general-heldout", type=Path)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exact-pretokenizer", action="store_true", help="use the tokenizer's own (slower) pre-tokenizer")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    splits = {"train": args.train, "heldout": args.heldout}
    if args.general_train:
        splits["general_train"] = args.general_train
    if args.general_heldout:
        splits["general_heldout"] = args.general_heldout
    for name, path in splits.items():
        if not path.exists():
            raise UserError(f"{path}: {name} split does not exist")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    analyze(args.tokenizer, splits, args.out_dir, args.threads, args.exact_pretokenizer, trust_remote_code=args.trust_remote_code)


if __name__ == "__main__":
    run_main(main)
