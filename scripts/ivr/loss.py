"""The training loss: chunked linear cross-entropy (never the whole batch's logits at once) and the
regions of the model that are compiled."""

from __future__ import annotations

import contextlib
import sys

import torch

from ivr.cli import log
from ivr.packed_data import IGNORE


def _chunk_loss_and_grads(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, vocab: int):
    """Summed loss of one chunk of tokens and its gradients for h and w.

    Written as reductions and element-wise steps only (the one-hot as a comparison, no scatter), so
    that compiled, the fp32 upcast, softmax and gradient fuse into two passes over the chunk's logits;
    rows of w past `vocab` are alignment padding and get probability 0.
    """
    logits = (h @ w.t()).float()
    columns = torch.arange(w.shape[0], device=h.device)
    if w.shape[0] != vocab:
        logits = torch.where(columns < vocab, logits, float("-inf"))
    valid = y != IGNORE
    safe = torch.where(valid, y, 0)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, safe[:, None])[:, 0]
    loss = ((lse - picked) * valid).sum()
    grad = torch.exp(logits - lse[:, None]) - (columns[None, :] == safe[:, None]).float()
    grad = (grad * (valid * scale)[:, None]).to(h.dtype)
    return loss, grad @ w, grad.t() @ h


_chunk_fn = _chunk_loss_and_grads  # enable_compile replaces it with its compiled self
triton_on_cuda = True  # on CUDA, ivr.loss_kernel's Triton kernel instead (bench: --inductor-loss turns it off)


def _reference_chunk(h, w, y, scale, vocab, grad_weight):
    """_chunk_fn as the chunk loop calls a chunk: the gradient for w added into grad_weight (fp32)."""
    part, grad_h, grad_w = _chunk_fn(h, w, y, scale, vocab)
    # a copy: the compiled function's output may live in memory its next call reuses
    return part, grad_h, (grad_w.to(torch.float32, copy=True) if grad_weight is None else grad_weight.add_(grad_w))


def _chunk_kernel(device: torch.device):
    if device.type == "cuda" and triton_on_cuda:
        from ivr.loss_kernel import chunk_loss_and_grads

        return chunk_loss_and_grads
    return _reference_chunk


ALIGN_ROWS = 64  # on GPU the vocabulary is padded to this multiple: an odd row count (GPT-2's 50,257) makes
# the logits' rows misaligned for the tensor-core matrix kernels


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T against targets, chunked over tokens.

    Gradients are computed chunk by chunk in the forward pass (nothing is recomputed), so at most one
    chunk of logits exists at a time instead of the [tokens, vocab] fp32 logits of the whole batch.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compute_dtype):
        vocab, width = weight.shape
        rows = vocab + (-vocab % ALIGN_ROWS if hidden.is_cuda else 0)
        h_all = hidden.to(compute_dtype)
        if rows == vocab:
            w = weight.to(compute_dtype)
        else:  # cast and pad in one pass
            w = weight.new_empty((rows, width), dtype=compute_dtype)
            w[:vocab].copy_(weight)
            w[vocab:].zero_()
        count = (targets != IGNORE).sum().clamp(min=1)
        scale = 1.0 / count.float()
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(h_all)
        grad_weight = None  # fp32, made by the first chunk
        chunk_fn = _chunk_kernel(hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                end = min(start + chunk, hidden.shape[0])
                part, g_h, grad_weight = chunk_fn(h_all[start:end], w, targets[start:end], scale, vocab,
                                                  grad_weight)
                loss += part
                grad_hidden[start:end] = g_h
        if grad_weight is None:  # no tokens
            grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_hidden, grad_weight[:vocab])
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_output).to(hidden_dtype), (grad_weight * grad_output).to(weight_dtype),
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int) -> torch.Tensor:
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, dtype)


