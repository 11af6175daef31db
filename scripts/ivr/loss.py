"""The training loss: chunked linear cross-entropy (never the whole batch's logits at once) and the
regions of the model that are compiled."""

from __future__ import annotations

import torch

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


_chunk_fn = _chunk_loss_and_grads
ALIGN_ROWS = 64  # on GPU the vocabulary is padded to this multiple: an odd row count (GPT-2's 50,257) makes
# the logits' rows misaligned for the tensor-core matrix kernels


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T against targets, chunked over tokens.

    Gradients are computed chunk by chunk in the forward pass (nothing is recomputed), so at most one
    chunk of logits exists at a time instead of the [tokens, vocab] fp32 logits of the whole batch.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compute_dtype):
        vocab = weight.shape[0]
        h_all, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        if hidden.is_cuda and vocab % ALIGN_ROWS:
            w = torch.nn.functional.pad(w, (0, 0, 0, ALIGN_ROWS - vocab % ALIGN_ROWS))
        count = (targets != IGNORE).sum().clamp(min=1)
        scale = 1.0 / count.float()
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(h_all)
        grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                end = min(start + chunk, hidden.shape[0])
                part, g_h, g_w = _chunk_fn(h_all[start:end], w, targets[start:end], scale, vocab)
                loss += part
                grad_hidden[start:end] = g_h
                grad_weight += g_w
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
        hidden = lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        weight = lm.get_output_embeddings().weight
        return linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), self.chunk_tokens)


def compiled_regions(lm) -> list[torch.nn.Module]:
    """The model's repeated blocks (the classes it names as never to be split), else its whole body.

    Blocks, not the body: compiled whole, transformers (before torch 2.14) cannot tell that a block
    without padding needs no mask, and hands SDPA a dense causal mask, which doubles attention's work
    (GPT-2 124M on an H100: 383k -> 445k tokens/s compiled by blocks)."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    blocks = [m for m in lm.base_model.modules() if type(m).__name__ in names]
    return blocks or [lm.base_model]


def enable_compile(loss_model: CausalLMLoss, mode: str | None = None) -> None:
    """Compile the transformer's blocks in place (parameter identity, hooks and state-dict names stay)
    and the per-chunk loss kernel, where inductor fuses the upcast, softmax and gradient into few passes."""
    global _chunk_fn
    for region in compiled_regions(loss_model.lm):
        region.compile(mode=mode)
    _chunk_fn = torch.compile(_chunk_loss_and_grads, dynamic=False, mode=mode)
