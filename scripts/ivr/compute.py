"""Training compute: the optimizer steps a run's budget buys, and the FLOPs of its tokens.

The control's budget is training.epochs passes over its packed documents (or training.max_tokens
tokens). The IVR run's budget is a share of that (training.budget): the same share of optimizer steps
with the same batch shape, hence the same share of training FLOPs, since both models have one shape.
"""

from __future__ import annotations

import math


def reference_steps(settings: dict, meta: dict, global_batch: int) -> int:
    """Optimizer steps of the control: epochs over its packed blocks, or max_tokens when set."""
    if settings["max_tokens"]:
        return max(1, math.ceil(settings["max_tokens"] / (global_batch * meta["block_size"])))
    return max(1, math.ceil(settings["epochs"] * meta["blocks"] / global_batch))


def plan_steps(settings: dict, meta: dict, global_batch: int, reference: dict | None = None) -> int:
    """Optimizer steps of a run on packed data `meta`; `reference` is the control's packed data when
    this run's budget is measured against the control's (the IVR run), None for the control itself."""
    if reference is None:
        return reference_steps(settings, meta, global_batch)
    if settings["budget"] == "one_pass":  # the control's passes over the same documents, in this run's tokens
        passes = settings["max_tokens"] / reference["tokens"] if settings["max_tokens"] else settings["epochs"]
        return max(1, math.ceil(passes * meta["blocks"] / global_batch))
    return max(1, round(settings["budget"] * reference_steps(settings, reference, global_batch)))


def flops_per_token(model, sequence: int) -> float:
    """Training FLOPs per token, forward and backward: 6 x parameters + 12 x layers x width x sequence
    (attention), as in the PaLM paper's MFU. Every parameter counts once (a tied matrix once, as the head)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    width = getattr(config, "hidden_size", None) or config.n_embd
    params = sum(p.numel() for p in model.parameters())
    return 6.0 * params + 12.0 * layers * width * sequence