class CausalLMLoss(torch.nn.Module):
    """A causal LM (or its peft wrapper) whose forward returns the mean next-token loss."""

    def __init__(self, model, chunk_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.causal_attention = False  # enable_compile(scope="body") sets it: attention through CAUSAL_SDPA
        # FSDP's auto-wrap and DeepSpeed look these up on the module they are given
        self._no_split_modules = getattr(self.lm, "_no_split_modules", None)
        self.config = self.lm.config

    @property
    def lm(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lm = self.lm
        with attention_implementation(lm.config, CAUSAL_SDPA if self.causal_attention else None):
            hidden = lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        weight = lm.get_output_embeddings().weight
        return linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), self.chunk_tokens)


# ---- attention without a mask ----------------------------------------------------------------------
# Packed training blocks never have padding inside attention (padding is only left out of the loss) and
# positions always run 0..T-1, so the attention of our training forward is plain causal attention. Eager,
# transformers sees that and hands SDPA no mask (is_causal=True); while tracing for torch.compile it cannot
# (before torch 2.14) and builds a dense (B, 1, T, T) mask, which keeps SDPA off its flash/cuDNN kernels and
# doubles attention's work. CAUSAL_SDPA is transformers' own SDPA attention registered under a name that
# has no mask function, so create_causal_mask returns None for it (the path transformers keeps for
# attention implementations that build no mask), traced or not. The name is set on the model's config only
# for the duration of our training forward: evaluation and generation, which pass masks, never see it.
CAUSAL_SDPA = "ivr_causal_sdpa"


_sdpa_forward = None  # transformers' sdpa_attention_forward, once registered


def _causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    if attention_mask is not None:
        raise RuntimeError(f"{CAUSAL_SDPA} got an attention mask: this model builds its masks outside "
                           "transformers.masking_utils; compile it by blocks (training.compile_scope: blocks)")
    return _sdpa_forward(module, query, key, value, None, **kwargs)  # no mask: is_causal=True


def register_causal_sdpa() -> None:
    global _sdpa_forward
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _sdpa_forward = sdpa_attention_forward
    AttentionInterface.register(CAUSAL_SDPA, _causal_sdpa)


@contextlib.contextmanager
def attention_implementation(config, name: str | None):
    """config._attn_implementation set to `name` inside the block (nothing changes for None)."""
    if name is None:
        yield
        return
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def body_without_mask(lm) -> str | None:
    """Why the model's body cannot run its attention through CAUSAL_SDPA, or None when it can: SDPA
    attention, causal, every layer full attention (no sliding window or chunks, whose masks are not plain
    causal), no sub-configs, and masks built by transformers.masking_utils (create_causal_mask)."""
    config = lm.config
    if config._attn_implementation != "sdpa":
        return f"attention implementation {config._attn_implementation!r}, not sdpa"
    if not getattr(config, "is_causal", True):
        return "bidirectional attention"
    if getattr(config, "sub_configs", None):
        return "a composite config"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(kind != "full_attention" for kind in layer_types):
            return f"layers of type {sorted(set(layer_types) - {'full_attention'})}"
    elif getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "a sliding window"
    if getattr(config, "attention_chunk_size", None) is not None:
        return "chunked attention"
    module = sys.modules.get(type(lm.base_model).__module__)
    if module is None or getattr(module, "create_causal_mask", None) is None:
        return "masks built outside transformers.masking_utils"
    return None


# ---- compilation -----------------------------------------------------------------------------------
SCOPES = ("blocks", "body")


@torch.library.custom_op("ivr::stored_table", mutates_args=())
def stored_table(table: torch.Tensor) -> torch.Tensor:
    """A copy of `table`, made by an operator inductor cannot see into, so that the table is computed
    into memory once instead of inlined into every kernel that reads it."""
    return table.clone()


