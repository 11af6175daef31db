"""The workflow's configuration: defaults from config/schema.yaml, validation with one-line errors."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from ivr.cli import UserError

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


def _describe(error) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        key = f"{where}.{extra[0]}" if where else extra[0]
        return f"unknown key '{key}' (allowed here: {', '.join(known)})"
    if error.validator in ("oneOf", "anyOf") and error.context:
        return _describe(min(error.context, key=lambda e: len(list(e.absolute_path)) * -1))
    return f"key '{where or '(top level)'}': {error.message}"


def validate_config(config: dict, source: str = "config", schema_path: Path = SCHEMA) -> dict:
    """Validated copy of config with defaults filled in; UserError naming the key on any problem."""
    import jsonschema

    schema = yaml.safe_load(schema_path.read_text())
    config = copy.deepcopy(config or {})
    if not isinstance(config, dict):
        raise UserError(f"{source}: the configuration must be a mapping of keys to values")
    fill_defaults(config, schema, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(e.absolute_path), e.message))
    if errors:
        raise UserError(f"{source}: {_describe(jsonschema.exceptions.best_match(errors))}")
    return config


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: config file does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return validate_config(raw, str(path))
