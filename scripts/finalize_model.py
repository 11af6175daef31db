#!/usr/bin/env python3
"""Write results/final_model: the fine-tuned model a user loads with from_pretrained, if the gates pass.

Reads the validation report; when a gate failed, stops with one line per failed gate naming it, its
threshold and the measured value, and writes nothing. Otherwise copies the fine-tuned model with its
remapped tokenizer, adds the base model's chat template and generation config where missing, the remap
rules, a model card (README.md) with the headline numbers, how to load it and its provenance, and
PROVENANCE.json (resolved config, checksums of the inputs).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_path, log, run_main  # noqa: E402
from ivr.files import asset_folder, read_json, sha256_of  # noqa: E402
from ivr.remap_rules import read_rules  # noqa: E402


def failed_gates(validation: dict) -> list[str]:
    return [
        f"gate '{g['name']}' failed: measured {g['measured']:.6g}, threshold {g['threshold']:.6g} ({g['rule']})"
        for g in validation["gates"] if not g["passed"]
    ]


def checksums(paths: list[Path]) -> dict[str, str]:
    out = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            out[str(file)] = sha256_of(file)
    return out


def model_card(validation: dict, provenance: dict, repo_name: str) -> str:
    head = validation["headline"]
    pct = lambda v: f"{v * 100:.1f} %" if v is not None else "–"  # noqa: E731
    num = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
    base = provenance["base_model"]
    return f"""---
library_name: transformers
tags: [vocabulary-adaptation, ivr]
---
# {repo_name}

{base['name']} with its vocabulary reassigned in place for the domain corpus: {provenance['reassigned']} token
slots that the domain never needed now hold frequent domain pieces; their embeddings were rebuilt and
the model fine-tuned. Vocabulary size and model shape are unchanged.

| held-out measure | base | control | IVR |
|---|---|---|---|
| domain tokens per byte | {num(head['domain_tokens_per_byte']['base'])} | {num(head['domain_tokens_per_byte']['base'])} | {num(head['domain_tokens_per_byte']['ivr'])} |
| domain bits per byte | {num(head['domain_bpb'].get('base'))} | {num(head['domain_bpb'].get('control'))} | {num(head['domain_bpb'].get('sft'))} |
| general-text bits per byte | {num(head['general_bpb'].get('base'))} | {num(head['general_bpb'].get('control'))} | {num(head['general_bpb'].get('sft'))} |
| generation, bytes of text per second | {num(head['generation_bytes_per_second'].get('base'))} | {num(head['generation_bytes_per_second'].get('control'))} | {num(head['generation_bytes_per_second'].get('sft'))} |

