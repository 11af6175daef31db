"""Selection on real bills with the real GPT-2 tokenizer: safe sacrifices, special tokens, strict rules files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from ivr.base_bpe import load_base
from ivr.cli import run_main
from ivr.continued_bpe import Words, continue_bpe
from ivr.remap_rules import read_rules
from select_candidates import main as select_main

BUDGET = 300
SPECIAL = '[{"token": "<ToW>", "init_text": "a thought", "frozen": true}]'


def select(analysis: dict, out: Path, *extra: str) -> dict[str, Path]:
    """Run the selection script's main on the fixture's analysis; the three outputs by name."""
    outs = {"candidates": out / "candidates.tsv", "rules": out / "remap_rules.yaml", "log": out / "selection_log.md"}
    select_main([
        "--tokenizer", str(analysis["tokenizer"]),
        "--pretokens", str(analysis["analysis"] / "pretokens.parquet"),
        "--frequencies", str(analysis["analysis"] / "token_frequencies.parquet"),
        "--n-reassign", str(BUDGET), "--min-count", "5", *extra,
        "--candidates-out", str(outs["candidates"]), "--rules-out", str(outs["rules"]), "--log-out", str(outs["log"]),
    ])
    return outs


@pytest.fixture(scope="module")
def base(gpt2_tokenizer_dir):
    return load_base(str(gpt2_tokenizer_dir))


@pytest.fixture(scope="module")
def selections(tmp_path_factory, gpt2_bills_analysis) -> dict[str, dict[str, Path]]:
    out = {}
    for backend in ("unigram", "bpe"):
        folder = tmp_path_factory.mktemp(f"select_{backend}")
        out[backend] = select(gpt2_bills_analysis, folder, "--backend", backend, "--protected-ids", "50000 49999", "--special-tokens", SPECIAL)
    return out


def reassignments(paths: dict[str, Path]) -> list[dict]:
    return read_rules(paths["rules"])["reassignments"]


@pytest.mark.parametrize("backend", ["unigram", "bpe"])
def test_sacrifices_are_never_special_single_byte_or_protected(selections, base, backend):
    rules = reassignments(selections[backend])
    ids = [r["id"] for r in rules]
    assert len(ids) == len(set(ids)) == BUDGET + 1  # the special token comes on top of the budget
    for r in rules:
        assert r["id"] not in base.special and not base.single_byte(r["id"]) and r["id"] not in (50000, 49999)
        assert r["old_token"] == base.tokens[r["id"]]
        if backend == "bpe":
            assert r["id"] not in base.built_on  # the bpe backend only drops merges nothing builds on
    assert ids == sorted(ids)


@pytest.mark.parametrize("backend", ["unigram", "bpe"])
def test_new_tokens_are_new_pieces_with_their_base_segmentation(selections, base, backend):
    for r in reassignments(selections[backend]):
        if r["kind"] == "special":
            continue
        assert r["kind"] == "ngram" and r["new_token"] not in base.ids
        assert r["base_ids"] == [t.id for t in base.tok.model.tokenize(r["new_token"])]
        assert len(r["base_ids"]) >= 2 and not r["frozen"]


def test_special_token_takes_a_slot_with_its_init_text(selections, base):
    special = [r for r in reassignments(selections["unigram"]) if r["kind"] == "special"]
    assert len(special) == 1
    (r,) = special
    assert r["new_token"] == "<ToW>" and r["frozen"] is True
    assert r["base_ids"] == base.tok.encode("a thought", add_special_tokens=False).ids


def test_candidates_table_lists_every_merge_with_its_saving(selections):
    rows = selections["bpe"]["candidates"].read_text(encoding="utf-8").splitlines()
    header = rows[0].split("\t")
    assert header[:6] == ["rank", "id", "left", "right", "new_token", "new_readable"]
    assert len(rows) - 1 == BUDGET
    counts = [int(row.split("\t")[header.index("count")]) for row in rows[1:]]
    assert all(c >= 5 for c in counts)
    assert "remapped tokens/byte" in selections["bpe"]["log"].read_text(encoding="utf-8")


def test_unused_embedding_rows_are_taken_first(tmp_path, gpt2_bills_analysis):
    outs = select(gpt2_bills_analysis, tmp_path, "--model-rows", "50300")
    rules = read_rules(outs["rules"])["reassignments"]
    unused = [r for r in rules if r["kind"] == "unused_row"]
    assert [r["id"] for r in unused] == list(range(50257, 50300))
    assert all(r["old_token"] is None and r["old_readable"] is None for r in unused)
    assert len(rules) - len(unused) == BUDGET - 43


def test_same_inputs_give_byte_identical_outputs(tmp_path, selections, gpt2_bills_analysis):
    again = select(gpt2_bills_analysis, tmp_path, "--backend", "bpe", "--protected-ids", "50000 49999", "--special-tokens", SPECIAL)
    for name, path in again.items():
        assert path.read_bytes() == selections["bpe"][name].read_bytes(), name


def test_greedy_keeps_every_new_piece_in_use():
    # Real merge order on a tiny word list: "ab" is merged first, then "abc" would use up every "ab".
    strings = ["a", "b", "c", "d"]
    words = Words([[0, 1, 2], [0, 1, 2], [0, 1, 3]], [10, 10, 1], [0, 0, 0], 0, 0, 0, 0)
    kept = continue_bpe(words, strings, 5, 1, set(strings), keep=1)
    assert [m.string for m in kept.merges][:2] == ["ab", "abc"]
    assert all(m.final_count >= 1 for m in kept.merges)
    greedy = continue_bpe(words, strings, 5, 1, set(strings), keep=0)
    assert any(m.final_count == 0 for m in greedy.merges)  # without the guard a piece can end unused


# ---- a user's rules file ------------------------------------------------------------------------


def rules_file(tmp_path: Path, selection: dict[str, Path], change) -> Path:
    """The first 20 merges of a selection as a user's rules file (parts come before the pieces
    built on them), after `change` edits its reassignments."""
    first = [line.split("\t")[4] for line in selection["candidates"].read_text(encoding="utf-8").splitlines()[1:21]]
    data = read_rules(selection["rules"])
    data["reassignments"] = [r for r in data["reassignments"] if r["new_token"] in first]
    change(data["reassignments"])
    path = tmp_path / "my_rules.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def test_a_valid_rules_file_is_completed_and_kept(tmp_path, selections, gpt2_bills_analysis):
    def strip(rules):  # a person writes only ids and new tokens
        for r in rules:
            for key in ("old_token", "old_readable", "new_readable", "base_ids", "frozen"):
                r.pop(key)

    path = rules_file(tmp_path, selections["bpe"], strip)
    outs = select(gpt2_bills_analysis, tmp_path / "out", "--backend", "bpe", "--rules-file", str(path))
    mine = read_rules(outs["rules"])["reassignments"]
    first = {line.split("\t")[4] for line in selections["bpe"]["candidates"].read_text(encoding="utf-8").splitlines()[1:21]}
    assert mine == [r for r in reassignments(selections["bpe"]) if r["new_token"] in first]
    assert len(outs["candidates"].read_text(encoding="utf-8").splitlines()) == 21


def first_new(rules):
    return next(r for r in rules if r["kind"] == "ngram")


CASES = {
    "special": (lambda rules: first_new(rules).update(id=50256, old_token="<|endoftext|>"), "special token"),
    "single_byte": (lambda rules: first_new(rules).update(id=64, old_token="a"), "single-byte"),
    "protected": (lambda rules: None, "protected in ivr.protected_ids"),
    "twice": (lambda rules: rules.append(dict(rules[0], new_token=rules[1]["new_token"] + "Ġ")), "named twice"),
    "unknown_key": (lambda rules: rules[0].update(comment="x"), "unknown key 'comment'"),
    "not_a_leaf": (lambda rules: first_new(rules).update(id=262, old_token="Ġthe"), "no merge builds on"),
    "existing": (lambda rules: first_new(rules).update(new_token="Ġthe"), "already token 262"),
    "unreachable": (lambda rules: first_new(rules).update(new_token="ĠzqxjvkQQ", base_ids=[1976, 80, 87, 73, 85, 74, 48, 48], new_readable=" zqxjvkQQ"), "cannot be built"),
    "wrong_base_ids": (lambda rules: first_new(rules).update(base_ids=[0, 0]), "are not the base segmentation"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rules_file_errors_are_one_line_and_exit_2(tmp_path, selections, gpt2_bills_analysis, capsys, case):
    change, expected = CASES[case]
    path = rules_file(tmp_path, selections["bpe"], change)
    protected = str(first_new(read_rules(path)["reassignments"])["id"]) if case == "protected" else ""
    args = [
        "--tokenizer", str(gpt2_bills_analysis["tokenizer"]),
        "--pretokens", str(gpt2_bills_analysis["analysis"] / "pretokens.parquet"),
        "--frequencies", str(gpt2_bills_analysis["analysis"] / "token_frequencies.parquet"),
        "--backend", "bpe", "--rules-file", str(path), "--protected-ids", protected,
        "--candidates-out", str(tmp_path / "c.tsv"), "--rules-out", str(tmp_path / "r.yaml"), "--log-out", str(tmp_path / "l.md"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_main(select_main, args)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "r.yaml").exists()  # nothing partial is left


def test_rules_file_error_from_the_command_line(tmp_path, selections, gpt2_bills_analysis):
    path = rules_file(tmp_path, selections["bpe"], CASES["twice"][0])
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "select_candidates.py"),
         "--tokenizer", str(gpt2_bills_analysis["tokenizer"]),
         "--pretokens", str(gpt2_bills_analysis["analysis"] / "pretokens.parquet"),
         "--frequencies", str(gpt2_bills_analysis["analysis"] / "token_frequencies.parquet"),
         "--backend", "bpe", "--rules-file", str(path),
         "--candidates-out", str(tmp_path / "c.tsv"), "--rules-out", str(tmp_path / "r.yaml"), "--log-out", str(tmp_path / "l.md")],
        capture_output=True, text=True, env={"IVR_LOG_LEVEL": "WARNING", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:") and "named twice" in result.stderr


@pytest.mark.parametrize(
    "ivr,expected",
    [
        ({"n_reassign": -1}, "key 'ivr.n_reassign'"),
        ({"budget": 10}, "unknown key 'ivr.budget'"),
        ({"backend": "wordpiece"}, "key 'ivr.backend'"),
        ({"special_tokens": [{"token": "<ToW>"}]}, "key 'ivr.special_tokens.0'"),
        ({"special_tokens": [{"token": "<ToW>", "init_text": "a"}], "rules_file": "r.yaml"},
         "ivr.special_tokens and ivr.rules_file are both set"),
    ],
)
def test_config_section_is_checked(ivr, expected):
    from ivr.cli import UserError
    from ivr.config import validate_config

    with pytest.raises(UserError, match=expected.replace(".", r"\.")):
        validate_config({"ivr": ivr})
    assert validate_config({})["ivr"]["backend"] == "bpe"
