"""The final model (scripts/finalize_model.py): written only when every gate of the validation report passes,
as a folder a user loads with from_pretrained, with its rules, model card and provenance. The report is the
real one of the default GPU run (docs/evidence/default_run/), whose gates all passed, and the same report
with its ivr_vs_control gate failed as a stricter threshold would fail it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from ivr.base_bpe import load_base
from ivr.files import sha256_of
from ivr.remap_rules import dump_rules, make_rule, piece_segmentation

GPU_RUN = ROOT / "docs" / "evidence" / "default_run" / "validation.json"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_gpt2_dir, gpt2_tokenizer_dir) -> dict[str, Path]:
    """What finalize reads: the fine-tuned model (the tiny GPT-2, with the checkpoints and TensorBoard logs
    training keeps in it), the base model (with a chat template and a model card), remap rules and two reports: the GPU run's, and the
    same with its ivr_vs_control gate failed (the control's bits per byte lowered to 0.59)."""
    root = tmp_path_factory.mktemp("finalize")
    model = root / "sft"
    shutil.copytree(tiny_gpt2_dir, model)
    (model / "checkpoints" / "step-4").mkdir(parents=True)
    (model / "tensorboard").mkdir()
    (model / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"scalars")
    (model / "generation_config.json").unlink()
    base = root / "base"
    shutil.copytree(tiny_gpt2_dir, base)
    (base / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (base / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# tiny GPT-2\n")
    gpt2 = load_base(str(gpt2_tokenizer_dir))
    rules = [make_rule(gpt2, 40000, "ngram", "ìķĪëħķ", piece_segmentation(gpt2, "ìķĪëħķ"), False),
             make_rule(gpt2, 50300, "unused_row", "ë²ķë¥ł", piece_segmentation(gpt2, "ë²ķë¥ł"), False)]
    (root / "remap_rules.yaml").write_text(dump_rules(rules, str(gpt2_tokenizer_dir), "unigram", "test rules"))
    report = json.loads(GPU_RUN.read_text())
    assert report["gates_passed"]
    gate = next(g for g in report["gates"] if g["name"] == "ivr_vs_control")
    gate.update(threshold=0.59, passed=False)
    report["gates_passed"] = False
    (root / "failed.json").write_text(json.dumps(report))
    corpus = root / "bills.jsonl"
    corpus.write_text('{"text": "국회 법률안"}\n', encoding="utf-8")
    return {"root": root, "model": model, "base": base, "rules": root / "remap_rules.yaml",
            "passed": GPU_RUN, "failed": root / "failed.json", "corpus": corpus}


def finalize(run: dict[str, Path], validation: Path, out: Path) -> subprocess.CompletedProcess:
    config = {"corpus": {"paths": [str(run["corpus"])]}, "general_corpus": None, "ivr": {"n_reassign": 2}}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "finalize_model.py"), "--model", str(run["model"]),
         "--validation", str(validation), "--rules", str(run["rules"]), "--base-model", str(run["base"]),
         "--config", json.dumps(config), "--inputs", str(run["corpus"]), str(run["base"]), "--out", str(out)],
        capture_output=True, text=True,
    )


def test_a_failed_gate_writes_nothing_and_names_the_gate(run, tmp_path):
    out = tmp_path / "final_model"
    result = finalize(run, run["failed"], out)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {run['failed']}: gate 'ivr_vs_control' failed: measured 0.598195, threshold 0.59 "
        "(IVR domain bits/byte <= control's + tolerance) (see the report beside it; no final model written)\n")
    assert not out.exists() and not any(tmp_path.iterdir())


def test_passed_gates_give_a_model_that_loads_with_its_card_rules_and_provenance(run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "final_model"
    result = finalize(run, run["passed"], out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "checkpoints").exists() and not (out / "tensorboard").exists()
    assert (run["model"] / "tensorboard" / "events.out.tfevents.1.host").exists()  # the logs stay where they are
    assert (out / "chat_template.jinja").read_bytes() == (run["base"] / "chat_template.jinja").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (run["base"] / "generation_config.json").read_bytes()
    assert (out / "remap_rules.yaml").read_bytes() == run["rules"].read_bytes()
    assert (out / "validation.json").read_bytes() == run["passed"].read_bytes()

    tokenizer, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    inputs = tokenizer("제안이유", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3

    provenance = json.loads((out / "PROVENANCE.json").read_text())
    assert provenance["reassigned"] == 2 and provenance["config"]["ivr"] == {"n_reassign": 2}
    files = [run["corpus"], *sorted(p for p in run["base"].rglob("*") if p.is_file())]
    assert provenance["inputs_sha256"] == {str(f): sha256_of(f) for f in files}
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "2 token\nslots" in card and "| domain tokens per byte | 0.856 | 0.856 | 0.180 |" in card
    assert "79.0 % fewer tokens" in card and 'from_pretrained("final_model")' in card
    assert "- Base model: base (as published); licence mit." in card  # from the base's model card


def test_the_same_inputs_give_the_same_folder(run, tmp_path):
    for name in ("a", "b"):
        assert finalize(run, run["passed"], tmp_path / name / "final_model").returncode == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_the_base_models_licence_is_found_where_it_is_recorded(tmp_path, monkeypatch):
    """The asset's licence (config/assets.yaml) for a base fetched as one, else a GGUF's general.license."""
    import gguf

    from finalize_model import describe_base

    monkeypatch.chdir(ROOT)  # the config names assets relative to the workflow's folder
    converted = tmp_path / "resources" / "models" / "SmolLM2-135M-Instruct.Q4_1"
    converted.mkdir(parents=True)
    asset = "resources/assets/smollm2_gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert describe_base(str(converted), asset)["licence"] == "Apache-2.0"

    own = tmp_path / "my-model.gguf"
    writer = gguf.GGUFWriter(str(own), "llama")
    writer.add_license("cc-by-sa-4.0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert describe_base(str(converted), str(own))["licence"] == "cc-by-sa-4.0"
    assert "licence" not in describe_base(str(converted), str(tmp_path / "other.gguf"))
