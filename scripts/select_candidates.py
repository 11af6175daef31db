#!/usr/bin/env python3
"""Choose the reassignment: which new tokens to add and which ids they take.

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

Writes candidates.tsv (every merged pair in merge order, with counts and savings), remap_rules.yaml
(the format in docs/DEVELOPING.md) and selection_log.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.analysis_tables import read_frequencies, read_pretokens  # noqa: E402
from ivr.base_bpe import Base, load_base  # noqa: E402
from ivr.candidates import write_candidates  # noqa: E402
from ivr.cli import UserError, atomic_outputs, first_line, log, run_main  # noqa: E402
from ivr.continued_bpe import Training, Words, continue_bpe, without, words_of  # noqa: E402
from ivr.files import read_json  # noqa: E402
from ivr.remap_rules import check_rules_file, dump_rules, make_rule, piece_segmentation, slot_kind, text_segmentation  # noqa: E402
from ivr.tokenization import readable, token_bytes  # noqa: E402

BACKENDS = ("unigram", "bpe")


# ---- the base model -----------------------------------------------------------------------------


def model_rows(model: str | None, rows: int | None, base: Base, trust_remote_code: bool = False) -> int:
    """Rows of the embedding matrix: given, or the model config's vocab_size, or the tokenizer's ids."""
    if rows is None and model:
        path = Path(model) / "config.json"
        if path.is_file():
            config = read_json(path, "model config")
        else:
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).to_dict()
            except (OSError, ValueError) as err:
                raise UserError(f"{model}: cannot read the model config ({first_line(err)})") from None
        rows = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
        if not isinstance(rows, int):
            raise UserError(f"{model}: model config has no vocab_size")
    rows = base.n_ids if rows is None else rows
    if rows < base.n_ids:  # more rows than ids is normal (padding); fewer means they do not belong together
        raise UserError(
            f"{model or '--model-rows'}: the model has {rows} embedding rows but the tokenizer {base.n_ids} ids; "
            "the tokenizer's ids beyond the rows would have no embedding (is base_tokenizer the model's own?)"
        )
    return rows


def digit_ids(base: Base, policy: str) -> set[int]:
    """Tokens holding a digit, when new pieces must not join digits (auto: as the base never does)."""
    has_digit = [i for i, t in enumerate(base.tokens) if t and i not in base.special and any(48 <= b <= 57 for b in token_bytes(t))]
    if policy == "merge" or (policy == "auto" and any(len(base.tokens[i]) > 1 for i in has_digit)):
        return set()
    return set(has_digit)


# ---- sacrificed ids ---------------------------------------------------------------------------------


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


# ---- named special tokens ---------------------------------------------------------------------------


@dataclass
class Special:
    token: str
    init_text: str
    frozen: bool = False


def parse_specials(raw: str | None, base: Base) -> list[Special]:
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UserError(f"ivr.special_tokens: not valid JSON ({err.msg})") from None
    if not isinstance(items, list):
        raise UserError("ivr.special_tokens: expected a list of {token, init_text, frozen}")
    out, seen = [], set()
    for n, item in enumerate(items):
        where = f"ivr.special_tokens[{n}]"
        if not isinstance(item, dict) or set(item) - {"token", "init_text", "frozen"}:
            raise UserError(f"{where}: expected keys token, init_text, frozen")
        token, init_text, frozen = item.get("token"), item.get("init_text"), item.get("frozen", False)
        if not isinstance(token, str) or not token.strip():
            raise UserError(f"{where}: token must be a non-empty string")
        if not isinstance(init_text, str) or not init_text:
            raise UserError(f"{where}: init_text of '{token}' must be a non-empty string")
        if not isinstance(frozen, bool):
            raise UserError(f"{where}: frozen of '{token}' must be true or false")
        if token in base.ids:
            raise UserError(f"{where}: '{token}' is already token {base.ids[token]} of the base tokenizer")
        if token in seen:
            raise UserError(f"{where}: '{token}' is named twice")
        seen.add(token)
        out.append(Special(token, init_text, frozen))
    return out


# ---- outputs --------------------------------------------------------------------------------------


def candidate_rows(training: Training, slot_of: dict[int, int], words: Words) -> list[list]:
    rows, cumulative, strings = [], 0, training.strings
    for rank, m in enumerate(training.merges, start=1):
        cumulative += m.count
        rows.append([
            rank, slot_of[m.new], strings[m.left], strings[m.right],
            m.string, readable(m.string), m.count, m.general_count, m.pretokens, m.final_count,
            f"{m.count / max(words.domain_tokens, 1):.6f}", f"{cumulative / max(words.domain_tokens, 1):.6f}",
        ])
    return rows


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
    blocked = digit_ids(base, digits)
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
    selection = Selection(rules, candidate_rows(training, slot_of, words))
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
    selection = Selection(rules, candidate_rows(training, slot_of, words))
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


def parse_ids(raw: str) -> set[int]:
    try:
        return {int(part) for part in raw.replace(",", " ").split()}
    except ValueError:
        raise UserError(f"ivr.protected_ids: expected integers, got {raw!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="base tokenizer: HF folder, tokenizer.json or hub id")
    parser.add_argument("--model", help="base model folder or hub id (its vocab_size gives the embedding rows)")
    parser.add_argument("--model-rows", type=int, help="embedding rows, instead of reading the model config")
    parser.add_argument("--pretokens", type=Path, required=True, help="analysis/pretokens.parquet")
    parser.add_argument("--frequencies", type=Path, required=True, help="analysis/token_frequencies.parquet")
    parser.add_argument("--backend", choices=BACKENDS, default="unigram")
    parser.add_argument("--n-reassign", type=int, default=8000, help="new pieces to add (budget)")
    parser.add_argument("--min-count", type=int, default=20, help="least domain count a pair needs to be merged")
    parser.add_argument("--max-sacrifice-domain-count", type=int, default=0, help="never sacrifice a token the domain uses more often")
    parser.add_argument("--digits", choices=["auto", "split", "merge"], default="auto",
                        help="may new pieces join digits (auto: only if the base vocabulary does)")
    parser.add_argument("--protected-ids", default="", help="ids never to sacrifice (space or comma separated)")
    parser.add_argument("--special-tokens", default="", help="JSON list of {token, init_text, frozen}")
    parser.add_argument("--rules-file", type=Path, help="use these reassignments instead of selecting")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--candidates-out", type=Path, required=True)
    parser.add_argument("--rules-out", type=Path, required=True)
    parser.add_argument("--log-out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.n_reassign < 0 or args.min_count < 1:
        raise UserError("ivr.n_reassign must be >= 0 and ivr.min_count >= 1")
    base = load_base(args.tokenizer, args.trust_remote_code)
    rows = model_rows(args.model, args.model_rows, base, args.trust_remote_code)
    protected = parse_ids(args.protected_ids)
    bad = sorted(i for i in protected if not 0 <= i < rows)
    if bad:
        raise UserError(f"ivr.protected_ids: id {bad[0]} is not a row of the model (0 to {rows - 1})")
    specials = parse_specials(args.special_tokens, base)
    words = words_of(read_pretokens(args.pretokens))
    frequencies = read_frequencies(args.frequencies, base.n_ids)
    log.info("%d pre-tokens of two or more tokens; %d domain tokens", len(words.seqs), words.domain_tokens)
    if args.rules_file:
        if specials:
            raise UserError("ivr.special_tokens and ivr.rules_file are both set: list the special tokens in the rules file")
        selection = select_from_file(args.rules_file, base, words, frequencies, rows, args.backend, protected, args.min_count)
        header = f"Reassignments from {args.rules_file}, checked and completed by select_candidates.py."
    else:
        selection = select(
            base, words, frequencies, rows, args.backend, args.n_reassign, args.min_count,
            args.max_sacrifice_domain_count, protected, specials, args.digits,
        )
        header = (
            f"Written by select_candidates.py: {len(selection.candidates)} new pieces by continued BPE on the domain "
            f"(budget {args.n_reassign}, min count {args.min_count}), {len(selection.rules) - len(selection.candidates)} special tokens."
        )
    with atomic_outputs(args.candidates_out, args.rules_out, args.log_out) as (candidates, rules, report):
        write_candidates(candidates, selection.candidates)
        rules.write_text(dump_rules(selection.rules, args.tokenizer, args.backend, header), encoding="utf-8")
        report.write_text("\n".join(selection.log_lines) + "\n", encoding="utf-8")
    log.info("%d reassignments written to %s", len(selection.rules), args.rules_out)


if __name__ == "__main__":
    run_main(main)
