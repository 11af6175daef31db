"""Packing (scripts/pack_data.py): documents joined by EOS into blocks, padding that is never a label,
prompt/completion examples with their prompts masked."""

from __future__ import annotations

import math

import numpy as np

from ivr.packed_data import PackedBlocks
from conftest import EOS_GPT2 as EOS, pack, write_jsonl


def test_documents_are_joined_by_eos_and_the_tail_block_is_padded(tmp_path, tiny_gpt2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    docs = ["첫 번째 법안입니다.", "Second document, in English.", "세 번째"]
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in docs])
    meta = pack(tiny_gpt2_dir, tmp_path / "data", train, "--block-size", "16", "--seed", "7")
    data = PackedBlocks(tmp_path / "data")
    ids = np.asarray(data.ids).reshape(-1)
    mask = np.asarray(data.mask).reshape(-1)
    real = ids[mask == 1]
    # every document, in the seeded order, followed by EOS; the stream then padded to whole blocks
    order = np.random.default_rng(7).permutation(len(docs))
    expected = [t for i in order for t in tok(docs[i], add_special_tokens=False)["input_ids"] + [EOS]]
    assert real.tolist() == expected
    assert meta["tokens"] == len(expected) == meta["label_tokens"]
    assert meta["blocks"] == math.ceil(len(expected) / 16) and len(ids) == meta["blocks"] * 16
    assert not mask[len(expected):].any()
    # determinism: the same inputs give byte-identical outputs
    pack(tiny_gpt2_dir, tmp_path / "again", train, "--block-size", "16", "--seed", "7")
    for name in ("input_ids.bin", "loss_mask.bin", "meta.json"):
        assert (tmp_path / "data" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_padding_is_no_label_while_real_eos_is_when_pad_equals_eos(tmp_path, tiny_gpt2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tok.pad_token = tok.eos_token  # the usual work-around that makes PAD == EOS
    tok.save_pretrained(tmp_path / "tok")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "짧은 문서"}])
    meta = pack(tmp_path / "tok", tmp_path / "data", train, "--block-size", "32")
    assert meta["pad_is_eos"] and meta["pad_id"] == EOS
    sample = PackedBlocks(tmp_path / "data")[0]
    ids, targets = sample["input_ids"], sample["targets"]
    n = meta["tokens"]  # the document and its EOS; the rest of the block is padding (also id EOS)
    assert ids[n - 1] == EOS and (ids[n:] == EOS).all()
    assert targets[n - 2] == EOS  # the real EOS is predicted
    assert (targets[n - 1:] == -100).all()  # padding never is, though it has the same id
    assert targets[: n - 1].tolist() == ids[1:n].tolist()


def test_prompt_is_masked_and_the_chat_template_is_used(tmp_path, tiny_gpt2_dir):
    from transformers import AutoTokenizer

    template_dir = tmp_path / "with_template"
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}<|endoftext|>{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]: {% endif %}")
    tok.save_pretrained(template_dir)
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "본문"}])
    examples = [{"prompt": "법안의 목적은?", "completion": "국민의 안전입니다."},
                {"prompt": "Summarise.", "completion": "Short answer."}]
    sft = write_jsonl(tmp_path / "sft.jsonl", examples)
    for source, expect_template in ((template_dir, True), (tiny_gpt2_dir, False)):
        out = tmp_path / f"data_{expect_template}"
        meta = pack(tiny_gpt2_dir, out, train, "--block-size", "128", "--sft", str(sft),
                    "--chat-template-from", str(source))
        assert meta["sft"]["examples"] == 2 and meta["sft"]["chat_template"] is expect_template
        data = PackedBlocks(out)
        sft_rows = [i for i in range(len(data)) if "Summarise." in tok.decode(np.asarray(data.ids[i]))]
        assert len(sft_rows) == 1  # both examples fit one block, which is padded
        labelled = "".join(tok.decode(np.asarray(data.ids[i])[np.asarray(data.mask[i]) == 1]) for i in sft_rows)
        if expect_template:
            assert labelled == "국민의 안전입니다.<|endoftext|>Short answer.<|endoftext|>"
        else:  # no template: prompt and completion as given, EOS after the completion
            assert labelled == "국민의 안전입니다.<|endoftext|>Short answer.<|endoftext|>"
        everything = "".join(tok.decode(np.asarray(data.ids[i])) for i in sft_rows)
        assert ("[user]: 법안의 목적은?" in everything) is expect_template
        assert "법안의 목적은?" in everything
