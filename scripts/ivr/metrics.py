"""The project's one bits-per-byte measure, and generation speed in bytes of text per second.

Bits per byte compares models across tokenizers: every model scores the same NFC text, cut to the
same byte budget, and the summed negative log-likelihood (in bits) is divided by that text's UTF-8
bytes. The first token is conditioned on the BOS (or EOS) token, so every byte is paid for.
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ivr.cli import UserError


@dataclass(frozen=True)
class DocumentScore:
    index: int  # position in the texts given
    bytes: int  # UTF-8 bytes of the scored (NFC, cut) text
    tokens: int  # tokens scored, without the BOS
    bits: float  # summed negative log-likelihood in bits


@dataclass(frozen=True)
class BitsPerByte:
    bits_per_byte: float
    bits: float
    tokens: int
    bytes: int
    tokens_per_byte: float
    byte_budget: int
    context: int
    stride: int
    documents: list[DocumentScore] = field(repr=False)

    def to_dict(self, with_documents: bool = True) -> dict:
        out = asdict(self)
        if not with_documents:
            out.pop("documents")
        return out


def cut_to_bytes(text: str, byte_budget: int) -> str:
    """The NFC text cut to at most byte_budget UTF-8 bytes, at a character boundary."""
    data = unicodedata.normalize("NFC", text).encode("utf-8")[:byte_budget]
    # The input was valid UTF-8, so only a character split by the cut can fail to decode.
    return unicodedata.normalize("NFC", data.decode("utf-8", errors="ignore"))


def prefix_token_id(tokenizer, model=None) -> int:
    """The token every document is conditioned on: BOS, else EOS (the tokenizer's, else the model's)."""
    for source in (tokenizer, getattr(model, "config", None)):
        for attr in ("bos_token_id", "eos_token_id"):
            value = getattr(source, attr, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    raise UserError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")


def model_context(model) -> int:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    raise UserError(f"{type(model).__name__}: cannot tell the context length; pass it explicitly")


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a document's tokens as (start, end, score_from) token indices.

    Each window feeds the prefix token and tokens[start:end] (at most context - 1 of them) and scores
    tokens[score_from:end], so every token is scored exactly once; after the first window, each scored
    token sees at least context - 1 - stride tokens before it.
    """
    span = context - 1
    if span < 1 or not 1 <= stride <= span:
        raise UserError(f"context {context} and stride {stride}: need context >= 2 and 1 <= stride <= context - 1")
    out = [(0, min(span, n_tokens), 0)]
    while out[-1][1] < n_tokens:
        prev_end = out[-1][1]
        end = min(prev_end + stride, n_tokens)
        out.append((end - span, end, prev_end))
    return out


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()  # not inference_mode: training measures the dev split with DeepSpeed's gathered weights
def bits_per_byte(
    model,
    tokenizer,
    texts: Sequence[str],
    byte_budget: int,
    *,
    context: int | None = None,
    stride: int | None = None,
    max_batch_tokens: int = 4096,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> BitsPerByte:
    """Bits per byte of `texts`, each cut to `byte_budget` bytes and scored whole (sliding window past the context).

    context defaults to the model's; stride (how far each further window moves) to half of it.
    Windows are batched up to max_batch_tokens padded tokens (and at most batch_size windows, if
    given); the result depends only on the inputs.
    """
    if byte_budget < 1:
        raise UserError(f"byte budget {byte_budget}: must be at least 1")
    device = torch.device(device) if device is not None else _device_of(model)
    context = context or model_context(model)
    stride = stride or max(1, (context - 1) // 2)
    prefix = prefix_token_id(tokenizer, model)

    cut = [cut_to_bytes(t, byte_budget) for t in texts]
    encoded = tokenizer(cut, add_special_tokens=False)["input_ids"] if cut else []
    pieces = []  # (document, input ids, first scored position)
    for doc, ids in enumerate(encoded):
        for start, end, score_from in windows(len(ids), context, stride):
            if end > score_from:
                pieces.append((doc, [prefix] + ids[start:end], score_from - start))
    # Longest first, ties by document, so batches have little padding and a fixed composition.
    pieces.sort(key=lambda p: (-len(p[1]), p[0]))

    nats = [0.0] * len(cut)
    model.eval()
    i = 0
    while i < len(pieces):
        longest = len(pieces[i][1])
        size = max(1, max_batch_tokens // longest)
        batch = pieces[i : i + (min(size, batch_size) if batch_size else size)]
        i += len(batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, (_, seq, _) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, (doc, seq, first) in enumerate(batch):
            # Position p predicts seq[p + 1]; the last position predicts past the window.
            pred = logits[row, first : len(seq) - 1].float()
            target = ids[row, first + 1 : len(seq)].to(pred.device)
            loss = torch.nn.functional.cross_entropy(pred, target, reduction="sum")
            nats[doc] += float(loss.double())
        del logits

    docs = [
        DocumentScore(index=k, bytes=len(text.encode("utf-8")), tokens=len(ids), bits=nats[k] / math.log(2))
        for k, (text, ids) in enumerate(zip(cut, encoded))
    ]
    total_bytes = sum(d.bytes for d in docs)
    if total_bytes == 0:
        raise UserError("bits per byte: no text to score (every document is empty)")
    total_bits = math.fsum(d.bits for d in docs)
    total_tokens = sum(d.tokens for d in docs)
    return BitsPerByte(
        bits_per_byte=total_bits / total_bytes,
        bits=total_bits,
        tokens=total_tokens,
        bytes=total_bytes,
        tokens_per_byte=total_tokens / total_bytes,
        byte_budget=byte_budget,
        context=context,
        stride=stride,
        documents=docs,
    )


@dataclass(frozen=True)
class GenerationSpeed:
    bytes_per_second: float
    tokens_per_second: float
    seconds: float
    bytes: int
    tokens: int
    prompts: int
    new_tokens: int
    continuations: list[str] = field(repr=False)


@torch.inference_mode()
def generation_speed(
    model,
    tokenizer,
    prompts: Sequence[str],
    new_tokens: int,
    *,
    device: str | torch.device | None = None,
    warmup: bool = True,
) -> GenerationSpeed:
    """Greedy decoding, batch 1, exactly new_tokens per prompt (EOS suppressed): decoded bytes per second."""
    if not prompts or new_tokens < 1:
        raise UserError("generation speed: needs at least one prompt and one new token")
    device = torch.device(device) if device is not None else _device_of(model)
    prefix = prefix_token_id(tokenizer, model)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else prefix
    inputs = [torch.tensor([[prefix] + tokenizer(p, add_special_tokens=False)["input_ids"]], device=device) for p in prompts]

    def generate(ids: torch.Tensor) -> torch.Tensor:
        # min_new_tokens = max_new_tokens masks EOS at every step, so every prompt gets the same length.
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=eos,
            pad_token_id=eos,
        )[0, ids.shape[1] :]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if warmup:
        generate(inputs[0])
    total_bytes = total_tokens = 0
    seconds = 0.0
    continuations = []
    for ids in inputs:
        sync()
        began = time.perf_counter()
        out = generate(ids)
        sync()
        seconds += time.perf_counter() - began
        total_tokens += len(out)
        text = tokenizer.decode(out.tolist(), skip_special_tokens=True)
        total_bytes += len(unicodedata.normalize("NFC", text).encode("utf-8"))
        continuations.append(text)
    return GenerationSpeed(
        bytes_per_second=total_bytes / seconds,
        tokens_per_second=total_tokens / seconds,
        seconds=seconds,
        bytes=total_bytes,
        tokens=total_tokens,
        prompts=len(prompts),
        new_tokens=new_tokens,
        continuations=continuations,
    )
