"""Bits per byte on the dev split while a model trains (the project's one measure, ivr.metrics).

Every process scores the same documents (a forward under DeepSpeed ZeRO-3 or FSDP gathers weights
collectively, so all must take part); compiled regions run eagerly here, as the documents have other
lengths than the training blocks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ivr.corpus import iter_jsonl_texts
from ivr.metrics import bits_per_byte

def read_dev_texts(path: str | None, limit: int) -> list[str]:
    """The first `limit` documents of a split (all when 0); none without a path."""
    if not path:
        return []
    texts = []
    for text in iter_jsonl_texts(path):
        texts.append(text)
        if limit and len(texts) >= limit:
            break
    return texts


@dataclass
class DevEval:
    tokenizer: object
    texts: dict[str, list[str]]  # key of the train log record ("dev_bpb", "general_dev_bpb", ...) -> documents
    byte_budget: int

    def measure(self, accelerator, model) -> dict[str, float]:
        """Bits per byte of `model` (the unwrapped causal LM) on each dev text, keyed as in the train log."""
        was_training = model.training
        model.eval()
        eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
        batch_tokens = 32768 if accelerator.device.type == "cuda" else 4096
        out = {}
        with eager, accelerator.autocast():
            for key, texts in self.texts.items():
                if texts:
                    scored = bits_per_byte(model, self.tokenizer, texts, self.byte_budget, max_batch_tokens=batch_tokens,
                                           device=accelerator.device)
                    out[key] = round(scored.bits_per_byte, 6)
        model.train(was_training)
        return out
