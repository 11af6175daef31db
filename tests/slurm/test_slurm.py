"""The workflow through `snakemake --profile profiles/slurm` on a real one-node Slurm cluster.

tests/slurm/cluster.sh brings the cluster up (munge, slurmctld, slurmd with a fake GPU) and down again
by PID. One cluster and one workdir serve the module. The light stages up to the training inputs run
locally first, so the cluster's minutes go to what matters: the training rule and what follows it go
through sbatch.

The training job's first attempt is killed at its Slurm time limit (1 minute, Slurm's minimum) and
Snakemake's retry, with 2 minutes, resumes from the checkpoint it saved on SIGTERM. A training budget
"just long enough to be killed" cannot be had on a machine shared with other work: the tiny training runs
at 1 to 11 steps/s here, depending on the load. So the budget is small (TRAIN_STEPS, seconds when idle) and
the test stands in for a long training: once the first attempt has logged a step it stops (SIGSTOP) that
attempt's training process, found by its command line and working directory. Slurm itself ends the
job at its limit: SIGCONT, then SIGTERM, on which the training finishes its step, saves and exits (the
rule's shell and accelerate's launcher ignore SIGTERM, so the job lasts until then; SIGKILL follows after
KillWait, 30 s).

A second run, in a copy of the workdir, sends a job that fails on the cluster while that first attempt
waits for its time limit, so the failure costs no wall time of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, asset, make_workdir

CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PROFILE = ["--profile", "profiles/slurm", "--workflow-profile", "tests/slurm/profile"]
SLURM_CONFIG = "slurm.yaml"  # written into the workdir by the fixture, passed after tests/config/tiny.yaml
TRAIN_STEPS = 60  # what is left after the first attempt fits the 2nd attempt even at 1 step/s


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


def snakemake(workdir: Path, *args: str, configs: tuple[str, ...] = (), timeout: int = 900) -> subprocess.Popen:
    """Start Snakemake in its own process group, its output into temporary files (no pipe to fill)."""
    outputs = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
    process = subprocess.Popen(
        ["timeout", "-k", "30", str(timeout), *SNAKEMAKE, *args,
         "--configfile", "tests/config/tiny.yaml", SLURM_CONFIG, *configs],
        cwd=workdir, stdout=outputs[0], stderr=outputs[1], env={**os.environ, "IVR_NO_PROGRESS": "1"},
        start_new_session=True,
    )
    process.outputs = outputs
    return process


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    process.wait()
    texts = []
    for stream in process.outputs:
        stream.seek(0)
        texts.append(stream.read())
        stream.close()
    return subprocess.CompletedProcess(process.args, process.returncode, *texts)


def run(workdir: Path, *args: str, configs: tuple[str, ...] = (), timeout: int = 900) -> subprocess.CompletedProcess:
    return finish(snakemake(workdir, *args, configs=configs, timeout=timeout))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """The workflow with the training inputs made locally, and slurm.yaml: no control model (one training
    job), no periodic checkpoints (the resumed one must be the SIGTERM one), TRAIN_STEPS steps, and a
    lighter validation (generation dominates its time; the gates still apply)."""
    for name in ("korean_bills", "python_docs"):
        asset(name)
    workdir = make_workdir(tmp_path_factory.mktemp("slurm"), gpt2_tokenizer_dir)
    local = subprocess.run(
        [*SNAKEMAKE, "results/data/ivr/meta.json", "results/model/initialized", "--cores", "2",
         "--configfile", "tests/config/tiny.yaml"], cwd=workdir, capture_output=True, text=True,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    training = yaml.safe_load((workdir / "tests" / "config" / "tiny.yaml").read_text())["training"]
    tokens_per_step = training["block_size"] * training["micro_batch_size"] * training.get("gradient_accumulation", 1)
    training.update(control=False, checkpoint_every=1_000_000, max_tokens=TRAIN_STEPS * tokens_per_step)
    validation = {"prompts": 1, "new_tokens": 8, "byte_budget": 500}
    (workdir / SLURM_CONFIG).write_text(yaml.safe_dump({"training": training, "validation": validation}))
    return workdir


@pytest.fixture(scope="module")
def failing_run(cluster, workdir, tmp_path_factory):
    """A run whose one job fails on the cluster: pack_data of the control branch, in a copy of the workdir
    whose domain training split has a line that is not JSON (nothing before the job reads it). Started
    in the background: the first test starts it beside its own run, the last one checks it."""
    copy = tmp_path_factory.mktemp("slurm_failing") / "workdir"
    shutil.copytree(workdir, copy, symlinks=True)
    with open(copy / "results" / "corpus" / "domain" / "train.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{ not json\n")
    # mtime only: the copy's rules name scripts by another absolute path; one thread, so that the job fits
    # beside the training job on the test node's 2 CPUs
    process = snakemake(copy, "results/data/control/meta.json", "--rerun-triggers", "mtime", *PROFILE,
                        "--retries", "0", "--set-threads", "pack_data=1", timeout=600)
    try:
        yield copy, process
    finally:
        if process.poll() is None:  # the test that waits for it did not run
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def training_process(workdir: Path) -> int | None:
    """PID of the process running scripts/train_sft.py (under accelerate launch) in `workdir`, if any."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if len(argv) > 1 and argv[1].endswith(b"scripts/train_sft.py"):
                if os.readlink(entry / "cwd") == str(workdir):
                    return int(entry.name)
        except OSError:  # gone, or not ours to read
            continue
    return None


