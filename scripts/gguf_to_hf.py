#!/usr/bin/env python3
"""Turn a GGUF model file into a normal Hugging Face model folder (safetensors), once.

Transformers dequantizes the GGUF weights (e.g. Q4_1) to float32 on load; the tokenizer is rebuilt
from the GGUF's vocabulary for each llama.cpp tokenizer type (ivr/gguf_vocab.py), and a type it does
not know is refused before anything is read. The folder written here holds config.json,
model.safetensors, generation_config.json and the tokenizer, so later stages load it like any local
model. A PROVENANCE.json records the source file, its checksum and form.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_path, first_line, log, run_main  # noqa: E402
from ivr.files import sha256_of  # noqa: E402
from ivr.gguf_vocab import gguf_tokenizer  # noqa: E402


def convert(gguf: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    if not gguf.is_file():
        raise UserError(f"{gguf}: GGUF file does not exist")
    with open(gguf, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"{gguf}: not a GGUF file (bad magic number)")
    tokenizer = gguf_tokenizer(gguf)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # the GGUF reader raises many kinds on a damaged file
        raise UserError(f"{gguf}: cannot read the GGUF file ({type(err).__name__}: {first_line(err)[:200]})") from None
    # The loaded weights are plain float32, but the model still carries the GGUF quantizer, which
    # refuses to save: rebuild a clean model from the config and move the weights over.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    model = clean
    quant = _quantization(gguf)
    provenance = {
        "source": gguf.name,
        "sha256": sha256_of(gguf),
        "form": f"dequantized to float32 from {quant} GGUF" if quant else "converted from GGUF",
        "architecture": type(model).__name__,
    }
    with atomic_path(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("wrote %s (%s, %d parameters)", out, provenance["form"], model.num_parameters())
    return provenance


def _quantization(gguf: Path) -> str | None:
    """The file type GGUF records (e.g. Q4_1), or None when it cannot be read."""
    try:
        from gguf import GGUFReader, LlamaFileType

        field = GGUFReader(str(gguf)).fields.get("general.file_type")
        return LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_") if field else None
    except Exception:  # provenance only: never fail the conversion over it
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path, help="the .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="Hugging Face model folder to create")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    convert(args.gguf, args.out)


if __name__ == "__main__":
    run_main(main)
