"""The remapped tokenizer built from the rules (scripts/remap_tokenizer.py), for either backend.

unigram backend: the distilled Unigram (base vocabulary, same ids) with each reassigned id's piece
replaced by the new piece. Taken in merge order, a new piece scores a margin above the best way to
build its string from the pieces before it, so wherever its string occurs it beats its own parts;
a piece the Viterbi still never picks on the training split is raised until it does.

bpe backend: the base BPE with the sacrificed tokens' merges dropped (selection only sacrifices tokens
no merge builds on) and one merge appended per new token, in selection's order. Any text whose base
segmentation uses no sacrificed token and in which no new merge fires is tokenized bit-identically.

Special tokens become added tokens at their ids (never split).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ivr.base_bpe import Base, split_merge
from ivr.cli import UserError, log

# A new piece scores this share of the base pieces' score spread above the best way to build it
# from other pieces. Far larger margins make the Viterbi favour pieces built from many small parts
# and skip others; smaller ones change little.
MARGIN = 1 / 16


def special_entry(token_id: int, content: str) -> dict:
    return {
        "id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": True,
    }


def ordered_merges(rules: list[dict], merges: list[tuple[str, str, str]], candidates: Path) -> list[tuple[str, str, str]]:
    """The merges of the new tokens the rules hold, checked to cover every one of them."""
    wanted = {r["new_token"] for r in rules if r["kind"] != "special"}
    out = [m for m in merges if m[2] in wanted]
    missing = wanted - {m[2] for m in out}
    if missing:
        raise UserError(f"{candidates}: has no merge for new token {sorted(missing)[0]!r}; rerun the selection")
    return out


def build_bpe(base: Base, rules: list[dict], merges: list[tuple[str, str, str]]) -> dict:
    """The base BPE minus the sacrificed tokens' merges, plus one appended merge per new token."""
    spec = json.loads(json.dumps(base.spec))
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    removed = {}
    for rule in rules:
        slot = rule["id"]
        if slot < base.n_ids:
            if slot in base.built_on:
                raise UserError(
                    f"id {slot} ({base.tokens[slot]!r}) is a part of other merges: the bpe backend cannot take it "
                    "(select again with ivr.backend: bpe)"
                )
            removed[base.tokens[slot]] = slot
            vocab.pop(base.tokens[slot], None)
    for rule in rules:
        vocab[rule["new_token"]] = rule["id"]
    string_form = bool(model["merges"]) and isinstance(model["merges"][0], str)
    kept = [m for m in model["merges"] if "".join(split_merge(m)) not in removed]
    for left, right, new in merges:
        for part in (left, right):
            if part not in vocab:
                raise UserError(f"merge {left!r} + {right!r}: {part!r} is not in the remapped vocabulary")
        kept.append(f"{left} {right}" if string_form else [left, right])
    model["merges"] = kept
    return spec


def viterbi_score(text: str, scores: dict[str, float], longest: int) -> float | None:
    """Best total score of a segmentation of text into the given pieces (None if none exists)."""
    best: list[float | None] = [0.0] + [None] * len(text)
    for end in range(1, len(text) + 1):
        for start in range(max(0, end - longest), end):
            score = scores.get(text[start:end])
            if score is not None and best[start] is not None:
                total = best[start] + score
                if best[end] is None or total > best[end]:
                    best[end] = total
    return best[-1]


