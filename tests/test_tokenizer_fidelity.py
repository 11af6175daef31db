"""Tokenizer fidelity (scripts/tokenizer_fidelity.py): how faithfully a candidate tokenizer reproduces the
base BPE, counted per pre-token, per document and by decoding, on real text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import ROOT
from distill_tokenizer import distill, unigram_spec
from ivr.fidelity import measure_fidelity, read_texts
from ivr.unigram_fit import FitOptions


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, gpt2_bills_analysis) -> Path:
    """A quick distillation of GPT-2 on the fixture's bills, the candidate the workflow measures."""
    out = tmp_path_factory.mktemp("distill") / "distilled"
    distill(str(gpt2_bills_analysis["tokenizer"]), gpt2_bills_analysis["analysis"] / "pretokens.parquet", out,
            FitOptions(max_rounds=2, vocabulary_weight=0.0))
    return out


def test_pretoken_agreement_counts_each_pretoken(gpt2_tokenizer_dir, korean_texts, english_texts):
    """measure_fidelity against a direct count: pre-tokenize, segment each piece with both models."""
    spec = json.loads((gpt2_tokenizer_dir / "tokenizer.json").read_text())
    vocab = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    base = Tokenizer.from_str(json.dumps(spec))
    crude = Tokenizer.from_str(json.dumps(unigram_spec(spec, vocab, -np.array([len(t) ** 0.5 for t in vocab]))))
    docs = korean_texts[:10] + english_texts[:3] + ["a<|endoftext|>b  c\n\n"]
    same = total = 0
    for doc in docs:
        for part in doc.split("<|endoftext|>"):
            for piece, _ in base.pre_tokenizer.pre_tokenize_str(part):
                total += 1
                same += [t.id for t in base.model.tokenize(piece)] == [t.id for t in crude.model.tokenize(piece)]
        total += doc.count("<|endoftext|>")
        same += doc.count("<|endoftext|>")
    result = measure_fidelity(base, crude, docs, batch_size=4)
    assert result["pretokens"] == total and result["pretokens_identical"] == same
    assert 0.3 < result["pretoken_agreement"] < 0.99
    assert result["documents"] == len(docs) and result["decode_roundtrip"] == 1.0


def test_the_script_measures_each_file_and_all_together(tmp_path, distilled, gpt2_tokenizer_dir, gpt2_bills_analysis, korean_texts):
    lines = tmp_path / "korean.txt"
    lines.write_text("\n".join(t.replace("\n", " ") for t in korean_texts[:30]) + "\n", encoding="utf-8")
    out = tmp_path / "fidelity.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tokenizer_fidelity.py"), "--reference", str(gpt2_tokenizer_dir),
         "--candidate", str(distilled / "tokenizer.json"), "--text", str(gpt2_bills_analysis["heldout"]), str(lines),
         "--out", str(out)],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    assert set(report["files"]) == {str(gpt2_bills_analysis["heldout"]), str(lines)}
    assert report["files"][str(lines)]["documents"] == 30
    assert report["documents"] == 30 + len(list(read_texts(gpt2_bills_analysis["heldout"])))
    assert report["pretokens"] == sum(f["pretokens"] for f in report["files"].values())
    for key in ("pretoken_agreement", "document_agreement", "decode_roundtrip"):
        assert 0.9 <= report[key] <= 1.0, key
    same = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tokenizer_fidelity.py"), "--reference", str(gpt2_tokenizer_dir),
         "--candidate", str(gpt2_tokenizer_dir), "--text", str(lines)],
        capture_output=True, text=True, check=True,
    )
    assert json.loads(same.stdout)["pretoken_agreement"] == json.loads(same.stdout)["document_agreement"] == 1.0


def test_a_missing_text_file_is_one_line(tmp_path, gpt2_tokenizer_dir):
    missing = tmp_path / "no such text.txt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tokenizer_fidelity.py"), "--reference", str(gpt2_tokenizer_dir),
         "--candidate", str(gpt2_tokenizer_dir), "--text", str(missing), "--out", str(tmp_path / "fidelity.json")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and result.stderr == f"error: {missing}: text file does not exist\n"
    assert not (tmp_path / "fidelity.json").exists()


def test_a_sentencepiece_style_reference_is_counted_by_word(korean_texts, english_texts):
    """Llama-2's tokenizer (converted from llama.cpp's vocabulary file) keeps a text whole before its merges:
    its pre-tokens are the analysis's words, and measure_fidelity counts them as the analysis cuts them."""
    from conftest import asset
    from ivr.gguf_vocab import gguf_tokenizer
    from ivr.tokenization import sentencepiece_pretokenizer

    spec = json.loads(gguf_tokenizer(asset("llama_cpp_vocabs") / "ggml-vocab-llama-spm.gguf").backend_tokenizer.to_str())
    base = Tokenizer.from_str(json.dumps(spec))
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "th" not in "".join(m)]  # "th" now stays apart
    candidate = Tokenizer.from_str(json.dumps(spec))
    docs = korean_texts[:10] + english_texts[:3]
    pretokenize = sentencepiece_pretokenizer(spec, base)
    pieces = [piece for doc in docs for piece in pretokenize(doc)]
    same = sum([t.id for t in base.model.tokenize(p)] == [t.id for t in candidate.model.tokenize(p)] for p in pieces)
    result = measure_fidelity(base, candidate, docs, batch_size=4)
    assert result["pretokens"] == len(pieces) and result["pretokens_identical"] == same < len(pieces)
    assert measure_fidelity(base, base, docs)["pretoken_agreement"] == 1.0
