"""The shared bits-per-byte measure and generation speed, on a tiny GPT-2 with the real tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ivr.cli import UserError
from ivr.metrics import bits_per_byte, cut_to_bytes, generation_speed, windows


@pytest.fixture(scope="module")
def tiny(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval(), AutoTokenizer.from_pretrained(tiny_gpt2_dir)


def hand_bits(model, ids: list[int]) -> float:
    """Summed NLL in bits of ids[1:] given the ones before, in one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    logp = torch.log_softmax(logits.double(), -1)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item() / math.log(2)


def test_equals_a_hand_computation(tiny):
    model, tokenizer = tiny
    text = "The quick brown fox jumps over the lazy dog. 법률안을 제출함."
    ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]  # GPT-2: BOS is EOS
    result = bits_per_byte(model, tokenizer, [text], byte_budget=10_000)
    n_bytes = len(text.encode("utf-8"))
    assert result.bytes == n_bytes and result.tokens == len(ids) - 1
    assert result.bits_per_byte == pytest.approx(hand_bits(model, ids) / n_bytes, rel=1e-5)
    assert result.tokens_per_byte == pytest.approx((len(ids) - 1) / n_bytes)
    assert result.documents[0].bits == pytest.approx(result.bits)


def coarse_gpt2(folder: Path, tokenizer_dir: Path) -> Path:
    """GPT-2's tokenizer with only its first 300 merges: same ids, a different (longer) segmentation."""
    from transformers import AutoTokenizer

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = spec["model"]["merges"][:300]
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text((tokenizer_dir / "tokenizer_config.json").read_text())
    return AutoTokenizer.from_pretrained(folder)


def test_two_tokenizations_count_the_same_bytes(tiny, korean_texts, gpt2_tokenizer_dir, tmp_path):
    model, tokenizer = tiny
    coarse = coarse_gpt2(tmp_path / "coarse", gpt2_tokenizer_dir)
    texts = ["대한민국 국회 " * 40, "Plain English prose, with numbers 12345.", korean_texts[0]]
    budget = 301  # 15 repeats of 20 bytes, then cuts into a 3-byte character
    fine_result = bits_per_byte(model, tokenizer, texts, budget)
    coarse_result = bits_per_byte(model, coarse, texts, budget)
    assert [d.bytes for d in fine_result.documents] == [d.bytes for d in coarse_result.documents]
    assert fine_result.bytes == coarse_result.bytes == sum(len(cut_to_bytes(t, budget).encode()) for t in texts)
    assert coarse_result.tokens > fine_result.tokens
    assert fine_result.documents[0].bytes == 300  # the split character is left out, not half-scored


def test_cut_to_bytes_is_nfc_and_at_a_character_boundary():
    assert cut_to_bytes("가나다", 4) == "가"
    assert cut_to_bytes("가나다", 6) == "가나"
    assert cut_to_bytes("e\u0301x", 2) == "\u00e9"  # NFC first: é is 2 bytes
    assert cut_to_bytes("abc", 100) == "abc"


def test_window_plan_scores_every_token_once():
    for n in (0, 1, 5, 16, 17, 40, 101):
        for context, stride in ((17, 16), (17, 8), (17, 1), (5, 2), (2, 1)):
            plan = windows(n, context, stride)
            scored = [t for _, end, first in plan for t in range(first, end)]
            assert scored == list(range(n))
            for k, (start, end, first) in enumerate(plan):
                assert 0 <= start <= first <= end and end - start <= context - 1
                if k:  # after the first window, every scored token keeps context - 1 - stride tokens before it
                    assert first - start >= context - 1 - stride
    assert windows(40, 17, 16) == [(0, 16, 0), (16, 32, 16), (24, 40, 32)]
    with pytest.raises(UserError):
        windows(10, 17, 17)


def test_sliding_window_matches_hand_windows_and_whole_scoring(tiny, korean_texts):
    model, tokenizer = tiny
    for budget in range(30, 200):  # a text of 33 to 48 tokens: three windows of 16 at stride 16
        text = cut_to_bytes(korean_texts[1], budget)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if 32 < len(ids) <= 48:
            break
    eos = tokenizer.eos_token_id
    whole = bits_per_byte(model, tokenizer, [text], 10_000)
    covering = bits_per_byte(model, tokenizer, [text], 10_000, context=len(ids) + 1)
    assert covering.bits == pytest.approx(whole.bits, rel=1e-6)
    assert whole.bits == pytest.approx(hand_bits(model, [eos] + ids), rel=1e-5)

    # context 17, stride 16: windows (0,16,0), (16,32,16), (n-16,n,32), each fed after the BOS.
    n = len(ids)
    expected = hand_bits(model, [eos] + ids[:16]) + hand_bits(model, [eos] + ids[16:32])
    last = [eos] + ids[n - 16 :]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([last])).logits[0, :-1].double(), -1)
    targets = range(32 - (n - 16), 16)  # positions in `last` predicting ids[32:]
    expected += -sum(logp[p, last[p + 1]].item() for p in targets) / math.log(2)
    windowed = bits_per_byte(model, tokenizer, [text], 10_000, context=17, stride=16)
    assert windowed.tokens == whole.tokens and windowed.bytes == whole.bytes
    assert windowed.bits == pytest.approx(expected, rel=1e-5)


def test_long_documents_use_the_model_context(tiny, korean_texts):
    model, tokenizer = tiny  # n_positions 256, and 1,000 bytes of Korean are ~900 GPT-2 tokens
    result = bits_per_byte(model, tokenizer, korean_texts[:2], 1000)
    assert result.context == 256 and result.stride == 127
    assert result.tokens > 2 * 256 and math.isfinite(result.bits_per_byte)


def test_batching_does_not_change_the_result_and_runs_repeat_exactly(tiny, korean_texts, english_texts):
    model, tokenizer = tiny
    texts = korean_texts[:3] + english_texts[:3] + [""]
    small = bits_per_byte(model, tokenizer, texts, 700, max_batch_tokens=64)
    large = bits_per_byte(model, tokenizer, texts, 700, max_batch_tokens=100_000)
    assert small.tokens == large.tokens and small.bytes == large.bytes
    for a, b in zip(small.documents, large.documents):
        assert a.bits == pytest.approx(b.bits, rel=1e-5)
    assert bits_per_byte(model, tokenizer, texts, 700).to_dict() == bits_per_byte(model, tokenizer, texts, 700).to_dict()
    assert small.documents[-1].bytes == 0 and small.documents[-1].tokens == 0


def test_nothing_to_score_is_an_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(UserError, match="no text to score"):
        bits_per_byte(model, tokenizer, ["", ""], 100)
    with pytest.raises(UserError, match="byte budget"):
        bits_per_byte(model, tokenizer, ["abc"], 0)


def test_generation_speed_suppresses_eos(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    # Make EOS the greedy choice everywhere: every final hidden state is v, and EOS's row is 10 v.
    with torch.no_grad():
        v = torch.linspace(-1, 1, model.config.n_embd)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)
        model.transformer.wte.weight[tokenizer.eos_token_id] = 10 * v
    speed = generation_speed(model, tokenizer, ["Hello", "법률안"], new_tokens=6)
    assert speed.tokens == 12 and speed.prompts == 2
    assert speed.bytes > 0 and speed.bytes_per_second > 0 and speed.seconds > 0
