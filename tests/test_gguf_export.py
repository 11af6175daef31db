"""GGUF export (scripts/export_gguf.py), checked by llama.cpp itself through llama-cpp-python: a tiny Llama
with a real IVR tokenizer (GPT-2's BPE remapped by the bpe backend on real bills, with a special token)
comes back from F16 and Q4_1 (the type of SmolLM2's GGUF) files with the same ids on held-out bills and English, the same logits
(F16) and the same greedy tokens; a tokenizer llama.cpp cannot carry and a damaged GGUF are refused in
one line, leaving nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, asset
from ivr.corpus import iter_jsonl_texts
from ivr.gguf_vocab import CONTROL, PRE_TOKENIZERS, gguf_tokenizer, read_fields
from test_gguf_vocabs import vocab

pytest.importorskip("llama_cpp")

# The largest absolute next-token logit difference allowed between llama.cpp (F16 weights) and
# transformers (float32); this model's logits span about +-0.5, so it is about 1 % of that.
LOGIT_TOLERANCE = 0.01
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>\n' }}{% endfor %}")


def tiny_llama(folder: Path, tokenizer_dir: Path, vocab_size: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def export(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export_gguf.py"), "--model", str(model),
                           "--out", f"base={out / 'model.gguf'}", "--out", f"F16={out / 'model.F16.gguf'}",
                           "--base-gguf", str(asset("smollm2_gguf") / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                           "--report", str(out / "check.json"), *extra], capture_output=True, text=True)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1 and lines[-1].startswith("error: "), result.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def ivr_model(tmp_path_factory, gpt2_bills_analysis) -> Path:
    """A tiny Llama whose tokenizer is the bpe backend's remapping of GPT-2 on 300 real bills, with a chat template."""
    from test_remap_tokenizer import remap
    from test_select_candidates import SPECIAL, select

    folder = tmp_path_factory.mktemp("ivr")
    selection = select(gpt2_bills_analysis, folder, "--backend", "bpe", "--special-tokens", SPECIAL)
    tokenizer = remap(gpt2_bills_analysis, selection, folder, None)["tokenizer"]
    model = tiny_llama(folder / "final_model", tokenizer, 50257)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    (model / "PROVENANCE.json").write_text(json.dumps({"base_model": {"name": "tiny-llama", "licence": "Apache-2.0"}}))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ivr_model, gpt2_bills_analysis) -> Path:
    out = tmp_path_factory.mktemp("gguf")
    result = export(ivr_model, out, "--check", f"domain={gpt2_bills_analysis['heldout']}",
                    "--check", f"general={gpt2_bills_analysis['general_heldout']}", "--check-documents", "100")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_llama_cpp_tokenizes_every_held_out_document_like_the_tokenizer(exported, gpt2_bills_analysis):
    report = json.loads((exported / "check.json").read_text())
    bills = len(gpt2_bills_analysis["heldout"].read_text(encoding="utf-8").splitlines())
    assert bills >= 90
    assert {name: entry["type"] for name, entry in report["files"].items()} == {"model.gguf": "Q4_1", "model.F16.gguf": "F16"}
    for entry in report["files"].values():
        print(entry)
        assert entry["ids"] == {"domain": {"identical": bills, "checked": bills}, "general": {"identical": 10, "checked": 10}}