def stop_first_training(workdir: Path, run: subprocess.Popen, timeout: float = 600) -> int:
    """Wait until the first attempt's training has logged a step, then stop (SIGSTOP) its process."""
    log = workdir / "results" / "checkpoints" / "sft" / "train_log.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        if log.exists() and log.read_text().strip():
            pid = training_process(workdir)
            assert pid, "the training logged a step but its process is gone (it trained all steps at once?)"
            os.kill(pid, signal.SIGSTOP)
            return pid
        time.sleep(0.1)
    raise AssertionError("the training job never logged a step")


def submitted(result: subprocess.CompletedProcess) -> dict[str, list[str]]:
    """Rule name -> Slurm job ids in submission order, from Snakemake's 'submitted with SLURM jobid' lines."""
    rule, out = None, {}
    for line in (result.stdout + result.stderr).splitlines():
        stripped = line.strip()
        if stripped.startswith("rule "):
            rule = stripped[5:].rstrip(":")
        if "submitted with SLURM jobid" in line and rule:
            out.setdefault(rule, []).append(line.split("SLURM jobid ")[1].split()[0])
    return out


def slurm_job(job_id: str) -> dict[str, str]:
    """JobState, TimeLimit, RunTime of a job (cluster.sh keeps finished jobs for an hour)."""
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"\b(JobState|TimeLimit|RunTime)=(\S+)", text))


def test_the_main_profile_gives_each_retry_more_time():
    """profiles/slurm's runtimes per attempt, read by Snakemake's own profile and resource parsers."""
    from snakemake.profiles import ProfileConfigFileParser
    from snakemake.resources import Resources

    with open(ROOT / "profiles" / "slurm" / "config.yaml") as handle:
        profile = ProfileConfigFileParser().parse(handle)  # CLI-style "RULE:RESOURCE=VALUE" strings
    training = [item.split(":", 1)[1] for item in profile["set-resources"] if item.startswith("train_sft:")]

    def minutes(assignments: list[str], attempt: int) -> int:
        runtime = Resources.parse(assignments, allow_expressions=True)["runtime"]
        return runtime.evaluate(wildcards=None, input=None, attempt=attempt, threads=1, rulename="r",
                                async_run=None).value

    assert [minutes(training, attempt) for attempt in (1, 2, 3)] == [240, 480, 720]
    assert [minutes(profile["default-resources"], attempt) for attempt in (1, 2, 3)] == [120, 240, 360]


def test_training_killed_at_its_time_limit_resumes_on_retry_and_final_model_is_made(cluster, workdir, failing_run):
    process = snakemake(workdir, "results/final_model", *PROFILE, timeout=1200)
    try:
        stop_first_training(workdir, process)
    finally:
        result = finish(process)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-6000:]
    attempts = submitted(result)["train_sft"]
    jobs = [slurm_job(job_id) for job_id in attempts]
    print("train_sft attempts:", ", ".join(f"job {i} {j}" for i, j in zip(attempts, jobs)))

    # killed at its time limit, then retried with a limit that grows with the attempt (tests/slurm/profile:
    # "1 * attempt" minutes; the retry normally finishes, a third attempt may be needed on a loaded machine)
    assert len(attempts) >= 2, jobs
    assert [j["TimeLimit"] for j in jobs] == [f"00:0{n}:00" for n in range(1, len(jobs) + 1)], jobs
    assert [j["JobState"] for j in jobs] == ["TIMEOUT"] * (len(jobs) - 1) + ["COMPLETED"], jobs
    logs = workdir / ".snakemake" / "slurm_logs" / "rule_train_sft" / "sft"
    first_log = (logs / f"{attempts[0]}.log").read_text()
    assert re.search(rf"JOB {attempts[0]} ON \S+ CANCELLED AT \S+ DUE TO TIME LIMIT", first_log), first_log[-3000:]

    # each killed attempt saved the step it reached on SIGTERM (show-failed-logs printed its training
    # log), and the next attempt resumed from exactly that step; the last one's log stays on disk
    train_log = (workdir / "logs" / "train_sft" / "sft.log").read_text()
    stopped = [int(n) for n in re.findall(r"SIGTERM: stopped after step (\d+) of", text)]
    resumed = [int(n) for n in re.findall(r"resuming from \S*/step-\d+: step (\d+) of", text + train_log)]
    assert len(stopped) == len(attempts) - 1 and stopped[0] > 0, stopped
    assert resumed == stopped, (stopped, resumed)
    assert "starting fresh" not in train_log

    model = workdir / "results" / "model" / "sft"
    records = [json.loads(line) for line in (model / "train_log.jsonl").read_text().splitlines()]
    stats = json.loads((model / "training_stats.json").read_text())
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == stats["plan"]["total_steps"] >= TRAIN_STEPS
    assert stats["tokens_seen"] == stats["plan"]["total_steps"] * stats["plan"]["tokens_per_step"]
    assert not (workdir / "results" / "checkpoints" / "sft").exists()  # removed once the model is saved
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
    assert not planned & {"ingest_corpus", "analyze_corpus", "distill_tokenizer", "fetch_assets"}, planned


def test_a_failing_job_fails_the_workflow_and_shows_its_log(cluster, failing_run):
    copy, process = failing_run
    result = finish(process)
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert "Error in rule pack_data" in text, text[-3000:]
    assert "not a split written by ingest_corpus.py" in text  # show-failed-logs printed the job's own log
    found = re.search(r"\S*slurm_logs/rule_pack_data/\S*?(\d+)\.log", text)
    assert found, text[-3000:]
    slurm_log = Path(found.group(0))
    assert (slurm_log if slurm_log.is_absolute() else copy / slurm_log).stat().st_size > 0
    assert slurm_job(found.group(1))["JobState"] == "FAILED"
    assert not (copy / "results" / "data" / "control" / "meta.json").exists()
