#!/usr/bin/env python3
"""Distill a byte-level BPE tokenizer into a Unigram tokenizer over the same vocabulary.

Every vocabulary string keeps its id; added and special tokens, normalizer, pre-tokenizer, decoder
and post-processor are copied unchanged; only the model becomes a Unigram, whose scores are fitted
(ivr/unigram_fit.py) so that its Viterbi segmentation reproduces the BPE's on the training split's
distinct pre-tokens (pretokens.parquet from the analysis), optionally with the general-text pre-tokens
and every vocabulary string as extra examples. A slice of rare training pre-tokens is kept out of the
fit as a dev set. Writes a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json, the
base's special tokens map and chat template when it has them, distillation.json with the fit's
figures). A pre-token weighs 1 + log(its count) in the fit, a vocabulary string --vocabulary-weight.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.analysis_tables import read_pretokens  # noqa: E402
from ivr.cli import UserError, atomic_path, log, run_main  # noqa: E402
from ivr.tokenization import byte_to_unicode, check_byte_level_bpe, load_tokenizer_json  # noqa: E402
from ivr.unigram_fit import Examples, FitOptions, fit_scores, joined, mismatched, model_segmenter, segment, split_dev  # noqa: E402

COPIED = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def base_vocabulary(spec: dict, where: str) -> list[str]:
    """The BPE vocabulary as a list indexed by id (the Unigram needs ids 0..n-1 without holes)."""
    vocab = spec["model"]["vocab"]
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise UserError(f"{where}: the BPE vocabulary's ids are not 0..{len(by_id) - 1} without holes")
    return [token for token, _ in by_id]


def load_examples(path: Path, include_general: bool) -> Examples:
    table = read_pretokens(path)
    counts = table.count + table.general_count if include_general else table.count
    ex = Examples(table.strings, counts, 1.0 + np.log(np.maximum(counts, 1)), table.lens, table.ids)
    return ex.subset(np.nonzero(counts > 0)[0])


def vocabulary_examples(spec: dict, vocab: list[str], skip: set[str], weight: float) -> Examples:
    """Every byte-level vocabulary string not already an example, with its BPE segmentation."""
    alphabet = set(byte_to_unicode().values())
    added = {t["content"] for t in spec.get("added_tokens", [])}
    strings = [t for t in vocab if t not in skip and t not in added and set(t) <= alphabet]
    lens, flat = segment(model_segmenter(spec["model"]), joined(strings), len(strings))
    n = len(strings)
    return Examples(strings, np.zeros(n, np.int64), np.full(n, weight), lens, flat)


def check_segmentations(spec: dict, ex: Examples, message: str, sample: int = 500) -> None:
    """The most frequent examples must be segmented as the base BPE segments them."""
    head = ex.subset(np.arange(min(sample, len(ex.strings))))
    if len(ex.flat) and ex.flat.max() >= len(spec["model"]["vocab"]):
        raise UserError(message)
    lens, flat = segment(model_segmenter(spec["model"]), joined(head.strings), len(head.strings))
    if mismatched(head, lens, flat).any():
        raise UserError(message)


def unigram_spec(spec: dict, vocab: list[str], scores: np.ndarray) -> dict:
    """The base tokenizer.json with its model replaced by the Unigram; everything else unchanged."""
    pieces = [[t, float(s)] for t, s in zip(vocab, scores)]
    return {**spec, "model": {"type": "Unigram", "unk_id": None, "vocab": pieces, "byte_fallback": False}}


def base_files(name: str, trust_remote_code: bool) -> dict[str, bytes]:
    """tokenizer_config.json and the other files of the base tokenizer's folder worth keeping."""
    path = Path(name)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():  # a hub id: let transformers write its files
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code).save_pretrained(tmp)
            return base_files(tmp, False)
    return {n: (folder / n).read_bytes() for n in ("tokenizer_config.json", *COPIED) if (folder / n).is_file()}


