"""GGUF to a Hugging Face folder (scripts/gguf_to_hf.py): a tiny Llama with the real GPT-2 vocabulary, written
as a float32 GGUF with the `gguf` package the way llama.cpp's converter writes one, comes back with the same
weights, the same tokenizer and its provenance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from gguf_to_hf import convert
from ivr.files import sha256_of

HEADS, KV_HEADS = 4, 2


def permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's order of the query and key rows (convert_hf_to_gguf.py), which the loader undoes."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_gguf(path: Path, model, tokenizer_dir: Path) -> None:
    import gguf

    config = model.config
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = [line for line in (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if line]
    tokens = sorted(vocab, key=vocab.get)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(config.hidden_size // HEADS)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|endoftext|>"])
    for name, tensor in model.state_dict().items():
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            continue  # tied to the embedding
        else:
            layer, part = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[part]}.weight"
            if part == "self_attn.q_proj":
                tensor = permute(tensor, HEADS)
            elif part == "self_attn.k_proj":
                tensor = permute(tensor, KV_HEADS)
        writer.add_tensor(gguf_name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, gpt2_tokenizer_dir):
    """(path of the GGUF, the model it was written from)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny llama F32.gguf"
    write_gguf(path, model, gpt2_tokenizer_dir)
    return path, model


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_gguf) -> Path:
    out = tmp_path_factory.mktemp("converted") / "tiny-llama"
    convert(tiny_gguf[0], out)
    return out


def test_weights_come_back_exactly_as_safetensors(converted, tiny_gguf):
    from transformers import AutoModelForCausalLM

    assert sorted(p.name for p in converted.iterdir()) == [
        "PROVENANCE.json", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    model = AutoModelForCausalLM.from_pretrained(converted, use_safetensors=True)
    original = tiny_gguf[1].state_dict()
    state = model.state_dict()
    assert state.keys() == original.keys()
    for name, tensor in original.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor), name


def test_tokenizer_is_gpt2s(converted, gpt2_tokenizer_dir, korean_texts, english_texts):
    from transformers import AutoTokenizer

    ours, reference = AutoTokenizer.from_pretrained(converted), AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    assert len(ours) == len(reference) == 50257 and ours.eos_token == "<|endoftext|>"
    for text in korean_texts[:5] + english_texts[:2] + ["끝<|endoftext|>다음"]:
        ids = ours(text, add_special_tokens=False)["input_ids"]
        assert ids == reference(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == text


def test_provenance_names_the_file_and_its_checksum(converted, tiny_gguf):
    provenance = json.loads((converted / "PROVENANCE.json").read_text())
    assert provenance == {"source": tiny_gguf[0].name, "sha256": sha256_of(tiny_gguf[0]),
                          "form": "dequantized to float32 from ALL_F32 GGUF", "architecture": "LlamaForCausalLM"}


def test_a_damaged_file_is_one_line_and_leaves_nothing(tmp_path, tiny_gguf):
    cut = tmp_path / "cut short.gguf"
    data = tiny_gguf[0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # a download cut short: the header reads, the tensors do not
    out = tmp_path / "out" / "model"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gguf_to_hf.py"), str(cut), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {cut}: cannot read the GGUF file")
    assert not out.parent.exists() or not any(out.parent.iterdir())
