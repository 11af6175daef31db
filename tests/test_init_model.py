"""The initialized model (scripts/init_model.py): the base model with the reordered rows and the remapped
tokenizer, on real layouts (GPT-2 with a tied head, Llama untied), built through the two real scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import init_model
import reorder_embeddings
from ivr.cli import UserError
from ivr.modeling import embedding_layout, embedding_matrices
from ivr.tokenization import to_bytelevel
from test_reorder_embeddings import tiny_llama, write_rules

KOREAN_WORDS = ["법률안", "국회의원", "대한민국", "개정하려는"]


@pytest.fixture(scope="module")
def llama_untied_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "untied", gpt2_tokenizer_dir, tied=False)


def remapped_gpt2(folder: Path, tokenizer_dir: Path) -> tuple[Path, list[dict]]:
    """A remapped GPT-2 tokenizer (exact BPE style) making whole Korean words single tokens.

    Each word's base tokens are merged left to right; each merge's result takes the slot of a late
    GPT-2 token that no merge builds on, whose own merge is dropped. Returns the folder and rules.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    base = Tokenizer.from_str(json.dumps(spec))
    parts = {p for merge in merges for p in merge}
    id_to_token = {i: t for t, i in vocab.items()}
    slots = (i for i in range(50255, 0, -1) if id_to_token[i] not in parts and len(id_to_token[i]) > 1)
    new_merges, entries, dropped = [], [], set()
    for word in KOREAN_WORDS:
        pieces = [t.value for t in base.model.tokenize(to_bytelevel(word))]
        left = pieces[0]
        for right in pieces[1:]:
            token = left + right
            assert token not in vocab
            slot = next(slots)
            dropped.add(id_to_token[slot])
            new_merges.append([left, right])
            entries.append({"id": slot, "kind": "ngram", "old_token": id_to_token[slot], "new_token": token,
                            "base_ids": [t.id for t in base.model.tokenize(token)], "frozen": False})
            left = token
    slot = next(slots)  # a special token, initialised from its init text
    dropped.add(id_to_token[slot])
    spec["model"]["merges"] = [m for m in merges if m[0] + m[1] not in dropped] + new_merges
    for entry in entries:
        del vocab[entry["old_token"]]
        vocab[entry["new_token"]] = entry["id"]
    del vocab[id_to_token[slot]]
    vocab["<ToW>"] = slot
    spec["added_tokens"].append({"id": slot, "content": "<ToW>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    entries.append({"id": slot, "kind": "special", "old_token": id_to_token[slot], "new_token": "<ToW>",
                    "base_ids": base.encode("Thought:").ids, "frozen": True})
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text((tokenizer_dir / "tokenizer_config.json").read_text())
    AutoTokenizer.from_pretrained(folder)  # loads
    return folder, sorted(entries, key=lambda e: e["id"])


@pytest.fixture(scope="module")
def remap(tmp_path_factory, gpt2_tokenizer_dir) -> tuple[Path, Path, list[dict]]:
    root = tmp_path_factory.mktemp("remap")
    folder, entries = remapped_gpt2(root / "tokenizer", gpt2_tokenizer_dir)
    return folder, write_rules(root / "remap_rules.yaml", entries), entries


def build(model_dir: Path, remap, out: Path, strategy: str = "weighted") -> Path:
    tokenizer_dir, rules, _ = remap
    emb, meta = out / "reordered.safetensors", out / "reordered.json"
    reorder_embeddings.main(["--base-model", str(model_dir), "--rules", str(rules), "--strategy", strategy,
                             "--seed", "1", "--out", str(emb), "--meta-out", str(meta)])
    init_model.main(["--base-model", str(model_dir), "--embeddings", str(emb), "--embeddings-meta", str(meta),
                     "--tokenizer", str(tokenizer_dir), "--rules", str(rules), "--out", str(out / "initialized")])
    return out / "initialized"


@pytest.mark.parametrize("which", ["gpt2", "llama_untied"])
def test_initialized_model_loads_generates_and_keeps_everything_else(which, tiny_gpt2_dir, llama_untied_dir, remap, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_gpt2_dir if which == "gpt2" else llama_untied_dir
    folder = build(base_dir, remap, tmp_path)
    _, _, entries = remap
    ids = [e["id"] for e in entries]

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert model.config.vocab_size == base.config.vocab_size
    new_state, base_state = model.state_dict(), base.state_dict()
    assert new_state.keys() == base_state.keys()
    in_name = embedding_layout(model).input_name
    for name, tensor in base_state.items():
        assert new_state[name].shape == tensor.shape
        if name != in_name and name != "lm_head.weight":
            assert torch.equal(new_state[name], tensor), name
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[ids] = False
    for new, old in zip(embedding_matrices(model), embedding_matrices(base)):
        if new is not None:
            assert torch.equal(new[keep], old[keep])
            assert not torch.equal(new[ids], old[ids])
    # Special rows: the mean of the init text's base rows, on both sides of an untied head.
    special = next(e for e in entries if e["kind"] == "special")
    for new, old in zip(embedding_matrices(model), embedding_matrices(base)):
        if new is not None:
            assert torch.allclose(new[special["id"]], old[special["base_ids"]].mean(0))

    encoded = tokenizer("법률안 <ToW>", add_special_tokens=False)["input_ids"]
    assert encoded[0] in ids and special["id"] in encoded
    prompt = torch.tensor([encoded])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == prompt.shape[1] + 5
    card = (folder / "README.md").read_text()
    assert "weighted" in card and f"{len(ids)} token ids" in card


def test_outputs_are_byte_identical_between_runs(tiny_gpt2_dir, remap, tmp_path):
    first = build(tiny_gpt2_dir, remap, tmp_path / "a", strategy="random")
    second = build(tiny_gpt2_dir, remap, tmp_path / "b", strategy="random")
    for name in ("reordered.safetensors", "reordered.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    meta = json.loads((tmp_path / "a" / "reordered.json").read_text())
    assert meta["tied"] and meta["parameters"]["input_embeddings"] == "transformer.wte.weight"
    assert meta["ids"] == sorted(e["id"] for e in remap[2])


def test_tokenizer_that_does_not_match_the_rules_is_refused(tiny_gpt2_dir, remap, gpt2_tokenizer_dir, tmp_path):
    _, rules, _ = remap
    emb, meta = tmp_path / "r.safetensors", tmp_path / "r.json"
    reorder_embeddings.main(["--base-model", str(tiny_gpt2_dir), "--rules", str(rules), "--out", str(emb), "--meta-out", str(meta)])
    with pytest.raises(UserError, match="do not match"):
        init_model.main(["--base-model", str(tiny_gpt2_dir), "--embeddings", str(emb), "--embeddings-meta", str(meta),
                         "--tokenizer", str(gpt2_tokenizer_dir), "--rules", str(rules), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
