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
import gc
from array import array
import json
import multiprocessing as mp
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Iterator
from itertools import chain, count, islice
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

    def add_dense(self, values: np.ndarray) -> None:
        """data[: len(values)] += values."""
        if len(values) > self.size:
            self.extend(np.zeros(len(values) - self.size))
        self.data[: len(values)] += values


# ---- worker side -------------------------------------------------------------------------
# Phase 1 (parallel): cut documents into units and give each distinct unit a worker-local index.
# A unit is a space-separated word with its leading space (the pre-tokenizers we speed up never let
# a pre-token cross such a space, see splits_at_single_spaces), or one pre-token where that does
# not hold. Phase 2 (parallel): the distinct units, split among the workers, are pre-tokenized once
# and their pre-tokens segmented with the base BPE. Phase 3: the training split's unit sequence is
# expanded into token ids while the tables are written. Counting by unit is exact and much cheaper
# than encoding every document.

SPECIAL = "\x00"  # unit kinds, as the first character of a unit's key: an added token met in the text,
WORD = "\x01"  # a word that followed a single space (its pre-tokens are those of " " + word),
WHOLE = "\x02"  # text before the first space (pre-tokenized as it is),
PIECE = "\x03"  # one pre-token, kept verbatim
_SPACE_IN_WHITESPACE = re.compile(r" (?<=\s )(?:\s|\Z)")  # a space with whitespace (or the end) on both sides

VERIFY_EVERY = 32  # every n-th distinct pre-token segmented by ranks is checked against the HF model
GUARD_EVERY = 256  # every n-th training document is encoded by the tokenizer itself and compared
_W: dict = {}


class RankMismatch(Exception):
    """tiktoken's merger disagreed with the tokenizer on a sampled pre-token."""


class _Numbering(dict):
    """Key -> worker-local unit index, numbered on first sight; new keys are noted with their kind."""

    def __init__(self, kind: str, counter, new: list[str]) -> None:
        super().__init__()
        self.kind, self.counter, self.new = kind, counter, new

    def __missing__(self, key: str) -> int:
        value = self[key] = self.counter()
        self.new.append(self.kind + key)
        return value


def _worker_init(spec_json: str, exact: bool, use_ranks: bool) -> None:
    from tokenizers import Tokenizer

    gc.disable()  # millions of new strings and lists, no reference cycles: the collector only costs time
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
    _W["segment"] = (RankSegmenter.build(spec, _hf_segment) if use_ranks and not exact else None) or _hf_segment
    _W["pieces"] = {}
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


def _hf_segment(piece: bytes) -> list[int]:
    return [t.id for t in _W["tok"].model.tokenize(bytes_to_bytelevel(piece))]


def _add_units(part: str, out: list[int]) -> None:
    units = _W["units"]
    if _W["by_word"] and _SPACE_IN_WHITESPACE.search(part) is None:
        words = part.split(" ")
        if words[0]:
            out.append(units[WHOLE][words[0]])
        out.extend(map(units[WORD].__getitem__, islice(words, 1, None)))
    else:
        out.extend(map(units[PIECE].__getitem__, _W["pretokenize"](part)))


def _add_units_of(text: str, out: list[int]) -> None:
    if _W["normalize"]:
        text = _W["normalize"](text)
    if not any(a in text for a in _W["added"]):
        _add_units(text, out)
        return
    for i, part in enumerate(_W["added_re"].split(text)):
        if i % 2:
            out.append(_W["units"][SPECIAL][part])
        elif part:
            _add_units(part, out)


def _index_chunk(task: tuple[str, int, int, bool]) -> dict:
    """Phase 1: units of a chunk of JSON lines as worker-local indices (or their counts), the units new
    to this worker, and the tokenizer's own ids of every GUARD_EVERY-th line of the chunk."""
    path, start, end, keep_sequence = task
    with open(path, "rb") as handle:
        handle.seek(start)
        lines = handle.read(end - start).decode("utf-8").split("\n")
    if lines and not lines[-1]:
        lines.pop()
    new = _W["new"]
    new.clear()
    occurrences: list[int] = []
    doc_units = np.zeros(len(lines), dtype=np.int64)
    sample: list[tuple[int, list[int]]] = []
    n_bytes = 0
    for i, line in enumerate(lines):
        doc = json.loads(line)["text"]
        before = len(occurrences)
        _add_units_of(doc, occurrences)
        doc_units[i] = len(occurrences) - before
        n_bytes += len(doc.encode("utf-8"))
        if keep_sequence and i % GUARD_EVERY == 0:
            sample.append((i, _W["tok"].encode(doc, add_special_tokens=False).ids))
    local = np.frombuffer(array("l", occurrences), dtype=np.int64)
    known = sum(map(len, _W["units"].values()))
    return {
        "units": list(new),
        "payload": local if keep_sequence else np.bincount(local, minlength=known),
        "doc_units": doc_units,
        "bytes": n_bytes,
        "sample": sample,
    }


