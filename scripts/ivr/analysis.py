"""The corpus analysis engine (scripts/analyze_corpus.py): every distinct word of the corpus pre-tokenized
once, every distinct pre-token segmented once with the base BPE, and counts taken by word; the same
counts and ids as encoding every document, much faster. Writes the tables of ivr/analysis_tables.py,
the training split's ids (train_ids.bin, train_offsets.npy, train_ids.json) and corpus_stats.json."""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import re
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import chain, islice
from pathlib import Path

import numpy as np

from ivr.analysis_tables import write_frequencies, write_pretokens
from ivr.cli import atomic_outputs, log, progress
from ivr.ragged import Growing, GrowingRagged, Ragged, concat, interleave
from ivr.string_numbering import StringNumbering
from ivr.tokenization import (
    SPACE,
    RankSegmenter,
    compile_pretokenizer,
    load_tokenizer_json,
    sentencepiece_pretokenizer,
    splits_at_single_spaces,
    token_bytes,
    token_form,
)


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
# tiktoken call, both split over analysis.threads threads; the helper also expands the training
# split's units into token ids and appends them to the ids file (in a thread). Counting by unit is
# exact and much cheaper than encoding every document.

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
IN_FLIGHT = 4  # chunks sent to the helper and not yet answered: past this the cutter waits, so that
# chunks never pile up in memory while the helper lags
_W: dict = {}


class RankMismatch(Exception):
    """tiktoken's merger disagreed with the tokenizer on a sampled pre-token."""


def _init_common(spec: dict, tok, exact: bool) -> None:
    gc.disable()  # millions of new strings and lists, no reference cycles: the collector only costs time
    _W["tok"] = tok
    _W["form"] = token_form(spec, "tokenizer")
    _W["pretokenize"] = _pretokenizer(spec, tok, exact)
    _W["added"] = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t["content"]}


def _init_cutter(spec: dict, tok, exact: bool) -> None:
    """State of this process, which cuts documents into units and numbers them."""
    import regex

    _init_common(spec, tok, exact)
    added = _W["added"]
    # A SentencePiece-style tokenizer's normalizer runs in its pre-tokenizer, on each part between added tokens.
    _W["normalize"] = tok.normalizer.normalize_str if tok.normalizer and _W["form"].byte_level else None
    _W["by_word"] = not exact and splits_at_single_spaces(spec)
    _W["added_re"] = regex.compile("(" + "|".join(map(regex.escape, sorted(added, key=len, reverse=True))) + ")")
    literal = ("".join(f"\\x{{{ord(c):x}}}" for c in token) for token in added)
    _W["not_by_word_re2"] = "|".join([_SPACE_IN_WHITESPACE_RE2, *literal])  # documents cut in Python instead
    new: list = []  # (kind, pyarrow array) batches of the units numbered since it was last cleared
    _W["new"] = new
    units_seen = [0]
    _W["units"] = {kind: StringNumbering(kind, new, units_seen) for kind in (SPECIAL, WORD, WHOLE, PIECE)}


def _init_resolver(spec: dict, tok, exact: bool, use_ranks: bool, threads: int) -> None:
    """State of the helper (spec and tok inherited through fork), which resolves units into ids."""
    _init_common(spec, tok, exact)
    _W["threads"] = threads
    _W["segmenter"] = RankSegmenter.build(spec, _hf_segment) if use_ranks and not exact else None
    _W["new_pieces"] = []
    _W["pieces"] = StringNumbering("", _W["new_pieces"], [0])
    _W["piece_tokens"] = GrowingRagged()  # piece number -> its base ids
    _W["unit_tokens"] = GrowingRagged(ids_dtype(tok.get_vocab_size(with_added_tokens=True)))  # unit -> ids
    _W["writer"], _W["writes"], _W["helper"] = ThreadPoolExecutor(1), [], ThreadPoolExecutor(max(1, threads - 1))


