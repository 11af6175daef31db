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
import json
import multiprocessing as mp
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.analysis_tables import write_frequencies, write_pretokens  # noqa: E402
from ivr.cli import UserError, atomic_outputs, log, progress, run_main  # noqa: E402
from ivr.tokenization import (  # noqa: E402
    RankSegmenter,
    bytes_to_bytelevel,
    interleave,
    ragged,
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


class Ragged:
    """Rows of ids of varying length, stored flat: row r is flat[starts[r] : starts[r] + lens[r]]."""

    def __init__(self, lens: np.ndarray, flat: np.ndarray, starts: np.ndarray | None = None) -> None:
        self.lens, self.flat = lens, flat
        self.starts = np.cumsum(lens) - lens if starts is None else starts

    def expand(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The concatenated ids of a sequence of rows, and where each row's ids end."""
        lens = self.lens[rows]
        ends = np.cumsum(lens)
        filled = np.flatnonzero(lens)
        if not len(filled):
            return self.flat[:0], ends
        # Positions in flat as a running sum: +1 within a row, a jump to the row's start at each row's first id.
        starts, lens = self.starts[rows[filled]], lens[filled]
        positions = np.ones(int(ends[-1]), np.int64)
        positions[ends[filled] - lens] = starts - np.concatenate([[0], starts[:-1] + lens[:-1]]) + 1
        positions[0] = starts[0]
        np.cumsum(positions, out=positions)
        return self.flat[positions], ends

    def compose(self, inner: Ragged) -> Ragged:
        """Rows of inner's ids: each row's ids are inner's rows named by this row's ids."""
        ids, ends = inner.expand(self.flat)
        row_ends = np.concatenate([[0], ends])[np.cumsum(self.lens)]
        return Ragged(np.diff(row_ends, prepend=0), ids)


class GrowingRagged:
    """A Ragged that grows by appending rows."""

    def __init__(self, dtype=np.int64) -> None:
        self.lens, self.starts, self.flat = Growing(), Growing(), Growing(dtype)

    def append(self, lens: np.ndarray, flat: np.ndarray) -> None:
        self.starts.extend(self.flat.size + np.cumsum(lens) - lens)
        self.lens.extend(lens)
        self.flat.extend(flat)

    def view(self) -> Ragged:
        return Ragged(self.lens.view(), self.flat.view(), self.starts.view())


def ids_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# ---- worker side -------------------------------------------------------------------------
# Cutting (this process): documents become units, numbered on first sight. A unit is a
# space-separated word with its leading space (the pre-tokenizers we speed up never let a pre-token
# cross such a space, see splits_at_single_spaces), or one pre-token where that does not hold. The
# cut is vectorized: pyarrow splits and hashes each chunk, and the chunk's distinct words are looked
# up in a sorted table of 64-bit hashes (StringNumbering), so no Python object is made per word.
# Resolving (one helper process, meanwhile): the new units are pre-tokenized once, most of them in
# one regex pass over them all joined, and their new pre-tokens segmented with the base BPE in one
# tiktoken call; the helper also expands the training split's units into token ids and appends them
# to the ids file (in a thread). Counting by unit is exact and much cheaper than encoding every document.

SPECIAL = "\x00"  # unit kinds, as the first character of a unit's key: an added token met in the text,
WORD = "\x01"  # a word that followed a single space (its pre-tokens are those of " " + word),
WHOLE = "\x02"  # text before the first space (pre-tokenized as it is),
PIECE = "\x03"  # one pre-token, kept verbatim
_SPACE_IN_WHITESPACE = re.compile(r" (?<=\s )(?:\s|\Z)")  # a space with whitespace (or the end) on both sides
# The same test in RE2 syntax for pyarrow, with Python's \s spelled out (RE2's \s is ASCII only).
_WHITESPACE_RE2 = "".join(f"\\x{{{c:x}}}" for c in range(0x110000) if chr(c).isspace())
_SPACE_IN_WHITESPACE_RE2 = f"[{_WHITESPACE_RE2}] (?:[{_WHITESPACE_RE2}]|$)"
_NOT_SPACE_FIRST_RE2 = f"^[^{_WHITESPACE_RE2}]"

VERIFY_EVERY = 32  # every n-th distinct pre-token segmented by ranks is checked against the HF model
GUARD_EVERY = 256  # every n-th training document is encoded by the tokenizer itself and compared
_W: dict = {}


_HASH_BASE = np.uint64(0x100000001B3 * 2 + 1)
_HASH_LENGTH = np.uint64(0x9E3779B97F4A7C15)


def hash_strings(texts) -> np.ndarray:
    """A 64-bit polynomial hash of each string of a pyarrow string array, vectorized (equal strings,
    equal hashes; callers check hits against the strings)."""
    offsets = np.frombuffer(texts.buffers()[1], np.int32, len(texts) + 1, texts.offset * 4).astype(np.int64)
    data = texts.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    lens = np.diff(offsets)
    starts = offsets[:-1] - offsets[0]
    powers = np.cumprod(np.full(max(int(lens.max(initial=0)), 1), _HASH_BASE, np.uint64))
    within = np.arange(int(lens.sum())) - np.repeat(starts, lens)
    terms = (data[offsets[0] : offsets[-1]].astype(np.uint64) + np.uint64(1)) * powers[within]
    hashes = np.zeros(len(texts), np.uint64)
    filled = lens > 0
    if filled.any():
        hashes[filled] = np.add.reduceat(terms, starts[filled])
    return hashes ^ (lens.astype(np.uint64) * _HASH_LENGTH)


class RankMismatch(Exception):
    """tiktoken's merger disagreed with the tokenizer on a sampled pre-token."""


class StringNumbering:
    """Numbers strings on first sight, many at a time without a Python object per string: the strings
    seen are kept as a pyarrow array with their numbers and sorted 64-bit hashes. A lookup is a
    binary search by hash checked against the string itself; the rare strings whose hash is taken by
    another string are numbered through a dict instead. The counter is shared with other numberings
    (`total`), and new strings are noted in a shared list as (prefix, pyarrow array) batches."""

    def __init__(self, prefix: str, new: list, total: list[int]) -> None:
        import pyarrow as pa

        self.prefix, self.new, self.total = prefix, new, total
        self.hashes = np.zeros(0, np.uint64)  # sorted
        self.slots = np.zeros(0, np.int64)  # the slot in `strings` of each sorted hash
        self.strings = pa.array([], pa.string())
        self.numbers = np.zeros(0, np.int64)  # by slot
        self.clashing: dict[str, int] = {}

    def number(self, texts) -> np.ndarray:
        """Numbers of the strings of a pyarrow string array (repeats allowed)."""
        import pyarrow.compute as pc

        encoded = pc.dictionary_encode(texts)
        return self.number_distinct(encoded.dictionary)[encoded.indices.to_numpy()]

    def number_distinct(self, texts) -> np.ndarray:
        """Numbers of the strings of a pyarrow string array without repeats."""
        import pyarrow as pa
        import pyarrow.compute as pc

        hashes = hash_strings(texts)
        numbers = np.full(len(texts), -1, np.int64)
        at = np.minimum(np.searchsorted(self.hashes, hashes), max(len(self.hashes) - 1, 0))
        hit = np.flatnonzero(self.hashes[at] == hashes) if len(self.hashes) else np.zeros(0, np.int64)
        slot = self.slots[at[hit]]
        same = pc.equal(self.strings.take(pa.array(slot)), texts.take(pa.array(hit))).to_numpy(zero_copy_only=False)
        numbers[hit[same]] = self.numbers[slot[same]]
        fresh = np.ones(len(texts), bool)
        fresh[hit] = False
        fresh = np.flatnonzero(fresh)
        order = np.argsort(hashes[fresh], kind="stable")
        repeated = np.zeros(len(fresh), bool)  # a hash already given to an earlier fresh string
        repeated[order[1:]] = hashes[fresh][order[1:]] == hashes[fresh][order[:-1]]
        clashing = np.concatenate([hit[~same], fresh[repeated]])
        fresh = fresh[~repeated]
        numbers[fresh] = self._add(texts.take(pa.array(fresh)), hashes[fresh])
        if len(clashing):
            for i, text in zip(clashing.tolist(), texts.take(pa.array(clashing)).to_pylist()):
                if text not in self.clashing:
                    self.clashing[text] = self._next(1)
                    self.new.append((self.prefix, pa.array([text], pa.string())))
                numbers[i] = self.clashing[text]
        return numbers

    def _next(self, count: int) -> int:
        first = self.total[0]
        self.total[0] += count
        return first

    def _add(self, texts, hashes: np.ndarray) -> np.ndarray:
        import pyarrow as pa

        numbers = np.arange(self._next(len(texts)), self.total[0])
        order = np.argsort(hashes)
        at = np.searchsorted(self.hashes, hashes[order])
        self.hashes = np.insert(self.hashes, at, hashes[order])
        self.slots = np.insert(self.slots, at, len(self.strings) + order)
        self.strings = pa.concat_arrays([self.strings, texts])
        self.numbers = np.concatenate([self.numbers, numbers])
        if len(texts):
            self.new.append((self.prefix, texts))
        return numbers


def _init_common(spec: dict, tok, exact: bool) -> None:
    gc.disable()  # millions of new strings and lists, no reference cycles: the collector only costs time
    _W["tok"] = tok
    _W["pretokenize"] = _pretokenizer(spec, tok, exact)
    _W["added"] = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t["content"]}


def _init_cutter(spec: dict, tok, exact: bool) -> None:
    """State of this process, which cuts documents into units and numbers them."""
    import regex

    _init_common(spec, tok, exact)
    added = _W["added"]
    _W["normalize"] = tok.normalizer.normalize_str if tok.normalizer else None
    _W["by_word"] = not exact and splits_at_single_spaces(spec)
    _W["added_re"] = regex.compile("(" + "|".join(map(regex.escape, sorted(added, key=len, reverse=True))) + ")")
    literal = ("".join(f"\\x{{{ord(c):x}}}" for c in token) for token in added)
    _W["not_by_word_re2"] = "|".join([_SPACE_IN_WHITESPACE_RE2, *literal])  # documents cut in Python instead
    new: list = []  # (kind, pyarrow array) batches of the units numbered since it was last cleared
    _W["new"] = new
    units_seen = [0]
    _W["units"] = {kind: StringNumbering(kind, new, units_seen) for kind in (SPECIAL, WORD, WHOLE, PIECE)}


def _init_resolver(spec: dict, tok, exact: bool, use_ranks: bool) -> None:
    """State of the helper (spec and tok inherited through fork), which resolves units into ids."""
    _init_common(spec, tok, exact)
    _W["segmenter"] = RankSegmenter.build(spec, _hf_segment) if use_ranks and not exact else None
    _W["new_pieces"] = []
    _W["pieces"] = StringNumbering("", _W["new_pieces"], [0])
    _W["piece_tokens"] = GrowingRagged()  # piece number -> its base ids
    _W["unit_tokens"] = GrowingRagged(ids_dtype(tok.get_vocab_size(with_added_tokens=True)))  # unit -> ids
    _W["writer"], _W["writes"], _W["helper"] = ThreadPoolExecutor(1), [], ThreadPoolExecutor(1)


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


def _add_units(part: str, out: list[str]) -> None:
    if _W["by_word"] and _SPACE_IN_WHITESPACE.search(part) is None:
        words = part.split(" ")
        if words[0]:
            out.append(WHOLE + words[0])
        out.extend(WORD + word for word in islice(words, 1, None))
    else:
        out.extend(PIECE + piece for piece in _W["pretokenize"](part))


def _add_units_of(text: str, out: list[str]) -> None:
    """Unit keys (kind + text) of one (normalized) document, cut in Python."""
    if not any(a in text for a in _W["added"]):
        _add_units(text, out)
        return
    for i, part in enumerate(_W["added_re"].split(text)):
        if i % 2:
            out.append(SPECIAL + part)
        elif part:
            _add_units(part, out)


def _number_keys(keys: list[str]) -> np.ndarray:
    """Unit numbers of unit keys (kind + text)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys_array = pa.array(keys, pa.string())
    kinds = pc.utf8_slice_codeunits(keys_array, 0, 1)
    texts = pc.utf8_slice_codeunits(keys_array, 1)
    numbers = np.zeros(len(keys), np.int64)
    for kind, numbering in _W["units"].items():
        where = pc.equal(kinds, kind)
        if pc.any(where).as_py():
            numbers[np.flatnonzero(where.to_numpy(zero_copy_only=False))] = numbering.number(texts.filter(where))
    return numbers


def _units_by_word(docs) -> tuple[np.ndarray, np.ndarray]:
    """Units of documents with no added token and no space inside whitespace, vectorized: the first
    word of each document is a WHOLE unit (none if empty), every later word a WORD unit. Returns
    (units per document, unit numbers back to back)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    words = pc.split_pattern(docs, " ")
    offsets = words.offsets.to_numpy()
    offsets = offsets - offsets[0]
    firsts = offsets[:-1]  # every document has at least one (maybe empty) word
    flat = pc.list_flatten(words)
    encoded = pc.dictionary_encode(flat)
    word_of = encoded.indices.to_numpy()
    later = np.ones(len(flat), bool)
    later[firsts] = False
    used = np.flatnonzero(np.bincount(word_of[later], minlength=len(encoded.dictionary)))  # not only first
    numbers_of_used = _W["units"][WORD].number_distinct(encoded.dictionary.take(pa.array(used)))
    numbers = np.full(len(encoded.dictionary), -1, np.int64)
    numbers[used] = numbers_of_used
    numbers = numbers[word_of]
    first_words = pc.dictionary_encode(flat.take(pa.array(firsts)))
    numbers[firsts] = _W["units"][WHOLE].number_distinct(first_words.dictionary)[first_words.indices.to_numpy()]
    empty_first = (pc.binary_length(first_words.dictionary).to_numpy() == 0)[first_words.indices.to_numpy()]
    if empty_first.any():
        numbers = np.delete(numbers, firsts[empty_first])
    return np.diff(offsets) - empty_first, numbers


def _read_texts(path: str, start: int, end: int):
    """The "text" of each JSON line in a byte range, as a pyarrow string array."""
    import pyarrow as pa
    import pyarrow.json as pj

    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    if not data:
        return pa.array([], pa.string())
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    longest = int(np.diff(ends, prepend=-1).max(initial=0)) if len(ends) else len(data)
    table = pj.read_json(
        pa.py_buffer(data),
        read_options=pj.ReadOptions(block_size=max(1 << 20, longest + 2)),
        parse_options=pj.ParseOptions(explicit_schema=pa.schema([("text", pa.string())]),
                                      unexpected_field_behavior="ignore"),
    )
    return table.column("text").combine_chunks()


def _index_chunk(task: tuple[str, int, int, bool]) -> dict:
    """Units of a chunk of JSON lines as unit numbers (or their counts), the units new to this
    process, and the tokenizer's own ids of every GUARD_EVERY-th line of the chunk."""
    import pyarrow as pa
    import pyarrow.compute as pc

    path, start, end, keep_sequence = task
    new = _W["new"]
    new.clear()
    docs = _read_texts(path, start, end)
    if _W["normalize"]:
        docs = pa.array(map(_W["normalize"], docs.to_pylist()), pa.string())
    n_docs = len(docs)
    if _W["by_word"]:
        in_python = pc.match_substring_regex(docs, _W["not_by_word_re2"]).to_numpy(zero_copy_only=False)
    else:
        in_python = np.ones(n_docs, bool)
    sources = []
    by_word = np.flatnonzero(~in_python)
    if len(by_word):
        sources.append((by_word, _units_by_word(docs.take(pa.array(by_word)) if len(by_word) < n_docs else docs)))
    elsewise = np.flatnonzero(in_python)
    if len(elsewise):
        rows: list[list[str]] = []
        for text in docs.take(pa.array(elsewise)).to_pylist():
            rows.append([])
            _add_units_of(text, rows[-1])
        lens = np.fromiter(map(len, rows), np.int64, count=len(rows))
        sources.append((elsewise, (lens, _number_keys([key for row in rows for key in row]))))
    doc_units, local = interleave(sources, n_docs)
    sample = [(i, _W["tok"].encode(docs[i].as_py(), add_special_tokens=False).ids)
              for i in range(0, n_docs, GUARD_EVERY)] if keep_sequence else []
    known = _W["units"][WORD].total[0]
    return {
        "units": list(new),  # (kind, texts) batches
        "payload": local if keep_sequence else np.bincount(local, minlength=known),
        "doc_units": doc_units,
        "bytes": int(pc.sum(pc.binary_length(docs)).as_py() or 0),
        "sample": sample,
    }


def _resolve_units(batches: list, sequence: tuple[str, np.ndarray, np.ndarray] | None = None) -> dict:
    """Pre-tokens of new units ((kind, texts) batches, in the order they were numbered), each
    pre-token new to this process segmented once. Returns unit -> piece numbers (numbered in order of
    first sight, across calls), the new pieces with their segmentations, and each new unit's number
    of ids. With a sequence (ids file, unit numbers, units per document), also appends that
    sequence's ids to the file and returns each document's number of ids."""
    import pyarrow as pa

    pieces, new_pieces = _W["pieces"], _W["new_pieces"]
    new_pieces.clear()
    rows = [_pieces_of(kind, texts) for kind, texts in batches] or [(np.zeros(0, np.int64), np.zeros(0, np.int64))]
    unit_pieces = (np.concatenate([lens for lens, _ in rows]), np.concatenate([flat for _, flat in rows]))
    new = pa.concat_arrays([texts for _, texts in new_pieces]) if new_pieces else pa.array([], pa.string())
    segs, mismatches = _segment(new, pieces.total[0] - len(new))
    _W["piece_tokens"].append(*segs)
    unit_tokens = Ragged(*unit_pieces).compose(_W["piece_tokens"].view())
    _W["unit_tokens"].append(unit_tokens.lens, unit_tokens.flat)
    answer = {"pieces": new, "segs": Ragged(*segs), "unit_pieces": Ragged(*unit_pieces),
              "unit_token_lens": unit_tokens.lens, "mismatches": mismatches}
    if sequence is not None:
        path, units, doc_units = sequence
        table = _W["unit_tokens"].view()
        doc_ends = np.concatenate([[0], np.cumsum(table.lens[units])])[np.cumsum(doc_units)]
        answer["doc_tokens"] = np.diff(doc_ends, prepend=0)
        # Written by a thread (numpy and file writes release the GIL), in order, while the next units resolve.
        _W["writes"].append(_W["writer"].submit(_write_ids, path, table, units))
    return answer


def _pieces_of(kind: str, texts) -> tuple[np.ndarray, np.ndarray]:
    """Piece numbers of units of one kind: (pieces per unit, piece numbers back to back)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pretokenize, pieces = _W["pretokenize"], _W["pieces"]
    sources = []
    joinable = np.zeros(len(texts), bool)
    if kind == WORD:
        # Words that start with something other than whitespace can be joined by single spaces and
        # pre-tokenized in one pass: no pre-token crosses such a space (splits_at_single_spaces).
        joinable = pc.match_substring_regex(texts, _NOT_SPACE_FIRST_RE2).to_numpy(zero_copy_only=False)
    if joinable.any():
        words = texts.filter(pa.array(joinable))
        halves = _in_two_threads(lambda half: pretokenize(" " + " ".join(half.to_pylist())), words)
        parts = halves[0] + halves[1]
        part_ends = np.cumsum(np.fromiter(map(len, parts), np.int64, count=len(parts)))
        word_ends = np.cumsum(pc.utf8_length(words).to_numpy().astype(np.int64) + 1)
        last_part = np.searchsorted(part_ends, word_ends)
        if not np.array_equal(part_ends[np.minimum(last_part, len(parts) - 1)], word_ends):
            raise RuntimeError("a pre-token crossed a single space between words")
        numbers = pieces.number(pa.array(parts, pa.string()))
        sources.append((np.flatnonzero(joinable), (np.diff(last_part, prepend=-1), numbers)))
    rest = np.flatnonzero(~joinable)
    if len(rest):
        rows = []
        for text in texts.take(pa.array(rest)).to_pylist():
            if kind == WORD:
                rows.append(pretokenize(" " + text))
            elif kind == WHOLE:
                rows.append(pretokenize(text))
            elif kind == PIECE:
                rows.append([text])
            else:
                rows.append([SPECIAL + text])  # an added token: one piece, SPECIAL-prefixed
        lens = np.fromiter(map(len, rows), np.int64, count=len(rows))
        sources.append((rest, (lens, pieces.number(pa.array([p for row in rows for p in row], pa.string())))))
    return interleave(sources, len(texts))


def _in_two_threads(work, items: list) -> tuple:
    """work(first half), work(second half), the second in a helper thread: the regex and tiktoken
    release the GIL, so both cores help once the main process has finished cutting."""
    middle = len(items) // 2
    second = _W["helper"].submit(work, items[middle:])
    return work(items[:middle]), second.result()


def _write_ids(path: str, table: Ragged, units: np.ndarray) -> None:
    ids, _ = table.expand(units)
    with open(path, "ab") as handle:
        handle.write(memoryview(ids))


def _writes_done() -> None:
    """Wait for the ids written in the background (raising what failed there)."""
    while _W["writes"]:
        _W["writes"].pop(0).result()


def _segment(new, first_number: int) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """Base segmentations of new pre-tokens (a pyarrow string array, numbered from first_number),
    and how many of the sampled ones tiktoken's merger got wrong."""
    import pyarrow as pa
    import pyarrow.compute as pc

    added, segmenter = _W["added"], _W["segmenter"]
    special = pc.starts_with(new, SPECIAL).to_numpy(zero_copy_only=False)
    plain = new.filter(pa.array(~special)) if special.any() else new
    if segmenter is None:
        segs = ragged([_hf_segment(p.encode("utf-8", "surrogateescape")) for p in plain.to_pylist()])
    else:
        halves = _in_two_threads(segmenter.many, plain)
        segs = (np.concatenate([halves[0][0], halves[1][0]]), np.concatenate([halves[0][1], halves[1][1]]))
    if special.any():
        specials = ragged([[added[p[1:]]] for p in new.filter(pa.array(special)).to_pylist()])
        segs = interleave([(np.flatnonzero(~special), segs), (np.flatnonzero(special), specials)], len(new))
    mismatches = 0
    if segmenter is not None:
        lens, flat = segs
        starts = np.cumsum(lens) - lens
        sampled = np.arange(-first_number % VERIFY_EVERY, len(new), VERIFY_EVERY)
        for i, piece in zip(sampled.tolist(), new.take(pa.array(sampled)).to_pylist()):
            if not piece.startswith(SPECIAL):
                expected = _hf_segment(piece.encode("utf-8", "surrogateescape"))
                mismatches += flat[starts[i] : starts[i] + lens[i]].tolist() != expected
    return segs, mismatches


# ---- main side -----------------------------------------------------------------------------


class UnitTable:
    """Distinct units and pre-tokens, numbered in order of first sight, with their segmentations and
    each unit's number of ids, filled answer by answer from the resolver."""

    def __init__(self) -> None:
        self.units = 0
        self.piece_keys: list = []  # pyarrow string arrays, answer by answer
        self.mismatches = 0
        self.piece_tokens = GrowingRagged()  # piece -> token ids
        self.pieces = GrowingRagged()  # unit -> piece numbers
        self.token_lens = Growing()  # unit -> number of ids

    def add(self, answer: dict) -> None:
        """Append one resolver answer (answers come in the order of the units asked about)."""
        self.mismatches += answer["mismatches"]
        self.piece_keys.append(answer["pieces"])  # a pyarrow array
        self.piece_tokens.append(answer["segs"].lens, answer["segs"].flat)
        self.pieces.append(answer["unit_pieces"].lens, answer["unit_pieces"].flat)
        self.token_lens.extend(answer["unit_token_lens"])

    def piece_counts(self, unit_counts: np.ndarray) -> np.ndarray:
        pieces = self.pieces.view()
        full = np.zeros(len(pieces.lens), dtype=np.int64)
        full[: len(unit_counts)] = unit_counts
        weights = np.repeat(full, pieces.lens)
        return np.bincount(pieces.flat, weights=weights, minlength=self.piece_tokens.lens.size).astype(np.int64)


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
    chunk_bytes: int = 8 << 20,
    trust_remote_code: bool = False,
) -> dict:
    """Analyze the splits (keys: train, heldout, general_train, general_heldout) into out_dir.

    threads is accepted for callers; the work uses this process and one helper process.
    """
    spec = load_tokenizer_json(tokenizer, trust_remote_code)
    check_byte_level_bpe(spec, tokenizer)
    try:
        return _analyze(spec, splits, out_dir, exact, chunk_bytes, use_ranks=True)
    except RankMismatch:
        log.warning("tiktoken's merger disagreed with the tokenizer on sampled pre-tokens; analysing again with the tokenizer")
        return _analyze(spec, splits, out_dir, exact, chunk_bytes, use_ranks=False)


