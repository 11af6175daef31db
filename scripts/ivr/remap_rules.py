"""remap_rules.yaml, the reassignment every later stage reads (format in docs/DEVELOPING.md): the one
module that reads it, checks a person's rules file against the base tokenizer, and writes it."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ivr.base_bpe import Base
from ivr.cli import UserError
from ivr.files import read_yaml

TOP_KEYS = ("version", "base_tokenizer", "backend", "reassignments")
RULE_KEYS = ("id", "kind", "old_token", "old_readable", "new_token", "new_readable", "base_ids", "frozen")
KINDS = ("ngram", "special", "unused_row")
# What YAML refuses as raw characters, or reads as line breaks, inside a quoted scalar.
YAML_UNSAFE = re.compile("[^\x09\x0a\x0d\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]")


# ---- reading ---------------------------------------------------------------------------------------


def read_rules(path: str | os.PathLike, needs: tuple[str, ...] = ("id", "kind", "old_token", "new_token")) -> dict:
    """The rules file as a mapping whose 'reassignments' is a list of mappings, each holding the keys
    `needs` (a file selection wrote has them all); UserError naming the file and entry otherwise."""
    data = read_yaml(path, "remap rules file")
    if not isinstance(data, dict) or not isinstance(data.get("reassignments"), list):
        raise UserError(f"{path}: expected a mapping with a 'reassignments' list (see docs/DEVELOPING.md)")
    for n, entry in enumerate(data["reassignments"]):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: reassignments[{n}]: expected a mapping")
        missing = [key for key in needs if key not in entry]
        if missing:
            raise UserError(f"{path}: reassignments[{n}]: needs {', '.join(needs)} (no {missing[0]})")
    return data


@dataclass(frozen=True)
class Reassignment:
    """What the embeddings need of one rule."""

    id: int
    kind: str
    new_token: str
    base_ids: tuple[int, ...]


def load_reassignments(path: str | os.PathLike) -> list[Reassignment]:
    """The reassignments of a rules file by id, each checked: a slot, a kind, a new token, its base ids."""
    out: list[Reassignment] = []
    for n, entry in enumerate(read_rules(path, needs=())["reassignments"]):
        where = f"{path}: reassignments[{n}]"
        slot, kind, new, base = entry.get("id"), entry.get("kind"), entry.get("new_token"), entry.get("base_ids")
        if not _is_id(slot):
            raise UserError(f"{where}: 'id' must be a non-negative integer, got {slot!r}")
        if kind not in KINDS:
            raise UserError(f"{where} (id {slot}): 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
        if not isinstance(new, str) or not new:
            raise UserError(f"{where} (id {slot}): 'new_token' must be a non-empty string")
        if not isinstance(base, list) or not base or not all(map(_is_id, base)):
            raise UserError(f"{where} (id {slot}): 'base_ids' must be a non-empty list of token ids")
        out.append(Reassignment(slot, kind, new, tuple(base)))
    ids = [r.id for r in out]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise UserError(f"{path}: id {dup} is reassigned more than once")
    return sorted(out, key=lambda r: r.id)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---- building and writing --------------------------------------------------------------------------


def piece_segmentation(base: Base, piece: str) -> list[int]:
    """Base ids of a piece in the model's form (the model alone: a piece lies inside one pre-token)."""
    return [t.id for t in base.tok.model.tokenize(piece)]


def text_segmentation(base: Base, text: str) -> list[int]:
    return base.tok.encode(text, add_special_tokens=False).ids


def slot_kind(base: Base, slot: int) -> str:
    return "unused_row" if slot >= base.n_ids else "ngram"


def make_rule(base: Base, slot: int, kind: str, new_token: str, base_ids: list[int], frozen: bool) -> dict:
    old = base.tokens[slot] if slot < base.n_ids else None
    return {
        "id": slot,
        "kind": kind,
        "old_token": old,
        "old_readable": None if old is None else base.form.readable(old),
        "new_token": new_token,
        "new_readable": new_token if kind == "special" else base.form.readable(new_token),
        "base_ids": base_ids,
        "frozen": frozen,
    }


def yaml_string(value: str | None) -> str:
    """A YAML double-quoted scalar (JSON's escapes, plus the characters YAML may not hold raw)."""
    if value is None:
        return "null"
    text = json.dumps(value, ensure_ascii=False)
    return YAML_UNSAFE.sub(lambda m: "\\u%04x" % ord(m.group()) if ord(m.group()) < 0x10000 else "\\U%08x" % ord(m.group()), text)


