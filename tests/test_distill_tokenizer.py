"""Distilled tokenizer: same vocabulary at the same ids, identical decoding, BPE segmentation reproduced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import ROOT
from distill_tokenizer import distill
from ivr.fidelity import measure_fidelity, read_texts
from ivr.unigram_fit import FitOptions

FIT = FitOptions(max_rounds=6)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, gpt2_bills_analysis) -> Path:
    out = tmp_path_factory.mktemp("distill") / "distilled"
    distill(str(gpt2_bills_analysis["tokenizer"]), gpt2_bills_analysis["analysis"] / "pretokens.parquet", out, FIT)
    return out


def load(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_same_vocabulary_ids_and_special_tokens(distilled, gpt2_tokenizer_dir):
    base, ours = load(gpt2_tokenizer_dir), load(distilled)
    size = base.get_vocab_size(with_added_tokens=True)
    assert ours.get_vocab_size(with_added_tokens=True) == size == 50257
    assert all(base.id_to_token(i) == ours.id_to_token(i) for i in range(size))
    assert base.get_vocab(with_added_tokens=True) == ours.get_vocab(with_added_tokens=True)
    base_spec, our_spec = (json.loads((f / "tokenizer.json").read_text()) for f in (gpt2_tokenizer_dir, distilled))
    assert our_spec["model"]["type"] == "Unigram"
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "truncation", "padding"):
        assert our_spec[key] == base_spec[key], key
    assert ours.token_to_id("<|endoftext|>") == 50256
    assert ours.encode("끝<|endoftext|>", add_special_tokens=False).ids[-1] == 50256


def test_decode_is_identical_over_the_whole_vocabulary(distilled, gpt2_tokenizer_dir):
    base, ours = load(gpt2_tokenizer_dir), load(distilled)
    size = base.get_vocab_size(with_added_tokens=True)
    singles = [[i] for i in range(size)]
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, size, rng.integers(1, 40)).tolist() for _ in range(3000)]
    for skip in (False, True):
        for ids in (singles, sequences):
            assert base.decode_batch(ids, skip_special_tokens=skip) == ours.decode_batch(ids, skip_special_tokens=skip)


def test_heldout_agreement(distilled, gpt2_tokenizer_dir, gpt2_bills_analysis, korean_texts):
    """A fit on 300 bills and 30 pages of English reproduces GPT-2 on text it never saw."""
    base, ours = load(gpt2_tokenizer_dir), load(distilled)
    bills = measure_fidelity(base, ours, read_texts(gpt2_bills_analysis["heldout"]))
    other_korean = measure_fidelity(base, ours, korean_texts)
    english = measure_fidelity(base, ours, read_texts(gpt2_bills_analysis["general_heldout"]))
    assert bills["documents"] == len(list(read_texts(gpt2_bills_analysis["heldout"]))) and english["documents"] == 10
    assert bills["pretoken_agreement"] >= 0.999, bills  # measured: 0.99994
    assert other_korean["pretoken_agreement"] >= 0.99, other_korean  # measured: 0.996
    assert english["pretoken_agreement"] >= 0.98, english  # measured: 0.990
    for result in (bills, other_korean, english):
        assert result["decode_roundtrip"] == 1.0


def test_loads_with_transformers(distilled, gpt2_tokenizer_dir, korean_texts):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    reference = load(distilled)
    base = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    for tok in (AutoTokenizer.from_pretrained(distilled), PreTrainedTokenizerFast.from_pretrained(distilled)):
        assert tok.eos_token == base.eos_token and tok.eos_token_id == base.eos_token_id == 50256
        assert len(tok) == len(base)
        for text in korean_texts[:5]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == reference.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids) == text


def test_output_is_byte_identical_between_runs(tmp_path, gpt2_bills_analysis):
    opts = FitOptions(max_rounds=2, vocabulary_weight=0.0)
    for run in ("a", "b"):
        pretokens = gpt2_bills_analysis["analysis"] / "pretokens.parquet"
        distill(str(gpt2_bills_analysis["tokenizer"]), pretokens, tmp_path / run, opts)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["distillation.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_non_bpe_tokenizer_is_refused(tmp_path, gpt2_tokenizer_dir, gpt2_bills_analysis):
    spec = json.loads((gpt2_tokenizer_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}
    spec["model"]["byte_fallback"] = True
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    bad = tmp_path / "sp" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(spec))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill_tokenizer.py"), "--tokenizer", str(bad),
         "--pretokens", str(gpt2_bills_analysis["analysis"] / "pretokens.parquet"), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "a SentencePiece-style BPE tokenizer: the unigram backend" in result.stderr
    assert not out.exists()


def test_pretokens_of_another_tokenizer_are_refused(tmp_path, gpt2_tokenizer_dir, gpt2_bills_analysis):
    spec = json.loads((gpt2_tokenizer_dir / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][300:]
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps(spec))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill_tokenizer.py"), "--tokenizer", str(other),
         "--pretokens", str(gpt2_bills_analysis["analysis"] / "pretokens.parquet"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "analyzed with another tokenizer" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