def tokenizer_config(raw: bytes | None) -> bytes:
    """The base's tokenizer_config.json, loading as a plain fast tokenizer (the BPE-specific class would not fit)."""
    config = json.loads(raw) if raw else {}
    config.pop("auto_map", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def distill(tokenizer: str, pretokens: Path, out: Path, opts: FitOptions, trust_remote_code: bool = False) -> dict:
    """Fit and write the distilled tokenizer folder; returns what distillation.json holds."""
    from tokenizers import Tokenizer

    spec = load_tokenizer_json(tokenizer, trust_remote_code)
    check_byte_level_bpe(spec, tokenizer)
    vocab = base_vocabulary(spec, tokenizer)
    fixed = np.array(sorted(t["id"] for t in spec.get("added_tokens", []) if t["id"] < len(vocab)), dtype=np.int64)
    corpus = load_examples(pretokens, opts.include_general)
    if not corpus.strings:
        raise UserError(f"{pretokens}: holds no pre-tokens to fit")
    fit_index, dev_index = split_dev(corpus, opts)
    fit, dev = corpus.subset(fit_index), corpus.subset(dev_index)
    check_segmentations(spec, corpus, f"{pretokens}: the segmentations are not those of {tokenizer}; "
                        "was it analyzed with another tokenizer?")
    if opts.vocabulary_weight > 0:
        fit = fit.concat(vocabulary_examples(spec, vocab, set(corpus.strings), opts.vocabulary_weight))
    log.info("fitting %d pre-tokens (%d from the vocabulary), %d kept out as dev", len(fit.strings),
             int((fit.counts == 0).sum()), len(dev.strings))
    unseen = float((corpus.counts == 1).sum()) / float(corpus.counts.sum())
    scores, fit_report = fit_scores(vocab, fixed, fit, dev, unseen, opts)
    distilled = Tokenizer.from_str(json.dumps(unigram_spec(spec, vocab, scores)))
    files = base_files(tokenizer, trust_remote_code)
    report = {"base": str(tokenizer), "pretokens": str(pretokens), "options": asdict(opts),
              "fit_pretokens": len(fit.strings), "dev_pretokens": len(dev.strings), **fit_report}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        distilled.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_bytes(tokenizer_config(files.get("tokenizer_config.json")))
        for name in COPIED:
            if name in files:
                (tmp / name).write_bytes(files[name])
        (tmp / "distillation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = FitOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="base tokenizer: local HF folder, tokenizer.json, or hub id")
    parser.add_argument("--pretokens", type=Path, required=True, help="pretokens.parquet from the analysis")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the distilled tokenizer to")
    parser.add_argument("--include-general", action=argparse.BooleanOptionalAction, default=d.include_general)
    parser.add_argument("--vocabulary-weight", type=float, default=d.vocabulary_weight)
    parser.add_argument("--margin", type=float, default=d.margin)
    parser.add_argument("--l2", type=float, default=d.l2)
    parser.add_argument("--max-rounds", type=int, default=d.max_rounds)
    parser.add_argument("--patience", type=int, default=d.patience)
    parser.add_argument("--lbfgs-iterations", type=int, default=d.lbfgs_iterations)
    parser.add_argument("--dev-fraction", type=float, default=d.dev_fraction)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    opts = FitOptions(args.include_general, args.vocabulary_weight, args.margin, args.l2, args.max_rounds,
                      args.patience, args.lbfgs_iterations, args.dev_fraction, args.seed)
    if opts.margin <= 0 or opts.l2 <= 0 or opts.vocabulary_weight < 0 or not 0 <= opts.dev_fraction < 1:
        raise UserError("margin and l2 must be > 0, vocabulary weight >= 0, dev fraction in [0, 1)")
    report = distill(args.tokenizer, args.pretokens, args.out, opts, args.trust_remote_code)
    chosen = report["rounds"][report["chosen_round"]]
    log.info("wrote %s: round %d, agreement %.6f on the fit, %.6f on dev", args.out, chosen["round"],
             chosen["fit_agreement"], chosen["dev_agreement"])


if __name__ == "__main__":
    run_main(main)