def _resolve_units(keys: list[str]) -> dict:
    """Phase 2: pre-tokens of new units, each pre-token new to this process segmented once. Returns
    unit -> piece numbers (numbered in order of first sight, across calls) and the new pieces with
    their segmentations."""
    pretokenize, segment, added = _W["pretokenize"], _W["segment"], _W["added"]
    pieces: dict[str, int] = _W["pieces"]
    first_new = len(pieces)
    piece_segs: list[list[int]] = []
    unit_pieces: list[list[int]] = []
    mismatches = 0
    for key in keys:
        kind, text = key[0], key[1:]
        if kind == WORD:  # a word of letters after a space is one pre-token for every pattern we cut by words
            parts = [" " + text] if text.isalpha() else pretokenize(" " + text)
        elif kind == WHOLE:
            parts = pretokenize(text)
        elif kind == PIECE:
            parts = [text]
        else:
            parts = [key]  # an added token: one piece, SPECIAL-prefixed
        numbers = []
        for part in parts:
            number = pieces.get(part)
            if number is None:
                number = pieces[part] = len(pieces)
                if part.startswith(SPECIAL):
                    piece_segs.append([added[part[1:]]])
                else:
                    data = part.encode("utf-8", "surrogateescape")
                    seg = segment(data)
                    if segment is not _hf_segment and number % VERIFY_EVERY == 0 and seg != _hf_segment(data):
                        mismatches += 1
                    piece_segs.append(seg)
            numbers.append(number)
        unit_pieces.append(numbers)
    return {"pieces": list(islice(pieces, first_new, None)), "segs": Ragged(*_ragged(piece_segs)),
            "unit_pieces": Ragged(*_ragged(unit_pieces)), "mismatches": mismatches}


def _ragged(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    return lens, np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lens.sum()))


# ---- main side -----------------------------------------------------------------------------