def _analyze(spec: dict, splits: dict[str, Path], out_dir: Path, exact: bool, chunk_bytes: int,
             use_ranks: bool) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(spec))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = ids_dtype(vocab_size)
    table = UnitTable()
    counts = {name: Growing() for name in splits}
    doc_tokens: list[np.ndarray] = []  # ids per training document, chunk by chunk
    stats: dict[str, dict] = {}
    names = (
        "train_ids.bin", "train_offsets.npy", "train_ids.json",
        "token_frequencies.parquet", "pretokens.parquet", "corpus_stats.json",
    )
    # Imported before the fork, and not in a thread: a fork while another thread holds the import
    # lock leaves the helper waiting for it forever.
    import pyarrow.compute  # noqa: F401
    import pyarrow.json  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    ctx = mp.get_context("fork")
    with atomic_outputs(*(out_dir / n for n in names)) as paths, ctx.Pool(
        1, initializer=_init_resolver, initargs=(spec, tok, exact, use_ranks)
    ) as pool:
        _init_cutter(spec, tok, exact)
        bin_path, offsets_path, meta_path, freq_path, pretokens_path, stats_path = paths
        bin_path.write_bytes(b"")  # the helper appends the training split's ids, chunk by chunk
        sample: list[tuple[int, list[int]]] = []
        asked: deque = deque()  # AsyncResults of _resolve_units not yet taken, in order

        def take_answers(wait: bool) -> None:
            while asked and (wait or asked[0].ready()):
                answer = asked.popleft().get()
                table.add(answer)
                if "doc_tokens" in answer:
                    doc_tokens.append(answer["doc_tokens"])

        for name, path in splits.items():
            keep = name == "train"
            n_docs = n_bytes = 0
            bar = progress(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"analyze {name}")
            log.info("analyzing %s (%s)", name, path)
            for task in _chunks(path, chunk_bytes, keep):
                chunk = _index_chunk(task)
                table.units += sum(len(texts) for _, texts in chunk["units"])
                sequence = (str(bin_path), chunk["payload"], chunk["doc_units"]) if keep else None
                asked.append(pool.apply_async(_resolve_units, (chunk["units"], sequence)))
                counts[name].add_dense(np.bincount(chunk["payload"]) if keep else chunk["payload"])
                take_answers(wait=False)
                sample += [(n_docs + i, ids) for i, ids in chunk["sample"]]
                n_docs += len(chunk["doc_units"])
                n_bytes += chunk["bytes"]
                bar.update(task[2] - task[1])
            bar.close()
            stats[name] = {"documents": n_docs, "bytes": n_bytes}
        vocab = _vocab_columns(tok, spec)
        take_answers(wait=True)
        pool.apply(_writes_done)
        if table.mismatches:
            raise RankMismatch
        offsets = np.concatenate([[0], np.cumsum(np.concatenate([np.zeros(0, np.int64), *doc_tokens]))])
        log.info("%d distinct units, %d distinct pre-tokens; writing tables", table.units, table.piece_tokens.lens.size)
        token_lens = table.token_lens.view()
        for name in splits:
            c = counts[name].view()
            n_tokens = int((c * token_lens[: len(c)]).sum())
            stats[name]["tokens"] = n_tokens
            stats[name]["tokens_per_byte"] = round(n_tokens / stats[name]["bytes"], 6) if stats[name]["bytes"] else None
            log.info("%s: %d documents, %d bytes, %d tokens", name, stats[name]["documents"], stats[name]["bytes"], n_tokens)
        _write_tables(table, counts, vocab, freq_path, pretokens_path)
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


