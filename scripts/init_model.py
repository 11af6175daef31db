#!/usr/bin/env python3
"""Write the initialized model: the base model with the reordered embedding rows and the remapped tokenizer.

Shapes and vocabulary size stay those of the base model; weights are saved as safetensors. The
folder is checked before it is moved into place: it loads with AutoModelForCausalLM and AutoTokenizer,
its rows are the reordered ones, and it generates.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_path, log, run_main  # noqa: E402
from ivr.files import read_json  # noqa: E402
from ivr.remap_rules import Reassignment, load_reassignments  # noqa: E402
from ivr.tokenization import load_tokenizer  # noqa: E402

# Files of the model itself, written by save_pretrained; a tokenizer folder must not override them.
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json", "README.md"}


def load_reordered(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    if "input_embeddings" not in tensors:
        raise UserError(f"{path}: holds no 'input_embeddings' tensor")
    return tensors["input_embeddings"], tensors.get("output_embeddings")


def check_tokenizer(tokenizer, reassignments: list[Reassignment], rows: int, where: str) -> None:
    """The remapped tokenizer must fit the embedding and hold each new token at its reassigned id."""
    if len(tokenizer) > rows:
        raise UserError(f"{where}: tokenizer has {len(tokenizer)} tokens, more than the model's {rows} embedding rows")
    for r in reassignments:
        got = tokenizer.convert_tokens_to_ids(r.new_token)
        if got != r.id:
            raise UserError(
                f"{where}: new token {r.new_token!r} of reassigned id {r.id} is id {got} in the tokenizer; "
                "the tokenizer and the remap rules do not match"
            )


def model_card(base_model: str, meta: dict, n_reassigned: int, kinds: dict[str, int]) -> str:
    what = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in kinds.items() if n) or "none"
    return (
        "---\nlibrary_name: transformers\ntags: [ivr, in-place-vocabulary-reassignment]\n---\n"
        f"# Initialized IVR model\n\n"
        f"`{base_model}` with in-place vocabulary reassignment: {n_reassigned} token ids ({what}) now stand for new "
        f"tokens of the remapped tokenizer, their embedding rows initialised by `{meta.get('strategy')}` "
        f"(seed {meta.get('seed')}, {'tied' if meta.get('tied') else 'untied'} head) from the new tokens' base "
        "sub-tokens; all other weights are the base model's, shapes and vocabulary size unchanged. "
        "Not trained yet.\n"
    )


def initialize(model, input_matrix: torch.Tensor, output_matrix: torch.Tensor | None) -> None:
    from ivr.modeling import embedding_layout, set_embedding_matrices

    layout = embedding_layout(model)
    vocab_before = model.config.vocab_size
    set_embedding_matrices(model, input_matrix, output_matrix)
    if embedding_layout(model) != layout or model.config.vocab_size != vocab_before:
        raise UserError("setting the embeddings changed the model's shape or vocabulary size")


def check_folder(
    folder: Path, input_matrix: torch.Tensor, output_matrix: torch.Tensor | None, ids: list[int], trust_remote_code: bool = False
) -> str:
    """Reload the written folder, compare its reassigned rows, and generate a few tokens; returns the text."""
    from ivr.modeling import embedding_matrices, load_causal_lm

    model = load_causal_lm(folder, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    got_in, got_out = embedding_matrices(model)
    index = torch.tensor(ids, dtype=torch.long)
    if not torch.equal(got_in[index], input_matrix[index].to(got_in.dtype)) or (
        output_matrix is not None and not torch.equal(got_out[index], output_matrix[index].to(got_out.dtype))
    ):
        raise UserError(f"{folder}: the saved model's reassigned rows differ from the reordered embeddings")
    prompt = torch.tensor([[tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]])
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, 1:].tolist())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", required=True, help="base model folder (safetensors) or hub id")
    parser.add_argument("--embeddings", required=True, type=Path, help="reordered.safetensors")
    parser.add_argument("--embeddings-meta", required=True, type=Path, help="reordered.json")
    parser.add_argument("--tokenizer", required=True, type=Path, help="remapped tokenizer folder")
    parser.add_argument("--rules", required=True, type=Path, help="remap_rules.yaml")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--out", required=True, type=Path, help="model folder to write")
    args = parser.parse_args(argv)

    from ivr.modeling import embedding_layout, load_causal_lm

    if not args.tokenizer.is_dir():
        raise UserError(f"{args.tokenizer}: remapped tokenizer folder does not exist")
    meta = read_json(args.embeddings_meta, "embeddings metadata")
    reassignments = load_reassignments(args.rules)
    ids = [r.id for r in reassignments]
    if meta.get("ids") != ids:
        raise UserError(f"{args.embeddings_meta}: its reassigned ids are not those of {args.rules}; rebuild the embeddings")
    input_matrix, output_matrix = load_reordered(args.embeddings)

    model = load_causal_lm(args.base_model, trust_remote_code=args.trust_remote_code)
    layout = embedding_layout(model)
    tokenizer = load_tokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code)
    check_tokenizer(tokenizer, reassignments, layout.rows, str(args.tokenizer))
    initialize(model, input_matrix, output_matrix)

    with atomic_path(args.out) as out:
        model.save_pretrained(out)
        for path in sorted(args.tokenizer.iterdir()):
            if path.is_file() and path.name not in MODEL_FILES:
                shutil.copyfile(path, out / path.name)
        (out / "README.md").write_text(model_card(str(args.base_model), meta, len(ids), meta.get("kinds", {})), encoding="utf-8")
        sample = check_folder(out, input_matrix, output_matrix, ids, args.trust_remote_code)
        log.info("reloaded %s: %d reassigned rows in place; greedy sample %r", args.out, len(ids), sample)


if __name__ == "__main__":
    run_main(main)
