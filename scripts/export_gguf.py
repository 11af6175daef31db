#!/usr/bin/env python3
"""Export a Hugging Face Llama folder (results/final_model) as GGUF files that llama.cpp and ollama run.

Writes F16 with the `gguf` package (ivr/gguf_export.py) and every other type with llama.cpp's own
quantiser, then checks each file in llama.cpp itself (llama-cpp-python): on the --check texts it must
tokenize every document into exactly the transformers tokenizer's ids, or nothing is written. The
report gives those counts and, for the F16 file, the largest absolute next-token logit difference
against transformers and how many greedy tokens agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_outputs, log, run_main  # noqa: E402
from ivr.corpus import iter_jsonl_texts  # noqa: E402
from ivr.gguf_export import compare_ids, compare_logits, ftype, gguf_type, open_gguf, quantize, write_f16  # noqa: E402


def pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{what} {value!r}: expected NAME=PATH")
        out.append((name, path))
    return out


def first_documents(path: str, count: int) -> list[str]:
    texts = []
    for text in iter_jsonl_texts(path):
        if len(texts) == count:
            break
        texts.append(text)
    return texts


def export(model: Path, outs: list[tuple[str, str]], checks: list[tuple[str, str]], report: Path | None,
           documents: int, prompts: int, prompt_tokens: int, new_tokens: int, threads: int,
           base_gguf: Path | None = None) -> dict:
    import shutil

    from transformers import AutoTokenizer

    from ivr.modeling import load_causal_lm

    if not (model / "config.json").is_file():
        raise UserError(f"{model}: not a model folder (no config.json)")
    if any(name == "base" for name, _ in outs) and base_gguf is None:
        raise UserError("--out base=...: the type of the base model's GGUF needs --base-gguf")
    outs = [(gguf_type(base_gguf) if name == "base" else name, path) for name, path in outs]
    for name, _ in outs:
        ftype(name)
    texts = {name: first_documents(path, documents) for name, path in checks}
    finals = [Path(path) for _, path in outs] + ([report] if report else [])
    with atomic_outputs(*finals) as tmps:
        files = list(zip([name for name, _ in outs], tmps))
        f16 = next((path for name, path in files if name == "F16"), tmps[0].parent / "f16.gguf")
        write_f16(model, f16)
        log.info("wrote F16 (%.1f MiB)", f16.stat().st_size / 2**20)
        for name, path in files:
            if name == "F16" and path != f16:
                shutil.copyfile(f16, path)
            elif name != "F16":
                quantize(f16, path, name, threads)
                log.info("quantised to %s (%.1f MiB)", name, path.stat().st_size / 2**20)
        tokenizer = AutoTokenizer.from_pretrained(model)
        result = {"model": str(model), "files": {}}
        for (name, path), (_, final) in zip(files, outs):
            llm = open_gguf(path, vocab_only=True)
            ids = {text: compare_ids(llm, tokenizer, docs, f"{final}: {text}") for text, docs in texts.items()}
            result["files"][Path(final).name] = {"type": name, "ids": ids}
            del llm
        if prompts and texts:
            prompt_ids = [tokenizer(doc, add_special_tokens=False)["input_ids"][:prompt_tokens]
                          for docs in texts.values() for doc in docs[:prompts]]
            llm = open_gguf(f16, n_ctx=prompt_tokens + new_tokens + 8, threads=threads, logits_all=True)
            result["f16"] = compare_logits(llm, load_causal_lm(model, dtype="float32"), prompt_ids, new_tokens)
            del llm
        log.info("checked in llama.cpp: %s", json.dumps(result))
        if report:
            tmps[-1].write_text(json.dumps(result, indent=2) + "\n")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face Llama folder")
    parser.add_argument("--out", action="append", required=True, metavar="TYPE=PATH",
                        help="a GGUF file to write and its type (F16, Q8_0, Q4_1, Q4_K_M, ..., or base); repeat for more")
    parser.add_argument("--check", action="append", default=[], metavar="NAME=PATH",
                        help="texts (JSON lines with 'text', as ingest writes them) llama.cpp must tokenize alike")
    parser.add_argument("--check-documents", type=int, default=50, help="documents checked per text")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per text for logits and greedy tokens")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens compared after each prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base-gguf", type=Path, help="the base model's GGUF, whose type --out base=PATH names")
    parser.add_argument("--report", type=Path, help="JSON file of the checks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    export(args.model, pairs(args.out, "--out"), pairs(args.check, "--check"), args.report, args.check_documents,
           args.prompts, args.prompt_tokens, args.new_tokens, args.threads, args.base_gguf)


if __name__ == "__main__":
    run_main(main)
