#!/usr/bin/env python3
"""Pack a training split into fixed-length token blocks for fine-tuning.

Documents (the domain split, plus an optional share of general text against forgetting) are shuffled
with a seed, tokenized without special tokens, joined with the tokenizer's EOS after every document
and cut into blocks of --block-size tokens; the last block is padded. Optional prompt/completion
examples (JSON lines {"prompt", "completion"}) are rendered with the chat template of
--chat-template-from when it has one, packed whole into their own padded blocks, and only their
completion tokens are labels. Writes into --out-dir:

  input_ids.bin   token ids, blocks x block_size, little-endian uint16 (uint32 for vocabularies > 65536)
  loss_mask.bin   uint8, same shape: 1 where the token is a label, 0 for prompts and padding
  meta.json       shapes, dtype, EOS/PAD ids, counts of documents, bytes, tokens and a digest

The mask, not the token id, marks padding: a tokenizer whose PAD equals its EOS still gets its real
EOS tokens as labels. The same documents in the same order reach both branches (IVR, control), so
a fraction of an epoch covers the same text whichever tokenizer cut it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_outputs, log, progress, run_main  # noqa: E402
from ivr.corpus import iter_jsonl_texts, split_line_text  # noqa: E402
from ivr.tokenization import load_tokenizer  # noqa: E402
from ivr.packed_data import interleave, pack_examples  # noqa: E402

BATCH_DOCUMENTS = 256
CHUNK_TOKENS = 1 << 22  # tokens per chunk where whole files are written or copied


def eos_tokenizer(path: str, trust_remote_code: bool = False):
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise UserError(f"{path}: the tokenizer has no EOS token, which packing puts between documents")
    return tok


def select_general(general: list[str], domain_bytes: int, share: float, seed: int) -> list[str]:
    """General documents (seeded order) until they make up `share` of all training bytes."""
    if share <= 0 or not general:
        return []
    want = share / (1 - share) * domain_bytes
    order = np.random.default_rng(seed + 1).permutation(len(general))
    chosen, total = [], 0
    for i in order:
        if total >= want:
            break
        chosen.append(general[i])
        total += len(general[i].encode("utf-8"))
    if total < want:
        log.warning("general text: only %d bytes available, %.1f%% of training bytes instead of %.1f%%",
                    total, 100 * total / (total + domain_bytes), 100 * share)
    return chosen


def encode_all(tok, texts: list[str], what: str) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added), encoded in parallel batches."""
    encode = batch_encoder(tok)
    out: list[np.ndarray] = []
    with progress(total=sum(len(t) for t in texts), unit="char", unit_scale=True, desc=f"tokenizing {what}") as bar:
        for start in range(0, len(texts), BATCH_DOCUMENTS):
            batch = texts[start : start + BATCH_DOCUMENTS]
            out.extend(np.asarray(ids, dtype=np.int32) for ids in encode(batch))
            bar.update(sum(len(t) for t in batch))
    return out


def batch_encoder(tok):
    backend = tok.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


class Split:
    """A split written by ingest, read by line offset: its documents' byte sizes without holding their text."""

    def __init__(self, path: str) -> None:
        self.path, self.offsets, self.sizes = path, [], []
        at = 0
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                self.offsets.append(at)
                self.sizes.append(len(split_line_text(line, path, number).encode("utf-8")))
                at += len(line)

    def __len__(self) -> int:
        return len(self.offsets)

    def texts(self, indices) -> list[str]:
        with open(self.path, "rb") as handle:
            out = []
            for i in indices:
                handle.seek(self.offsets[i])
                out.append(json.loads(handle.readline())["text"])
            return out


