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
import json
import multiprocessing as mp
import os
import re
import sys
from collections.abc import Iterator
from collections import defaultdict
from itertools import count, islice
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_outputs, log, progress, run_main  # noqa: E402
from ivr.tokenization import (  # noqa: E402
    RankSegmenter,
    bytes_to_bytelevel,
    check_byte_level_bpe,
    compile_pretokenizer,
    load_tokenizer_json,
    readable,
    splits_at_single_spaces,
    to_bytelevel,
    token_bytes,
)


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
        """data[index] += values, for distinct indices."""
        if len(index) and index.max() >= self.size:
            self.extend(np.zeros(index.max() + 1 - self.size))
        self.data[index] += values


# ---- worker side -------------------------------------------------------------------------
# Phase 1 (parallel): cut documents into units and give each distinct unit a worker-local index.
# A unit is a space-separated word with its leading space (the pre-tokenizers we speed up never let
# a pre-token cross such a space, see splits_at_single_spaces), or one pre-token where that does
# not hold. Phase 2: pre-tokenize each distinct unit once and segment each distinct pre-token once
# with the base BPE. Phase 3: expand the training split's unit sequence into token ids. Counting
# by unit is exact and much cheaper than encoding every document.

SPECIAL = "\x00"  # unit kinds, as the first character of a unit's key: an added token met in the text,
WORD = "\x01"  # a word that followed a single space (its pre-tokens are those of " " + word),
WHOLE = "\x02"  # text before the first space (pre-tokenized as it is),
PIECE = "\x03"  # one pre-token, kept verbatim
_SPACE_IN_WHITESPACE = re.compile(r" (?<=\s )(?:\s|\Z)")  # a space with whitespace (or the end) on both sides

_W: dict = {}
_SEGMENTER: list = [None]  # set before the pool forks, so workers inherit the built tiktoken merger
VERIFY_EVERY = 16  # every n-th distinct pre-token segmented by ranks is checked against the HF model
GUARD_EVERY = 128  # every n-th training document is encoded by the tokenizer itself and compared


class _Numbering(dict):
    """Key -> worker-local unit index, numbered on first sight; new keys are noted with their kind."""

    def __init__(self, kind: str, counter, new: list[str]) -> None:
        super().__init__()
        self.kind, self.counter, self.new = kind, counter, new

    def __missing__(self, key: str) -> int:
        value = self[key] = self.counter()
        self.new.append(self.kind + key)
        return value


def _worker_init(spec_json: str, exact: bool) -> None:
    from tokenizers import Tokenizer

    import regex

    spec = json.loads(spec_json)
    tok = Tokenizer.from_str(spec_json)
    _W["tok"] = tok
    _W["normalize"] = tok.normalizer.normalize_str if tok.normalizer else None
    _W["pretokenize"] = _pretokenizer(spec, tok, exact)
    _W["by_word"] = not exact and splits_at_single_spaces(spec)
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    _W["added"] = added
    _W["added_re"] = regex.compile("(" + "|".join(map(regex.escape, sorted(added, key=len, reverse=True))) + ")")
    new: list[str] = []
    counter = count().__next__
    _W["new"] = new
    _W["units"] = {kind: _Numbering(kind, counter, new) for kind in (SPECIAL, WORD, WHOLE, PIECE)}


def _pretokenizer(spec: dict, tok, exact: bool):
    fast = None if exact else compile_pretokenizer(spec)
    if fast is not None:
        return fast
    pre = tok.pre_tokenizer
    return (lambda text: [to_text(p) for p, _ in pre.pre_tokenize_str(text)]) if pre else (lambda text: [text])


def to_text(bytelevel_piece: str) -> str:
    return token_bytes(bytelevel_piece).decode("utf-8", errors="surrogateescape")


def _add_units(part: str, out: list[int]) -> None:
    units = _W["units"]
    if _W["by_word"] and _SPACE_IN_WHITESPACE.search(part) is None:
        words = part.split(" ")
        if words[0]:
            out.append(units[WHOLE][words[0]])
        out.extend(map(units[WORD].__getitem__, islice(words, 1, None)))
    else:
        out.extend(map(units[PIECE].__getitem__, _W["pretokenize"](part)))


