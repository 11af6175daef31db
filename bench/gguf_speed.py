#!/usr/bin/env python3
"""Benchmark: the IVR model's GGUF against the base model's GGUF of the same type, in llama.cpp on CPU.

On the first --prompts domain documents, each cut to --prompt-bytes of UTF-8 (at a character boundary),
each model (1) processes the prompt in one batch from an empty cache, then (2) generates exactly
--new-tokens tokens greedily, end-of-generation and other control tokens suppressed (the base model,
given Korean text, otherwise repeats <|im_start|>, which is no text), then (3) decodes the document's
next --continuation-bytes as generation does, one token per step with the next-token choice made, but
each step fed the text's own next token. (2) times what the model writes, which for a model that has not
learnt to write the domain in its new tokens is not domain text; (3) times writing the domain's own text,
the same bytes for both models. Prints all three as bytes of text per second and the ratios IVR / base,
measured in the same run, once, after one warm-up per model; --json also gets each model's continuation
of the first prompt.

    python bench/gguf_speed.py --ivr results/final_model.gguf \\
        --base resources/assets/smollm2_gguf/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --texts results/corpus/domain/heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from ivr.cli import UserError, run_main  # noqa: E402
from ivr.corpus import iter_jsonl_texts  # noqa: E402
from ivr.gguf_export import gguf_type, llama_ids, open_gguf  # noqa: E402


def prompts_of(path: Path, count: int, size: int, continuation: int) -> list[tuple[str, str]]:
    """(prompt, continuation): the first size bytes of each document and the next continuation bytes, both
    cut at character boundaries; documents shorter than size + continuation bytes are passed over."""
    out = []
    for text in iter_jsonl_texts(path):
        if len(out) == count:
            break
        data = text.encode("utf-8")
        if len(data) >= size + continuation:
            prompt = data[:size].decode("utf-8", "ignore")
            rest = data[len(prompt.encode("utf-8")):][:continuation].decode("utf-8", "ignore")
            out.append((prompt, rest))
    if not out:
        raise UserError(f"{path}: holds no document of {size + continuation} bytes or more")
    return out


class Runner:
    """One GGUF in llama.cpp: a prompt processed in one batch from an empty cache, then greedy tokens."""

    def __init__(self, path: Path, prompts: list[str], new_tokens: int, threads: int):
        import llama_cpp

        # ids <= bytes (BPE with bytes as its base alphabet)
        n_ctx = max(len((p + c).encode("utf-8")) for p, c in prompts) + new_tokens + 16
        self.path, self.new_tokens, self.prompts = path, new_tokens, prompts
        self.llm = open_gguf(path, n_ctx=n_ctx, threads=threads)
        vocab = self.llm._model.vocab
        self.banned = [t for t in range(self.llm.n_vocab())
                       if llama_cpp.llama_vocab_is_eog(vocab, t) or llama_cpp.llama_vocab_is_control(vocab, t)]
        self.continuations: list[list[int]] = []  # the greedy ids after each prompt run
        self.totals = dict.fromkeys(("prompt_bytes", "prompt_tokens", "prompt_seconds", "generated_bytes",
                                     "generated_tokens", "generation_seconds", "forced_bytes", "forced_tokens",
                                     "forced_seconds"), 0)

    def step(self, token: int | None) -> int:
        """One decoding step: the greedy choice from the context's last logits, then token (or that choice) fed."""
        import llama_cpp
        import numpy as np

        llm = self.llm
        # the context's last logits: llm.scores holds them only when every position's are kept
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
        logits[self.banned] = -np.inf
        choice = int(np.argmax(logits))
        llm.eval([choice if token is None else token])
        return choice

    def run(self, prompt: str, continuation: str) -> dict:
        llm, ids = self.llm, llama_ids(self.llm, prompt)

        def prompt_pass() -> float:
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            return time.perf_counter() - start

        prompt_seconds = prompt_pass()
        start = time.perf_counter()
        generated = []
        for _ in range(self.new_tokens):
            generated.append(self.step(None))
        generation_seconds = time.perf_counter() - start
        self.continuations.append(generated)
        prompt_pass()
        forced = llama_ids(llm, continuation)
        start = time.perf_counter()
        for token in forced:
            self.step(token)
        forced_seconds = time.perf_counter() - start
        return {"prompt_bytes": len(prompt.encode("utf-8")), "prompt_tokens": len(ids), "prompt_seconds": prompt_seconds,
                "generated_bytes": len(llm.detokenize(generated)), "generated_tokens": len(generated),
                "generation_seconds": generation_seconds, "forced_bytes": len(continuation.encode("utf-8")),
                "forced_tokens": len(forced), "forced_seconds": forced_seconds}

    def add(self, run: dict) -> None:
        for key, value in run.items():
            self.totals[key] += value

    def figures(self) -> dict:
        t = self.totals
        return {"file": str(self.path), "type": gguf_type(self.path), "prompt_tokens_per_byte": t["prompt_tokens"] / t["prompt_bytes"],
                "prompt_bytes_per_second": t["prompt_bytes"] / t["prompt_seconds"],
                "generated_bytes_per_token": t["generated_bytes"] / t["generated_tokens"],
                "generation_bytes_per_second": t["generated_bytes"] / t["generation_seconds"],
                "continuation_tokens_per_byte": t["forced_tokens"] / t["forced_bytes"],
                "continuation_bytes_per_second": t["forced_bytes"] / t["forced_seconds"],
                "first_continuation": {"ids": self.continuations[-len(self.prompts)],
                                       "text": self.llm.detokenize(self.continuations[-len(self.prompts)])
                                       .decode("utf-8", "replace")}}


