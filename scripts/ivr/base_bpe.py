"""The base BPE (byte-level or SentencePiece-style) as reassignment sees it: its tokens by id, its merges,
which ids they build on."""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import Tokenizer

from ivr.tokenization import ByteLevelForm, SentencePieceForm, load_tokenizer_json, token_form


@dataclass
class Base:
    """The base BPE tokenizer, with what reassignment needs to know about its merges."""

    spec: dict
    form: ByteLevelForm | SentencePieceForm  # what its token strings stand for
    tokens: list[str | None]  # id -> token string (None for a gap)
    ids: dict[str, int]  # model vocabulary and added tokens
    special: set[int]  # added tokens
    merge_rank: dict[int, int]  # id -> rank of the merge that builds it
    parts: dict[int, tuple[int, int]]  # id -> the two ids its merge joins
    built_on: set[int]  # ids some merge uses as a part
    n_ids: int  # tokenizer ids: highest id + 1
    tok: Tokenizer

    def single_byte(self, token_id: int) -> bool:
        """A token every text may fall back to: a single byte (or character, or byte-fallback token)."""
        token = self.tokens[token_id]
        return token is not None and token_id not in self.special and self.form.is_byte(token)


def split_merge(merge: str | list[str]) -> tuple[str, str]:
    """A merge of tokenizer.json, written either as "a b" or as ["a", "b"]."""
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    return merge[0], merge[1]


def load_base(name_or_path: str, trust_remote_code: bool = False) -> Base:
    spec = load_tokenizer_json(name_or_path, trust_remote_code)
    form = token_form(spec, name_or_path)
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
    return Base(spec, form, tokens, ids, special, merge_rank, parts, built_on, n_ids, Tokenizer.from_str(json.dumps(spec)))
