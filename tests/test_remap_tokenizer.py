"""The remapped tokenizer on real bills with the real GPT-2 tokenizer: both backends load, every new
token is produced, the bpe backend is bit-identical wherever no sacrificed or new token is involved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from conftest import asset
from ivr.corpus import iter_jsonl_texts
from ivr.remap_rules import read_rules
from remap_tokenizer import main as remap_main
from test_select_candidates import SPECIAL, select


def remap(analysis: dict, selection: dict[str, Path], out: Path, distilled: Path | None) -> dict[str, Path]:
    konlpy = asset("konlpy_corpus")
    outs = {"tokenizer": out / "remapped", "compression": out / "compression.json"}
    remap_main([
        "--rules", str(selection["rules"]), "--candidates", str(selection["candidates"]),
        "--base-tokenizer", str(analysis["tokenizer"]),
        *(["--distilled", str(distilled)] if distilled else []),
        "--pretokens", str(analysis["analysis"] / "pretokens.parquet"),
        "--heldout", str(analysis["heldout"]), "--general-heldout", str(analysis["general_heldout"]),
        "--extra", f"konlpy={konlpy / 'constitution.txt'},{konlpy / 'kobill'}",
        "--out", str(outs["tokenizer"]), "--compression-out", str(outs["compression"]),
    ])
    return outs


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def remapped(request, tmp_path_factory, gpt2_bills_analysis, gpt2_unigram_standin) -> dict:
    backend = request.param
    folder = tmp_path_factory.mktemp(f"remap_{backend}")
    selection = select(gpt2_bills_analysis, folder, "--backend", backend, "--special-tokens", SPECIAL)
    outs = remap(gpt2_bills_analysis, selection, folder, gpt2_unigram_standin if backend == "unigram" else None)
    rules = read_rules(selection["rules"])["reassignments"]
    return {"backend": backend, "selection": selection, "rules": rules, **outs}


def new_ids(rules: list[dict]) -> set[int]:
    return {r["id"] for r in rules if r["kind"] == "ngram"}


def test_loads_with_autotokenizer_and_keeps_the_base_setup(remapped, gpt2_tokenizer_dir, korean_texts):
    tok = AutoTokenizer.from_pretrained(remapped["tokenizer"])
    base = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == (base.bos_token, base.eos_token, base.unk_token)
    raw = Tokenizer.from_file(str(remapped["tokenizer"] / "tokenizer.json"))
    for text in korean_texts[:5]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    for rule in remapped["rules"]:
        assert tok.convert_ids_to_tokens(rule["id"]) == rule["new_token"]


def test_special_token_is_one_id_never_split(remapped):
    tok = AutoTokenizer.from_pretrained(remapped["tokenizer"])
    (rule,) = [r for r in remapped["rules"] if r["kind"] == "special"]
    for text in ("<ToW>", "생각<ToW>한다", "x <ToW>y"):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids.count(rule["id"]) == 1, (text, ids)
    assert tok.decode(tok.encode("a <ToW> b", add_special_tokens=False), skip_special_tokens=True) == "a  b"


def test_every_new_token_is_produced_on_the_training_split(remapped, gpt2_bills_analysis):
    tok = Tokenizer.from_file(str(remapped["tokenizer"] / "tokenizer.json"))
    texts = list(iter_jsonl_texts(gpt2_bills_analysis["train"]))
    produced = {i for enc in tok.encode_batch(texts, add_special_tokens=False) for i in enc.ids}
    wanted = new_ids(remapped["rules"])
    assert len(wanted) == 300 and wanted <= produced, sorted(wanted - produced)[:10]
    report = json.loads(remapped["compression"].read_text())
    assert report["train"]["never_produced"] == []


def test_compression_report(remapped):
    report = json.loads(remapped["compression"].read_text())
    assert set(report["corpora"]) == {"domain_heldout", "general_heldout", "konlpy"}
    domain = report["corpora"]["domain_heldout"]
    assert domain["remapped_tokens_per_byte"] < 0.75 * domain["base_tokens_per_byte"]  # 300 tokens from 300 bills
    assert domain["new_tokens_occurring"] > 100 and domain["documents_longer"] == 0
    for corpus in report["corpora"].values():
        assert {"share_longer", "worst_case", "base_tokens_per_byte", "remapped_tokens_per_byte"} <= set(corpus)
    if remapped["backend"] == "unigram":
        assert "distilled_tokens_per_byte" in domain


def test_bpe_backend_is_bit_identical_where_nothing_changed(remapped, gpt2_tokenizer_dir, english_texts, korean_texts):
    if remapped["backend"] != "bpe":
        pytest.skip("only the bpe backend promises identity")
    base = Tokenizer.from_file(str(gpt2_tokenizer_dir / "tokenizer.json"))
    tok = Tokenizer.from_file(str(remapped["tokenizer"] / "tokenizer.json"))
    sacrificed = {r["id"] for r in remapped["rules"]}
    new = new_ids(remapped["rules"])
    english = [line for text in english_texts for line in text.splitlines() if line.strip()]
    korean = [line for text in korean_texts for line in text.splitlines() if line.strip()]
    untouched = {"english": 0, "korean": 0}
    for name, lines in (("english", english), ("korean", korean)):
        for line in lines:
            before = base.encode(line, add_special_tokens=False).ids
            after = tok.encode(line, add_special_tokens=False).ids
            if not sacrificed.intersection(before) and not new.intersection(after):
                assert after == before, line
                untouched[name] += 1
    assert untouched["english"] > 0.9 * len(english)  # nearly every English line qualifies: not vacuous
    assert untouched["korean"] < 0.5 * len(korean)  # and Korean mostly does change


def test_same_inputs_give_byte_identical_tokenizer(remapped, tmp_path, gpt2_bills_analysis, gpt2_unigram_standin):
    again = remap(gpt2_bills_analysis, remapped["selection"], tmp_path, gpt2_unigram_standin if remapped["backend"] == "unigram" else None)
    assert again["compression"].read_bytes() == remapped["compression"].read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again["tokenizer"] / name).read_bytes() == (remapped["tokenizer"] / name).read_bytes()


@pytest.mark.parametrize("backend", ["unigram", "bpe"])
def test_new_tokens_in_unused_embedding_rows(backend, tmp_path, gpt2_bills_analysis, gpt2_unigram_standin):
    selection = select(gpt2_bills_analysis, tmp_path, "--backend", backend, "--model-rows", "50300")
    outs = remap(gpt2_bills_analysis, selection, tmp_path, gpt2_unigram_standin if backend == "unigram" else None)
    tok = AutoTokenizer.from_pretrained(outs["tokenizer"])
    texts = list(iter_jsonl_texts(gpt2_bills_analysis["train"]))
    produced = {i for text in texts[:100] for i in tok.encode(text, add_special_tokens=False)}
    assert produced & set(range(50257, 50300))
    assert json.loads(outs["compression"].read_text())["train"]["never_produced"] == []
