"""Quality outside the training text: interpolation with the start model, the retention rule that picks its
weight, and the report's gates on unseen text (retention, language_vs_control, no shared documents).

Real parts: the tiny GPT-2 with the real GPT-2 tokenizer, trained on real Korean bills by train_sft.py, scored
on real English prose by validate.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, write_jsonl
from test_train_sft import REASSIGNED, packed, rules_file, run, stats, train_command  # noqa: F401 (fixtures)

from ivr.retention import choose_weight, interpolate, parse_unseen, shared_documents, training_keys
from ivr.cli import UserError


@pytest.fixture(scope="module")
def english(tmp_path_factory, english_texts) -> dict[str, Path]:
    """Two disjoint sets of real English pages: one to watch while training, one to report on."""
    folder = tmp_path_factory.mktemp("english")
    return {"dev": write_jsonl(folder / "dev.jsonl", [{"text": t} for t in english_texts[:4]]),
            "report": write_jsonl(folder / "report.jsonl", [{"text": t} for t in english_texts[4:8]])}


@pytest.fixture(scope="module")
def korean_dev(tmp_path_factory, bills_sample) -> Path:
    lines = bills_sample.read_text(encoding="utf-8").splitlines()[200:204]
    return write_jsonl(tmp_path_factory.mktemp("dev") / "dev.jsonl", [json.loads(line) for line in lines])


def test_interpolation_is_a_straight_line_from_the_start_that_leaves_unchanged_rows_bit_identical():
    torch.manual_seed(0)
    start = {"w": torch.randn(6, 4), "steps": torch.tensor([3])}
    trained = {"w": start["w"].clone(), "steps": torch.tensor([3])}
    trained["w"][2:] += torch.randn(4, 4)  # rows 0 and 1 held by training
    half = interpolate(start, trained, 0.5)
    assert torch.equal(half["w"][:2], start["w"][:2])
    assert torch.allclose(half["w"][2:], (start["w"][2:] + trained["w"][2:]) / 2, atol=1e-6)
    assert torch.equal(interpolate(start, trained, 1.0)["w"], trained["w"])
    assert torch.equal(half["steps"], trained["steps"])  # not a weight
    with pytest.raises(UserError, match="lacks extra"):
        interpolate(start, {**trained, "extra": torch.zeros(1)}, 0.5)


def test_the_retention_rule_keeps_the_best_domain_dev_within_the_tolerance_of_the_base():
    reference = {"prose_bpb": 1.0}
    scores = {("start", 1.0): {"dev_bpb": 0.60, "prose_bpb": 1.40}, ("start", 0.7): {"dev_bpb": 0.64, "prose_bpb": 1.05},
              ("start", 0.5): {"dev_bpb": 0.70, "prose_bpb": 1.01}, ("start", 0.3): {"dev_bpb": 0.90, "prose_bpb": 0.99}}
    assert choose_weight(scores, reference, 0.05)[0] == ("start", 0.7)
    assert choose_weight(scores, reference, 0.5)[0] == ("start", 1.0)
    assert choose_weight(scores, reference, 0.0)[0] == ("start", 0.3)
    weight, why = choose_weight(scores, {"prose_bpb": 0.5}, 0.05)  # none within: the closest
    assert weight == ("start", 0.3) and "none within" in why
    # a second anchor whose line keeps the domain better at the same retention wins
    both = {**scores, ("stage1", 0.7): {"dev_bpb": 0.62, "prose_bpb": 1.04}}
    assert choose_weight(both, reference, 0.05)[0] == ("stage1", 0.7)


def test_unseen_specs_are_checked():
    text = parse_unseen("prose:base=a.jsonl,b.jsonl", "--unseen")
    assert (text.name, text.language, text.paths) == ("prose", "base", ("a.jsonl", "b.jsonl"))
    with pytest.raises(UserError, match="--unseen 'prose:english=a.jsonl'"):
        parse_unseen("prose:english=a.jsonl", "--unseen")


def test_shared_documents_are_found_by_hash_whatever_the_normal_form(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "정부는 법안을 제출한다."}, {"text": "other"}])
    assert shared_documents(["정부는 법안을 제출한다.", "unseen"], training_keys([str(train)])) == 1
    decomposed = __import__("unicodedata").normalize("NFD", "정부는 법안을 제출한다.")
    assert shared_documents([decomposed + "\n"], training_keys([str(train)])) == 1
    assert shared_documents(["unseen"], training_keys([str(train)])) == 0


def train(tiny_gpt2_dir, packed, out: Path, dev: Path, unseen_dev: Path, *settings: str) -> Path:
    command = train_command(tiny_gpt2_dir, packed, out, out.parent / f"{out.name}_ckpt", None, "stage1_share=0",
                            "eval_every=0", "eval_documents=4", "eval_byte_budget=300", *settings)
    run(command + ["--dev", str(dev), "--unseen-dev", f"prose:base={unseen_dev}"])
    return out


@pytest.fixture(scope="module")
def hard(tmp_path_factory, tiny_gpt2_dir, packed, korean_dev, english) -> Path:
    """The tiny GPT-2 trained hard on three Korean bills: many passes at a high learning rate, no interpolation."""
    out = tmp_path_factory.mktemp("hard") / "model"
    return train(tiny_gpt2_dir, packed, out, korean_dev, english["dev"], "epochs=4", "lr=3e-2", "interpolation=1.0")


def test_auto_interpolation_follows_the_rule_and_a_fixed_one_is_the_straight_line(tmp_path, tiny_gpt2_dir, packed,
                                                                                   korean_dev, english, hard):
    auto = train(tiny_gpt2_dir, packed, tmp_path / "auto", korean_dev, english["dev"], "epochs=4", "lr=3e-2",
                 "interpolation=auto")
    chosen = stats(auto)["interpolation"]
    assert chosen["anchor"] == "start" and set(chosen["scores"]) == {"start"}  # no stage 1: the start only
    scores = {float(a): s for a, s in chosen["scores"]["start"].items()}
    tried = sorted(scores, reverse=True)
    assert tried == pytest.approx([1.0 - 0.1 * k for k in range(len(tried))])  # from 1.0 down, in steps of 0.1
    weights = {("start", a): s for a, s in scores.items()}
    assert (chosen["anchor"], chosen["alpha"]) == choose_weight(weights, chosen["reference"], 0.05)[0]
    kept = [a for a in tried if scores[a]["prose_bpb"] <= chosen["reference"]["prose_bpb"] * 1.05]
    if len(tried) < 10:  # it stopped: the last weight tried is worse on the domain than the best one kept
        assert kept and scores[tried[-1]]["dev_bpb"] > min(scores[a]["dev_bpb"] for a in kept)
    assert set(chosen["reference"]) == {"prose_bpb"}
    assert scores[1.0]["prose_bpb"] > chosen["reference"]["prose_bpb"]  # training on Korean cost English

    fixed = train(tiny_gpt2_dir, packed, tmp_path / "fixed", korean_dev, english["dev"], "epochs=4", "lr=3e-2",
                  "interpolation=0.25")
    start, trained, mixed = (load_file(Path(p) / "model.safetensors") for p in (tiny_gpt2_dir, hard, fixed))
    for key, value in mixed.items():
        assert torch.allclose(value, start[key] + 0.25 * (trained[key] - start[key]), atol=1e-5), key
    assert stats(fixed)["interpolation"] == {"alpha": 0.25, "anchor": "start", "rule": "fixed (training.interpolation)"}


def test_the_stage1_anchor_is_the_start_with_the_rows_stage_1_left(tmp_path, tiny_gpt2_dir, packed, rules_file):
    """Interpolating towards `stage1` moves the blocks back to the start and the reassigned rows back to where
    stage 1 (rows only) left them: the same rows a rows-only run of stage 1's steps learns."""
    def ivr(name: str, *settings: str) -> Path:
        out = tmp_path / name
        run(train_command(tiny_gpt2_dir, packed, out, tmp_path / f"{name}_ck", rules_file, "epochs=2", "lr=1e-2",
                          "stage1_lr=5e-2", *settings))
        assert not (tmp_path / f"{name}_ck").exists()  # the anchor's rows went with the checkpoints
        return out

    trained = ivr("trained", "interpolation=1.0")
    mixed = ivr("mixed", "interpolation=0.5", "interpolation_anchor=stage1")
    rows_steps = stats(trained)["plan"]["stages"][0]["steps"]
    tokens = rows_steps * 2 * 32  # stage 1's steps of 2 blocks of 32 tokens, as a rows-only run
    rows_only = ivr("rows_only", "stage2=none", f"max_tokens={tokens}", "interpolation=1.0")
    assert stats(rows_only)["optimizer_steps"] == rows_steps
    start, trained, mixed, rows_only = (load_file(Path(p) / "model.safetensors")
                                        for p in (tiny_gpt2_dir, trained, mixed, rows_only))
    assert stats(tmp_path / "mixed")["interpolation"]["anchor"] == "stage1"
    reassigned = torch.tensor(REASSIGNED)
    for key, value in mixed.items():
        anchor = start[key].clone()
        if key == "transformer.wte.weight":
            assert not torch.allclose(rows_only[key][reassigned], start[key][reassigned])  # stage 1 moved them
            anchor[reassigned] = rows_only[key][reassigned]
        assert torch.allclose(value, anchor + 0.5 * (trained[key] - anchor), atol=1e-5), key

    refused = subprocess.run(train_command(tiny_gpt2_dir, packed, tmp_path / "no", tmp_path / "no_ck", None,
                                           "interpolation_anchor=stage1"), capture_output=True, text=True)
    assert refused.returncode != 0 and "interpolation_anchor: stage1 needs a stage 1" in refused.stderr
    assert not (tmp_path / "no").exists()