def dump_rules(rules: list[dict], base_tokenizer: str, backend: str, header: str) -> str:
    """The rules as YAML, written by hand: fast for 10k+ entries, one stable layout."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += ["version: 1", f"base_tokenizer: {yaml_string(base_tokenizer)}", f"backend: {backend}", "reassignments:"]
    for r in sorted(rules, key=lambda r: r["id"]):
        lines += [
            f"  - id: {r['id']}",
            f"    kind: {r['kind']}",
            f"    old_token: {yaml_string(r['old_token'])}",
            f"    old_readable: {yaml_string(r['old_readable'])}",
            f"    new_token: {yaml_string(r['new_token'])}",
            f"    new_readable: {yaml_string(r['new_readable'])}",
            f"    base_ids: [{', '.join(map(str, r['base_ids']))}]",
            f"    frozen: {str(r['frozen']).lower()}",
        ]
    if not rules:
        lines[-1] = "reassignments: []"
    return "\n".join(lines) + "\n"


# ---- a person's rules file -------------------------------------------------------------------------


def check_rules_file(path: Path, base: Base, rows: int, protected: set[int], backend: str) -> list[dict]:
    """A person's rules file, checked as strictly as selection's own rules and completed (old tokens,
    readable forms, base segmentations): UserError naming the entry otherwise."""
    data = read_rules(path, needs=())
    unknown = set(data) - set(TOP_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown top-level key '{sorted(unknown)[0]}'")
    if data.get("version", 1) != 1:
        raise UserError(f"{path}: version {data['version']!r} is not supported (expected 1)")
    if data.get("backend", backend) != backend:
        raise UserError(f"{path}: written for backend '{data['backend']}' but ivr.backend is '{backend}'")
    seen_ids: dict[int, int] = {}
    seen_tokens: dict[str, int] = {}
    rules = []
    for n, entry in enumerate(data["reassignments"]):
        where = f"{path}: reassignments[{n}]"
        extra = set(entry) - set(RULE_KEYS)
        if extra:
            raise UserError(f"{where}: unknown key '{sorted(extra)[0]}'")
        slot = entry.get("id")
        if not _is_id(slot) or slot >= rows:
            raise UserError(f"{where}: id must be an integer from 0 to {rows - 1}, not {slot!r}")
        where = f"{path}: reassignments[{n}] (id {slot})"
        if slot in seen_ids:
            raise UserError(f"{where}: id {slot} is named twice (also in reassignments[{seen_ids[slot]}])")
        seen_ids[slot] = n
        old = base.tokens[slot] if slot < base.n_ids else None
        if slot in base.special:
            raise UserError(f"{where}: id {slot} is the special token '{old}' and cannot be reassigned")
        if slot in protected:
            raise UserError(f"{where}: id {slot} ('{base.form.readable(old) if old else 'unused row'}') is protected in ivr.protected_ids")
        if slot < base.n_ids and base.single_byte(slot):
            raise UserError(f"{where}: id {slot} is the single-byte token '{old}' and cannot be reassigned")
        if old is None and slot < base.n_ids:
            raise UserError(f"{where}: id {slot} is not a token of the base tokenizer")
        if backend == "bpe" and slot in base.built_on:
            raise UserError(f"{where}: id {slot} ('{base.form.readable(old)}') is a part of other merges; the bpe backend can only reassign tokens no merge builds on")
        if "old_token" in entry and entry["old_token"] != old:
            raise UserError(f"{where}: old_token {entry['old_token']!r} does not match the base tokenizer's {old!r}")
        kind = entry.get("kind", "ngram")
        if kind not in KINDS:
            raise UserError(f"{where}: kind must be ngram, special or unused_row, not {kind!r}")
        if kind != "special":
            expected_kind = slot_kind(base, slot)
            if kind != expected_kind:
                raise UserError(f"{where}: kind {kind} does not fit the slot (expected {expected_kind})")
        new = entry.get("new_token")
        if not isinstance(new, str) or not new:
            raise UserError(f"{where}: new_token must be a non-empty string")
        if kind != "special" and not base.form.is_piece(new):
            raise UserError(f"{where}: new_token {new!r} is not a token string of the base vocabulary's kind "
                            "(write it as the base vocabulary does, e.g. 'Ġ' or '▁' for a space, never <0xNN> bytes)")
        if new in base.ids:
            raise UserError(f"{where}: new_token {new!r} is already token {base.ids[new]} of the base tokenizer")
        if new in seen_tokens:
            raise UserError(f"{where}: new_token {new!r} is named twice (also in reassignments[{seen_tokens[new]}])")
        seen_tokens[new] = n
        frozen = entry.get("frozen", False)
        if not isinstance(frozen, bool):
            raise UserError(f"{where}: frozen must be true or false")
        if kind == "special":
            base_ids = entry.get("base_ids")
            if not (isinstance(base_ids, list) and base_ids and all(isinstance(i, int) and 0 <= i < base.n_ids for i in base_ids)):
                raise UserError(f"{where}: a special token needs base_ids, the base ids its rows start from")
        else:
            base_ids = piece_segmentation(base, new)
            if "base_ids" in entry and entry["base_ids"] != base_ids:
                raise UserError(f"{where}: base_ids {entry['base_ids']} are not the base segmentation {base_ids} of {new!r}")
        rule = make_rule(base, slot, kind, new, base_ids, frozen)
        for key in ("old_readable", "new_readable"):
            if key in entry and entry[key] != rule[key]:
                raise UserError(f"{where}: {key} {entry[key]!r} does not match {rule[key]!r}")
        rules.append(rule)
    return rules
