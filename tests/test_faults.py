"""Faults: a stage killed with SIGKILL mid-way leaves no target, and rerunning it gives byte for byte what
an uninterrupted run gives (and clears what the killed run left).

Covered elsewhere, not repeated here: training killed inside its second stage resumes to the same final
step and the same weights (tests/test_train_sft.py, test_resume_after_sigkill_ends_at_the_same_step_with_the_same_weights);
two clean runs of the tiny workflow give byte-identical analysis, remap rules, remapped tokenizer,
embeddings and initialized model (tests/test_workflow.py, test_two_clean_runs_give_byte_identical_artefacts).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ROOT, asset

ANALYSIS_FILES = ("token_frequencies.parquet", "pretokens.parquet", "train_ids.bin", "train_offsets.npy",
                  "train_ids.json", "corpus_stats.json")
PACK_FILES = ("input_ids.bin", "loss_mask.bin", "meta.json")


@pytest.fixture(scope="module")
def bills_split(tmp_path_factory) -> dict[str, Path]:
    """Real Korean bills as ingested splits: 5,000 to analyze (4,900 train, 100 held-out), the first 1,500
    to pack; enough work that a stage is still running when it is killed."""
    import pyarrow.parquet as pq

    table = pq.read_table(asset("korean_bills") / "bill_texts.parquet", columns=["propose_reason"])
    texts = [t for t in table.column(0).to_pylist()[:5000] if t]
    folder = tmp_path_factory.mktemp("fault splits")

    def write(name: str, docs: list[str]) -> Path:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
        return path

    return {"train": write("train", texts[:-100]), "heldout": write("heldout", texts[-100:]),
            "pack": write("pack", texts[:1500])}


def environment(progress: bool = False) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("IVR_NO_PROGRESS", None)
    if not progress:
        env["IVR_NO_PROGRESS"] = "1"
    return env


def run(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def group_members(pgid: int) -> int:
    """Processes in a process group (the stage and the workers it forked), from /proc."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        count += fields[0] != "Z" and int(fields[2]) == pgid
    return count


def kill_when(argv: list[str], env: dict[str, str], ready: Callable[[bytes], bool], timeout: float = 300,
              on_start: Callable[[int], None] = lambda pid: None) -> bytes:
    """Start a stage in its own process group and SIGKILL the whole group (the script and its worker
    processes, as Slurm or the out-of-memory killer would) as soon as ready(stderr so far) holds."""
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    on_start(process.pid)
    stderr = bytearray()
    reader = threading.Thread(target=lambda: [stderr.extend(c) for c in iter(lambda: process.stderr.read1(4096), b"")],
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while not ready(bytes(stderr)):
            if process.poll() is not None:
                raise AssertionError("the stage ended before it could be killed:\n" + stderr.decode(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError("the stage never reached the point to kill it:\n" + stderr.decode(errors="replace")[-3000:])
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None and time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        reader.join(timeout=10)
    assert process.returncode == -signal.SIGKILL, (process.returncode, stderr.decode(errors="replace")[-3000:])
    return bytes(stderr)


def digests(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


def leftovers(folder: Path) -> list[str]:
    """Anything in the output folder but the targets: temporary copies a killed run left."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


# ---- analysis ------------------------------------------------------------------------------------


def analyze_command(split: dict[str, Path], gpt2_tokenizer_dir: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "analyze_corpus.py"), "--tokenizer", str(gpt2_tokenizer_dir),
            "--train", str(split["train"]), "--heldout", str(split["heldout"]), "--out-dir", str(out), "--threads", "2"]


def test_analysis_killed_mid_way_reruns_to_the_uninterrupted_result(tmp_path, bills_split, gpt2_tokenizer_dir):
    reference = tmp_path / "reference"
    run(analyze_command(bills_split, gpt2_tokenizer_dir, reference), environment())

    out = tmp_path / "analysis"
    command = analyze_command(bills_split, gpt2_tokenizer_dir, out)
    # Killed at work: its temporary outputs exist, its worker processes have run for half a second.
    started: list[float] = []

    def at_work(_: bytes) -> bool:
        if not started and leftovers(out) and group_members(pids[0]) > 1:
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > 0.5

    pids: list[int] = []
    kill_when(command, environment(), at_work, on_start=pids.append)
    assert not any((out / name).exists() for name in ANALYSIS_FILES)  # no partial target
    assert leftovers(out), "the killed run should have left its temporary outputs (else it was killed too late)"

    log = run(command, environment())
    assert "left by a run that was killed" in log
    assert digests(out, ANALYSIS_FILES) == digests(reference, ANALYSIS_FILES)
    assert leftovers(out) == []


# ---- packing the training data ---------------------------------------------------------------------


def pack_command(split: dict[str, Path], model: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "pack_data.py"), "--tokenizer", str(model),
            "--train", str(split["pack"]), "--block-size", "64", "--seed", "7", "--threads", "1", "--out-dir", str(out)]


def test_packing_killed_while_tokenizing_reruns_to_the_uninterrupted_result(tmp_path, bills_split, tiny_gpt2_dir):
    reference = tmp_path / "reference"
    run(pack_command(bills_split, tiny_gpt2_dir, reference), environment())

    out = tmp_path / "data"
    command = pack_command(bills_split, tiny_gpt2_dir, out)
    # Killed as soon as its progress bar says it is tokenizing the documents.
    kill_when(command, environment(progress=True), lambda err: b"tokenizing documents" in err)
    assert not any((out / name).exists() for name in PACK_FILES)

    run(command, environment())
    assert digests(out, PACK_FILES) == digests(reference, PACK_FILES)
    documents = len(bills_split["pack"].read_text(encoding="utf-8").splitlines())
    assert json.loads((out / "meta.json").read_text())["documents"]["domain"] == documents
    assert leftovers(out) == []
