"""Resumable training state: checkpoints keyed by what a run depends on, and stopping on SIGTERM."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import torch

from ivr import tracking
from ivr.cli import log


# Settings that change how a run is carried out or reported, not what it computes: they may change
# between a kill and the rerun without invalidating the checkpoints.
OPERATIONAL = ("accelerate", "gpus", "nodes", "threads", "control", "serial", "compile", "compile_scope",
               "cuda_graphs", "loss_chunk_tokens", "log_every", "checkpoint_every", "frozen_check_every", "eval_every",
               "eval_documents", "eval_byte_budget", "tensorboard")
KEEP_CHECKPOINTS = 2
CHECKPOINT_GLOB = "step-" + "[0-9]" * 7  # complete checkpoints; one being written is step-NNNNNNN.partial


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()


def run_key(model: str, data_meta: dict, reference_digest: str | None, rules: str | None, settings: dict,
            world: dict) -> str:
    """Hash of everything a run's result depends on: inputs, settings and the process layout."""
    h = hashlib.blake2b(digest_size=16)
    folder = Path(model)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    h.update(json.dumps([model] if not files else [(p.name, file_digest(p)) for p in files]).encode())
    h.update(json.dumps([data_meta, reference_digest], sort_keys=True).encode())
    h.update(Path(rules).read_bytes() if rules else b"no rules")
    semantic = {k: v for k, v in settings.items() if k not in OPERATIONAL}
    h.update(json.dumps([semantic, world], sort_keys=True).encode())
    return h.hexdigest()


class Checkpoints:
    """Checkpoint folder of one run: key.json, train_log.jsonl and step-NNNNNNN/ folders."""

    def __init__(self, root: str | Path, key: str, accelerator, describe: dict) -> None:
        self.root = Path(root)
        self.key = key
        self.accelerator = accelerator
        self.log_path = self.root / "train_log.jsonl"
        key_path = self.root / "key.json"
        if accelerator.is_main_process:
            old = json.loads(key_path.read_text())["key"] if key_path.exists() else None
            if old != key and self.root.exists():
                reason = "no key" if old is None else "inputs or settings changed"
                log.info("checkpoints in %s are from another run (%s): starting fresh", self.root, reason)
                shutil.rmtree(self.root)
            self.root.mkdir(parents=True, exist_ok=True)
            if old != key:
                key_path.write_text(json.dumps({"key": key, **describe}, indent=2, default=str) + "\n")
        accelerator.wait_for_everyone()

    def latest(self) -> tuple[Path, dict] | None:
        done = sorted(p for p in self.root.glob(CHECKPOINT_GLOB) if (p / "trainer_state.json").exists())
        if not done:
            return None
        return done[-1], json.loads((done[-1] / "trainer_state.json").read_text())

    def save(self, state: dict) -> None:
        accelerator = self.accelerator
        name = f"step-{state['step']:07d}"
        partial_dir = self.root / f"{name}.partial"
        if accelerator.is_main_process:
            shutil.rmtree(partial_dir, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial_dir))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial_dir / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str) + "\n")
            shutil.rmtree(self.root / name, ignore_errors=True)
            os.replace(partial_dir, self.root / name)
            for old in sorted(self.root.glob(CHECKPOINT_GLOB))[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def append_log(self, record: dict) -> None:
        """One line of train_log.jsonl, and its numeric fields to the trackers (TensorBoard)."""
        if self.accelerator.is_main_process:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            tracking.log_record(self.accelerator, record)

    def truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint a rerun resumes from."""
        if self.accelerator.is_main_process and self.log_path.exists():
            lines = self.log_path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            self.log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class TrainingStopped(Exception):
    """Training stopped on SIGTERM; a checkpoint of `step` was saved."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped by SIGTERM after step {step}")
        self.step = step


class StopRequest:
    """Catches SIGTERM while training runs, so that training can stop after a step with a checkpoint.

    Slurm sends SIGTERM at a job's time limit (and on scancel), then SIGKILL KillWait seconds later
    (30 s unless the cluster says otherwise): time to finish the step and save it, so a retry loses
    nothing instead of going back to the last checkpoint_every boundary. Saving is collective, so every
    process must stop at the same step: with several processes the flag is summed across them only at
    logged steps (log_every), where the loop waits for the device anyway, so no other step stalls.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = None

    def __enter__(self) -> "StopRequest":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self, accelerator, step: int, log_every: int) -> bool:
        if accelerator.num_processes == 1:
            return self.signum is not None
        if step % log_every:
            return False
        flag = torch.tensor(float(self.signum is not None), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0
