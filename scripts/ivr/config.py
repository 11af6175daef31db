"""The workflow's configuration: defaults from config/schema.yaml, validation with one-line errors."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from ivr.cli import UserError
from ivr.files import asset_folder, looks_local

SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _object_branch(schema: dict, root: dict) -> dict | None:
    schema = _resolve(schema, root)
    if "properties" in schema:
        return schema
    for branch in schema.get("oneOf", []) + schema.get("anyOf", []):
        branch = _resolve(branch, root)
        if "properties" in branch:
            return branch
    return None


def fill_defaults(value: dict, schema: dict, root: dict) -> None:
    """Fill in every missing key that has a default, at every depth (through $ref and oneOf)."""
    branch = _object_branch(schema, root)
    if branch is None or not isinstance(value, dict):
        return
    for key, sub in branch["properties"].items():
        sub_resolved = _resolve(sub, root)
        if key not in value and "default" in sub_resolved:
            value[key] = copy.deepcopy(sub_resolved["default"])
        if isinstance(value.get(key), dict):
            fill_defaults(value[key], sub, root)


def _describe(error) -> tuple[list, str]:
    """The key path an error is about, and a line saying what is wrong."""
    parts = list(error.absolute_path)
    where = ".".join(str(p) for p in parts)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        key = f"{where}.{extra[0]}" if where else extra[0]
        return [*parts, extra[0]], f"unknown key '{key}' (allowed here: {', '.join(known)})"
    if error.validator in ("oneOf", "anyOf") and error.context:
        return _describe(min(error.context, key=lambda e: len(list(e.absolute_path)) * -1))
    if error.validator == "not" and "description" in error.validator_value:  # a combination the schema refuses
        return parts, error.validator_value["description"]
    return parts, f"key '{where or '(top level)'}': {error.message}"


ConfigSources = list[str | tuple[str, dict]] | None


def file_holding(parts: list, files: ConfigSources) -> str | None:
    """Of config files (or (label, values) pairs such as Snakemake's --config) listed lowest precedence
    first, the one whose value at the key path is in effect."""
    for entry in reversed(files or []):
        name, node = entry if isinstance(entry, tuple) else (entry, None)
        if node is None:
            try:
                node = yaml.safe_load(Path(name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue
        for part in parts:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                break
        else:
            return name
    return None


def validate_config(config: dict, source: str = "config", schema_path: Path = SCHEMA, files: ConfigSources = None) -> dict:
    """Validated copy of config with defaults filled in; UserError naming the key on any problem (and the
    file that set it, when `files`, the config files lowest precedence first, are given)."""
    import jsonschema

    schema = yaml.safe_load(schema_path.read_text())
    config = copy.deepcopy(config or {})
    if not isinstance(config, dict):
        raise UserError(f"{source}: the configuration must be a mapping of keys to values")
    fill_defaults(config, schema, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(e.absolute_path), e.message))
    if errors:
        parts, message = _describe(jsonschema.exceptions.best_match(errors))
        raise UserError(f"{file_holding(parts, files) or source}: {message}")
    return config


def read_configs(files: list[str]) -> dict:
    """config/config.yaml and then each of `files`, merged key by key as Snakemake merges --configfile
    values, validated."""
    def merge(base: dict, over: dict) -> dict:
        for key, value in over.items():
            base[key] = merge(base.get(key, {}), value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return base

    config: dict = {}
    names = ["config/config.yaml", *files]
    for name in names:
        merge(config, yaml.safe_load(Path(name).read_text(encoding="utf-8")) or {})
    return validate_config(config, source=" + ".join(names))


def check_input_paths(config: dict, source: str = "config", root: str | Path = ".", files: ConfigSources = None) -> None:
    """Every input path the user names must exist before any job runs; UserError naming the key otherwise.

    Without this, Snakemake reports a missing user file as a multi-line MissingInputException (or a
    cyclic dependency); paths of the demo assets are exempt, a rule fetches them.
    """
    root = Path(root)
    named: list[tuple[list, str]] = []  # (key path, path)
    for corpus in ("corpus", "general_corpus"):
        dataset = (config.get(corpus) or {}).get("dataset")
        if dataset:  # a local dataset folder must exist; a hub id is looked up when ingest runs
            named += [([corpus, "dataset", "name"], dataset["name"])] if looks_local(dataset["name"]) else []
        elif config.get(corpus):
            named += [([corpus, "paths", n], p) for n, p in enumerate(config[corpus].get("paths", []))]
    for n, texts in enumerate(config.get("ivr", {}).get("eval_texts", [])):
        named += [(["ivr", "eval_texts", n, "paths", m], p) for m, p in enumerate(texts.get("paths", []))]
    for role, texts in (config.get("unseen_texts") or {}).items():
        for n, text in enumerate(texts):
            named += [(["unseen_texts", role, n, "paths", m], p) for m, p in enumerate(text.get("paths", []))]
    for parts, value in ((["ivr", "rules_file"], config.get("ivr", {}).get("rules_file")),
                         (["training", "sft_data"], config.get("training", {}).get("sft_data"))):
        if value:
            named.append((parts, value))
    for key in ("base_model", "base_tokenizer"):
        value = config.get(key)
        if value and looks_local(value):
            named.append(([key], value))
    for parts, path in named:
        if asset_folder(path):  # a rule fetches it
            continue
        key = ".".join(map(str, parts))
        full = root / os.path.expanduser(path)
        problem = "does not exist" if not full.exists() else None if os.access(full, os.R_OK) else "is not readable (permission denied)"
        if problem:
            raise UserError(f"{file_holding(parts, files) or source}: key '{key}': '{path}' {problem}")