def _vocab_columns(tok, spec: dict) -> dict:
    """id, token and readable form of every id: the part of token_frequencies.parquet the corpus
    does not change (made while the helper finishes)."""
    import pyarrow as pa

    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    tokens = [tok.id_to_token(i) or "" for i in range(vocab_size)]
    special = {t["id"] for t in spec.get("added_tokens", [])}
    return {
        "id": pa.array(np.arange(vocab_size), pa.int32()),
        "token": pa.array(tokens, pa.string()),
        "readable": pa.array([t if i in special else readable(t) for i, t in enumerate(tokens)], pa.string()),
    }


def _write_tables(table: UnitTable, counts: dict[str, Growing], vocab: dict, freq_path: Path,
                  pretokens_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    def piece_counts(name: str) -> np.ndarray:
        return table.piece_counts(counts[name].view() if name in counts else np.zeros(0, np.int64))

    domain, general = piece_counts("train"), piece_counts("general_train")
    segs = table.piece_tokens.view()
    vocab_size = len(vocab["id"])
    token_count = np.bincount(segs.flat, weights=np.repeat(domain, segs.lens), minlength=vocab_size).astype(np.int64)
    token_general = np.bincount(segs.flat, weights=np.repeat(general, segs.lens), minlength=vocab_size).astype(np.int64)
    # Arrow writes without the GIL.
    writing = threading.Thread(target=write_frequencies, args=(freq_path, vocab, token_count, token_general))
    writing.start()

    keys = pa.concat_arrays(table.piece_keys) if table.piece_keys else pa.array([], pa.string())
    is_special = pc.starts_with(keys, SPECIAL).to_numpy(zero_copy_only=False)
    keep = np.flatnonzero(~is_special & ((domain > 0) | (general > 0)))
    texts = keys.take(pa.array(keep))
    order = pc.sort_indices(pa.table({"domain": domain[keep], "general": general[keep], "text": texts}),
                            sort_keys=[("domain", "descending"), ("general", "descending"), ("text", "ascending")])
    keep, texts = keep[order.to_numpy()], texts.take(order)  # by count, then by text
    lens = segs.lens[keep]
    ids, _ = segs.expand(keep)
    # A pre-token's byte-level form is its tokens' strings joined.
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]), pa.int32())
    forms = pc.binary_join(pa.ListArray.from_arrays(offsets, vocab["token"].take(pa.array(ids))), "")
    write_pretokens(pretokens_path, forms, texts, domain[keep], general[keep], lens, ids)
    writing.join()


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


def _keep_freed_memory() -> None:
    """Each chunk frees and reallocates buffers of tens of MB; the allocators would hand them back to
    the OS and fault the pages in again next chunk (a page fault per 4 KiB). Keep them instead: for
    pyarrow's mimalloc (read when pyarrow loads) and glibc's malloc (numpy)."""
    os.environ.setdefault("MIMALLOC_PURGE_DELAY", "-1")
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the largest glibc allows, so big arrays come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _keep_freed_memory()
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
