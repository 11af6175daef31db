"""Numbering strings on first sight, many at a time, without a Python object per string."""

from __future__ import annotations

import numpy as np

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


class StringNumbering:
    """Numbers strings on first sight, many at a time without a Python object per string: the strings
    seen are kept as a pyarrow array with their numbers and sorted 64-bit hashes. A lookup is a
    binary search by hash checked against the string itself; the rare strings whose hash is taken by
    another string are numbered through a dict instead. The counter is shared with other numberings
    (`total`), and new strings are noted in a shared list as (prefix, pyarrow array) batches.

    Worth its code: with a plain dict in its place the whole analysis of the 88 MB bills took 11.8 s
    CPU against 9.8 s (medians of 4 alternating runs on 2 busy cores; best wall clock 26.6 s against 21.4 s)."""

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
