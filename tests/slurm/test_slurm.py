"""The workflow as users run it on a cluster, `snakemake --profile slurm results/final_model`, on a real
two-node Slurm cluster on this machine.

tests/slurm/cluster.sh brings the cluster up (munge, slurmctld, two slurmd: nodes ivr1 and ivr2, each with
a fake GPU) and down again by PID. The module's workdir is a copy of the workflow whose workflow profile
(profiles/default, read after --profile) is tests/slurm/profile: the test cluster's partitions and sizes
and the tiny configuration; `slurm` and profiles/slurm are as they ship. The light stages up to the
training inputs run locally first, so the cluster's minutes go to what matters: the training rule and
what follows it go through sbatch.

Both training runs have their first attempt killed at its Slurm time limit (1 minute, Slurm's minimum)
and Snakemake's retry, with 3 minutes, resumes from the checkpoint saved on SIGTERM: the one-node run of
`snakemake --profile slurm results/final_model`, and beside it, in a copy of the workdir, a two-node run
(training.nodes: 2, one process per node on CPU over gloo, half the micro-batch so that the global batch
and so the step count match the one-node run). A training budget "just long enough to be killed" cannot
be had on a machine shared with other work: the tiny training runs at 1 to 11 steps/s here, depending on
the load. So the budget is small (TRAIN_STEPS, seconds when idle) and the test stands in for a long
training: once a first attempt has logged a step it stops (SIGSTOP) that attempt's training processes,
found by their command line and working directory. Slurm itself ends the job at its limit: SIGCONT,
then SIGTERM, on which the training finishes its step, saves and exits (the rule's shell and the
launchers ignore SIGTERM, so the job lasts until then; SIGKILL follows after KillWait, 30 s).

A third run, in another copy, sends a job that fails on the cluster while the first attempts wait for
their time limit, so the failure costs no wall time of its own.
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
_ENTRY = Path(sys.executable).with_name("snakemake")  # the venv's `snakemake` command
SNAKEMAKE = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "snakemake"]
PROFILE = ["--profile", "slurm"]  # what users type: the `slurm` folder at the root (-> profiles/slurm)
CONFIGS = ["tests/config/tiny.yaml", "slurm.yaml"]  # the workdir's workflow profile names these too
SLURM_CONFIG = "slurm.yaml"  # written into the workdir by the fixture, read after tests/config/tiny.yaml
TRAIN_STEPS = 30  # what is left after the first attempt fits the 3-minute retry even at 0.3 steps/s


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


def snakemake(workdir: Path, *args: str, timeout: int = 900, env: dict | None = None) -> subprocess.Popen:
    """Start `snakemake ARGS` in its own process group, its output into temporary files (no pipe to fill)."""
    outputs = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
    process = subprocess.Popen(
        ["timeout", "-k", "30", str(timeout), *SNAKEMAKE, *args],
        cwd=workdir, stdout=outputs[0], stderr=outputs[1],
        env={**os.environ, "IVR_NO_PROGRESS": "1", **(env or {})}, start_new_session=True,
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


def run(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return finish(snakemake(workdir, *args, timeout=timeout))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """The workflow with the training inputs made locally, tests/slurm/profile as its workflow profile, and
    slurm.yaml: the training job on one node with the fake GPU, no control model (one training job), no
    periodic checkpoints (the resumed one must be the SIGTERM one), TRAIN_STEPS steps, and a lighter
    validation (generation dominates its time; the gates still apply)."""
    for name in ("korean_bills", "python_docs"):
        asset(name)
    workdir = make_workdir(tmp_path_factory.mktemp("slurm"), gpt2_tokenizer_dir)
    local = subprocess.run(
        [*SNAKEMAKE, "results/data/ivr/meta.json", "results/data/control/meta.json", "results/model/initialized",
         "--cores", "2",
         "--configfile", "tests/config/tiny.yaml"], cwd=workdir, capture_output=True, text=True,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    training = yaml.safe_load((workdir / "tests" / "config" / "tiny.yaml").read_text())["training"]
    tokens_per_step = training["block_size"] * training["micro_batch_size"] * training.get("gradient_accumulation", 1)
    # budget 1.0: the IVR model takes the steps the control's max_tokens buys (the control itself is off)
    training.update(control=False, checkpoint_every=1_000_000, max_tokens=TRAIN_STEPS * tokens_per_step, gpus=1,
                    budget=1.0)
    validation = {"prompts": 1, "new_tokens": 8, "byte_budget": 500}
    (workdir / SLURM_CONFIG).write_text(yaml.safe_dump({"training": training, "validation": validation}))
    shutil.copyfile(ROOT / "tests" / "slurm" / "profile" / "config.yaml", workdir / "profiles" / "default" / "config.yaml")
    return workdir


def copy_workdir(workdir: Path, tmp_path_factory, name: str) -> Path:
    copy = tmp_path_factory.mktemp(name) / "workdir"
    shutil.copytree(workdir, copy, symlinks=True)
    return copy


@pytest.fixture(scope="module")
def failing_run(cluster, workdir, tmp_path_factory):
    """A run whose one job fails on the cluster: pack_data of the control branch, in a copy of the workdir
    whose domain training split has a line that is not JSON (nothing before the job reads it). Started
    in the background: the first test starts it beside its own run, the last one checks it."""
    copy = copy_workdir(workdir, tmp_path_factory, "slurm_failing")
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


def two_node_config(workdir: Path) -> dict:
    """training.nodes: 2, one process per node on CPU (multi_gpu: torchrun per node, gloo under
    ACCELERATE_USE_CPU), half the micro-batch: the global batch, so the steps, are the one-node run's."""
    micro = yaml.safe_load((workdir / SLURM_CONFIG).read_text())["training"]["micro_batch_size"]
    assert micro % 2 == 0, micro
    return {"training": {"nodes": 2, "gpus": 1, "accelerate": "multi_gpu", "micro_batch_size": micro // 2}}


@pytest.fixture(scope="module")
def two_node_run(cluster, workdir, tmp_path_factory):
    """The IVR model trained on the cluster's two nodes, in a copy of the workdir, started in the background
    beside the one-node run (--verbose: Snakemake then prints each sbatch call)."""
    copy = copy_workdir(workdir, tmp_path_factory, "slurm_two_nodes")
    (copy / "nodes.yaml").write_text(yaml.safe_dump(two_node_config(workdir)))
    process = snakemake(copy, *PROFILE, "results/model/sft", "--verbose", "--rerun-triggers", "mtime",
                        "--configfile", *CONFIGS, "nodes.yaml", timeout=1200, env={"ACCELERATE_USE_CPU": "true"})
    try:
        yield copy, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def training_processes(workdir: Path) -> list[int]:
    """PIDs of the processes running scripts/train_sft.py in `workdir` (one per node, not the launchers:
    accelerate's simple launcher runs `python train_sft.py`, torchrun `python -u train_sft.py`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if any(arg.endswith(b"scripts/train_sft.py") for arg in argv[1:3]):
                if os.readlink(entry / "cwd") == str(workdir):
                    pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def stop_first_trainings(runs: dict[Path, tuple[subprocess.Popen, int]], timeout: float = 600) -> None:
    """For each workdir: once its first attempt's training has logged a step, stop (SIGSTOP) its `n`
    training processes. All runs are watched at once: a run left going would finish in seconds."""
    waiting = dict(runs)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for workdir, (run, count) in list(waiting.items()):
            assert run.poll() is None, f"{workdir}: snakemake ended before its training logged a step"
            log = workdir / "results" / "checkpoints" / "sft" / "train_log.jsonl"
            if log.exists() and log.read_text().strip():
                pids = training_processes(workdir)
                assert len(pids) == count, (workdir, pids, "trained all steps at once?")
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                del waiting[workdir]
        time.sleep(0.1)
    assert not waiting, f"no training step logged in {list(waiting)}"


def attempt_checks(workdir: Path, result: subprocess.CompletedProcess) -> tuple[list[str], list[dict]]:
    """The training job's attempts: each killed at its time limit but the last, each retry with more time,
    each killed attempt's SIGTERM checkpoint the step the next one resumed from."""
    text = result.stdout + result.stderr
    attempts = submitted(result)["train_sft"]
    jobs = [slurm_job(job_id) for job_id in attempts]
    # tests/slurm/profile: "2 * attempt - 1" minutes; the retry normally finishes, a third attempt may be
    # needed on a loaded machine
    assert len(attempts) >= 2, jobs
    assert [j["TimeLimit"] for j in jobs] == [f"00:0{2 * n - 1}:00" for n in range(1, len(jobs) + 1)], jobs
    assert [j["JobState"] for j in jobs] == ["TIMEOUT"] * (len(jobs) - 1) + ["COMPLETED"], jobs
    logs = workdir / ".snakemake" / "slurm_logs" / "rule_train_sft" / "sft"
    first_log = (logs / f"{attempts[0]}.log").read_text()
    assert re.search(rf"JOB {attempts[0]} ON \S+ CANCELLED AT \S+ DUE TO TIME LIMIT", first_log), first_log[-3000:]
    # show-failed-logs printed each killed attempt's training log; the last one's stays on disk
    train_log = (workdir / "logs" / "train_sft" / "sft.log").read_text()
    stopped = [int(n) for n in re.findall(r"SIGTERM: stopped after step (\d+) of", text)]
    resumed = [int(n) for n in re.findall(r"resuming from \S*/step-\d+: step (\d+) of", text + train_log)]
    assert len(stopped) == len(attempts) - 1 and stopped[0] > 0, stopped
    assert resumed == stopped, (stopped, resumed)
    assert "starting fresh" not in train_log
    return attempts, jobs


def trained_steps(workdir: Path) -> list[int]:
    """The steps of the saved model's train_log.jsonl, checked against its plan and token count."""
    model = workdir / "results" / "model" / "sft"
    records = [json.loads(line) for line in (model / "train_log.jsonl").read_text().splitlines()]
    stats = json.loads((model / "training_stats.json").read_text())
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == stats["plan"]["total_steps"] >= TRAIN_STEPS
    assert stats["tokens_seen"] == stats["plan"]["total_steps"] * stats["plan"]["tokens_per_step"]
    assert not (workdir / "results" / "checkpoints" / "sft").exists()  # removed once the model is saved
    assert list((model / "tensorboard").rglob("events.out.tfevents.*"))
    return steps


def submitted(result: subprocess.CompletedProcess) -> dict[str, list[str]]:
    """Rule name -> Slurm job ids in submission order, from the plugin's lines "Job N has been submitted
    with SLURM jobid ID (log: .../slurm_logs/rule_RULE/...)" (the rule from the log's path: jobs submitted
    together are announced after all their "rule" blocks)."""
    out = {}
    for job_id, rule in re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*?slurm_logs/rule_([^/\s]+)/",
                                   result.stdout + result.stderr):
        out.setdefault(rule, []).append(job_id)
    return out


def slurm_job(job_id: str) -> dict[str, str]:
    """JobState, TimeLimit, RunTime, NumNodes, NodeList of a job (cluster.sh keeps finished jobs for an hour)."""
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"\b(JobState|TimeLimit|RunTime|NumNodes|NodeList)=(\S+)", text))


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