class Ragged:
    """Rows of ids of varying length, stored flat: row r is flat[starts[r] : starts[r] + lens[r]]."""

    def __init__(self, lens: np.ndarray, flat: np.ndarray, starts: np.ndarray | None = None) -> None:
        self.lens, self.flat = lens, flat
        self.starts = np.cumsum(lens) - lens if starts is None else starts

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
    """Distinct units and pre-tokens, numbered in order of first sight, with their segmentations;
    filled batch by batch as the resolver answers, so token ids can be written while it works."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.piece_keys: list[str] = []
        self.mismatches = 0
        self.grown = {name: Growing() for name in (
            "piece_lens", "piece_starts", "piece_flat", "unit_lens", "unit_starts", "unit_flat", "unit_piece_lens",
            "unit_piece_flat")}
        self.pieces: Ragged | None = None  # unit -> piece numbers (after finish)
        self.piece_tokens: Ragged | None = None  # piece -> token ids (after finish)
        self.tokens: Ragged | None = None  # unit -> token ids (after finish)

    @property
    def resolved_units(self) -> int:
        return self.grown["unit_lens"].size

    def add(self, answer: dict) -> None:
        """Append one resolver answer (answers come in the order of the units asked about)."""
        g = self.grown
        self.mismatches += answer["mismatches"]
        self.piece_keys += answer["pieces"]
        segs, by_unit = answer["segs"], answer["unit_pieces"]
        g["piece_starts"].extend(self._starts("piece_flat", segs.lens))
        for prefix, part in (("piece", segs), ("unit_piece", by_unit)):
            g[f"{prefix}_lens"].extend(part.lens)
            g[f"{prefix}_flat"].extend(part.flat)
        pieces = Ragged(g["piece_lens"].view(), g["piece_flat"].view(), g["piece_starts"].view())
        tokens = by_unit.compose(pieces)
        g["unit_starts"].extend(self._starts("unit_flat", tokens.lens))
        g["unit_lens"].extend(tokens.lens)
        g["unit_flat"].extend(tokens.flat)

    def _starts(self, flat: str, lens: np.ndarray) -> np.ndarray:
        return self.grown[flat].size + np.cumsum(lens) - lens

    def unit_tokens(self) -> Ragged:
        g = self.grown
        return Ragged(g["unit_lens"].view(), g["unit_flat"].view(), g["unit_starts"].view())

    def finish(self) -> None:
        if self.mismatches:
            raise RankMismatch
        g = self.grown
        self.piece_tokens = Ragged(g["piece_lens"].view(), g["piece_flat"].view())
        self.pieces = Ragged(g["unit_piece_lens"].view(), g["unit_piece_flat"].view())
        self.tokens = self.unit_tokens()

    def piece_counts(self, unit_counts: np.ndarray) -> np.ndarray:
        full = np.zeros(len(self.keys), dtype=np.int64)
        full[: len(unit_counts)] = unit_counts
        weights = np.repeat(full, self.pieces.lens)
        return np.bincount(self.pieces.flat, weights=weights, minlength=len(self.piece_keys)).astype(np.int64)


class IdWriter:
    """Writes the training split's token ids chunk by chunk, as soon as the chunk's units are resolved."""

    def __init__(self, handle, dtype) -> None:
        self.handle, self.dtype = handle, dtype
        self.pending: list[tuple[np.ndarray, np.ndarray, int]] = []  # (unit ids, units per document, units needed)
        self.offsets = [np.zeros(1, dtype=np.int64)]

    def add(self, units: np.ndarray, doc_units: np.ndarray, needed: int) -> None:
        self.pending.append((units, doc_units, needed))

    def write_ready(self, table: UnitTable) -> None:
        done = 0
        tokens = None
        for units, doc_units, needed in self.pending:
            if needed > table.resolved_units:
                break
            tokens = tokens or table.unit_tokens()
            self.handle.write(tokens.expand(units).astype(self.dtype).tobytes())
            so_far = np.concatenate([[0], np.cumsum(tokens.lens[units])])
            self.offsets.append(self.offsets[-1][-1] + so_far[np.cumsum(doc_units)])
            done += 1
        del self.pending[:done]


def _chunks(path: Path, chunk_bytes: int, keep_sequence: bool) -> Iterator[tuple[str, int, int, bool]]:
    """Byte ranges of about chunk_bytes that end at line ends; the workers read them themselves."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        start = 0
        while start < size:
            handle.seek(min(start + chunk_bytes, size) - 1)
            handle.readline()
            end = handle.tell()
            yield str(path), start, end, keep_sequence
            start = end


def analyze(
    tokenizer: str,
    splits: dict[str, Path],
    out_dir: Path,
    threads: int = 2,
    exact: bool = False,
    chunk_bytes: int = 1 << 20,
    trust_remote_code: bool = False,
) -> dict:
    """Analyze the splits (keys: train, heldout, general_train, general_heldout) into out_dir.

    threads is accepted for callers; the work uses this process and one helper process.
    """
    spec = load_tokenizer_json(tokenizer, trust_remote_code)
    check_byte_level_bpe(spec, tokenizer)
    threading.Thread(target=_import_pyarrow, daemon=True).start()  # needed at the end; load it meanwhile
    try:
        return _analyze(spec, splits, out_dir, exact, chunk_bytes, use_ranks=True)
    except RankMismatch:
        log.warning("tiktoken's merger disagreed with the tokenizer on sampled pre-tokens; analysing again with the tokenizer")
        return _analyze(spec, splits, out_dir, exact, chunk_bytes, use_ranks=False)


def _import_pyarrow() -> None:
    import pyarrow.parquet  # noqa: F401


