"""Selection: which new tokens to add and which ids they take (scripts/select_candidates.py).

New tokens are pieces of one pre-token (so the segmenter can produce them), found by continuing BPE
training on the domain's training split: count adjacent token pairs inside pre-tokens (weighted by
how often each pre-token occurs), merge the pair that saves the most tokens, re-count the pre-tokens
it touched, repeat. Longer pieces may build on pieces already chosen; a merge that would leave an
earlier new piece fewer than min_count uses is skipped, so every new token is still produced on the
training split, often enough for its embedding to be learnt.

The ids they take: embedding rows beyond the tokenizer's ids first, then the tokens the domain and
the general text use least (ties: latest merged first). Never special tokens, single bytes or
protected ids; for the bpe backend only tokens no merge builds on. Named special tokens take slots
on top of the budget. A user rules file replaces the selection; it is checked as strictly.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ivr.base_bpe import Base
from ivr.candidates import candidate_rows
from ivr.cli import UserError, log
from ivr.continued_bpe import Training, Words, continue_bpe, without
from ivr.remap_rules import check_rules_file, make_rule, piece_segmentation, slot_kind, text_segmentation


@dataclass
class Special:
    """A named special token (ivr.special_tokens): its rows start as the mean of init_text's tokens."""

    token: str
    init_text: str
    frozen: bool = False


def digit_ids(base: Base, policy: str) -> set[int]:
    """Tokens holding a digit, when new pieces must not join digits (auto: as the base never does)."""
    has_digit = [i for i, t in enumerate(base.tokens) if t and i not in base.special and any(48 <= b <= 57 for b in base.form.token_bytes(t))]
    if policy == "merge" or (policy == "auto" and any(len(base.tokens[i]) > 1 for i in has_digit)):
        return set()
    return set(has_digit)


def rank_sacrifices(
    base: Base,
    domain_count: np.ndarray,
    general_count: np.ndarray,
    protected: set[int],
    backend: str,
    max_domain_count: int,
) -> list[int]:
    """Ids that may give up their slot, cheapest first.

    Cost: the share of domain tokens plus the share of general-text tokens the id accounts for
    (each occurrence costs about one token once the id is gone); ties go to the latest merge, as
    BPE merges late what its training text needed least.
    """
    domain_total = max(int(domain_count.sum()), 1)
    general_total = max(int(general_count.sum()), 1)
    rows = []
    for token_id, token in enumerate(base.tokens):
        if token is None or token_id in base.special or token_id in protected or base.single_byte(token_id):
            continue
        if backend == "bpe" and token_id in base.built_on:
            continue
        domain = int(domain_count[token_id]) if token_id < len(domain_count) else 0
        if domain > max_domain_count:
            continue
        general = int(general_count[token_id]) if token_id < len(general_count) else 0
        cost = domain / domain_total + general / general_total
        rank = base.merge_rank.get(token_id, len(base.merge_rank))  # never built by a merge: never produced
        rows.append((cost, -rank, -token_id))
    rows.sort()
    return [-row[2] for row in rows]


@dataclass
class Selection:
    rules: list[dict]
    candidates: list[list]
    log_lines: list[str] = field(default_factory=list)


def select(
    base: Base,
    words: Words,
    frequencies: tuple[np.ndarray, np.ndarray],
    rows: int,
    backend: str,
    n_reassign: int,
    min_count: int,
    max_domain_count: int,
    protected: set[int],
    specials: list[Special],
    digits: str = "auto",
) -> Selection:
    """Our own selection: new pieces by continued BPE, slots for them and for the special tokens."""
    unused_rows = list(range(base.n_ids, rows))
    order = [i for i in rank_sacrifices(base, *frequencies, protected, backend, max_domain_count) if i < rows]
    if n_reassign + len(specials) > len(unused_rows) + len(order):
        raise UserError(
            f"ivr.n_reassign = {n_reassign} plus {len(specials)} special tokens needs more ids than the "
            f"{len(unused_rows) + len(order)} that may be reassigned under the thresholds; lower ivr.n_reassign"
        )
    sacrificed = order[: max(n_reassign + len(specials) - len(unused_rows), 0)]
    taken = set(base.ids) | {s.token for s in specials}
    # Byte-fallback tokens are never joined: their strings together are no token the model can produce.
    blocked = digit_ids(base, digits) | {i for i, t in enumerate(base.tokens) if t and not base.form.is_piece(t)}
    # Sacrificed ids are split into their parts in the domain's segmentation. If the merges come short
    # of the budget fewer ids are needed; when that spares an id the domain uses, select again.
    budget = n_reassign
    for _ in range(4):
        training = continue_bpe(
            without(words, set(sacrificed), base.parts), base.tokens, budget, min_count, taken, keep=min_count, blocked=blocked
        )
        needed = max(len(training.merges) + len(specials) - len(unused_rows), 0)
        spared, sacrificed = sacrificed[needed:], sacrificed[:needed]
        if not any(frequencies[0][t] > 0 for t in spared):
            break
        budget = len(training.merges)
    slots = unused_rows + sacrificed
    rules: list[dict] = []
    for special, slot in zip(specials, slots):
        rules.append(make_rule(base, slot, "special", special.token, text_segmentation(base, special.init_text), special.frozen))
    slot_of = {}
    for merge, slot in zip(training.merges, slots[len(specials) :]):
        slot_of[merge.new] = slot
        rules.append(make_rule(base, slot, slot_kind(base, slot), merge.string, piece_segmentation(base, merge.string), False))
    selection = Selection(rules, candidate_rows(training, slot_of, words.domain_tokens, base.form.readable))
    selection.log_lines = selection_report(base, words, frequencies, training, rules, backend, n_reassign, min_count, protected)
    selection.log_lines.insert(5, f"- digits: {'kept apart, as in the base vocabulary' if blocked else 'may be joined'}")
    return selection


