"""End-to-end: the Snakemake workflow on the tiny real configuration, in a temporary copy."""

from __future__ import annotations

import json
import os
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
    for name in ("korean_bills", "python_docs"):
        asset(name)
    return make_workdir(tmp_path_factory.mktemp("workflow"), gpt2_tokenizer_dir)


def jobs_run(result: subprocess.CompletedProcess) -> set[str]:
    text = result.stdout + result.stderr
    return {line.split("rule ")[1].rstrip(":").strip() for line in text.splitlines() if line.lstrip().startswith(("rule ", "localrule "))}


def test_analysis_target_is_built_and_checked(workdir):
    snakemake(workdir, "results/analysis/corpus_stats.json")
    stats = json.loads((workdir / "results/analysis/corpus_stats.json").read_text())
    ingest = json.loads((workdir / "results/corpus/domain/ingest.json").read_text())
    assert stats["train"]["documents"] + stats["heldout"]["documents"] == 300
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
