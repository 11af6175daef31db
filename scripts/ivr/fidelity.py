"""How faithfully one tokenizer reproduces another on real text: pre-tokens, documents, round trips."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from ivr.corpus import ReadOptions, read_documents
from ivr.tokenization import SPACE, load_tokenizer_json

COUNTS = ("documents", "documents_identical", "documents_roundtrip", "pretokens", "pretokens_identical",
          "reference_tokens", "candidate_tokens", "bytes")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A `tokenizers.Tokenizer` from a folder, a tokenizer.json file or a hub id."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(load_tokenizer_json(str(name_or_path), trust_remote_code)))


def read_texts(path: str | Path) -> Iterator[str]:
    """Documents of a text file: .jsonl holds one {"text": ...} per line, anything else one document per line."""
    path = Path(path)
    jsonl = path.suffix.lower() == ".jsonl"
    opts = ReadOptions(format="jsonl" if jsonl else "txt", txt_mode="line")
    for text in read_documents(path, opts):
        if text:
            yield text


def sentencepiece_words(encoding) -> list[int]:
    """Word numbers of a SentencePiece-style encoding, whose pre-tokenizer (if any) keeps the text whole: a
    word starts at a token with a leading "▁" unless the token before is all "▁" (the analysis's pre-tokens)."""
    words, n, previous = [], -1, ""
    for token in encoding.tokens:
        if n < 0 or (token.startswith(SPACE) and previous.strip(SPACE)):
            n += 1
        words.append(n)
        previous = token
    return words


def _words(encoding, word_ids) -> dict[tuple[int, int], tuple[int, ...]]:
    """Token ids grouped by pre-token, keyed by the pre-token's character span."""
    spans: dict[int, list] = {}
    for token_id, word, (start, end) in zip(encoding.ids, word_ids, encoding.offsets):
        if word is None:
            continue
        entry = spans.setdefault(word, [start, end, []])
        entry[1] = end
        entry[2].append(token_id)
    return {(s, e): tuple(ids) for s, e, ids in spans.values()}


def _word_count(word_ids) -> int:
    return len({w for w in word_ids if w is not None})


def measure_fidelity(reference, candidate, documents: Iterable[str], batch_size: int = 256) -> dict:
    """Agreement of `candidate` with `reference` (both `tokenizers.Tokenizer`) on the documents.

    pretoken_agreement: share of the reference's pre-token occurrences that the candidate splits
    at the same place into the same ids; document_agreement: share of documents with identical ids;
    decode_roundtrip: share of documents the candidate decodes back to exactly the same text.
    Special tokens are never added. A SentencePiece-style reference (byte fallback, no splitting
    pre-tokenizer) is cut into words as the analysis cuts it (sentencepiece_words).
    """
    counts = dict.fromkeys(COUNTS, 0)
    by_space = getattr(reference.model, "byte_fallback", False) and (
        reference.pre_tokenizer is None or type(reference.pre_tokenizer).__name__ == "Metaspace")
    word_ids = sentencepiece_words if by_space else (lambda encoding: encoding.word_ids)
    docs = iter(documents)
    while batch := list(islice(docs, batch_size)):
        refs = reference.encode_batch(batch, add_special_tokens=False)
        cands = candidate.encode_batch(batch, add_special_tokens=False)
        decoded = candidate.decode_batch([c.ids for c in cands], skip_special_tokens=False)
        for text, ref, cand, back in zip(batch, refs, cands, decoded):
            counts["documents"] += 1
            counts["bytes"] += len(text.encode("utf-8"))
            counts["reference_tokens"] += len(ref.ids)
            counts["candidate_tokens"] += len(cand.ids)
            counts["documents_roundtrip"] += back == text
            ref_ids, cand_ids = word_ids(ref), word_ids(cand)
            if ref.ids == cand.ids and ref_ids == cand_ids:
                counts["documents_identical"] += 1
                n = _word_count(ref_ids)
                counts["pretokens"] += n
                counts["pretokens_identical"] += n
                continue
            ref_words, cand_words = _words(ref, ref_ids), _words(cand, cand_ids)
            counts["pretokens"] += len(ref_words)
            counts["pretokens_identical"] += sum(cand_words.get(span) == ids for span, ids in ref_words.items())
    return summarize(counts)


def summarize(counts: dict) -> dict:
    """The three shares, computed from the counts (None when there was nothing to count)."""

    def share(part: str, whole: str) -> float | None:
        return round(counts[part] / counts[whole], 8) if counts[whole] else None

    return {
        "pretoken_agreement": share("pretokens_identical", "pretokens"),
        "document_agreement": share("documents_identical", "documents"),
        "decode_roundtrip": share("documents_roundtrip", "documents"),
        **{k: counts[k] for k in COUNTS},
    }


def fidelity_report(reference: str, candidate: str, texts: list[str], trust_remote_code: bool = False) -> dict:
    """measure_fidelity on each text file and on all of them together, as one JSON-ready dict."""
    ref, cand = load_tokenizer(reference, trust_remote_code), load_tokenizer(candidate, trust_remote_code)
    files = {str(path): measure_fidelity(ref, cand, read_texts(path)) for path in texts}
    total = {k: sum(f[k] for f in files.values()) for k in COUNTS}
    return {"reference": str(reference), "candidate": str(candidate), **summarize(total), "files": files}