def test_the_profile_is_found_by_name_from_the_repository_root(monkeypatch):
    """`--profile slurm` from the root finds the one profile, profiles/slurm, through the `slurm` link."""
    from snakemake.cli import get_profile_dir

    monkeypatch.chdir(ROOT)
    folder, config = get_profile_dir("slurm")
    assert config.resolve() == (ROOT / "profiles" / "slurm" / "config.yaml").resolve()
    assert get_profile_dir("profiles/slurm")[1].resolve() == config.resolve()


def test_slurm_profile_makes_the_final_model_training_killed_at_its_limit_resumes_on_one_and_two_nodes(
        cluster, workdir, failing_run, two_node_run, capsys):
    command = [*PROFILE, "results/final_model"]
    process = snakemake(workdir, *command, timeout=1200)
    two_nodes, two_node_process = two_node_run
    try:
        stop_first_trainings({workdir: (process, 1), two_nodes: (two_node_process, 2)})
    finally:
        result = finish(process)
        two_node_result = finish(two_node_process)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-6000:]
    attempts, jobs = attempt_checks(workdir, result)
    steps = trained_steps(workdir)
    assert (workdir / "results" / "final_model" / "config.json").exists()
    assert (workdir / "results" / "final_model" / "README.md").exists()

    # the same training on two nodes: each attempt's job spans ivr1 and ivr2, one accelerate launch per
    # node through srun, each with its own machine rank; it resumes and ends at the same step
    two_text = two_node_result.stdout + two_node_result.stderr
    assert two_node_result.returncode == 0, two_text[-6000:]
    two_attempts, two_jobs = attempt_checks(two_nodes, two_node_result)
    assert all(j["NumNodes"] == "2" and j["NodeList"] == "ivr[1-2]" for j in two_jobs), two_jobs
    train_log = (two_nodes / "logs" / "train_sft" / "sft.log").read_text()
    sbatch = [line.split("sbatch call: ", 1)[1] for line in two_text.splitlines() if "sbatch call: " in line]
    sbatch = [line for line in sbatch if "rule_train_sft" in line]
    srun = [line for line in (two_text + train_log).splitlines() if "accelerate_nodes.sh: srun " in line]
    tasks = [line for line in train_log.splitlines() if re.search(r"accelerate_nodes.sh: task \d", line)]
    assert len(sbatch) == len(two_attempts) and all(" --nodes=2 " in c and " --ntasks=2 " in c for c in sbatch), sbatch
    assert len(srun) == len(two_attempts) and all("--nodes=2 --ntasks=2 --ntasks-per-node=1" in c for c in srun), srun
    assert sorted(re.search(r"task (\d) on node (\S+):", t).groups() for t in tasks) == [("0", "ivr1"), ("1", "ivr2")]
    assert all("--machine_rank" in t and "--main_process_ip 127.0.0.1" in t for t in tasks), tasks
    assert "2 process(es), MULTI_CPU" in two_text  # the first attempt: two processes over gloo on CPU
    two_steps = trained_steps(two_nodes)
    assert two_steps == steps

    with capsys.disabled():
        print(f"\n$ snakemake {' '.join(command)}  (one node): attempts",
              ", ".join(f"job {i} {j['JobState']} after {j['RunTime']}" for i, j in zip(attempts, jobs)),
              f"-> final step {steps[-1]}")
        print("two-node training (training.nodes: 2), attempts",
              ", ".join(f"job {i} {j['JobState']} on {j['NodeList']}" for i, j in zip(two_attempts, two_jobs)),
              f"-> final step {two_steps[-1]}")
        shown = [c.split(" --wrap=")[0] + " --wrap=..." for c in sbatch]
        shown += [c.split(" --task ")[0] + " --task ..." for c in srun] + tasks
        for line in shown:
            print("  ", line.strip())


def test_changing_a_selection_parameter_resubmits_only_affected_rules(cluster, workdir):
    (workdir / "more.yaml").write_text("ivr:\n  n_reassign: 150\n")
    result = run(workdir, *PROFILE, "results/final_model", "-n", "--configfile", *CONFIGS, "more.yaml")
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
