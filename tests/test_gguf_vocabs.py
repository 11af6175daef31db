"""The tokenizers of llama.cpp's own vocabulary test files (ggml-vocab-*.gguf, from the llama-cpp-python sdist):
each one gguf_to_hf converts reproduces llama.cpp's expected ids for every test text (.inp/.out), and each
type it does not support is refused in one line naming the type."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, asset
from ivr.cli import UserError
from ivr.gguf_vocab import gguf_tokenizer

SUPPORTED = ["command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe", "llama-spm", "mpt",
             "phi-3", "qwen2", "qwen35", "refact", "starcoder"]
SEPARATOR = "\n__ggml_vocab_test__\n"  # between the test texts of a .inp file (llama.cpp's tests/test-tokenizer-0.cpp)


def vocab(name: str) -> Path:
    return asset("llama_cpp_vocabs") / f"ggml-vocab-{name}.gguf"


def expected(gguf: Path) -> list[tuple[str, list[int]]]:
    """(text, llama.cpp's ids) of every test case: .inp holds the texts, .out a line of ids per text."""
    texts = Path(f"{gguf}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    ids = Path(f"{gguf}.out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]


def test_every_vocabulary_file_is_tested():
    named = {p.name.removeprefix("ggml-vocab-").removesuffix(".gguf") for p in asset("llama_cpp_vocabs").glob("*.gguf")}
    assert named == set(SUPPORTED) | {"bert-bge"}


@pytest.mark.parametrize("name", SUPPORTED)
def test_converted_tokenizer_gives_llama_cpps_ids(name):
    tokenizer = gguf_tokenizer(vocab(name))
    cases = expected(vocab(name))
    assert len(cases) >= 47
    for text, ids in cases:
        assert tokenizer.encode(text, add_special_tokens=False) == ids, repr(text)


def test_a_type_nothing_supports_is_refused_in_one_line(tmp_path):
    gguf = vocab("bert-bge")
    with pytest.raises(UserError, match=r"llama.cpp tokenizer type 'bert' \(tokenizer.ggml.model\) is not supported"):
        gguf_tokenizer(gguf)
    out = tmp_path / "model"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gguf_to_hf.py"), str(gguf), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: {gguf}: llama.cpp tokenizer type 'bert'")
    assert not out.exists()


def test_a_sentencepiece_vocabulary_without_byte_tokens_is_refused(tmp_path):
    import gguf

    from ivr.gguf_vocab import BYTE, read_fields

    fields = read_fields(vocab("llama-spm"))
    keep = [i for i, t in enumerate(fields["tokenizer.ggml.token_type"]) if t != BYTE]
    path = tmp_path / "no bytes.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([fields["tokenizer.ggml.tokens"][i] for i in keep])
    writer.add_token_scores([fields["tokenizer.ggml.scores"][i] for i in keep])
    writer.add_token_types([fields["tokenizer.ggml.token_type"][i] for i in keep])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(UserError, match=r"no bytes.gguf: a llama \(SentencePiece\) vocabulary without the 256 byte tokens"):
        gguf_tokenizer(path)
