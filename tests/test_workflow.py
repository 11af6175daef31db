"""End-to-end: the Snakemake workflow on the tiny real configuration, in a temporary copy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import asset, make_workdir

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(workdir: Path, *args: str, configs: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "IVR_NO_PROGRESS": "1"}
    result = subprocess.run(
        [*SNAKEMAKE, *args, "--cores", "2", "--configfile", "tests/config/tiny.yaml", *configs],
        cwd=workdir, capture_output=True, text=True, env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stdout[-3000:] + result.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    for name in ("korean_bills", "python_docs", "austen_novels", "libreoffice_help_ko", "convention_speeches",
                 "gnome_help_ko"):
        asset(name)
    return make_workdir(tmp_path_factory.mktemp("workflow"), gpt2_tokenizer_dir)


def jobs_run(result: subprocess.CompletedProcess) -> set[str]:
    text = result.stdout + result.stderr
    return {line.split("rule ")[1].rstrip(":").strip() for line in text.splitlines() if line.lstrip().startswith(("rule ", "localrule "))}


def test_analysis_target_is_built_and_checked(workdir):
    snakemake(workdir, "results/analysis/corpus_stats.json")
    stats = json.loads((workdir / "results/analysis/corpus_stats.json").read_text())
    ingest = json.loads((workdir / "results/corpus/domain/ingest.json").read_text())
    assert stats["train"]["documents"] + stats["heldout"]["documents"] + ingest["dev"]["documents"] == 300
    assert stats["train"]["documents"] == ingest["train"]["documents"]
    assert 0.8 < stats["train"]["tokens_per_byte"] < 0.95  # GPT-2 on Korean: about 0.88
    assert 0.15 < stats["general_train"]["tokens_per_byte"] < 0.35  # and on English prose
    for name in ("token_frequencies.parquet", "pretokens.parquet", "train_ids.bin", "train_offsets.npy", "train_ids.json"):
        assert (workdir / "results/analysis" / name).stat().st_size > 0
    assert (workdir / "logs/analyze_corpus.log").exists()
    assert (workdir / "benchmarks/analyze_corpus.tsv").exists()
    # nothing to do on a second run
    again = snakemake(workdir, "results/analysis/corpus_stats.json")
    assert not jobs_run(again), again.stdout


def test_changing_the_split_reruns_only_what_depends_on_it(workdir):
    (workdir / "changed.yaml").write_text("corpus:\n  heldout_fraction: 0.2\n")
    dry = snakemake(workdir, "results/analysis/corpus_stats.json", "-n", configs=("changed.yaml",))
    assert jobs_run(dry) == {"ingest_corpus", "analyze_corpus"}
    assert "wildcards: corpus=domain" in dry.stdout and "wildcards: corpus=general" not in dry.stdout


def test_config_typo_is_one_clear_line(workdir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus:\n  heldout_fractoin: 0.1\n")
    result = subprocess.run([*SNAKEMAKE, "-n", "--configfile", str(bad)], cwd=workdir, capture_output=True, text=True)
    assert result.returncode != 0
    errors = [l for l in (result.stdout + result.stderr).splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "unknown key 'corpus.heldout_fractoin'" in errors[0], result.stderr


@pytest.mark.parametrize(
    "override,expected",
    [
        ("corpus:\n  heldout_fraction: 1.5\n", "key 'corpus.heldout_fraction'"),
        ("analysis:\n  threads: two\n", "key 'analysis.threads'"),
    ],
)
def test_config_value_errors_name_the_key(workdir, tmp_path, override, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(override)
    result = subprocess.run([*SNAKEMAKE, "-n", "--configfile", str(bad)], cwd=workdir, capture_output=True, text=True)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr


def test_dag_renders(workdir):
    result = subprocess.run(
        f"set -o pipefail; {sys.executable} -m snakemake results/analysis/corpus_stats.json --dag "
        "--configfile tests/config/tiny.yaml | dot -Tsvg > dag.svg",
        shell=True, executable="/bin/bash", cwd=workdir, capture_output=True, text=True,
    )
    if result.returncode == 127 or "dot: command not found" in result.stderr:
        pytest.fail("graphviz 'dot' is missing: .ci/run installs it")
    assert result.returncode == 0, result.stderr
    assert "<svg" in (workdir / "dag.svg").read_text()


def test_the_two_trainings_never_run_beside_each_other(workdir):
    """training.serial (on by default): one GPU (or the CPU cores) is never shared by the two trainings. Each
    training job takes the profile's one unit of `training`; and no DAG edge joins them (Snakemake would not
    check the parameters of a job downstream of one it reruns)."""
    dry = snakemake(workdir, "results/model/sft", "results/model/control", "-n", "--forceall").stdout
    jobs = re.findall(r"rule train_sft:.*?wildcards: trained=(\w+).*?resources: ([^\n]*)", dry, re.S)
    assert {branch for branch, _ in jobs} == {"sft", "control"}, dry[-3000:]
    assert all("training=1" in resources for _, resources in jobs), jobs
    assert "resources: [training=1]" in (workdir / "profiles" / "default" / "config.yaml").read_text()
    dag = snakemake(workdir, "results/model/sft", "--dag").stdout
    assert "trained: control" not in dag


@pytest.fixture(scope="module")
def final_model(workdir) -> Path:
    snakemake(workdir, "results/final_model")
    return workdir / "results" / "final_model"


def test_final_model_loads_and_generates(final_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final_model)
    model = AutoModelForCausalLM.from_pretrained(final_model)
    rules = (final_model / "remap_rules.yaml").read_text(encoding="utf-8")
    assert "reassignments" in rules
    inputs = tokenizer("제안이유 현행법은", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    card = (final_model / "README.md").read_text(encoding="utf-8")
    assert "from_pretrained" in card and "fewer tokens" in card and "Provenance" in card
    provenance = json.loads((final_model / "PROVENANCE.json").read_text())
    assert provenance["inputs_sha256"] and provenance["config"]["corpus"]["max_documents"] == 300


def test_report_holds_every_number(final_model):
    report = json.loads((final_model.parent / "report" / "validation.json").read_text())
    for name in ("base", "initialized", "sft", "control"):
        assert report["models"][name]["domain"]["bits_per_byte"] > 0
        assert report["models"][name]["generation"]["bytes_per_second"] > 0
    assert report["headline"]["domain_tokens_per_byte"]["ivr"] < report["headline"]["domain_tokens_per_byte"]["base"]
    assert report["gates_passed"] is True


def test_report_renders_in_chromium_with_its_plots(final_model, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Debian's chromium is missing: IVR_SETUP_TEST_TOOLS=1 bash setup.sh installs it")
    page = tmp_path / "report.html"
    probe = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        " document.body.dataset.images = imgs.length;"
        " document.body.dataset.broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length; });</script>"
    )
    page.write_text((final_model.parent / "report" / "validation.html").read_text(encoding="utf-8").replace("</body>", probe + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", "--virtual-time-budget=3000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r'data-images="(\d+)" data-broken="(\d+)"', dom.stdout)
    assert match, dom.stdout[:500] + dom.stderr[-500:]
    assert int(match.group(1)) >= 3 and int(match.group(2)) == 0
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000  # a rendered page, not a blank one


def tree_digest(path: Path) -> dict[str, str]:
    import hashlib

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_two_clean_runs_give_byte_identical_artefacts(final_model, workdir, tmp_path_factory, gpt2_tokenizer_dir):
    second = make_workdir(tmp_path_factory.mktemp("again"), gpt2_tokenizer_dir)
    snakemake(second, "results/model/initialized")
    for target in ("results/analysis", "results/remap/remap_rules.yaml",
                   "results/remap/candidates.tsv", "results/tokenizer/remapped", "results/embeddings",
                   "results/model/initialized"):
        assert tree_digest(workdir / target) == tree_digest(second / target), target


def test_the_distilled_tokenizer_is_in_the_dag_for_the_unigram_backend_only(final_model, workdir):
    (workdir / "unigram.yaml").write_text("ivr:\n  backend: unigram\n")
    planned = jobs_run(snakemake(workdir, "results/final_model", "-n", configs=("unigram.yaml",)))
    assert {"distill_tokenizer", "tokenizer_fidelity", "remap_tokenizer"} <= planned, planned
    assert not (workdir / "results/tokenizer/distilled").exists()  # the default backend, bpe, ran without it
    report = json.loads((final_model.parent / "report" / "validation.json").read_text())
    assert report["compression"]["backend"] == "bpe"


def test_changing_the_budget_reruns_selection_and_after_but_not_analysis_or_distillation(final_model, workdir):
    (workdir / "budget.yaml").write_text("ivr:\n  n_reassign: 250\n")
    dry = snakemake(workdir, "results/final_model", "-n", configs=("budget.yaml",))
    planned = jobs_run(dry)
    assert {"select_candidates", "remap_tokenizer", "reorder_embeddings", "init_model"} <= planned, planned
    assert not planned & {"ingest_corpus", "analyze_corpus", "distill_tokenizer"}, planned


def test_ivr_budget_is_its_share_of_the_controls_steps_and_both_watch_the_dev_split(final_model, workdir):
    """tiny.yaml: the control trains max_tokens tokens, the IVR model training.budget (0.5) of its steps,
    with the same batch shape; both log dev bits per byte before the first step, every eval_every steps and
    after the last, on dev documents that are neither held out nor trained on."""
    ivr = json.loads((workdir / "results/model/sft/training_stats.json").read_text())
    control = json.loads((workdir / "results/model/control/training_stats.json").read_text())
    assert control["optimizer_steps"] == 8 and ivr["optimizer_steps"] == 4
    assert ivr["plan"]["budget"] == {"kind": "share of the control's compute", "setting": 0.5, "control_steps": 8,
                                     "share": 0.5}
    assert ivr["tokens_seen"] * 2 == control["tokens_seen"] and ivr["training_flops"] * 2 == control["training_flops"]
    for stats, name in ((ivr, "sft"), (control, "control")):
        records = [json.loads(l) for l in (workdir / f"results/model/{name}/train_log.jsonl").read_text().splitlines()]
        measured = [r["step"] for r in records if "dev_bpb" in r]
        assert measured == list(range(0, stats["optimizer_steps"] + 1, 4))
        assert all("general_dev_bpb" in r for r in records if "dev_bpb" in r)
        assert stats["dev_bpb"]["dev_bpb"] == records[-1]["dev_bpb"]
    splits = {s: set((workdir / f"results/corpus/domain/{s}.jsonl").read_text(encoding="utf-8").splitlines())
              for s in ("train", "dev", "heldout")}
    assert splits["dev"] and not splits["dev"] & splits["heldout"] and not splits["dev"] & splits["train"]
    report = (final_model.parent / "report" / "validation.html").read_text(encoding="utf-8")
    assert "<h2>Training compute</h2>" in report and "bytes of text seen" in report
    headline = json.loads((final_model.parent / "report" / "validation.json").read_text())["headline"]
    assert headline["ivr_training_flops_share"] == 0.5


def test_unseen_texts_are_scored_for_every_model_and_share_no_document_with_any_training_input(final_model, workdir):
    """The defaults of unseen_texts: the report scores every model on the report texts (checked by hash against
    the training and dev splits and the dev texts) with tokens per byte, training watches the dev texts."""
    report = json.loads((final_model.parent / "report" / "validation.json").read_text())
    assert set(report["unseen"]) == {"austen_novels", "libreoffice_help_ko"}
    assert all(info["shared_with_training"] == 0 and info["documents"] > 0 for info in report["unseen"].values())
    for model in ("base", "initialized", "sft", "control"):
        assert set(report["models"][model]["unseen"]) == {"austen_novels", "libreoffice_help_ko"}
    assert set(report["headline"]["unseen_change_vs_base"]["austen_novels"]) == {"initialized", "sft", "control"}
    for name in ("sft", "control"):
        records = [json.loads(l) for l in (workdir / f"results/model/{name}/train_log.jsonl").read_text().splitlines()]
        assert all({"convention_speeches_bpb", "gnome_help_ko_bpb"} <= set(r) for r in records if "dev_bpb" in r)
        interpolation = json.loads((workdir / f"results/model/{name}/training_stats.json").read_text())["interpolation"]
        assert interpolation["alpha"] in [float(a) for a in interpolation["scores"][interpolation["anchor"]]]
        assert set(interpolation["scores"]) == ({"start", "stage1"} if name == "sft" else {"start"})
        assert set(interpolation["reference"]) == {"convention_speeches_bpb"}
    unseen = report["models"]["sft"]["unseen"]["libreoffice_help_ko"]
    assert unseen["tokens_per_byte"] < report["models"]["base"]["unseen"]["libreoffice_help_ko"]["tokens_per_byte"]


def test_a_branchs_own_settings_rerun_only_that_branch(final_model, workdir):
    (workdir / "lr.yaml").write_text("training:\n  control_lr: 3.0e-4\n")
    planned = jobs_run(snakemake(workdir, "results/final_model", "-n", configs=("lr.yaml",)))
    assert "train_sft" in planned and "pack_data" not in planned
    dry = snakemake(workdir, "results/final_model", "-n", configs=("lr.yaml",)).stdout
    assert "trained=control" in dry and "trained=sft" not in dry
    (workdir / "budget.yaml").write_text("training:\n  budget: 1.0\n")
    dry = snakemake(workdir, "results/final_model", "-n", configs=("budget.yaml",)).stdout
    assert "trained=sft" in dry and "trained=control" not in dry
    (workdir / "control_stage2.yaml").write_text("training:\n  control_stage2: lora\n")
    dry = snakemake(workdir, "results/final_model", "-n", configs=("control_stage2.yaml",)).stdout
    assert "trained=control" in dry and "trained=sft" not in dry
    (workdir / "stage2.yaml").write_text("training:\n  stage2: lora\n")  # control_stage2 null: both follow
    dry = snakemake(workdir, "results/final_model", "-n", configs=("stage2.yaml",)).stdout
    assert "trained=control" in dry and "trained=sft" in dry


def test_a_failing_gate_stops_the_run_with_one_clear_line(final_model, workdir):
    """An "unseen" report text that is the training split itself: its documents are found in training, so its
    gate fails and no final model is written. Last in this module: it rewrites the report and removes the final
    model, and (only the report's inputs changed) reruns validate alone."""
    (workdir / "leak.yaml").write_text("unseen_texts:\n  report:\n    - name: leak\n      language: domain\n"
                                       "      paths: [results/corpus/domain/train.jsonl]\n")
    result = snakemake(workdir, "results/final_model", configs=("leak.yaml",), check=False)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert re.search(r"error: .*gate 'unseen_leak' failed: measured [1-9]\d*, threshold 0 \(no document", text), text[-2000:]
    assert (workdir / "results" / "report" / "validation.html").exists()
    assert not (workdir / "results" / "final_model").exists()