def select_from_file(
    path: Path, base: Base, words: Words, frequencies: tuple[np.ndarray, np.ndarray], rows: int, backend: str,
    protected: set[int], min_count: int,
) -> Selection:
    """A user's rules: checked, completed, and given a merge order by continued BPE limited to them.

    With selection's own guard (keep every piece min_count uses) this replays the merge order of a
    rules file selection wrote; a hand-written file may need the guard off to build all its tokens.
    """
    rules = check_rules_file(path, base, rows, protected, backend)
    wanted = {r["new_token"]: r for r in rules if r["kind"] != "special"}
    removed = {r["id"] for r in rules if r["id"] < base.n_ids}
    split = without(words, removed, base.parts)
    for keep in (min_count, 0):
        training = continue_bpe(split, base.tokens, len(wanted), 1, set(base.ids), only=set(wanted), keep=keep)
        missing = sorted(set(wanted) - {m.string for m in training.merges}, key=lambda s: wanted[s]["id"])
        if not missing:
            break
    if missing:
        first = wanted[missing[0]]
        raise UserError(
            f"{path}: new token {first['new_token']!r} (id {first['id']}, '{first['new_readable']}') cannot be built by "
            f"merging pieces inside pre-tokens of the training split ({len(missing)} such tokens)"
        )
    unused = [m.string for m in training.merges if m.final_count == 0]
    if unused:
        log.warning("%d new tokens of %s are never produced on the training split, e.g. %r", len(unused), path, unused[0])
    slot_of = {m.new: wanted[m.string]["id"] for m in training.merges}
    selection = Selection(rules, candidate_rows(training, slot_of, words.domain_tokens, base.form.readable))
    selection.log_lines = selection_report(base, words, frequencies, training, rules, backend, len(wanted), 1, protected, source=str(path))
    return selection


def selection_report(
    base: Base,
    words: Words,
    frequencies: tuple[np.ndarray, np.ndarray],
    training: Training,
    rules: list[dict],
    backend: str,
    n_reassign: int,
    min_count: int,
    protected: set[int],
    source: str | None = None,
) -> list[str]:
    saved = sum(m.count for m in training.merges)
    saved_general = sum(m.general_count for m in training.merges)
    kinds = defaultdict(int)
    for r in rules:
        kinds[r["kind"]] += 1
    sacrificed = [r["id"] for r in rules if r["old_token"] is not None]
    domain, general = frequencies
    lines = [
        "# Selection",
        "",
        f"- source: {'rules file ' + source if source else 'continued BPE on the domain training split'}",
        f"- backend: {backend}; budget (ivr.n_reassign): {n_reassign}; min pair count: {min_count}; protected ids: {len(protected)}",
        f"- new pieces: {len(training.merges)} (stopped: {training.stop}); special tokens: {kinds['special']}",
        f"- slots: {kinds['unused_row']} unused embedding rows, {len(sacrificed)} sacrificed tokens",
        f"- pairs skipped: {training.skipped_existing} already in the vocabulary, "
        f"{training.skipped_consuming} would have used up an earlier new piece",
        f"- least uses of a new piece on the training split after all merges: {min((m.final_count for m in training.merges), default=0)}",
        "",
        "## Expected effect on the training splits",
        "",
        "| split | base tokens/byte | remapped tokens/byte | change |",
        "|---|---|---|---|",
    ]
    sac_domain = int(sum(domain[i] for i in sacrificed if i < len(domain)))
    sac_general = int(sum(general[i] for i in sacrificed if i < len(general)))
    for name, tokens, nbytes, gain, loss in (
        ("domain train", words.domain_tokens, words.domain_bytes, saved, sac_domain),
        ("general train", words.general_tokens, words.general_bytes, saved_general, sac_general),
    ):
        if nbytes:
            after = tokens - gain + loss
            lines.append(f"| {name} | {tokens / nbytes:.4f} | {after / nbytes:.4f} | {100 * (after / tokens - 1):+.2f} % |")
    lines += [
        "",
        f"Sacrificed tokens occur {sac_domain} times in the domain and {sac_general} times in the general text "
        "(each occurrence costs about one token).",
        "",
        "## Largest savings",
        "",
        "| rank | id | new | count | replaces |",
        "|---|---|---|---|---|",
    ]
    by_token = {r["new_token"]: r for r in rules}
    for rank, m in enumerate(training.merges[:15], start=1):
        r = by_token[m.string]
        old = "unused row" if r["old_token"] is None else f"`{quoted(r['old_readable'])}`"
        lines.append(f"| {rank} | {r['id']} | `{quoted(r['new_readable'])}` | {m.count} | {old} |")
    if kinds["special"]:
        lines += ["", "## Special tokens", ""]
        for r in rules:
            if r["kind"] == "special":
                was = "an unused row" if r["old_token"] is None else f"`{quoted(r['old_readable'])}`"
                lines.append(f"- `{r['new_token']}` at id {r['id']} (was {was}), init from {len(r['base_ids'])} base tokens, frozen: {str(r['frozen']).lower()}")
    return lines


def quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("|", "\\|")