def test_new_tokens_and_the_special_token_carry_over(exported, ivr_model, korean_texts):
    from transformers import AutoTokenizer

    from ivr.gguf_export import llama_ids, open_gguf

    tokenizer = AutoTokenizer.from_pretrained(ivr_model)
    llm = open_gguf(exported / "model.gguf", vocab_only=True)
    special = tokenizer.convert_tokens_to_ids("<ToW>")
    used = set()
    for text in korean_texts[:20] + ["법률안<ToW>제안 이유"]:
        ids = llama_ids(llm, text)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], text[:80]
        used.update(ids)
    reference = AutoTokenizer.from_pretrained(ROOT / "resources" / "assets" / "gpt2_tokenizer")
    reassigned = {i for i in used if tokenizer.convert_ids_to_tokens(i) != reference.convert_ids_to_tokens(i)}
    assert special in used and len(reassigned) >= 20  # new Korean tokens are what llama.cpp produces

    fields = read_fields(exported / "model.gguf")
    spec = json.loads((ivr_model / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.tokens"][special] == "<ToW>" and fields["tokenizer.ggml.token_type"][special] == CONTROL
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id and not fields["tokenizer.ggml.add_bos_token"]
    general = read_fields(exported / "model.gguf", prefix="general.")  # from PROVENANCE.json
    assert general["general.name"] == "tiny-llama-IVR" and general["general.license"] == "Apache-2.0"


def test_f16_logits_within_tolerance_and_greedy_tokens_agree(exported):
    f16 = json.loads((exported / "check.json").read_text())["f16"]
    print(f"largest absolute logit difference: {f16['max_abs_logit_difference']:.2e}")
    assert f16["max_abs_logit_difference"] < LOGIT_TOLERANCE
    assert f16["greedy_tokens_agreeing"] == [8, 8, 8, 8]


def test_the_quantised_file_is_q4_1_and_runs(exported, ivr_model):
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

    reader = GGUFReader(str(exported / "model.gguf"))
    assert reader.fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_1
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == GGMLQuantizationType.Q4_1
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32

    from ivr.gguf_export import open_gguf

    llm = open_gguf(exported / "model.gguf", n_ctx=64)
    out = llm("국회", max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("name", ["command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe", "mpt",
                                  "qwen2", "qwen35", "refact", "starcoder"])
def test_each_byte_level_pre_tokenizer_is_named_as_llama_cpp_names_it(name, tmp_path):
    """Each of llama.cpp's byte-level test vocabularies, as a Hugging Face tokenizer, is given back a
    tokenizer.ggml.pre that llama.cpp cuts text with exactly as it does with its own name."""
    from ivr.gguf_export import pre_tokenizer_name

    tokenizer = gguf_tokenizer(vocab(name))
    tokenizer.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    own = read_fields(vocab(name))["tokenizer.ggml.pre"]
    assert PRE_TOKENIZERS[pre_tokenizer_name(spec, name)] == PRE_TOKENIZERS[own]


def test_a_unigram_tokenizer_is_refused_in_one_line(tmp_path, gpt2_unigram_standin):
    model = tiny_llama(tmp_path / "unigram model", gpt2_unigram_standin, 50257)
    result = export(model, tmp_path / "out")
    line = one_error_line(result)
    assert line == (f"error: {model / 'tokenizer.json'}: a Unigram tokenizer (ivr.backend: unigram; use ivr.backend: "
                    "bpe); a GGUF carries only byte-level BPE")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_added_token_that_strips_spaces_is_refused(tmp_path, gpt2_tokenizer_dir):
    """llama.cpp matches added tokens exactly: one that takes the spaces beside it would tokenize differently."""
    model = tiny_llama(tmp_path / "lstrip model", gpt2_tokenizer_dir, 50257)
    spec = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"][0]["lstrip"] = True
    (model / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    line = one_error_line(export(model, tmp_path / "out"))
    assert line.endswith("added token '<|endoftext|>' takes spaces beside it or whole words only (lstrip, rstrip or "
                         "single_word), which llama.cpp does not do")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_damaged_gguf_is_refused_in_one_line(exported, tmp_path, gpt2_bills_analysis):
    cut = tmp_path / "cut short.gguf"
    data = (exported / "model.F16.gguf").read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # a download cut short: the header reads, the tensors do not
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gguf_speed.py"), "--ivr", str(cut),
                             "--base", str(exported / "model.F16.gguf"), "--texts", str(gpt2_bills_analysis["heldout"])],
                            capture_output=True, text=True)
    line = one_error_line(result)
    assert line.startswith(f"error: {cut}: llama.cpp cannot load it (") and "corrupted or incomplete" in line


def test_speed_bench_compares_same_type_files(exported, ivr_model, tmp_path, gpt2_bills_analysis):
    """bench/gguf_speed.py on the tiny IVR model against itself: both figures and ratios, one run."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gguf_speed.py"), "--ivr", str(exported / "model.gguf"),
                             "--base", str(exported / "model.gguf"), "--texts", str(gpt2_bills_analysis["heldout"]),
                             "--prompts", "2", "--prompt-bytes", "200", "--new-tokens", "8", "--continuation-bytes", "120",
                             "--json", str(tmp_path / "speed.json")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    figures = json.loads((tmp_path / "speed.json").read_text())
    assert figures["models"]["ivr"]["type"] == "Q4_1" and figures["models"]["ivr"]["generation_bytes_per_second"] > 0
    assert "IVR / base, bytes of text per second: prompt processing" in result.stdout and "2 threads" in figures["conditions"]
    # both sides decode the same continuation text: with one file on both, its tokens per byte are alike
    ivr, base = figures["models"]["ivr"], figures["models"]["base"]
    assert ivr["continuation_tokens_per_byte"] == base["continuation_tokens_per_byte"] > 0
    assert ivr["continuation_bytes_per_second"] > 0 and figures["ratios"]["continuation_bytes_per_second"] > 0
    # the timed generation is the model's own greedy continuation, as llama.cpp's kept logits give it
    import llama_cpp
    import numpy as np
    from ivr.gguf_export import llama_ids, open_gguf

    llm = open_gguf(exported / "model.gguf", n_ctx=512, logits_all=True)
    vocab = llm._model.vocab
    banned = [t for t in range(llm.n_vocab())
              if llama_cpp.llama_vocab_is_eog(vocab, t) or llama_cpp.llama_vocab_is_control(vocab, t)]
    prompt = next(iter_jsonl_texts(gpt2_bills_analysis["heldout"])).encode("utf-8")[:200].decode("utf-8", "ignore")
    llm.eval(llama_ids(llm, prompt))
    expected = []
    for _ in range(8):
        logits = np.array(llm.scores[llm.n_tokens - 1])
        logits[banned] = -np.inf
        expected.append(int(np.argmax(logits)))
        llm.eval([expected[-1]])
    assert figures["models"]["ivr"]["first_continuation"]["ids"] == expected
    mixed = subprocess.run([sys.executable, str(ROOT / "bench" / "gguf_speed.py"), "--ivr", str(exported / "model.gguf"),
                            "--base", str(exported / "model.F16.gguf"), "--texts", str(gpt2_bills_analysis["heldout"])],
                           capture_output=True, text=True)
    assert one_error_line(mixed).endswith("compare GGUFs of the same type")