def validate(tmp: Path, base: Path, sft: Path, heldout: Path, unseen: list[str], training_texts: list[Path]) -> dict:
    command = [sys.executable, str(ROOT / "scripts" / "validate.py"), "--heldout", str(heldout),
               "--base-model", str(base), "--initialized", str(base), "--sft", str(sft), "--control", str(base),
               "--max-documents", "4", "--byte-budget", "300", "--batch-size", "4", "--prompts", "0",
               "--device", "cpu", "--out-json", str(tmp / "validation.json"), "--out-html", str(tmp / "validation.html")]
    for spec in unseen:
        command += ["--unseen", spec]
    for path in training_texts:
        command += ["--training-texts", str(path)]
    command += ["--gates", json.dumps({"language_vs_control": True})]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / "validation.json").read_text())


def test_the_retention_gate_fails_for_a_model_trained_hard_on_one_text(tmp_path, tiny_gpt2_dir, hard, korean_dev,
                                                                       english, bills_sample):
    korean = write_jsonl(tmp_path / "korean.jsonl", [json.loads(line) for line in
                                                     bills_sample.read_text(encoding="utf-8").splitlines()[300:304]])
    report = validate(tmp_path, tiny_gpt2_dir, hard, korean_dev, [f"prose:base={english['report']}",
                                                                   f"other_korean:domain={korean}"], [korean_dev])
    gates = {g["name"]: g for g in report["gates"]}
    retention = gates["retention_prose"]
    base = report["models"]["base"]["unseen"]["prose"]["bits_per_byte"]
    assert retention["threshold"] == pytest.approx(base * 1.05)
    assert not retention["passed"] and retention["measured"] > retention["threshold"]
    assert report["headline"]["unseen_change_vs_base"]["prose"]["sft"] > 0.05
    control_korean = report["models"]["control"]["unseen"]["other_korean"]["bits_per_byte"]
    assert gates["language_vs_control_other_korean"]["control"] == control_korean
    assert not report["gates_passed"]
    assert report["unseen"]["prose"] == {"language": "base", "documents": 4, "shared_with_training": 0}
    page = (tmp_path / "validation.html").read_text(encoding="utf-8")
    assert "Unseen text" in page and "retention_prose" in page


def test_an_unseen_document_that_training_read_fails_its_gate(tmp_path, tiny_gpt2_dir, korean_dev, english):
    leaked = write_jsonl(tmp_path / "train.jsonl", [json.loads(l) for l in english["report"].read_text().splitlines()[:1]])
    report = validate(tmp_path, tiny_gpt2_dir, tiny_gpt2_dir, korean_dev, [f"prose:base={english['report']}"],
                      [korean_dev, leaked])
    gate = {g["name"]: g for g in report["gates"]}["unseen_prose"]
    assert gate["measured"] == 1 and not gate["passed"] and report["unseen"]["prose"]["shared_with_training"] == 1
