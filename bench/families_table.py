#!/usr/bin/env python3
"""The families table: for workflow copies that ran to results/final_model (tests/test_families.py with
--basetemp), Korean tokens per byte base -> IVR (held-out bills, and the unseen Korean GNOME help), and
pre-token agreement of the remapped tokenizer with the base on unseen English (convention speeches) and
unseen Korean (GNOME help).

    pytest -q -s tests/test_families.py --basetemp=/tmp/fam
    python bench/families_table.py /tmp/fam/test_the_dag_writes_the_final_*/workflow
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from tokenizers import Tokenizer  # noqa: E402

from ivr.fidelity import measure_fidelity, read_texts  # noqa: E402

ASSETS = ROOT / "resources" / "assets"


def main() -> None:
    english = list(read_texts(ASSETS / "convention_speeches" / "documents.jsonl"))
    korean = list(read_texts(ASSETS / "gnome_help_ko" / "documents.jsonl"))
    print("| family | bills tokens/byte base -> IVR | GNOME help tokens/byte base -> IVR | agreement English, Korean | final_model |")
    print("|---|---|---|---|---|")
    for workdir in map(Path, sys.argv[1:]):
        model = next(p for p in (workdir / "resources" / "models").iterdir() if p.name != "tiny-gpt2")
        base = Tokenizer.from_file(str(model / "tokenizer.json"))
        remapped = Tokenizer.from_file(str(workdir / "results" / "tokenizer" / "remapped" / "tokenizer.json"))
        bills = json.loads((workdir / "results" / "remap" / "compression.json").read_text())["corpora"]["domain_heldout"]
        on_english, on_korean = measure_fidelity(base, remapped, english), measure_fidelity(base, remapped, korean)
        print(f"| {model.name.removeprefix('tiny-')} | {bills['base_tokens_per_byte']:.4f} -> {bills['remapped_tokens_per_byte']:.4f} "
              f"| {on_korean['reference_tokens'] / on_korean['bytes']:.4f} -> {on_korean['candidate_tokens'] / on_korean['bytes']:.4f} "
              f"| {on_english['pretoken_agreement']:.5f}, {on_korean['pretoken_agreement']:.5f} "
              f"| {(workdir / 'results' / 'final_model' / 'model.safetensors').exists()} |")


if __name__ == "__main__":
    main()
