#!/usr/bin/env python3
"""Build the remapped tokenizer from remap_rules.yaml and measure what it saves.

unigram backend: the distilled Unigram (base vocabulary, same ids) with each reassigned id's piece
replaced by the new piece. Taken in merge order, a new piece scores a margin above the best way to
build its string from the pieces before it, so wherever its string occurs it beats its own parts;
a piece the Viterbi still never picks on the training split is raised until it does.

bpe backend: the base BPE with the sacrificed tokens' merges dropped (selection only sacrifices tokens
no merge builds on) and one merge appended per new token, in selection's order. Any text whose base
segmentation uses no sacrificed token and in which no new merge fires is tokenized bit-identically.

Special tokens become added tokens at their ids (never split). The folder keeps the base tokenizer's
configuration (chat template, special tokens). compression.json compares base and remapped on the
held-out domain split, the general held-out split and any extra texts given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_outputs, log, run_main  # noqa: E402
from ivr.corpus import ReadOptions, clean, expand_paths, iter_jsonl_texts, read_documents  # noqa: E402
from ivr.analysis_tables import read_pretokens  # noqa: E402
from ivr.base_bpe import Base, load_base, split_merge  # noqa: E402
from ivr.candidates import read_merges  # noqa: E402
from ivr.remap_rules import read_rules  # noqa: E402
from ivr.tokenization import load_tokenizer_json  # noqa: E402


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