def _analyze(spec: dict, splits: dict[str, Path], out_dir: Path, exact: bool, chunk_bytes: int,
             use_ranks: bool) -> dict:
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
    ctx = mp.get_context("fork")
    with atomic_outputs(*(out_dir / n for n in names)) as paths, ctx.Pool(
        1, initializer=_worker_init, initargs=(spec_json, exact, use_ranks)
    ) as pool:
        _worker_init(spec_json, exact, use_ranks=False)  # this process cuts and numbers units; the pool's resolves them
        bin_path, offsets_path, meta_path, freq_path, pretokens_path, stats_path = paths
        sample: list[tuple[int, list[int]]] = []
        asked: deque = deque()  # AsyncResults of _resolve_units not yet taken, in order
        with open(bin_path, "wb") as bin_handle:
            writer = IdWriter(bin_handle, dtype)

            def take_answers(wait: bool) -> None:
                while asked and (wait or asked[0].ready()):
                    table.add(asked.popleft().get())
                writer.write_ready(table)

            for name, path in splits.items():
                keep = name == "train"
                n_docs = n_bytes = 0
                bar = progress(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"analyze {name}")
                log.info("analyzing %s (%s)", name, path)
                for task in _chunks(path, chunk_bytes, keep):
                    chunk = _index_chunk(task)
                    table.keys += chunk["units"]
                    asked.append(pool.apply_async(_resolve_units, (chunk["units"],)))
                    if keep:
                        counts[name].add_dense(np.bincount(chunk["payload"]))
                        writer.add(chunk["payload"], chunk["doc_units"], len(table.keys))
                    else:
                        counts[name].add_dense(chunk["payload"])
                    take_answers(wait=False)
                    sample += [(n_docs + i, ids) for i, ids in chunk["sample"]]
                    n_docs += len(chunk["doc_units"])
                    n_bytes += chunk["bytes"]
                    bar.update(task[2] - task[1])
                bar.close()
                stats[name] = {"documents": n_docs, "bytes": n_bytes}
            take_answers(wait=True)
        table.finish()
        offsets = np.concatenate(writer.offsets)
        log.info("%d distinct units, %d distinct pre-tokens; writing tables", len(table.keys), len(table.piece_keys))
        for name in splits:
            c = counts[name].view()
            n_tokens = int((c * table.tokens.lens[: len(c)]).sum())
            stats[name]["tokens"] = n_tokens
            stats[name]["tokens_per_byte"] = round(n_tokens / stats[name]["bytes"], 6) if stats[name]["bytes"] else None
            log.info("%s: %d documents, %d bytes, %d tokens", name, stats[name]["documents"], stats[name]["bytes"], n_tokens)
        _write_tables(table, counts, tok, spec, freq_path, pretokens_path)
        np.save(offsets_path, offsets)
        _guard(sample, splits["train"], bin_path, offsets, dtype)
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


def _guard(sample: list[tuple[int, list[int]]], train: Path, bin_path: Path, offsets: np.ndarray, dtype) -> None:
    """The sampled documents' ids in train_ids.bin must equal the tokenizer's own, exactly."""
    ids = np.memmap(bin_path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
    for number, expected in sample:
        if ids[offsets[number] : offsets[number + 1]].tolist() != expected:
            raise RuntimeError(
                f"{train}: document {number + 1}: the fast pre-tokenizer disagrees with the tokenizer; "
                "rerun with --exact-pretokenizer and report this document"
            )


def _write_tables(table: UnitTable, counts: dict[str, Growing], tok, spec: dict, freq_path: Path,
                  pretokens_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
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
    offsets = pa.array(np.concatenate([[0], np.cumsum(segs.lens[keep])]), pa.int32())
    ids = segs.expand(keep)
    # A pre-token's byte-level form is its tokens' strings joined.
    forms = pc.binary_join(pa.ListArray.from_arrays(offsets, pa.array(tokens).take(pa.array(ids))), "")
    pre = pa.table(
        {
            "pretoken": forms,
            "text": [keys[g] for g in rows],
            "count": pa.array(domain[keep], pa.int64()),
            "general_count": pa.array(general[keep], pa.int64()),
            "ids": pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())),
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
    parser.add_argument("--threads", type=int, default=2, help="kept for the rule; the analysis uses this process and one helper")
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
    analyze(args.tokenizer, splits, args.out_dir, args.threads, args.exact_pretokenizer, trust_remote_code=args.trust_remote_code)


if __name__ == "__main__":
    run_main(main)
