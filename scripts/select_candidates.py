#!/usr/bin/env python3
"""Choose the reassignment: which new tokens to add and which ids they take.

New tokens are pieces inside the domain's pre-tokens, found by continuing BPE training on its training
split; they take unused embedding rows first, then the ids the domain and the general text use least,
never special, single-byte or protected ones (ivr/selection.py). A user's rules file replaces the
selection and is checked as strictly.

Writes candidates.tsv (every merged pair in merge order, with counts and savings), remap_rules.yaml
(the format in docs/DEVELOPING.md) and selection_log.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.analysis_tables import read_frequencies, read_pretokens  # noqa: E402
from ivr.base_bpe import Base, load_base  # noqa: E402
from ivr.candidates import write_candidates  # noqa: E402
from ivr.cli import UserError, atomic_outputs, first_line, log, run_main  # noqa: E402
from ivr.continued_bpe import words_of  # noqa: E402
from ivr.files import read_json  # noqa: E402
from ivr.remap_rules import dump_rules  # noqa: E402
from ivr.selection import Special, select, select_from_file  # noqa: E402

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


# ---- named special tokens ---------------------------------------------------------------------------


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
    if args.rules_file:  # the config check refuses ivr.special_tokens beside it (config/schema.yaml)
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
