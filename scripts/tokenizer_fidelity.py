#!/usr/bin/env python3
"""Measure how faithfully a candidate tokenizer reproduces a reference tokenizer on text files.

Prints (and with --out writes) JSON: pretoken_agreement (share of the reference's pre-token
occurrences segmented identically), document_agreement (share of documents with identical ids),
decode_roundtrip (share of documents the candidate decodes back to the same text), the counts
behind them, and the same for each file. Tokenizers are folders, tokenizer.json files or hub ids;
text files are UTF-8, .jsonl with one {"text": ...} per line, any other file one document per line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_path, run_main  # noqa: E402
from ivr.fidelity import fidelity_report  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="the tokenizer to reproduce (e.g. the base BPE)")
    parser.add_argument("--candidate", required=True, help="the tokenizer measured (e.g. the distilled Unigram)")
    parser.add_argument("--text", type=Path, nargs="+", required=True,
                        help="UTF-8 text files (.jsonl, or one document per line)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for path in args.text:
        if not path.is_file():
            raise UserError(f"{path}: text file does not exist")
    report = fidelity_report(args.reference, args.candidate, [str(p) for p in args.text], args.trust_remote_code)
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text, encoding="utf-8")
    sys.stdout.write(text)


if __name__ == "__main__":
    run_main(main)
