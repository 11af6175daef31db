"""The training plan: which rows are reassigned or frozen (from remap_rules.yaml), the stages of a run
(rows only, then full or LoRA) and the learning-rate schedule of each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ivr.cli import UserError
from ivr import remap_rules


@dataclass(frozen=True)
class Rules:
    reassigned: np.ndarray  # ids whose rows were given new tokens
    frozen: np.ndarray  # ids whose rows must never move (special tokens marked frozen)


def read_rules(path: str | Path, num_rows: int) -> Rules:
    """Reassigned and frozen ids of remap_rules.yaml (docs/DEVELOPING.md), checked against the matrix."""
    ids, frozen = [], []
    for number, entry in enumerate(remap_rules.read_rules(path)["reassignments"]):
        if not isinstance(entry["id"], int) or not 0 <= entry["id"] < num_rows:
            raise UserError(f"{path}: reassignments[{number}]: id {entry['id']!r} is no row of the embedding "
                            f"matrix (0..{num_rows - 1})")
        ids.append(entry["id"])
        if entry.get("frozen", False):
            frozen.append(entry["id"])
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: an id is reassigned twice")
    return Rules(np.array(sorted(ids), dtype=np.int64), np.array(sorted(frozen), dtype=np.int64))


@dataclass(frozen=True)
class Stage:
    index: int  # 1 or 2
    kind: str  # rows | full | lora
    first_step: int  # global optimizer step at which it starts
    steps: int
    lr: float
    learn_rows: np.ndarray  # rows of the embedding/head that may change
    held_rows: np.ndarray  # rows that must not change (the rest)


def plan_stages(settings: dict, total_steps: int, num_rows: int, rules: Rules | None) -> list[Stage]:
    every = np.arange(num_rows)
    learnable = np.setdiff1d(rules.reassigned, rules.frozen) if rules else np.zeros(0, np.int64)
    frozen = rules.frozen if rules else np.zeros(0, np.int64)
    rows_steps = 0
    if len(learnable) and settings["stage2"] == "none":
        rows_steps = total_steps
    elif len(learnable) and settings["stage1_share"] > 0:
        rows_steps = min(total_steps, max(1, round(settings["stage1_share"] * total_steps)))
    stages = []
    if rows_steps:
        stages.append(Stage(1, "rows", 0, rows_steps, settings["stage1_lr"], learnable,
                            np.setdiff1d(every, learnable)))
    rest = total_steps - rows_steps
    if rest and settings["stage2"] != "none":
        learn = np.setdiff1d(every, frozen) if settings["stage2"] == "full" else learnable
        stages.append(Stage(2, settings["stage2"], rows_steps, rest, settings["lr"], learn,
                            np.setdiff1d(every, learn)))
    if not stages:
        raise UserError("nothing to train: stage2 is 'none' and there are no reassigned rows (no --rules)")
    return stages


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup, then cosine decay to `floor` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