def _pretokenizer(spec: dict, tok, exact: bool):
    if not _W["form"].byte_level:
        return sentencepiece_pretokenizer(spec, tok)
    fast = None if exact else compile_pretokenizer(spec)
    if fast is not None:
        return fast
    pre = tok.pre_tokenizer
    return (lambda text: [to_text(p) for p, _ in pre.pre_tokenize_str(text)]) if pre else (lambda text: [text])


def to_text(bytelevel_piece: str) -> str:
    return token_bytes(bytelevel_piece).decode("utf-8", errors="surrogateescape")


def _hf_segment(piece: bytes) -> list[int]:
    return [t.id for t in _W["tok"].model.tokenize(_W["form"].model_input(piece))]


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


def _units_by_word(docs) -> Ragged:
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
    return Ragged(np.diff(offsets) - empty_first, numbers)


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
    docs = raw = _read_texts(path, start, end)
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
        sources.append((elsewise, Ragged(lens, _number_keys([key for row in rows for key in row]))))
    doc_units, local = interleave(sources, n_docs)
    sample = [(i, np.array(_W["tok"].encode(raw[i].as_py(), add_special_tokens=False).ids, np.int64))
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
    unit_pieces = concat([_pieces_of(kind, texts) for kind, texts in batches])
    new = pa.concat_arrays([texts for _, texts in new_pieces]) if new_pieces else pa.array([], pa.string())
    segs, mismatches = _segment(new, pieces.total[0] - len(new))
    _W["piece_tokens"].append(segs)
    unit_tokens = unit_pieces.compose(_W["piece_tokens"].view())
    _W["unit_tokens"].append(unit_tokens)
    answer = {"pieces": new, "segs": segs, "unit_pieces": unit_pieces, "unit_token_lens": unit_tokens.lens,
              "mismatches": mismatches}
    if sequence is not None:
        path, units, doc_units = sequence
        table = _W["unit_tokens"].view()
        doc_ends = np.concatenate([[0], np.cumsum(table.lens[units])])[np.cumsum(doc_units)]
        answer["doc_tokens"] = np.diff(doc_ends, prepend=0)
        # Written by a thread (numpy and file writes release the GIL), in order, while the next units resolve.
        _W["writes"].append(_W["writer"].submit(_write_ids, path, table, units))
    return answer


def _pieces_of(kind: str, texts) -> Ragged:
    """Piece numbers of units of one kind, a row a unit."""
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
        parts = list(chain.from_iterable(_in_threads(lambda part: pretokenize(" " + " ".join(part.to_pylist())), words)))
        part_ends = np.cumsum(np.fromiter(map(len, parts), np.int64, count=len(parts)))
        word_ends = np.cumsum(pc.utf8_length(words).to_numpy().astype(np.int64) + 1)
        last_part = np.searchsorted(part_ends, word_ends)
        if not np.array_equal(part_ends[np.minimum(last_part, len(parts) - 1)], word_ends):
            raise RuntimeError("a pre-token crossed a single space between words")
        numbers = pieces.number(pa.array(parts, pa.string()))
        sources.append((np.flatnonzero(joinable), Ragged(np.diff(last_part, prepend=-1), numbers)))
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
        sources.append((rest, Ragged(lens, pieces.number(pa.array([p for row in rows for p in row], pa.string())))))
    return interleave(sources, len(texts))


def _in_threads(work, items) -> list:
    """work on each of analysis.threads parts of items (never an empty one), all but the first in helper
    threads: the regex and tiktoken release the GIL, so more cores help once the cutting is done."""
    bounds = np.linspace(0, len(items), max(1, min(_W["threads"], len(items))) + 1).astype(int).tolist()
    parts = [items[start:end] for start, end in zip(bounds, bounds[1:])]
    later = [_W["helper"].submit(work, part) for part in parts[1:]]
    return [work(parts[0]), *(future.result() for future in later)]


def _write_ids(path: str, table: Ragged, units: np.ndarray) -> None:
    with open(path, "ab") as handle:
        handle.write(memoryview(table.take(units).flat))


def _writes_done() -> None:
    """Wait for the ids written in the background (raising what failed there)."""
    while _W["writes"]:
        _W["writes"].pop(0).result()


def _segment(new, first_number: int) -> tuple[Ragged, int]:
    """Base segmentations of new pre-tokens (a pyarrow string array, numbered from first_number),
    and how many of the sampled ones tiktoken's merger got wrong."""
    import pyarrow as pa
    import pyarrow.compute as pc

    added, segmenter = _W["added"], _W["segmenter"]
    special = pc.starts_with(new, SPECIAL).to_numpy(zero_copy_only=False)
    plain = new.filter(pa.array(~special)) if special.any() else new
    if segmenter is None:
        segs = Ragged.of([_hf_segment(p.encode("utf-8", "surrogateescape")) for p in plain.to_pylist()])
    else:
        segs = concat(_in_threads(segmenter.many, plain))
    if special.any():
        specials = Ragged.of([[added[p[1:]]] for p in new.filter(pa.array(special)).to_pylist()])
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
        self.piece_tokens.append(answer["segs"])
        self.pieces.append(answer["unit_pieces"])
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

    This process cuts the documents into words; a helper process with `threads` threads resolves the
    new words into pre-tokens and ids meanwhile. The outputs do not depend on threads or chunk_bytes.
    """
    spec = load_tokenizer_json(tokenizer, trust_remote_code)
    token_form(spec, tokenizer)
    try:
        return _analyze(spec, splits, out_dir, threads, exact, chunk_bytes, use_ranks=True)
    except RankMismatch:
        log.warning("tiktoken's merger disagreed with the tokenizer on sampled pre-tokens; analysing again with the tokenizer")
        return _analyze(spec, splits, out_dir, threads, exact, chunk_bytes, use_ranks=False)


def _analyze(spec: dict, splits: dict[str, Path], out_dir: Path, threads: int, exact: bool, chunk_bytes: int,
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
        1, initializer=_init_resolver, initargs=(spec, tok, exact, use_ranks, threads)
    ) as pool:
        _init_cutter(spec, tok, exact)
        bin_path, offsets_path, meta_path, freq_path, pretokens_path, stats_path = paths
        bin_path.write_bytes(b"")  # the helper appends the training split's ids, chunk by chunk
        sample: list[tuple[int, np.ndarray]] = []
        asked: deque = deque()  # AsyncResults of _resolve_units not yet taken, in order

        def take_answers(wait: bool) -> None:
            while asked and (wait or asked[0].ready() or len(asked) > IN_FLIGHT):
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


def _guard(sample: list[tuple[int, np.ndarray]], train: Path, bin_path: Path, offsets: np.ndarray, dtype) -> None:
    """The sampled documents' ids in train_ids.bin must equal the tokenizer's own, exactly. Each is read
    on its own: a memory map would fault in much of the file around the samples."""
    size = np.dtype(dtype).itemsize
    for number, expected in sample:
        start, end = int(offsets[number]), int(offsets[number + 1])
        if not np.array_equal(np.fromfile(bin_path, dtype, count=end - start, offset=start * size), expected):
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
    form = token_form(spec, "tokenizer")
    return {
        "id": pa.array(np.arange(vocab_size), pa.int32()),
        "token": pa.array(tokens, pa.string()),
        "readable": pa.array([t if i in special else form.readable(t) for i, t in enumerate(tokens)], pa.string()),
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
    ids = segs.take(keep).flat
    if _W["form"].byte_level:  # a pre-token's byte-level form is its tokens' strings joined
        offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]), pa.int32())
        forms = pc.binary_join(pa.ListArray.from_arrays(offsets, vocab["token"].take(pa.array(ids))), "")
    else:  # SentencePiece-style pre-tokens are kept in the form the model reads
        forms, texts = texts, pc.replace_substring(texts, SPACE, " ")
    write_pretokens(pretokens_path, forms, texts, domain[keep], general[keep], lens, ids)
    writing.join()


def keep_freed_memory() -> None:
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
