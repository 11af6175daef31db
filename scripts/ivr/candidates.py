"""candidates.tsv: every pair selection merged, in merge order, with its counts; the remapped tokenizer
replays the merges of the new tokens from it."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ivr.cli import UserError
from ivr.continued_bpe import Training
from collections.abc import Callable

COLUMNS = [
    "rank", "id", "left", "right", "new_token", "new_readable", "count", "general_count",
    "pretokens", "final_count", "saving", "cumulative_saving",
]


def candidate_rows(training: Training, slot_of: dict[int, int], domain_tokens: int, readable: Callable[[str], str]) -> list[list]:
    """A row per merge of a continued-BPE training, in merge order; slot_of: the id each new piece takes;
    readable: a token string as text."""
    rows, cumulative, strings = [], 0, training.strings
    for rank, m in enumerate(training.merges, start=1):
        cumulative += m.count
        rows.append([
            rank, slot_of[m.new], strings[m.left], strings[m.right],
            m.string, readable(m.string), m.count, m.general_count, m.pretokens, m.final_count,
            f"{m.count / max(domain_tokens, 1):.6f}", f"{cumulative / max(domain_tokens, 1):.6f}",
        ])
    return rows


def write_candidates(path: str | os.PathLike, rows: list[list]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def read_merges(path: Path) -> list[tuple[str, str, str]]:
    """(left, right, new_token) of every merge in candidates.tsv, in merge order."""
    if not path.is_file():
        raise UserError(f"{path}: candidates table does not exist")
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if reader.fieldnames is None or not {"left", "right", "new_token"} <= set(reader.fieldnames):
            raise UserError(f"{path}: not a candidates table (needs columns left, right, new_token)")
        return [(row["left"], row["right"], row["new_token"]) for row in reader]
