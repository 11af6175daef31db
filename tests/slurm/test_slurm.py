"""The workflow through `snakemake --profile profiles/slurm` on a real one-node Slurm cluster.

tests/slurm/cluster.sh brings the cluster up (munge, slurmctld, slurmd with a fake GPU) and down again
by PID. The light stages up to the training inputs run locally first, so the cluster test spends its
minutes on what matters: the training rule and what follows it go through sbatch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, asset, make_workdir

CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PROFILE = ["--profile", "profiles/slurm", "--workflow-profile", "tests/slurm/profile"]


def slurm_available() -> bool:
    return shutil.which("slurmctld") is not None and shutil.which("sbatch") is not None and os.geteuid() == 0


pytestmark = pytest.mark.skipif(
    not slurm_available() and not os.environ.get("CI"),
    reason="needs root and Debian's slurmctld, slurmd, slurm-client, munge (IVR_SETUP_TEST_TOOLS=1 bash setup.sh)",
)


@pytest.fixture(scope="module")
def cluster():
    subprocess.run(["bash", str(CLUSTER), "start"], check=True)
    try:
        yield
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], check=False)


def run(workdir: Path, *args: str, configs: tuple[str, ...] = (), timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "IVR_NO_PROGRESS": "1"}
    return subprocess.run(
        ["timeout", "-k", "30", str(timeout), *SNAKEMAKE, *args, "--configfile", "tests/config/tiny.yaml", *configs],
        cwd=workdir, capture_output=True, text=True, env=env,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    for name in ("korean_bills", "python_docs"):
        asset(name)
    return make_workdir(tmp_path_factory.mktemp("slurm"), gpt2_tokenizer_dir)


def submitted(result: subprocess.CompletedProcess) -> dict[str, str]:
    """Rule name -> Slurm job id, from Snakemake's 'submitted with SLURM jobid' lines."""
    rule, out = None, {}
    for line in (result.stdout + result.stderr).splitlines():
        stripped = line.strip()
        if stripped.startswith("rule "):
            rule = stripped[5:].rstrip(":")
        if "submitted with SLURM jobid" in line and rule:
            out[rule] = line.split("SLURM jobid ")[1].split()[0]
    return out


def test_training_goes_through_sbatch_and_final_model_is_made(cluster, workdir):
    local = subprocess.run(
        [*SNAKEMAKE, "results/data/ivr/meta.json", "results/model/initialized", "--cores", "2",
         "--configfile", "tests/config/tiny.yaml"], cwd=workdir, capture_output=True, text=True,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    result = run(workdir, "results/final_model", *PROFILE)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    jobs = submitted(result)
    assert "train_sft" in jobs, jobs
    job_id = jobs["train_sft"]
    logs = list((workdir / ".snakemake" / "slurm_logs" / "rule_train_sft").rglob(f"{job_id}.log"))
    assert logs and logs[0].stat().st_size > 0, "no Slurm-side log for the training job"
    scontrol = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    assert "JobState=COMPLETED" in scontrol.stdout or scontrol.returncode != 0  # may already be purged
    assert (workdir / "results" / "final_model" / "config.json").exists()
    assert (workdir / "results" / "final_model" / "README.md").exists()


def test_changing_a_selection_parameter_resubmits_only_affected_rules(cluster, workdir):
    (workdir / "more.yaml").write_text("ivr:\n  n_reassign: 150\n")
    result = run(workdir, "results/final_model", *PROFILE, "-n", configs=("more.yaml",))
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    planned = {
        line.split()[1].rstrip(":") for line in text.splitlines() if line.lstrip().startswith(("rule ", "localrule "))
    }
    assert "select_candidates" in planned
    assert not planned & {"ingest_corpus", "analyze_corpus", "distill_tokenizer", "fetch_asset"}, planned


def test_a_failing_job_fails_the_workflow_and_shows_its_log(cluster, workdir):
    meta = workdir / "results" / "data" / "ivr" / "meta.json"
    saved = meta.read_bytes()
    meta.write_text("{ not json")  # the training job on the cluster cannot read its data
    try:
        result = run(workdir, "results/model/sft", *PROFILE, "--forcerun", "train_sft", "--retries", "0")
    finally:
        meta.write_bytes(saved)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "Error in rule train_sft" in text
    assert re.search(r"slurm_logs/rule_train_sft/\S*\d+\.log", text), text[-3000:]
