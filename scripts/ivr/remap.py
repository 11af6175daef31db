"""What selection and the remapped tokenizer share: the base BPE's structure, the rules, the merge table."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from tokenizers import Tokenizer

from ivr.cli import UserError
from ivr.tokenization import check_byte_level_bpe, load_tokenizer_json

# candidates.tsv: one row per merged pair, in merge order.
CANDIDATE_COLUMNS = [
    "rank", "id", "left", "right", "new_token", "new_readable", "count", "general_count",
    "pretokens", "final_count", "saving", "cumulative_saving",
]


@dataclass
class Base:
    """The base byte-level BPE tokenizer, with what reassignment needs to know about its merges."""

    spec: dict
    tokens: list[str | None]  # id -> token string (None for a gap)
    ids: dict[str, int]  # model vocabulary and added tokens
    special: set[int]  # added tokens
    merge_rank: dict[int, int]  # id -> rank of the merge that builds it
    parts: dict[int, tuple[int, int]]  # id -> the two ids its merge joins
    built_on: set[int]  # ids some merge uses as a part
    n_ids: int  # tokenizer ids: highest id + 1
    tok: Tokenizer

    def single_byte(self, token_id: int) -> bool:
        token = self.tokens[token_id]
        return token is not None and token_id not in self.special and len(token) == 1


def split_merge(merge: str | list[str]) -> tuple[str, str]:
    """A merge of tokenizer.json, written either as "a b" or as ["a", "b"]."""
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    return merge[0], merge[1]


def load_base(name_or_path: str, trust_remote_code: bool = False) -> Base:
    spec = load_tokenizer_json(name_or_path, trust_remote_code)
    check_byte_level_bpe(spec, name_or_path)
    ids = dict(spec["model"]["vocab"])
    special = set()
    for added in spec.get("added_tokens", []):
        ids[added["content"]] = added["id"]
        special.add(added["id"])
    n_ids = max(ids.values()) + 1
    tokens: list[str | None] = [None] * n_ids
    for token, token_id in ids.items():
        tokens[token_id] = token
    merge_rank, parts, built_on = {}, {}, set()
    for rank, merge in enumerate(spec["model"]["merges"]):
        left, right = split_merge(merge)
        out = ids[left + right]
        merge_rank[out] = rank
        parts[out] = (ids[left], ids[right])
        built_on.update((ids[left], ids[right]))
    return Base(spec, tokens, ids, special, merge_rank, parts, built_on, n_ids, Tokenizer.from_str(json.dumps(spec)))


def load_rules(path: Path) -> dict:
    """A remap_rules.yaml as written by selection (which checked it); only its shape is checked here."""
    if not path.is_file():
        raise UserError(f"{path}: remap rules file does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("reassignments"), list):
        raise UserError(f"{path}: needs a 'reassignments' list")
    for n, rule in enumerate(data["reassignments"]):
        if not isinstance(rule, dict) or not {"id", "kind", "old_token", "new_token"} <= set(rule):
            raise UserError(f"{path}: reassignments[{n}] needs id, kind, old_token and new_token")
    return data


def read_merges(path: Path) -> list[tuple[str, str, str]]:
    """(left, right, new_token) of every merge in candidates.tsv, in merge order."""
    if not path.is_file():
        raise UserError(f"{path}: candidates table does not exist")
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if reader.fieldnames is None or not {"left", "right", "new_token"} <= set(reader.fieldnames):
            raise UserError(f"{path}: not a candidates table (needs columns left, right, new_token)")
        return [(row["left"], row["right"], row["new_token"]) for row in reader]