Domain text needs {pct(head['domain_tokens_per_byte_reduction'])} fewer tokens than with the base tokenizer.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_name}")
model = AutoModelForCausalLM.from_pretrained("{repo_name}")
inputs = tokenizer("제안이유", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))
```

Use this tokenizer, not the base model's: the reassigned ids mean other strings now. `remap_rules.yaml`
lists every reassigned id with its old and new token.

## Provenance

- Base model: {base['name']} ({base['form']}); licence {base.get('licence', 'see the base model')}.
- Domain corpus: {provenance['corpus']}.
- General text: {provenance['general_corpus']}.
- The resolved configuration and SHA-256 checksums of every input are in `PROVENANCE.json`.
"""


def asset_source(path: str | Path) -> dict | None:
    """SOURCE.json of the fetched asset that holds path (config/assets.yaml's entry), if it is one."""
    folder = asset_folder(path)
    source = Path(folder) / "SOURCE.json" if folder else None
    return read_json(source, "asset source") if source and source.exists() else None


def card_licence(folder: Path) -> str | None:
    """The `license:` of a Hugging Face model card's front matter (README.md), if there is one."""
    card = folder / "README.md"
    match = re.match(r"---\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S) if card.is_file() else None
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    return str(meta["license"]) if isinstance(meta, dict) and meta.get("license") else None


def gguf_licence(path: Path) -> str | None:
    """A GGUF file's general.license, if it records one."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.license")
        return bytes(field.parts[field.data[0]]).decode() if field else None
    except Exception:  # provenance only: never fail over it
        return None


def describe_base(base_model: str, reference: str | None = None) -> dict:
    """Name, form and licence of the base model: base_model is the folder the workflow loads, reference
    the config's base_model (a GGUF it was converted from, an asset). The licence is the asset's
    (config/assets.yaml), else the model card's, else the GGUF's."""
    path, reference = Path(base_model), reference or base_model
    info = {"name": path.name if path.exists() else base_model, "form": "as published"}
    provenance = path / "PROVENANCE.json"
    if provenance.exists():
        data = read_json(provenance, "model provenance")
        info["form"] = data.get("form", info["form"])
        info["source"] = data.get("source")
        info["name"] = data.get("source", info["name"]).split(".")[0]
    licence = ((asset_source(reference) or asset_source(base_model) or {}).get("licence") or card_licence(path)
               or (gguf_licence(Path(reference)) if reference.endswith(".gguf") and Path(reference).is_file() else None))
    if licence:
        info["licence"] = licence
    return info


def describe_corpus(paths: list[str]) -> str:
    parts = []
    for raw in paths:
        source = asset_source(raw)
        parts.append(f"{source['description']} (licence {source['licence']})" if source else raw)
    return "; ".join(parts) or "none"


def read_validation(path: Path) -> dict:
    validation = read_json(path, "validation report")
    if not isinstance(validation, dict) or not isinstance(validation.get("gates"), list) or "headline" not in validation:
        raise UserError(f"{path}: not a validation report of validate.py (needs 'gates' and 'headline')")
    return validation


def check_model(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"{path}: fine-tuned model folder does not exist")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{path}: holds no .safetensors weights; not a fine-tuned model folder")


def finalize(args: argparse.Namespace) -> None:
    check_model(args.model)
    validation = read_validation(args.validation)
    failures = failed_gates(validation)
    if failures:
        raise UserError(f"{args.validation}: " + "; ".join(failures) + " (see the report beside it; no final model written)")
    config = args.config or {}
    rules = read_rules(args.rules)
    provenance = {
        "base_model": describe_base(args.base_model, config.get("base_model")),
        "reassigned": len(rules["reassignments"]),
        "corpus": describe_corpus(config.get("corpus", {}).get("paths", [])),
        "general_corpus": describe_corpus((config.get("general_corpus") or {}).get("paths", [])),
        "config": config,
        "inputs_sha256": checksums([p for p in args.inputs if p.exists()]),
    }
    with atomic_path(args.out) as tmp:
        # what a user loads, without training's records (checkpoints, TensorBoard logs), which stay where they are
        shutil.copytree(args.model, tmp, ignore=lambda folder, names: [
            n for n in names if Path(folder) == args.model and n in ("checkpoints", "tensorboard")])
        base = Path(args.base_model)
        for name in ("chat_template.jinja", "generation_config.json"):
            if (base / name).exists() and not (tmp / name).exists():
                shutil.copy2(base / name, tmp / name)
        shutil.copy2(args.rules, tmp / "remap_rules.yaml")
        shutil.copy2(args.validation, tmp / "validation.json")
        (tmp / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
        (tmp / "README.md").write_text(model_card(validation, provenance, args.out.name), encoding="utf-8")
    log.info("wrote %s", args.out)


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the fine-tuned model folder")
    parser.add_argument("--validation", type=Path, required=True, help="validation.json")
    parser.add_argument("--rules", type=Path, required=True, help="remap_rules.yaml")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--config", type=json_object, help="the resolved configuration, as JSON")
    parser.add_argument("--inputs", type=Path, nargs="*", default=[], help="input files to checksum")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    finalize(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