@stored_table.register_fake
def _(table: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(table)


stored_table.register_autograd(lambda ctx, grad: grad)  # a copy passes its gradient on unchanged


def _stored_rotary_tables(module, args, output):
    if isinstance(output, tuple) and output and all(isinstance(t, torch.Tensor) for t in output):
        return tuple(stored_table(t) for t in output)
    return output


rotary_tables_stored = True  # compiled as one body (bench: --inline-rotary turns it off)


def store_rotary_tables(lm) -> None:
    """Rotary position tables (cos, sin) computed once per forward, into memory. Compiled as one body,
    inductor otherwise inlines their computation (positions times frequencies, then cos and sin) into
    every layer's rotary kernels, forward and backward, recomputing each position's table for every head
    of every layer (SmolLM2-135M at batch 16 on an H200: 350.8k tokens/s stored, 334.5k inlined)."""
    for module in lm.modules():
        if (type(module).__name__.endswith("RotaryEmbedding")
                and _stored_rotary_tables not in module._forward_hooks.values()):
            module.register_forward_hook(_stored_rotary_tables)


def compiled_regions(lm, scope: str = "blocks") -> list[torch.nn.Module]:
    """What is compiled. blocks: the model's repeated blocks (the classes it names as never to be split),
    else its whole body. body: the whole body (embedding, blocks, final norm) as one graph, so that
    inductor also fuses across block boundaries (residual add with the next norm, the embedding's sum
    and dropout, the final norm); its attention then runs through CAUSAL_SDPA.

    Compiled whole with transformers' own SDPA attention, the body gets a dense causal mask under
    tracing (see CAUSAL_SDPA), which doubles attention's work (GPT-2 124M on an H100: 383k -> 445k
    tokens/s compiled by blocks instead)."""
    if scope == "body":
        return [lm.base_model]
    names = set(getattr(lm, "_no_split_modules", None) or ())
    blocks = [m for m in lm.base_model.modules() if type(m).__name__ in names]
    return blocks or [lm.base_model]


def enable_compile(loss_model: CausalLMLoss, mode: str | None = None, scope: str = "blocks",
                   cuda_graphs: bool = False) -> str:
    """Compile the transformer in place (parameter identity, hooks and state-dict names stay), by blocks
    or as one body (`scope`; a model whose attention is not plain causal, see body_without_mask, is
    compiled by blocks), and the per-chunk loss, where inductor fuses the upcast, softmax and gradient
    into few passes (on CUDA ivr.loss_kernel's Triton kernel runs instead). Returns the scope used.

    cuda_graphs: the transformer's compiled forward and backward are recorded once as CUDA graphs and
    replayed (torch.compile's reduce-overhead mode): one launch instead of hundreds of kernel launches,
    which at small batches is what bounds the step (SmolLM2-135M at batch 16: 47 ms of kernels in a 63 ms
    step). The loss kernel is left out: its chunks run in a loop, a few kernels each."""
    global _chunk_fn
    from torch._inductor import config as inductor_config

    if scope not in SCOPES:
        raise ValueError(f"compile scope {scope!r}: expected one of {SCOPES}")
    lm = loss_model.lm
    why_not = body_without_mask(lm) if scope == "body" else None
    if why_not:
        log.warning("compiling by blocks, not as one body: the model has %s", why_not)
        scope = "blocks"
    if scope == "body":
        register_causal_sdpa()
        loss_model.causal_attention = True
        if rotary_tables_stored:
            store_rotary_tables(lm)
    # Dropout's random numbers from ATen's generator instead of inductor's own per-element Philox: the
    # compiled step draws the masks the eager step draws for the same seed, and on an H200 GPT-2's
    # compiled step (dropout 0.1) ran 1.7 % faster, its fused kernels no longer generating them.
    inductor_config.fallback_random = True
    region_mode = mode
    if cuda_graphs:  # the same compile mode, with CUDA graphs
        region_mode = "max-autotune" if mode and mode.startswith("max-autotune") else "reduce-overhead"
    for region in compiled_regions(lm, scope):
        region.compile(mode=region_mode)
    _chunk_fn = torch.compile(_chunk_loss_and_grads, dynamic=False, mode=mode)
    return scope
