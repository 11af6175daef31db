"""The whole workflow on tokenizers of popular families, as a user who brings such a model runs it: each
tokenizer converted from llama.cpp's vocabulary files (gguf_to_hf), a small random Llama with its vocabulary
size, the tiny configuration's Korean bills and English prose, and the bpe backend. The final model is
written (every validation gate passed) and keeps the tokenizer's kind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import asset, make_workdir
from ivr.gguf_vocab import gguf_tokenizer
from ivr.remap_rules import read_rules
from test_workflow import snakemake

FAMILIES = ["gpt-2", "llama-bpe", "qwen2", "llama-spm", "phi-3"]  # GPT-2, Llama-3, Qwen2, Llama-2, Phi-3


def tiny_llama(family: str, out: Path) -> Path:
    """A 2-layer random Llama (width 64, tied embeddings) with the family's converted tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = gguf_tokenizer(asset("llama_cpp_vocabs") / f"ggml-vocab-{family}.gguf")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """One copy of the workflow; each family runs in a copy of it beside."""
    for name in ("korean_bills", "python_docs"):
        asset(name)
    return make_workdir(tmp_path_factory.mktemp("families"), gpt2_tokenizer_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_dag_writes_the_final_model(family, shared, tmp_path):
    import shutil

    workdir = tmp_path / "workflow"
    shutil.copytree(shared, workdir, symlinks=True, ignore=shutil.ignore_patterns("results", ".snakemake", "logs", "benchmarks"))
    tiny_llama(family, workdir / "resources" / "models" / f"tiny-{family}")
    (workdir / "family.yaml").write_text(
        f"base_model: resources/models/tiny-{family}\nivr:\n  backend: bpe\n  n_reassign: 300\n"
        "training:\n  control: false\n"  # the control branch is the same for every tokenizer: test_workflow runs it
        "validation:\n  max_documents: 8\n  byte_budget: 300\n  prompts: 1\n  new_tokens: 8\n"
    )
    start = time.monotonic()
    snakemake(workdir, "results/final_model", configs=("family.yaml",))
    wall = time.monotonic() - start
    results = workdir / "results"
    report = json.loads((results / "report" / "validation.json").read_text())
    assert report["gates_passed"] is True, [g for g in report["gates"] if not g["passed"]]
    assert (results / "final_model" / "model.safetensors").exists()
    compression = json.loads((results / "remap" / "compression.json").read_text())
    domain = compression["corpora"]["domain_heldout"]
    assert compression["backend"] == "bpe" and domain["remapped_tokens_per_byte"] < domain["base_tokens_per_byte"]
    base = json.loads((workdir / "resources" / "models" / f"tiny-{family}" / "tokenizer.json").read_text(encoding="utf-8"))
    never = {t["content"] for t in base["added_tokens"]} | {f"<0x{b:02X}>" for b in range(256)}
    given = [r["old_token"] for r in read_rules(results / "remap" / "remap_rules.yaml")["reassignments"]]
    assert given and not never.intersection(given)  # byte-fallback, special and added tokens are never given away
    stats = json.loads((results / "analysis" / "corpus_stats.json").read_text())
    print(f"\n{family}: domain tokens/byte {domain['base_tokens_per_byte']} -> {domain['remapped_tokens_per_byte']}, "
          f"train tokens/byte {stats['train']['tokens_per_byte']}, DAG {wall:.0f} s")