def _units_of(text: str) -> list[int]:
    if _W["normalize"]:
        text = _W["normalize"](text)
    out: list[int] = []
    if not any(a in text for a in _W["added"]):
        _add_units(text, out)
        return out
    for i, part in enumerate(_W["added_re"].split(text)):
        if i % 2:
            out.append(_W["units"][SPECIAL][part])
        elif part:
            _add_units(part, out)
    return out


def _index_chunk(task: tuple[list[str], bool]):
    """Phase 1: units of a chunk of JSON lines as worker-local indices (or their counts)."""
    lines, keep_sequence = task
    new = _W["new"]
    new.clear()
    occurrences: list[int] = []
    doc_units = np.zeros(len(lines), dtype=np.int64)
    n_bytes = 0
    for i, line in enumerate(lines):
        doc = json.loads(line)["text"]
        units = _units_of(doc)
        occurrences.extend(units)
        doc_units[i] = len(units)
        n_bytes += len(doc.encode("utf-8"))
    local = np.asarray(occurrences, dtype=np.int64)
    n_known = sum(map(len, _W["units"].values()))
    payload = local if keep_sequence else np.bincount(local, minlength=n_known)
    return os.getpid(), list(new), payload, doc_units, n_bytes


def _pieces_of_units(keys: list[str]) -> list[list[str]]:
    """Phase 2a: the pre-tokens of each unit (an added token stays one piece, SPECIAL-prefixed)."""
    pretokenize = _W["pretokenize"]
    out = []
    for key in keys:
        kind, text = key[0], key[1:]
        if kind == WORD:  # a word of letters after a space is one pre-token for every pattern we cut by words
            out.append([" " + text] if text.isalpha() else pretokenize(" " + text))
        elif kind == WHOLE:
            out.append(pretokenize(text))
        elif kind == PIECE:
            out.append([text])
        else:
            out.append([key])
    return out


def _hf_segment(piece: bytes) -> list[int]:
    return [t.id for t in _W["tok"].model.tokenize(bytes_to_bytelevel(piece))]


