"""Corpus analysis: counts and id sequences equal the tokenizer's own encode, on real text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from ivr.analysis import _SPACE_IN_WHITESPACE, analyze

QWEN_STYLE_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write_split(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture()
def splits(tmp_path, korean_texts, english_texts):
    train = korean_texts[:-20] + ["문서 끝<|endoftext|>다음 문서", "  leading spaces and 123,456.78 digits\n\n\ttabs  "]
    return {
        "train": write_split(tmp_path / "train.jsonl", train),
        "heldout": write_split(tmp_path / "heldout.jsonl", korean_texts[-20:]),
        "general_train": write_split(tmp_path / "gtrain.jsonl", english_texts[:8]),
        "general_heldout": write_split(tmp_path / "gheldout.jsonl", english_texts[8:12]),
    }


def texts_of(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def check_against_encode(tokenizer_json: Path, splits: dict, out: Path, **kw) -> None:
    out.mkdir()
    stats = analyze(str(tokenizer_json), splits, out, threads=2, chunk_bytes=20_000, **kw)
    tok = Tokenizer.from_file(str(tokenizer_json))
    for name, path in splits.items():
        docs = texts_of(path)
        encoded = [tok.encode(d, add_special_tokens=False).ids for d in docs]
        assert stats[name]["documents"] == len(docs)
        assert stats[name]["tokens"] == sum(map(len, encoded)), name
        assert stats[name]["bytes"] == sum(len(d.encode()) for d in docs)
        if name == "train":
            meta = json.loads((out / "train_ids.json").read_text())
            ids = np.memmap(out / "train_ids.bin", dtype=meta["dtype"], mode="r")
            offsets = np.load(out / "train_offsets.npy")
            assert meta["documents"] == len(docs) and meta["tokens"] == len(ids)
            for i, expected in enumerate(encoded):
                assert ids[offsets[i] : offsets[i + 1]].tolist() == expected
            counts = np.bincount(np.concatenate([np.array(e) for e in encoded]), minlength=tok.get_vocab_size())
            freq = pq.read_table(out / "token_frequencies.parquet").to_pandas()
            assert (freq["count"].to_numpy() == counts).all()
    pre = pq.read_table(out / "pretokens.parquet").to_pandas()
    assert (pre["count"].diff().dropna() <= 0).all()
    for row in pre.head(200).itertuples():
        assert [t.id for t in tok.model.tokenize(row.pretoken)] == list(row.ids)
    assert set(json.loads((out / "corpus_stats.json").read_text())) == set(splits)


def test_gpt2_counts_equal_hf_encode(tmp_path, splits, gpt2_tokenizer_dir):
    check_against_encode(gpt2_tokenizer_dir / "tokenizer.json", splits, tmp_path / "fast")


def test_exact_pretokenizer_gives_identical_files(tmp_path, splits, gpt2_tokenizer_dir):
    check_against_encode(gpt2_tokenizer_dir / "tokenizer.json", splits, tmp_path / "fast")
    check_against_encode(gpt2_tokenizer_dir / "tokenizer.json", splits, tmp_path / "exact", exact=True)
    for name in ("train_ids.bin", "token_frequencies.parquet", "pretokens.parquet", "corpus_stats.json"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "exact" / name).read_bytes(), name


@pytest.mark.parametrize("variant", ["split_then_bytelevel", "digits_then_bytelevel", "prefix_space"])
def test_other_byte_level_pretokenizers(tmp_path, splits, gpt2_tokenizer_dir, variant):
    """Qwen/Llama-3-style Split, SmolLM-style Digits and add_prefix_space are emulated exactly."""
    spec = json.loads((gpt2_tokenizer_dir / "tokenizer.json").read_text())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if variant == "split_then_bytelevel":
        split = {"type": "Split", "pattern": {"Regex": QWEN_STYLE_SPLIT}, "behavior": "Isolated", "invert": False}
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    elif variant == "digits_then_bytelevel":
        digits = {"type": "Digits", "individual_digits": True}
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    else:
        spec["pre_tokenizer"] = {**byte_level, "add_prefix_space": True}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    check_against_encode(path, splits, tmp_path / "out")


def test_outputs_are_byte_identical_between_runs(tmp_path, splits, gpt2_tokenizer_dir):
    """Whatever the chunk size and the helper's threads."""
    for run, threads, chunk_bytes in (("a", 1, 10_000), ("b", 3, 50_000)):
        (tmp_path / run).mkdir()
        analyze(str(gpt2_tokenizer_dir), splits, tmp_path / run, threads=threads, chunk_bytes=chunk_bytes)
    for name in ("train_ids.bin", "train_offsets.npy", "token_frequencies.parquet", "pretokens.parquet", "corpus_stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_chunk_that_brings_a_single_new_word(tmp_path, gpt2_tokenizer_dir):
    """Split over threads, one new word must not leave a thread an empty share (it once crashed here)."""
    splits = {"train": write_split(tmp_path / "train.jsonl", ["a b"]), "heldout": write_split(tmp_path / "heldout.jsonl", ["c"])}
    check_against_encode(gpt2_tokenizer_dir / "tokenizer.json", splits, tmp_path / "out")


@pytest.mark.parametrize("pattern", ["gpt2", "llama3", "qwen2"])
def test_cutting_at_single_spaces_gives_the_pretokens_of_the_whole_text(pattern):
    """The analysis counts by space-separated word; that must never change a pre-token, whatever the whitespace."""
    import random

    from ivr.tokenization import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, compile_pretokenizer, splits_at_single_spaces

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    regex_ = {"gpt2": GPT2_PATTERN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}[pattern]
    split = {"type": "Split", "pattern": {"Regex": regex_}, "behavior": "Isolated", "invert": False}
    spec = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}}
    assert splits_at_single_spaces(spec)
    digits = {"type": "Digits", "individual_digits": True}  # its part ends break the argument: not cut by words
    assert not splits_at_single_spaces({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}})
    pretokenize = compile_pretokenizer(spec)
    alphabet = [" ", " ", " ", "\n", "\t", "\r", "\u3000", "a", "B", "법", "률", "1", "٣", "'", "s", "!", "(", "\x1c"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        if _SPACE_IN_WHITESPACE.search(text):
            continue  # the analysis pre-tokenizes such texts whole
        first, *rest = text.split(" ")
        by_word = pretokenize(first) if first else []
        for word in rest:
            by_word += pretokenize(" " + word)
        assert by_word == pretokenize(text), repr(text)


def test_the_rank_merger_segments_like_the_tokenizer(tmp_path, gpt2_tokenizer_dir, korean_texts, english_texts):
    """tiktoken's merger, built from the merges, gives the BPE's own segmentation on every real pre-token,
    also when ids do not follow merge order."""
    from ivr.tokenization import GPT2_PATTERN, RankSegmenter, bytes_to_bytelevel

    import regex

    spec = json.loads((gpt2_tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    late = next(t for t, i in vocab.items() if i == 40000)
    vocab["Ġthe"], vocab[late] = vocab[late], vocab["Ġthe"]  # a merge-built token moved behind later merges
    pieces = {p for text in korean_texts + english_texts for p in regex.findall(GPT2_PATTERN, text)}
    for variant in (json.loads((gpt2_tokenizer_dir / "tokenizer.json").read_text()), spec):
        tok = Tokenizer.from_str(json.dumps(variant))

        def hf(data: bytes) -> list[int]:
            return [t.id for t in tok.model.tokenize(bytes_to_bytelevel(data))]

        segment = RankSegmenter.build(variant, hf)
        assert segment is not None
        mismatched = [p for p in pieces if segment(p.encode()) != hf(p.encode())]
        assert not mismatched and len(pieces) > 5000
        ordered = sorted(pieces)
        lens, flat = segment.many(ordered)  # all at once, through one call into tiktoken
        assert np.array_equal(lens, [len(hf(p.encode())) for p in ordered])
        assert flat.tolist() == [i for p in ordered for i in hf(p.encode())]


def test_documents_cut_in_python_are_found_by_the_re2_test():
    """The vectorized cut leaves documents with a space inside whitespace to Python; pyarrow's RE2
    must find exactly what Python's regex finds, for every character Python counts as whitespace."""
    import random

    import pyarrow as pa
    import pyarrow.compute as pc

    from ivr.analysis import _SPACE_IN_WHITESPACE_RE2

    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    alphabet = spaces + [" "] * 8 + ["a", "법", "1", ".", "\u200b", "\x1b"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(20000)]
    found = pc.match_substring_regex(pa.array(texts), _SPACE_IN_WHITESPACE_RE2).to_pylist()
    assert found == [_SPACE_IN_WHITESPACE.search(t) is not None for t in texts]
    assert 1000 < sum(found) < 19000


def test_string_numbering_stays_exact_when_hashes_collide(monkeypatch):
    """Strings are looked up by a 64-bit hash checked against the string; with every hash equal
    (the worst case), each distinct string still gets one number, the same on every later sight."""
    import pyarrow as pa

    from ivr import string_numbering

    batches = [["a", "b", "a", "법률"], ["b", "c", "법률", ""], ["", "d", "a"]]
    for hashing in (string_numbering.hash_strings, lambda texts: np.zeros(len(texts), np.uint64)):
        monkeypatch.setattr(string_numbering, "hash_strings", hashing)
        noted: list = []
        numbering = string_numbering.StringNumbering("k", noted, [0])
        numbers = [numbering.number(pa.array(batch, pa.string())).tolist() for batch in batches]
        new = [prefix + text for prefix, texts in noted for text in texts.to_pylist()]
        seen = list(dict.fromkeys(s for batch in batches for s in batch))
        assert sorted(new) == sorted("k" + s for s in seen)
        first = {key[1:]: i for i, key in enumerate(new)}
        assert numbers == [[first[s] for s in batch] for batch in batches]


def test_ids_out_of_merge_order_still_equal_hf_encode(tmp_path, splits, gpt2_tokenizer_dir):
    spec = json.loads((gpt2_tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    late = next(t for t, i in vocab.items() if i == 40000)
    vocab["Ġthe"], vocab[late] = vocab[late], vocab["Ġthe"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    check_against_encode(path, splits, tmp_path / "out")