def write_stream(tok, domain: Split, general: list[str], order: np.ndarray, eos_id: int, dtype, path: Path) -> int:
    """The documents in order, each followed by EOS, as dtype ids appended to path, a batch at a time;
    returns the number of tokens written."""
    encode = batch_encoder(tok)
    tokens = 0
    with open(path, "wb") as out, progress(total=len(order), unit="doc", desc="tokenizing documents") as bar:
        for start in range(0, len(order), BATCH_DOCUMENTS):
            batch = order[start : start + BATCH_DOCUMENTS]
            wanted = sorted(int(i) for i in batch if i < len(domain))
            from_domain = dict(zip(wanted, domain.texts(wanted)))
            texts = [from_domain[i] if i < len(domain) else general[i - len(domain)] for i in batch]
            ids = [np.append(np.asarray(e, dtype=np.int64), eos_id) for e in encode(texts)]
            chunk = np.concatenate(ids).astype(dtype)
            chunk.tofile(out)
            tokens += len(chunk)
            bar.update(len(batch))
    return tokens


def render_examples(records: list[dict], template_tok) -> list[tuple[str, str]]:
    """(prompt, completion) texts: through the chat template when there is one, else as given."""
    out = []
    for record in records:
        prompt, completion = record["prompt"], record["completion"]
        if template_tok is None:
            out.append((prompt, completion))
            continue
        user = [{"role": "user", "content": prompt}]
        head = template_tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = template_tok.apply_chat_template(user + [{"role": "assistant", "content": completion}], tokenize=False)
        if not full.startswith(head):
            raise UserError("chat template: the rendered prompt is not a prefix of the rendered conversation, "
                            "so the prompt cannot be masked out of the labels")
        out.append((head, full[len(head) :]))
    return out


def read_examples(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "completion")):
                raise UserError(f"{where}: expected an object with string keys 'prompt' and 'completion'")
            records.append(record)
    if not records:
        raise UserError(f"{path}: no prompt/completion examples")
    return records


def check_inputs(args: argparse.Namespace) -> None:
    """The splits and examples must exist before anything is loaded or tokenized."""
    for path, what in ((args.train, "domain training split"), (args.general, "general training split"),
                       (args.sft, "prompt/completion file")):
        if path and not Path(path).is_file():
            raise UserError(f"{path}: {what} does not exist")


