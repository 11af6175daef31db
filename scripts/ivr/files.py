"""Files and paths the stages share: JSON and YAML read with one-line errors, checksums, which names can
only be local paths, and where the fetched demo assets land."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ivr.cli import UserError, first_line

ASSETS = ("resources", "assets")  # fetched assets land in resources/assets/<name>/ (rules/fetch_assets.smk)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The value of a JSON file; UserError '<path>: <what> does not exist' or '<path>: not a readable <what> (...)'."""
    return _read(Path(path), what, json.loads)


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """The value of a YAML file (safe loader, the C one when there is one), with read_json's errors."""
    return _read(Path(path), what, lambda text: yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def _read(path: Path, what: str, parse) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: {what} does not exist")
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{path}: not a readable {what} ({first_line(err)})") from None


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def looks_local(name: str) -> bool:
    """A model or tokenizer reference that can only be a local path (hub ids are 'name' or 'owner/name')."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith((".gguf", ".json"))


def asset_folder(path: str | os.PathLike) -> str | None:
    """resources/assets/<name> when path lies inside a fetched asset's folder (a rule fetches it), else None."""
    parts = Path(path).parts
    return str(Path(*parts[:3])) if len(parts) >= 3 and parts[:2] == ASSETS else None
