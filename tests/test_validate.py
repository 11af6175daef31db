"""The validation report (scripts/validate.py) on real held-out bills and English prose, with the tiny GPT-2 as
every model: the numbers are the models' own, a failed gate is recorded (finalize_model.py refuses on it), and
the page is self-contained."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, write_jsonl

BYTES = 200
GPU_RUN = ROOT / "docs" / "evidence" / "default_run"  # real fidelity and compression reports


def validate(tmp: Path, models: Path, heldout: Path, general: Path, base: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "validate.py"), "--heldout", str(heldout), "--general-heldout",
         str(general), "--base-model", str(models) if base is None else base, "--initialized", str(models), "--sft", str(models),
         "--control", str(models), "--fidelity", str(GPU_RUN / "fidelity.json"),
         "--compression", str(GPU_RUN / "compression.json"), "--max-documents", "4", "--byte-budget", str(BYTES),
         "--batch-size", "4", "--prompts", "2", "--new-tokens", "4", "--device", "cpu",
         "--gates", json.dumps({"general_bpb_tolerance": 0.25}),
         "--out-json", str(tmp / "report" / "validation.json"), "--out-html", str(tmp / "report" / "validation.html")],
        capture_output=True, text=True,
    )


@pytest.fixture(scope="module")
def texts(tmp_path_factory, bills_sample, english_texts) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("heldout")
    bills = [json.loads(line) for line in bills_sample.read_text(encoding="utf-8").splitlines()[:6]]
    return {"heldout": write_jsonl(folder / "heldout.jsonl", bills),
            "general": write_jsonl(folder / "general.jsonl", [{"text": t} for t in english_texts[:3]])}


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_gpt2_dir, texts) -> Path:
    tmp = tmp_path_factory.mktemp("validate")
    result = validate(tmp, tiny_gpt2_dir, texts["heldout"], texts["general"])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "report"


def test_bits_per_byte_are_the_models_own(report, tiny_gpt2_dir, texts):
    """Each held-out document, cut to the byte budget, scored after EOS: -log2 p summed over its tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ivr.corpus import iter_jsonl_texts
    from ivr.metrics import cut_to_bytes

    data = json.loads((report / "validation.json").read_text())
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval(), AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    for split, path, documents in (("domain", texts["heldout"], 4), ("general", texts["general"], 3)):
        bits = tokens = nbytes = 0
        for text in list(iter_jsonl_texts(path))[:documents]:
            cut = cut_to_bytes(text, BYTES)
            ids = tokenizer(cut, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([[tokenizer.eos_token_id] + ids])).logits[0, :-1]
            bits += -torch.log_softmax(logits.double(), -1)[torch.arange(len(ids)), ids].sum().item() / math.log(2)
            tokens, nbytes = tokens + len(ids), nbytes + len(cut.encode("utf-8"))
        for name in ("base", "initialized", "sft", "control"):
            scored = data["models"][name][split]
            assert (scored["tokens"], scored["bytes"]) == (tokens, nbytes)
            assert scored["tokens_per_byte"] == pytest.approx(tokens / nbytes)
            assert scored["bits_per_byte"] == pytest.approx(bits / nbytes, rel=1e-5)
    assert data["protocol"] == {"documents": 4, "general_documents": 3, "byte_budget": BYTES, "prompts": 2,
                                "prompt_bytes": 120, "new_tokens": 4}
    assert data["fidelity"]["pretoken_agreement"] == json.loads((GPU_RUN / "fidelity.json").read_text())["pretoken_agreement"]


def test_a_failed_gate_is_recorded_and_the_others_checked(report):
    data = json.loads((report / "validation.json").read_text())
    gates = {g["name"]: g for g in data["gates"]}
    assert set(gates) == {"general_bpb", "domain_vs_initialized", "fidelity"}  # ivr_vs_control is off by default
    # The "fine-tuned" model is the initialized one, so training did not help: that gate fails.
    assert not gates["domain_vs_initialized"]["passed"]
    assert gates["domain_vs_initialized"]["measured"] == gates["domain_vs_initialized"]["threshold"]
    assert gates["general_bpb"]["passed"] and gates["general_bpb"]["threshold"] == pytest.approx(
        data["models"]["base"]["general"]["bits_per_byte"] + 0.25)
    assert gates["fidelity"]["passed"] and gates["fidelity"]["threshold"] == 0.999
    assert data["gates_passed"] is False


def test_the_page_is_self_contained_with_its_plots(report):
    page = (report / "validation.html").read_text(encoding="utf-8")
    assert len(re.findall(r"<img alt='plot \d' src='data:image/png;base64,[A-Za-z0-9+/=]{1000,}'>", page)) == 3
    assert not re.search(r"(src|href)=['\"]?https?:", page)
    assert "a gate failed: no final model was written" in page and "<td>domain_vs_initialized</td>" in page


def test_an_empty_heldout_split_is_one_line(tmp_path, tiny_gpt2_dir, texts):
    empty = tmp_path / "heldout.jsonl"
    empty.write_text("")
    result = validate(tmp_path, tiny_gpt2_dir, empty, texts["general"])
    assert result.returncode == 2 and result.stderr == f"error: {empty}: the held-out split is empty or missing\n"
    assert not (tmp_path / "report").exists()


def test_an_empty_base_model_is_one_line(tmp_path, tiny_gpt2_dir, texts):
    result = validate(tmp_path, tiny_gpt2_dir, texts["heldout"], texts["general"], base="")
    assert result.returncode == 2 and result.stderr.startswith("error: --base-model is empty")
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "report").exists()