def pad_to_blocks(path: Path, tokens: int, block_size: int, fill, dtype) -> int:
    """Pad the stream in path with fill up to whole blocks; returns the number of blocks."""
    blocks = -(-tokens // block_size)
    with open(path, "ab") as out:
        np.full(blocks * block_size - tokens, fill, dtype=dtype).tofile(out)
    return blocks


def write_mask(path: Path, labels: int, total: int) -> None:
    """1 for the first labels tokens, 0 for the rest, written a chunk at a time."""
    with open(path, "wb") as out:
        for start in range(0, total, CHUNK_TOKENS):
            (np.arange(start, min(start + CHUNK_TOKENS, total)) < labels).astype(np.uint8).tofile(out)


def interleave_files(ids_path: Path, mask_path: Path, text_blocks: int, sft_ids: np.ndarray, sft_mask: np.ndarray,
                     dtype) -> None:
    """The text blocks of the two files with the examples' blocks spread evenly among them, in place."""
    block_size = sft_ids.shape[1]
    text_ids = np.memmap(ids_path, dtype=dtype, mode="r", shape=(text_blocks, block_size))
    text_mask = np.memmap(mask_path, dtype=np.uint8, mode="r", shape=(text_blocks, block_size))
    order = interleave(text_blocks, len(sft_ids))
    rows = max(1, CHUNK_TOKENS // block_size)
    with open(f"{ids_path}.mixed", "wb") as ids_out, open(f"{mask_path}.mixed", "wb") as mask_out:
        for start in range(0, len(order), rows):
            part = order[start : start + rows]
            text = part < text_blocks
            for source, examples, out in ((text_ids, sft_ids, ids_out), (text_mask, sft_mask, mask_out)):
                chunk = np.empty((len(part), block_size), dtype=source.dtype)
                chunk[text] = source[part[text]]
                chunk[~text] = examples[part[~text] - text_blocks]
                chunk.tofile(out)
    del text_ids, text_mask
    os.replace(f"{ids_path}.mixed", ids_path)
    os.replace(f"{mask_path}.mixed", mask_path)


def file_digest(*paths: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def pack(args: argparse.Namespace, ids_path: Path, mask_path: Path) -> dict:
    """Write the blocks into ids_path and mask_path, the corpus streamed a batch of documents at a time;
    returns meta.json's content."""
    check_inputs(args)
    examples = read_examples(args.sft) if args.sft else []  # bad examples stop the run before any tokenizing
    tok = eos_tokenizer(args.tokenizer, args.trust_remote_code)
    eos_id = tok.eos_token_id
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    vocab = len(tok)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32

    domain = Split(args.train)
    if not len(domain):
        raise UserError(f"{args.train}: no documents")
    domain_bytes = sum(domain.sizes)
    general = select_general(list(iter_jsonl_texts(args.general)) if args.general else [], domain_bytes,
                             args.general_share, args.seed)
    order = np.random.default_rng(args.seed).permutation(len(domain) + len(general))
    text_tokens = write_stream(tok, domain, general, order, eos_id, dtype, ids_path)
    text_blocks = pad_to_blocks(ids_path, text_tokens, args.block_size, pad_id, dtype)
    write_mask(mask_path, text_tokens, text_blocks * args.block_size)
    blocks, label_tokens = text_blocks, text_tokens

    sft: dict = {"examples": 0, "blocks": 0, "truncated": 0, "skipped": 0, "tokens": 0, "chat_template": False}
    if args.sft:
        template_tok = None
        if args.chat_template_from:
            source = load_tokenizer(args.chat_template_from, trust_remote_code=args.trust_remote_code)
            template_tok = source if source.chat_template else None
        pairs = render_examples(examples, template_tok)
        prompts = encode_all(tok, [p for p, _ in pairs], "prompts")
        completions = encode_all(tok, [c for _, c in pairs], "completions")
        if template_tok is None:  # a template ends the turn itself; plain examples end with EOS
            completions = [np.append(c, eos_id) for c in completions]
        sft_ids, sft_mask, counts = pack_examples(prompts, completions, pad_id, args.block_size)
        interleave_files(ids_path, mask_path, text_blocks, sft_ids.astype(dtype), sft_mask, dtype)
        blocks, label_tokens = blocks + len(sft_ids), label_tokens + int(sft_mask.sum())
        sft = {"examples": len(pairs), "blocks": len(sft_ids), **counts, "chat_template": template_tok is not None}

    return {
        "format": 1,
        "block_size": args.block_size,
        "blocks": blocks,
        "text_blocks": text_blocks,
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "pad_is_eos": pad_id == eos_id,
        "tokens": text_tokens + sft.get("tokens", 0),
        "label_tokens": label_tokens,
        "documents": {"domain": len(domain), "general": len(general)},
        "bytes": {"domain": domain_bytes, "general": sum(len(t.encode("utf-8")) for t in general)},
        "sft": sft,
        "seed": args.seed,
        "digest": file_digest(ids_path, mask_path),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (the model folder of this branch)")
    parser.add_argument("--train", required=True, help="domain training split, JSON lines {'text'}")
    parser.add_argument("--general", help="general training split, JSON lines {'text'}")
    parser.add_argument("--general-share", type=float, default=0.0, help="share of training bytes from --general")
    parser.add_argument("--sft", help="prompt/completion examples, JSON lines {'prompt', 'completion'}")
    parser.add_argument("--chat-template-from", help="tokenizer whose chat template renders --sft (the base model)")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    if args.block_size < 2:
        raise UserError("--block-size must be at least 2")
    if not 0 <= args.general_share < 1:
        raise UserError("--general-share must be in [0, 1)")
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"

    out = Path(args.out_dir)
    with atomic_outputs(out / "input_ids.bin", out / "loss_mask.bin", out / "meta.json") as (ids_path, mask_path, meta_path):
        meta = pack(args, ids_path, mask_path)
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log.info("packed %d blocks of %d tokens (%d documents, %d label tokens, %d prompt/completion examples) into %s",
             meta["blocks"], meta["block_size"], sum(meta["documents"].values()), meta["label_tokens"],
             meta["sft"]["examples"], out)


if __name__ == "__main__":
    run_main(main)
