"""The training settings: the `training:` section of the workflow config, with schema defaults and
--set overrides (scripts/train_sft.py, bench/train_throughput.py)."""

from __future__ import annotations

import json

import yaml

from ivr.cli import UserError
from ivr.config import SCHEMA, fill_defaults, validate_config
from ivr.files import read_yaml


def parse_value(text: str):
    """A --set value: JSON first (so 1e-3 is a number, which YAML 1.1 reads as a string), else YAML."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str], option: str = "--set") -> dict:
    """raw with each KEY=VALUE of overrides set in place (dotted keys reach into sections; values as
    parse_value reads them)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{option} {item}: expected KEY=VALUE")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(value)
    return raw


def resolve_settings(raw: dict | None, overrides: list[str] = (), validate: bool = True) -> dict:
    """The training settings with schema defaults filled in; --set KEY=VALUE (dotted keys) applied first."""
    raw = apply_overrides(json.loads(json.dumps(raw or {})), overrides)
    if not validate:  # the GPU benchmark runs where jsonschema may be missing: defaults only
        schema = yaml.safe_load(SCHEMA.read_text())
        config = {"training": raw}
        fill_defaults(config, schema, schema)
        return config["training"]
    return validate_config({"training": raw}, source="training settings")["training"]


def read_settings_arg(value: str | None) -> dict:
    """--settings: inline JSON (what the rule passes), or a YAML/JSON file whose training: section is used."""
    if not value:
        return {}
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f"--settings: not valid JSON ({err.msg})") from None
    data = read_yaml(value, "settings file") or {}
    return data.get("training", data) if isinstance(data, dict) else {}


def branch_settings(training: dict, branch: str) -> dict:
    """The training settings of one branch (ivr or control), holding only what that branch uses, so that
    changing the IVR budget does not rerun the control, nor the control's learning rate the IVR model."""
    settings = dict(training)
    control = {key: settings.pop(f"control_{key}") for key in ("lr", "interpolation", "stage2")}
    if branch == "control":
        settings.pop("budget")
        settings.update({key: value for key, value in control.items() if value is not None})
        settings["interpolation_anchor"] = "start"  # the base: the control has no stage 1
    return settings
