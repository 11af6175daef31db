"""Continued BPE training: merge, inside the domain's pre-tokens, the pair of pieces that saves the most
tokens, re-count the pairs the merge changed, repeat; how selection finds new tokens (scripts/select_candidates.py)."""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ivr.analysis_tables import Pretokens


@dataclass
class Words:
    """Distinct pre-tokens as base-token sequences, with their domain and general-text counts."""

    seqs: list[list[int]]
    count: list[int]
    general: list[int]
    domain_tokens: int  # base tokens of the whole domain training split
    domain_bytes: int
    general_tokens: int
    general_bytes: int


def words_of(pretokens: Pretokens) -> Words:
    """The pre-tokens that have a pair to merge (two or more base tokens), and the totals of the splits."""
    nbytes, count, general, lens = pretokens.nbytes, pretokens.count, pretokens.general_count, pretokens.lens
    starts = np.cumsum(lens) - lens
    keep = np.flatnonzero(lens > 1)
    return Words(
        seqs=[pretokens.ids[starts[i] : starts[i] + lens[i]].tolist() for i in keep],
        count=count[keep].tolist(),
        general=general[keep].tolist(),
        domain_tokens=int((lens * count).sum()),
        domain_bytes=int((nbytes * count).sum()),
        general_tokens=int((lens * general).sum()),
        general_bytes=int((nbytes * general).sum()),
    )


def without(words: Words, removed: set[int], parts: dict[int, tuple[int, int]]) -> Words:
    """The words with removed ids split into the two ids their merge joins (parts), again and again (as the
    remapped tokenizer does)."""
    if not removed:
        return words

    def expand(token_id: int) -> list[int]:
        if token_id not in removed:
            return [token_id]
        left, right = parts[token_id]
        return expand(left) + expand(right)

    seqs = [[i for t in seq for i in expand(t)] if removed.intersection(seq) else seq for seq in words.seqs]
    return Words(seqs, words.count, words.general, words.domain_tokens, words.domain_bytes, words.general_tokens, words.general_bytes)


@dataclass
class Merge:
    left: int
    right: int
    new: int  # internal id of the merged piece (>= the base tokenizer's ids)
    string: str
    count: int  # domain tokens this merge saved on the training split
    general_count: int  # general-text tokens it saved
    pretokens: int  # distinct pre-tokens it applied in
    final_count: int = 0  # occurrences of the piece left after all merges


@dataclass
class Training:
    merges: list[Merge]
    strings: list[str | None]  # token string of every base id and new piece
    stop: str  # why the loop ended
    skipped_existing: int = 0  # best pairs whose string the vocabulary already has
    skipped_consuming: int = 0  # best pairs that would have left an earlier new piece (almost) unused


def continue_bpe(
    words: Words,
    strings: list[str | None],
    budget: int,
    min_count: int,
    taken: set[str],
    only: set[str] | None = None,
    keep: int = 1,
    blocked: set[int] = frozenset(),
) -> Training:
    """Greedy pair merging inside pre-tokens, as BPE training would continue on the domain.

    strings: token string of every base id; taken: strings that may not become new pieces (the
    base vocabulary); only: if given, merge only into these strings (a user's rules file);
    keep: skip a merge that would leave an earlier new piece fewer uses than this (0: never skip);
    blocked: ids no merge may use (digits, when the base keeps every digit a token of its own).
    """
    seqs, count, general = [list(s) for s in words.seqs], words.count, words.general
    strings = list(strings)
    # Pairs are keyed as one int (left << 32 | right): much faster dict keys than tuples.
    pair_count: dict[int, int] = defaultdict(int)
    pair_general: dict[int, int] = defaultdict(int)
    where: dict[int, set[int]] = defaultdict(set)  # may keep words that lost the pair; they are skipped
    for w, seq in enumerate(seqs):
        c, g = count[w], general[w]
        for left, right in zip(seq, seq[1:]):
            key = left << 32 | right
            pair_count[key] += c
            pair_general[key] += g
            where[key].add(w)
    heap = [(-c, key) for key, c in pair_count.items() if c >= min_count]
    heapq.heapify(heap)
    live: dict[int, int] = {}  # occurrences left of each new piece
    made = set(taken)
    training = Training([], strings, "budget reached")
    while len(training.merges) < budget:
        if not heap:
            training.stop = f"no pair left with count >= {min_count}"
            break
        negative, key = heapq.heappop(heap)
        if -negative != pair_count.get(key, 0):
            continue  # stale entry; the current count was pushed when it changed
        left, right = key >> 32, key & 0xFFFFFFFF
        if left in blocked or right in blocked:
            continue
        string = strings[left] + strings[right]
        if string in made or (only is not None and string not in only):
            training.skipped_existing += string in made
            continue
        uses = (2 if left == right else 1) * -negative  # an upper bound: overlapping pairs count twice
        if keep and any(live[t] - uses < keep for t in {left, right} if t in live):
            training.skipped_consuming += 1
            continue
        new = len(strings)
        strings.append(string)
        made.add(string)
        delta: dict[int, int] = defaultdict(int)
        delta_general: dict[int, int] = defaultdict(int)
        saved = saved_general = applied = 0
        for w in where.pop(key):
            seq, c, g = seqs[w], count[w], general[w]
            i, hits = 0, 0
            try:
                while True:
                    i = seq.index(left, i)  # the scan runs in C; most visited words hold the pair once
                    if i + 1 < len(seq) and seq[i + 1] == right:
                        # Only the pairs around the merged one change; seq[i - 1] is already current. One
                        # loop for both sides costs nothing measurable against the two written out: 3,000
                        # merges on the 88 MB bills, median CPU of three runs 28.31 s against 28.24 s.
                        changed = []
                        if i:
                            changed.append((seq[i - 1] << 32 | left, seq[i - 1] << 32 | new))
                        if i + 2 < len(seq):
                            changed.append((right << 32 | seq[i + 2], new << 32 | seq[i + 2]))
                        for gone, made_pair in changed:
                            # Most pre-tokens occur in only one of the two texts: skip the zero updates.
                            if c:
                                delta[gone] -= c
                                delta[made_pair] += c
                            if g:
                                delta_general[gone] -= g
                                delta_general[made_pair] += g
                            where[made_pair].add(w)
                        seq[i : i + 2] = [new]
                        hits += 1
                    i += 1
            except ValueError:
                pass
            if hits:
                saved += hits * c
                saved_general += hits * g
                applied += 1
        pair_count.pop(key, None)
        pair_general.pop(key, None)
        delta.pop(key, None)
        delta_general.pop(key, None)
        for k, dg in delta_general.items():
            if dg:
                pair_general[k] += dg
        for k, dc in delta.items():
            if dc:
                total = pair_count[k] + dc
                pair_count[k] = total
                if total >= min_count:
                    heapq.heappush(heap, (-total, k))
        live[new] = saved
        for t in (left, right):
            if t in live:
                live[t] -= saved
        training.merges.append(Merge(left, right, new, string, saved, saved_general, applied))
    for merge in training.merges:
        merge.final_count = live[merge.new]
    return training