def build_unigram(distilled: dict, base: Base, rules: list[dict], merges: list[tuple[str, str, str]]) -> tuple[dict, float]:
    """The distilled Unigram with reassigned pieces replaced and scored so that new pieces win."""
    spec = json.loads(json.dumps(distilled))
    model = spec["model"]
    if model.get("type") != "Unigram":
        raise UserError(f"distilled tokenizer: model is {model.get('type')}, expected Unigram")
    pieces: list[list] = model["vocab"]
    for rule in rules:
        slot = rule["id"]
        if slot < len(pieces) and slot < base.n_ids and pieces[slot][0] != base.tokens[slot]:
            raise UserError(
                f"distilled tokenizer: id {slot} is {pieces[slot][0]!r} but the base has {base.tokens[slot]!r}; "
                "it must keep the base vocabulary at the same ids"
            )
    reassigned = {r["id"] for r in rules}
    scores = {p: s for i, (p, s) in enumerate(pieces) if i not in reassigned and i not in base.special}
    spread = sorted(scores.values())
    low = spread[0]
    # Percentiles, not the extremes: a distilled model may park pieces it never uses at a huge negative score.
    margin = MARGIN * (spread[len(spread) * 99 // 100] - spread[len(spread) // 100]) or 1.0
    longest = max(map(len, scores))
    new_score = {}
    for left, right, new in merges:
        if left not in scores or right not in scores:
            raise UserError(f"merge {left!r} + {right!r}: a part is not in the remapped vocabulary")
        # At least as good as any way to build the string from the pieces there are, plus the margin.
        alternative = viterbi_score(new, scores, longest)
        best = scores[left] + scores[right] if alternative is None else max(scores[left] + scores[right], alternative)
        scores[new] = new_score[new] = best + margin
        longest = max(longest, len(new))
    added_ids = {a["id"]: a["content"] for a in spec.get("added_tokens", [])}
    top = max(r["id"] for r in rules) if rules else -1
    while len(pieces) <= top:  # ids beyond the distilled vocabulary (unused embedding rows)
        slot = len(pieces)
        pieces.append([added_ids.get(slot, f"<unused_row_{slot}>"), low - margin])
    for rule in rules:
        if rule["kind"] == "special":
            pieces[rule["id"]] = [rule["new_token"], 0.0]
        else:
            pieces[rule["id"]] = [rule["new_token"], new_score[rule["new_token"]]]
    return spec, margin


def add_specials(spec: dict, rules: list[dict]) -> None:
    specials = [r for r in rules if r["kind"] == "special"]
    spec["added_tokens"] = sorted(
        [a for a in spec.get("added_tokens", []) if a["id"] not in {r["id"] for r in rules}]
        + [special_entry(r["id"], r["new_token"]) for r in specials],
        key=lambda a: a["id"],
    )


def training_use(new_tok, pretokens: list[tuple[str, int]], new_ids: set[int]) -> dict:
    """How often each new token is produced on the domain training split (segmenting each pre-token once)."""
    produced: Counter[int] = Counter()
    tokenize = new_tok.model.tokenize
    for piece, count in pretokens:
        for token in tokenize(piece):
            if token.id in new_ids:
                produced[token.id] += count
    return {"new_tokens_produced": len(produced), "never_produced": sorted(new_ids - set(produced))}


def greedy_segmenter(base: Base, merges: list[tuple[str, str, str]], slot_of: dict[str, int]):
    """Segment a pre-token as selection did: the base BPE, then the new merges in order (new ids at their slots)."""
    from tokenizers import Tokenizer

    spec = json.loads(json.dumps(base.spec))
    vocab = spec["model"]["vocab"]
    fresh = {}
    for left, right, new in merges:
        fresh[base.n_ids + len(fresh)] = slot_of[new]
        vocab[new] = base.n_ids + len(fresh) - 1
        spec["model"]["merges"].append(f"{left} {right}" if isinstance(spec["model"]["merges"][0], str) else [left, right])
    tokenize = Tokenizer.from_str(json.dumps(spec)).model.tokenize
    return lambda piece: [fresh.get(t.id, t.id) for t in tokenize(piece)]


def raise_unused(
    spec: dict, margin: float, base: Base, rules: list[dict], merges: list[tuple[str, str, str]],
    pretokens: list[tuple[str, int]], rounds: int = 8,
) -> dict:
    """Raise each new piece the Viterbi never picks on the training split just enough to be picked.

    Selection keeps every piece in at least one pre-token's segmentation. For a piece never picked,
    take the most frequent such pre-token and raise the piece by the score gap between the Viterbi
    path and selection's path there (plus a sliver): every path without the piece then loses there.
    Raising one piece can take another's last use, so this repeats, with a growing sliver.
    """
    from tokenizers import Tokenizer

    pieces = spec["model"]["vocab"]
    new_ids = {r["id"] for r in rules if r["kind"] != "special"}
    segment = greedy_segmenter(base, merges, {r["new_token"]: r["id"] for r in rules})
    for n in range(rounds):
        tok = Tokenizer.from_str(json.dumps(spec))
        never = training_use(tok, pretokens, new_ids)["never_produced"]
        log.info("unigram round %d: %d of %d new pieces never produced", n, len(never), len(new_ids))
        if not never:
            break
        for token_id in never:
            string = pieces[token_id][0]
            for piece, _ in pretokens:  # most frequent first
                if string in piece and token_id in (target := segment(piece)):
                    found = [t.id for t in tok.model.tokenize(piece)]
                    gap = sum(pieces[i][1] for i in found) - sum(pieces[i][1] for i in target)
                    pieces[token_id][1] += gap / target.count(token_id) + margin / 16 * 2**n
                    break
    else:
        never = training_use(Tokenizer.from_str(json.dumps(spec)), pretokens, new_ids)["never_produced"]
        if never:
            log.warning("%d new pieces are still never produced on the training split: %s", len(never), never[:20])
    return spec
