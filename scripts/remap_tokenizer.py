#!/usr/bin/env python3
"""Build the remapped tokenizer from remap_rules.yaml (ivr/remapped_tokenizer.py) and measure what it saves.

The folder keeps the base tokenizer's configuration (chat template, special tokens). compression.json
compares base and remapped on the held-out domain split, the general held-out split and any extra
texts given, and says how many new tokens the training split produces.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.analysis_tables import read_pretokens  # noqa: E402
from ivr.base_bpe import load_base  # noqa: E402
from ivr.candidates import read_merges  # noqa: E402
from ivr.cli import UserError, atomic_outputs, log, run_main  # noqa: E402
from ivr.corpus import ReadOptions, clean, expand_paths, iter_jsonl_texts, read_documents  # noqa: E402
from ivr.remap_rules import read_rules  # noqa: E402
from ivr.remapped_tokenizer import add_specials, build_bpe, build_unigram, ordered_merges, raise_unused, training_use  # noqa: E402
from ivr.tokenization import load_tokenizer_json  # noqa: E402


def save_folder(spec: dict, template: str, out: Path, trust_remote_code: bool) -> None:
    """The base tokenizer's folder (configuration, chat template) with the remapped tokenizer.json."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(template, trust_remote_code=trust_remote_code)
    tok.save_pretrained(str(out))
    for stale in ("vocab.json", "merges.txt", "tokenizer.model"):  # the base's slow-tokenizer files
        (out / stale).unlink(missing_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # A model-specific class may rebuild a BPE from vocab files; the generic backend reads tokenizer.json.
    config["tokenizer_class"] = "TokenizersBackend"
    config.pop("added_tokens_decoder", None)  # tokenizer.json lists them, with the new ones
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


# ---- measurement ----------------------------------------------------------------------------------


def read_extra(paths: list[str]) -> list[str]:
    """Documents of extra texts: a .jsonl holds one {"text"} per line; any other file is one document."""
    docs = []
    for path in expand_paths(paths):
        if path.name == "SOURCE.json":
            continue
        if path.suffix.lower() == ".jsonl":
            docs += [clean(t) for t in read_documents(path, ReadOptions(format="jsonl"))]
        else:
            docs.append(clean(next(read_documents(path, ReadOptions(format="txt", txt_mode="file")))))
    return [d for d in docs if d]


def compare(base_tok, new_tok, texts: list[str], new_ids: set[int], distilled_tok=None) -> dict:
    base_lens = [len(e.ids) for e in base_tok.encode_batch(texts, add_special_tokens=False)]
    encoded = new_tok.encode_batch(texts, add_special_tokens=False)
    new_lens = [len(e.ids) for e in encoded]
    used = Counter(i for e in encoded for i in e.ids if i in new_ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    base_total, new_total = sum(base_lens), sum(new_lens)
    longer = [i for i, (b, n) in enumerate(zip(base_lens, new_lens)) if n > b]
    worst = max(range(len(texts)), key=lambda i: (new_lens[i] - base_lens[i], -i), default=None)
    out = {
        "documents": len(texts),
        "bytes": n_bytes,
        "base_tokens": base_total,
        "remapped_tokens": new_total,
        "base_tokens_per_byte": round(base_total / n_bytes, 6) if n_bytes else None,
        "remapped_tokens_per_byte": round(new_total / n_bytes, 6) if n_bytes else None,
        "change": round(new_total / base_total - 1, 6) if base_total else None,
        "new_tokens_occurring": len(used),
        "new_token_share": round(sum(used.values()) / new_total, 6) if new_total else None,
        "documents_longer": len(longer),
        "share_longer": round(len(longer) / len(texts), 6) if texts else None,
        "worst_case": None if worst is None else {
            "document": worst,
            "base_tokens": base_lens[worst],
            "remapped_tokens": new_lens[worst],
            "extra_tokens": new_lens[worst] - base_lens[worst],
            "change": round(new_lens[worst] / base_lens[worst] - 1, 6) if base_lens[worst] else None,
        },
    }
    if distilled_tok is not None:
        distilled = sum(len(e.ids) for e in distilled_tok.encode_batch(texts, add_special_tokens=False))
        out["distilled_tokens_per_byte"] = round(distilled / n_bytes, 6) if n_bytes else None
        out["change_vs_distilled"] = round(new_total / distilled - 1, 6) if distilled else None
    return out


def domain_pretokens(path: Path) -> list[tuple[str, int]]:
    """(byte-level pre-token, count) of every distinct pre-token of the domain training split, most frequent first."""
    table = read_pretokens(path)
    return [(p, c) for p, c in zip(table.strings, table.count.tolist()) if c]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=Path, required=True, help="remap_rules.yaml")
    parser.add_argument("--candidates", type=Path, required=True, help="candidates.tsv (the merge order)")
    parser.add_argument("--base-tokenizer", required=True, help="base tokenizer folder, tokenizer.json or hub id")
    parser.add_argument("--distilled", help="distilled Unigram tokenizer folder (unigram backend)")
    parser.add_argument("--pretokens", type=Path, help="analysis/pretokens.parquet: check every new token is produced")
    parser.add_argument("--heldout", type=Path, help="held-out domain split (JSON lines)")
    parser.add_argument("--general-heldout", type=Path, help="held-out general-text split (JSON lines)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=PATH[,PATH...]", help="more texts to measure")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--out", type=Path, required=True, help="remapped tokenizer folder")
    parser.add_argument("--compression-out", type=Path, required=True, help="compression.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from tokenizers import Tokenizer

    data = read_rules(args.rules)
    rules = data["reassignments"]
    backend = data.get("backend", "unigram")
    base = load_base(args.base_tokenizer, args.trust_remote_code)
    merges = ordered_merges(rules, read_merges(args.candidates), args.candidates)
    new_ids = {r["id"] for r in rules if r["kind"] != "special"}
    pretokens = domain_pretokens(args.pretokens) if args.pretokens else []
    distilled_tok = None
    if backend == "bpe":
        spec = build_bpe(base, rules, merges)
    elif backend == "unigram":
        if not args.distilled:
            raise UserError("the unigram backend needs the distilled tokenizer (--distilled)")
        distilled = load_tokenizer_json(args.distilled)
        spec, margin = build_unigram(distilled, base, rules, merges)
        if pretokens:
            spec = raise_unused(spec, margin, base, rules, merges, pretokens)
        distilled_tok = Tokenizer.from_str(json.dumps(distilled))
    else:
        raise UserError(f"{args.rules}: unknown backend {backend!r} (unigram or bpe)")
    add_specials(spec, rules)
    new_tok = Tokenizer.from_str(json.dumps(spec))
    for rule in rules:
        if new_tok.id_to_token(rule["id"]) != rule["new_token"]:
            raise RuntimeError(f"id {rule['id']}: the remapped tokenizer holds {new_tok.id_to_token(rule['id'])!r}, not {rule['new_token']!r}")
    report: dict = {"backend": backend, "new_tokens": len(new_ids), "special_tokens": len(rules) - len(new_ids)}
    if pretokens:
        report["train"] = training_use(new_tok, pretokens, new_ids)
        log.info("%d of %d new tokens produced on the training split", report["train"]["new_tokens_produced"], len(new_ids))
    corpora: dict[str, list[str]] = {}
    if args.heldout:
        corpora["domain_heldout"] = list(iter_jsonl_texts(args.heldout))
    if args.general_heldout:
        corpora["general_heldout"] = list(iter_jsonl_texts(args.general_heldout))
    for extra in args.extra:
        name, _, paths = extra.partition("=")
        if not name or not paths:
            raise UserError(f"--extra {extra!r}: expected NAME=PATH[,PATH...]")
        corpora[name] = read_extra(paths.split(","))
    report["corpora"] = {}
    for name, texts in corpora.items():
        report["corpora"][name] = compare(base.tok, new_tok, texts, new_ids, distilled_tok)
        c = report["corpora"][name]
        log.info("%s: %.4f -> %.4f tokens/byte (%+.2f %%), %d documents longer", name, c["base_tokens_per_byte"] or 0,
                 c["remapped_tokens_per_byte"] or 0, 100 * (c["change"] or 0), c["documents_longer"])
    with atomic_outputs(args.out, args.compression_out) as (folder, compression):
        folder.mkdir()
        save_folder(spec, args.base_tokenizer, folder, args.trust_remote_code)
        from transformers import AutoTokenizer

        check = AutoTokenizer.from_pretrained(str(folder))
        sample = "제1조(목적) 이 법은 ... The quick brown fox."
        if check.encode(sample, add_special_tokens=False) != new_tok.encode(sample, add_special_tokens=False).ids:
            raise RuntimeError("the saved tokenizer does not load back as built")
        compression.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    run_main(main)
