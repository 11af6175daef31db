"""Reordered embeddings (scripts/reorder_embeddings.py): strategies, layouts, determinism, checked rules
(the initialized model built from them: tests/test_init_model.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import reorder_embeddings
from ivr.cli import UserError
from ivr.modeling import embedding_layout, load_causal_lm
from ivr.remap_rules import Reassignment, load_reassignments
from reorder_embeddings import STRATEGIES, position_weights

# Every strategy on both head layouts, but zeros, which is refused on a tied head.
STRATEGY_LAYOUTS = [(s, tied) for s in STRATEGIES for tied in (True, False) if not (s == "zeros" and tied)]


def reassignments_for(rows: int) -> list[Reassignment]:
    return [
        Reassignment(rows - 1, "ngram", "ab", (3, 5)),
        Reassignment(rows - 3, "ngram", "abc", (3, 5, 7)),
        Reassignment(rows - 6, "special", "<ToW>", (11, 12, 13)),
        Reassignment(rows - 8, "unused_row", "x", (2,)),
    ]


def matrices(tied: bool, rows: int = 64, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(7)
    inp = torch.randn(rows, dim, generator=gen) * 0.1 + 0.03
    return inp, None if tied else torch.randn(rows, dim, generator=gen) * 0.2 - 0.05


@pytest.mark.parametrize(("strategy", "tied"), STRATEGY_LAYOUTS)
def test_untouched_rows_bit_identical_and_inputs_unchanged(strategy, tied):
    inp, out = matrices(tied)
    before = (inp.clone(), None if out is None else out.clone())
    rules = reassignments_for(inp.shape[0])
    new_in, new_out = reorder_embeddings.reorder_embeddings(inp, out, rules, strategy, seed=3)
    keep = torch.ones(inp.shape[0], dtype=torch.bool)
    keep[[r.id for r in rules]] = False
    assert torch.equal(new_in[keep], inp[keep])
    assert torch.equal(inp, before[0])  # pure: the given matrices are not modified
    assert (new_out is None) == tied
    if not tied:
        assert torch.equal(new_out[keep], out[keep]) and torch.equal(out, before[1])
    assert new_in.dtype == inp.dtype and new_in.shape == inp.shape
    assert torch.isfinite(new_in).all()


def test_untouched_rows_bit_identical_in_bfloat16():
    inp = matrices(True)[0].to(torch.bfloat16)
    rules = reassignments_for(inp.shape[0])
    new_in, _ = reorder_embeddings.reorder_embeddings(inp, None, rules, "weighted")
    keep = torch.ones(inp.shape[0], dtype=torch.bool)
    keep[[r.id for r in rules]] = False
    assert new_in.dtype == torch.bfloat16 and torch.equal(new_in[keep], inp[keep])


@pytest.mark.parametrize(("strategy", "tied"), STRATEGY_LAYOUTS)
def test_strategies_deterministic_for_a_seed(strategy, tied):
    inp, out = matrices(tied)
    rules = reassignments_for(inp.shape[0])
    first = reorder_embeddings.reorder_embeddings(inp, out, rules, strategy, seed=5)
    again = reorder_embeddings.reorder_embeddings(inp, out, rules, strategy, seed=5)
    other = reorder_embeddings.reorder_embeddings(inp, out, rules, strategy, seed=6)
    for a, b, c in zip(first, again, other):
        if a is None:
            continue
        assert torch.equal(a, b)
        assert torch.equal(a, c) == (strategy != "random")  # only random depends on the seed


def test_strategy_values_untied():
    inp, out = matrices(False)
    rules = reassignments_for(inp.shape[0])
    ngram, triple, special, unused = rules

    mean_in, mean_out = reorder_embeddings.reorder_embeddings(inp, out, rules, "subtoken_mean")
    assert torch.allclose(mean_in[triple.id], inp[[3, 5, 7]].mean(0))
    assert torch.allclose(mean_out[triple.id], out[[3, 5, 7]].mean(0))
    assert torch.equal(mean_in[unused.id], inp[2])

    w_in, w_out = reorder_embeddings.reorder_embeddings(inp, out, rules, "weighted", weighted_ratio=2.0)
    # Input rows lean on the last sub-token (weights 1:2:4), output rows on the first (4:2:1).
    assert torch.allclose(w_in[triple.id], (inp[3] + 2 * inp[5] + 4 * inp[7]) / 7)
    assert torch.allclose(w_out[triple.id], (4 * out[3] + 2 * out[5] + out[7]) / 7)
    # Special tokens start as the plain mean of their init text's tokens under every strategy.
    for strategy in STRATEGIES:
        s_in, s_out = reorder_embeddings.reorder_embeddings(inp, out, rules, strategy)
        assert torch.allclose(s_in[special.id], inp[[11, 12, 13]].mean(0))
        assert torch.allclose(s_out[special.id], out[[11, 12, 13]].mean(0))

    g_in, g_out = reorder_embeddings.reorder_embeddings(inp, out, rules, "global_mean")
    assert torch.allclose(g_in[ngram.id], inp.mean(0)) and torch.allclose(g_out[ngram.id], out.mean(0))
    z_in, z_out = reorder_embeddings.reorder_embeddings(inp, out, rules, "zeros")
    # Zero input rows; output rows at the mean, since a zero output row means logit 0 in every context.
    assert not z_in[ngram.id].any() and torch.allclose(z_out[ngram.id], out.mean(0))


def test_zeros_on_a_tied_head_is_refused():
    inp, _ = matrices(True)
    with pytest.raises(UserError, match="'zeros' on a tied head"):
        reorder_embeddings.reorder_embeddings(inp, None, reassignments_for(inp.shape[0]), "zeros")


def test_weighted_on_a_tied_matrix_follows_tied_weighted():
    inp, _ = matrices(True)
    rules = reassignments_for(inp.shape[0])
    triple = rules[1]
    first = reorder_embeddings.reorder_embeddings(inp, None, rules, "weighted", tied_weighted="output")[0]
    last = reorder_embeddings.reorder_embeddings(inp, None, rules, "weighted", tied_weighted="input")[0]
    plain = reorder_embeddings.reorder_embeddings(inp, None, rules, "weighted", tied_weighted="mean")[0]
    assert torch.allclose(first[triple.id], (4 * inp[3] + 2 * inp[5] + inp[7]) / 7)
    assert torch.allclose(last[triple.id], (inp[3] + 2 * inp[5] + 4 * inp[7]) / 7)
    assert torch.allclose(plain[triple.id], inp[[3, 5, 7]].mean(0))


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_random_rows_scatter_around_the_mean_by_random_scale(scale):
    gen = torch.Generator().manual_seed(1)
    inp = torch.randn(4000, 32, generator=gen) * 0.05 + 0.2
    rules = [Reassignment(i, "ngram", f"t{i}", (1, 2)) for i in range(3000, 4000)]
    new, _ = reorder_embeddings.reorder_embeddings(inp, None, rules, "random", seed=0, random_scale=scale)
    drawn = new[3000:]
    assert abs(drawn.mean().item() - 0.2) < 0.01
    assert abs(drawn.std().item() - 0.05 * scale) < 0.1 * 0.05 * scale


def test_position_weights():
    assert torch.allclose(position_weights(3, "last", 2.0), torch.tensor([1, 2, 4]) / 7)
    assert torch.allclose(position_weights(3, "first", 2.0), torch.tensor([4, 2, 1]) / 7)
    assert torch.allclose(position_weights(1, "first", 2.0), torch.tensor([1.0]))


def test_ids_outside_the_matrix_are_refused():
    inp, _ = matrices(True)
    with pytest.raises(UserError, match="outside the embedding's 64 rows"):
        reorder_embeddings.reorder_embeddings(inp, None, [Reassignment(10, "ngram", "a", (64,))], "subtoken_mean")
    with pytest.raises(UserError, match="init strategy 'mean'"):
        reorder_embeddings.reorder_embeddings(inp, None, [], "mean")


def write_rules(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "reassignments": entries}, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"id": 5, "kind": "ngram", "new_token": "ab", "base_ids": []}, "base_ids"),
        ({"id": 5, "kind": "bigram", "new_token": "ab", "base_ids": [1]}, "'kind' must be one of"),
        ({"id": -1, "kind": "ngram", "new_token": "ab", "base_ids": [1]}, "'id' must be"),
        ({"id": 5, "kind": "ngram", "new_token": "", "base_ids": [1]}, "new_token"),
    ],
)
def test_bad_rules_are_refused_with_the_entry_named(tmp_path, entry, message):
    path = write_rules(tmp_path / "rules.yaml", [entry])
    with pytest.raises(UserError, match=message) as err:
        load_reassignments(path)
    assert "reassignments[0]" in str(err.value)


def test_duplicate_ids_are_refused(tmp_path):
    entry = {"id": 5, "kind": "ngram", "new_token": "ab", "base_ids": [1, 2]}
    path = write_rules(tmp_path / "rules.yaml", [entry, {**entry, "new_token": "cd"}])
    with pytest.raises(UserError, match="id 5 is reassigned more than once"):
        load_reassignments(path)


# --- real layouts: GPT-2 (tied wte), Llama tied and untied ------------------------------------------


def tiny_llama(folder: Path, tokenizer_dir: Path, tied: bool) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=tied,
        bos_token_id=50256, eos_token_id=50256,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_untied_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "untied", gpt2_tokenizer_dir, tied=False)


def test_layouts(tiny_gpt2_dir, llama_untied_dir, tmp_path, gpt2_tokenizer_dir):
    gpt2 = embedding_layout(load_causal_lm(tiny_gpt2_dir))
    assert (gpt2.input_name, gpt2.output_name, gpt2.tied, gpt2.rows) == ("transformer.wte.weight", None, True, 50257)
    untied = embedding_layout(load_causal_lm(llama_untied_dir))
    assert (untied.input_name, untied.output_name, untied.tied) == ("model.embed_tokens.weight", "lm_head.weight", False)
    tied = embedding_layout(load_causal_lm(tiny_llama(tmp_path / "tied", gpt2_tokenizer_dir, tied=True)))
    assert (tied.input_name, tied.output_name) == ("model.embed_tokens.weight", None)


def test_only_safetensors_are_loaded(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(UserError, match="no .safetensors"):
        load_causal_lm(tmp_path)