def measure(paths: dict[str, Path], prompts: list[tuple[str, str]], new_tokens: int, threads: int) -> dict:
    """Each model on every prompt after one warm-up run, one model loaded at a time (a second model's
    idle threads would compete with the first's for the cores)."""
    figures = {}
    for name, path in paths.items():
        runner = Runner(path, prompts, new_tokens, threads)
        runner.run(*prompts[0])
        for prompt in prompts:
            runner.add(runner.run(*prompt))
        figures[name] = runner.figures()
        runner.llm.close()
    return figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ivr", type=Path, required=True, help="the IVR model's GGUF (results/final_model.gguf)")
    parser.add_argument("--base", type=Path, required=True, help="the base model's GGUF of the same type")
    parser.add_argument("--texts", type=Path, required=True, help="domain texts (JSON lines), e.g. the held-out split")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-bytes", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--continuation-bytes", type=int, default=300,
                        help="bytes of each document after its prompt, decoded step by step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import llama_cpp

    args = parse_args(argv)
    for path in (args.ivr, args.base):
        open_gguf(path, vocab_only=True)  # a file llama.cpp cannot load is refused before anything is timed
    types = {"ivr": gguf_type(args.ivr), "base": gguf_type(args.base)}
    if types["ivr"] != types["base"]:
        raise UserError(f"{args.ivr} is {types['ivr']} but {args.base} is {types['base']}: compare GGUFs of the same type")
    prompts = prompts_of(args.texts, args.prompts, args.prompt_bytes, args.continuation_bytes)
    results = measure({"base": args.base, "ivr": args.ivr}, prompts, args.new_tokens, args.threads)
    ratios = {key: results["ivr"][key] / results["base"][key]
              for key in ("prompt_bytes_per_second", "generation_bytes_per_second", "continuation_bytes_per_second")}
    conditions = (f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) on CPU ({platform.processor() or platform.machine()}), "
                  f"{args.threads} threads, batch 1; {len(prompts)} prompts of {args.prompt_bytes} bytes from {args.texts}; "
                  f"{args.new_tokens} greedy tokens each (control tokens suppressed); the next {args.continuation_bytes} "
                  "bytes of each document decoded step by step; one run after one warm-up")
    print(conditions)
    print(f"{'':6} {'type':>6} {'prompt tok/B':>12} {'prompt B/s':>10} {'gen B/token':>11} {'gen B/s':>8} "
          f"{'text tok/B':>10} {'text B/s':>8}")
    for name, r in results.items():
        print(f"{name:6} {r['type']:>6} {r['prompt_tokens_per_byte']:12.3f} {r['prompt_bytes_per_second']:10.1f} "
              f"{r['generated_bytes_per_token']:11.2f} {r['generation_bytes_per_second']:8.1f} "
              f"{r['continuation_tokens_per_byte']:10.3f} {r['continuation_bytes_per_second']:8.1f}")
    print(f"IVR / base, bytes of text per second: prompt processing {ratios['prompt_bytes_per_second']:.2f}x, "
          f"greedy generation {ratios['generation_bytes_per_second']:.2f}x, "
          f"writing the documents' own continuation {ratios['continuation_bytes_per_second']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"conditions": conditions, "models": results, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