def _segment_many(task: tuple[list[str], bool]) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Phase 2b: base segmentation of distinct pieces, as (lengths, flat ids, byte-level forms,
    number of sampled pieces where the rank merger and the HF model disagree)."""
    keys, use_ranks = task
    segment = _SEGMENTER[0] if use_ranks and _SEGMENTER[0] else _hf_segment
    added = _W["added"]
    segs, forms, mismatches = [], [], 0
    for n, key in enumerate(keys):
        if key.startswith(SPECIAL):
            segs.append([added[key[1:]]])
            forms.append(key)
            continue
        data = key.encode("utf-8", "surrogateescape")
        forms.append(bytes_to_bytelevel(data))
        seg = segment(data)
        if segment is not _hf_segment and n % VERIFY_EVERY == 0 and seg != _hf_segment(data):
            mismatches += 1
        segs.append(seg)
    lens = np.fromiter(map(len, segs), dtype=np.int64, count=len(segs))
    flat = np.fromiter((i for s in segs for i in s), dtype=np.int64, count=int(lens.sum()))
    return lens, flat, forms, mismatches


# ---- main side -----------------------------------------------------------------------------


class Ragged:
    """Rows of ids of varying length, stored flat: row r is flat[starts[r] : starts[r] + lens[r]]."""

    def __init__(self, lens: np.ndarray, flat: np.ndarray) -> None:
        self.lens, self.flat = lens, flat
        self.starts = np.cumsum(lens) - lens

    def expand(self, rows: np.ndarray) -> np.ndarray:
        """The concatenated ids of a sequence of rows."""
        lens = self.lens[rows]
        offsets = np.cumsum(lens) - lens
        positions = np.repeat(self.starts[rows] - offsets, lens) + np.arange(int(lens.sum()))
        return self.flat[positions]

    def compose(self, inner: Ragged) -> Ragged:
        """Rows of inner's ids: each row's ids are inner's rows named by this row's ids."""
        token_lens = np.bincount(np.repeat(np.arange(len(self.lens)), self.lens), weights=inner.lens[self.flat],
                                 minlength=len(self.lens)).astype(np.int64)
        return Ragged(token_lens, inner.expand(self.flat))


class UnitTable:
    """Distinct units, numbered globally in order of first sight; later their pieces and tokens."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.gid: dict[str, int] = {}
        self.local_to_global: dict[int, Growing] = {}
        self.piece_keys: list[str] = []  # distinct pieces in order of first sight in the text
        self.piece_forms: list[str] = []  # byte-level form of each piece
        self.pieces: Ragged | None = None  # unit -> piece numbers
        self.tokens: Ragged | None = None  # unit -> token ids
        self.piece_tokens: Ragged | None = None  # piece -> token ids

    def absorb(self, pid: int, new: list[str]) -> np.ndarray:
        """Register a worker's new units; return its local->global translation array."""
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
        unit_pieces = [p for r in pool.map(_pieces_of_units, [self.keys[i : i + step] for i in range(0, len(self.keys), step)]) for p in r]
        number = defaultdict(count().__next__)
        flat = np.fromiter((number[p] for ps in unit_pieces for p in ps), dtype=np.int64)
        self.pieces = Ragged(np.fromiter(map(len, unit_pieces), dtype=np.int64, count=len(unit_pieces)), flat)
        self.piece_keys = list(number)
        log.info("segmenting %d distinct pre-tokens of %d distinct units", len(self.piece_keys), len(self.keys))
        step = -(-len(self.piece_keys) // parts) or 1
        slices = [self.piece_keys[i : i + step] for i in range(0, len(self.piece_keys), step)]
        results = pool.map(_segment_many, [(s, True) for s in slices])
        mismatches = sum(r[3] for r in results)
        if mismatches:
            log.warning("tiktoken's merger disagreed with the tokenizer on %d sampled pieces; segmenting with the tokenizer", mismatches)
            results = pool.map(_segment_many, [(s, False) for s in slices])
        self.piece_tokens = Ragged(
            np.concatenate([r[0] for r in results] or [np.zeros(0, np.int64)]),
            np.concatenate([r[1] for r in results] or [np.zeros(0, np.int64)]),
        )
        self.piece_forms = [f for r in results for f in r[2]]
        self.tokens = self.pieces.compose(self.piece_tokens)

    def piece_counts(self, unit_counts: np.ndarray) -> np.ndarray:
        full = np.zeros(len(self.keys), dtype=np.int64)
        full[: len(unit_counts)] = unit_counts
        weights = np.repeat(full, self.pieces.lens)
        return np.bincount(self.pieces.flat, weights=weights, minlength=len(self.piece_keys)).astype(np.int64)


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
    table = UnitTable()
    counts = {name: Growing() for name in splits}
    stats: dict[str, dict] = {}
    names = (
        "train_ids.bin", "train_offsets.npy", "train_ids.json",
        "token_frequencies.parquet", "pretokens.parquet", "corpus_stats.json",
    )
    _W["tok"] = tok
    _SEGMENTER[0] = None if exact else RankSegmenter.build(spec, _hf_segment)
    log.info("segmenting with %s", "tiktoken's merger, checked against the tokenizer" if _SEGMENTER[0] else "the tokenizer")
    ctx = mp.get_context("fork")
    with atomic_outputs(*(out_dir / n for n in names)) as paths, ctx.Pool(
        max(1, threads), initializer=_worker_init, initargs=(spec_json, exact)
    ) as pool:
        bin_path, offsets_path, meta_path, freq_path, pretokens_path, stats_path = paths
        sequence_path = bin_path.with_name("units.tmp")
        doc_units_all: list[np.ndarray] = []
        with open(sequence_path, "wb") as sequence:
            for name, path in splits.items():
                keep = name == "train"
                n_docs = n_bytes = 0
                bar = progress(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"pre-tokenize {name}")
                for pid, new, payload, doc_units, chunk_utf8 in pool.imap(_index_chunk, _chunks(path, chunk_bytes, keep)):
                    trans = table.absorb(pid, new)
                    if keep:
                        sequence.write(trans[payload].astype(np.int32).tobytes())
                        doc_units_all.append(doc_units)
                        payload = np.bincount(payload, minlength=len(trans))
                    nz = np.nonzero(payload)[0]
                    counts[name].add_at(trans[nz], payload[nz])
                    n_docs += len(doc_units)
                    n_bytes += chunk_utf8
                    bar.update(chunk_utf8)
                bar.close()
                stats[name] = {"documents": n_docs, "bytes": n_bytes}
        table.segment(pool, 8 * max(1, threads))
        log.info("writing token ids and tables; checking every %dth training document against the tokenizer", GUARD_EVERY)
        sample = pool.apply_async(_encode_sample, (splits["train"], GUARD_EVERY))
        written = pool.apply_async(_write_ids, (table.tokens, sequence_path, doc_units_all, bin_path, dtype))
        for name in splits:
            c = counts[name].view()
            n_tokens = int((c * table.tokens.lens[: len(c)]).sum())
            stats[name]["tokens"] = n_tokens
            stats[name]["tokens_per_byte"] = round(n_tokens / stats[name]["bytes"], 6) if stats[name]["bytes"] else None
            log.info("%s: %d documents, %d bytes, %d tokens", name, stats[name]["documents"], stats[name]["bytes"], n_tokens)
        _write_tables(table, counts, tok, spec, freq_path, pretokens_path)
        offsets = written.get()
        sequence_path.unlink()
        np.save(offsets_path, offsets)
        _guard(sample.get(), splits["train"], bin_path, offsets, dtype)
        meta = {
            "dtype": np.dtype(dtype).name,
            "byteorder": "little",
            "tokens": int(offsets[-1]),
            "documents": len(offsets) - 1,
            "vocab_size": vocab_size,
            "offsets": "train_offsets.npy",
        }
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _write_ids(tokens: Ragged, sequence_path: Path, doc_units_all: list[np.ndarray], bin_path: Path, dtype) -> np.ndarray:
    """Phase 3: turn the training split's unit sequence into token ids, chunk by chunk."""
    sequence = np.memmap(sequence_path, dtype=np.int32, mode="r") if sequence_path.stat().st_size else np.zeros(0, np.int32)
    offsets = [np.zeros(1, dtype=np.int64)]
    pos = 0
    with open(bin_path, "wb") as out:
        for doc_units in doc_units_all:
            gids = np.asarray(sequence[pos : pos + int(doc_units.sum())], dtype=np.int64)
            pos += len(gids)
            out.write(tokens.expand(gids).astype(dtype).tobytes())
            tokens_so_far = np.concatenate([[0], np.cumsum(tokens.lens[gids])])
            offsets.append(offsets[-1][-1] + tokens_so_far[np.cumsum(doc_units)])
    return np.concatenate(offsets)


def _encode_sample(train: Path, every: int) -> list[tuple[int, list[int]]]:
    """Every n-th training document as the tokenizer itself encodes it (run in a worker)."""
    with open(train, encoding="utf-8") as handle:
        sample = [(n, json.loads(line)["text"]) for n, line in enumerate(handle) if n % every == 0]
    return [(n, _W["tok"].encode(text, add_special_tokens=False).ids) for n, text in sample]


def _guard(sample: list[tuple[int, list[int]]], train: Path, bin_path: Path, offsets: np.ndarray, dtype) -> None:
    """The sampled documents' ids in train_ids.bin must equal the tokenizer's own, exactly."""
    ids = np.memmap(bin_path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
    for number, expected in sample:
        if ids[offsets[number] : offsets[number + 1]].tolist() != expected:
            raise RuntimeError(
                f"{train}: document {number + 1}: the fast pre-tokenizer disagrees with the tokenizer; "
                "rerun with --exact-pretokenizer and report this document"
            )


def _write_tables(table: UnitTable, counts: dict[str, Growing], tok, spec: dict, freq_path: Path, pretokens_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def piece_counts(name: str) -> np.ndarray:
        return table.piece_counts(counts[name].view() if name in counts else np.zeros(0, np.int64))

    domain, general = piece_counts("train"), piece_counts("general_train")
    segs = table.piece_tokens
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    token_count = np.bincount(segs.flat, weights=np.repeat(domain, segs.lens), minlength=vocab_size).astype(np.int64)
    token_general = np.bincount(segs.flat, weights=np.repeat(general, segs.lens), minlength=vocab_size).astype(np.int64)
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

    keys = table.piece_keys
    is_special = np.fromiter((k.startswith(SPECIAL) for k in keys), dtype=bool, count=len(keys))
    keep = np.nonzero(~is_special & ((domain > 0) | (general > 0)))[0]
    keep = keep[np.lexsort((keep, -general[keep], -domain[keep]))]  # by count, then first sight
    rows = keep.tolist()
    pre = pa.table(
        {
            "pretoken": [table.piece_forms[g] for g in rows],
            "text": [keys[g] for g in rows],
            "count": pa.array(domain[keep], pa.int64()),
            "general_count": pa.array(general[keep], pa.int64()),
            "ids": pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(segs.lens[keep])]), pa.int32()),
                pa.array(segs.expand(keep), pa.int32()),
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
