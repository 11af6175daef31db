#!/usr/bin/env python3
"""Fine-tune a causal LM on packed blocks (from pack_data.py), launched by `accelerate launch`.

    accelerate launch --config_file config/accelerate/<name>.yaml --num_processes N \\
        scripts/train_sft.py --model DIR --data DIR --out DIR --checkpoint-dir DIR [--rules remap_rules.yaml]

Works on CPU, one or several GPUs (DDP), DeepSpeed ZeRO-2/3 and FSDP2. The settings are the `training:`
section of the workflow config (--settings, --set KEY=VALUE). Training runs in up to two stages:

  1. rows  only the reassigned rows of the input embedding (and of an untied head) learn; every other
           row is held by a gradient mask (needs --rules; training.stage1_share of the steps);
  2. full  every weight learns except special tokens marked `frozen` in the rules, or
     lora  LoRA adapters on the linear layers plus the reassigned rows; merged into the saved model.

Held rows are checked during training and at the end: the maximum absolute change of their fp32 weights
(DeepSpeed's fp32 master copy) since the stage began must be exactly 0. The embedding and head matrices
never get weight decay, which would move held rows although their gradient is zero.

Checkpoints (model, optimizer, scheduler, RNG, step, data position, resolved settings) go to
--checkpoint-dir every training.checkpoint_every steps, under a key hashed from the inputs and settings: a
rerun resumes from the newest one only when the key matches, otherwise it starts fresh. --out gets a
Hugging Face folder with the tokenizer of --model, train_log.jsonl (step, loss, grad norm, lr, tokens/s)
and training_stats.json (tokens seen, wall-clock, first loss, held-row checks).

SIGTERM (what Slurm sends at a job's time limit, KillWait seconds before SIGKILL) stops training after the
current optimizer step with a checkpoint of that step, and the script exits with status 143; the retry
resumes from there.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_path, log, run_main  # noqa: E402
from ivr.config import SCHEMA, fill_defaults, validate_config  # noqa: E402
from ivr.modeling import embedding_layout, load_causal_lm, load_tokenizer  # noqa: E402
from ivr.remap import load_rules  # noqa: E402

IGNORE = -100
FIRST_LOSS_MARGIN = 1.0  # nats above ln(vocab), i.e. clearly worse than guessing uniformly
BETAS = (0.9, 0.95)
# Settings that change how a run is carried out or reported, not what it computes: they may change
# between a kill and the rerun without invalidating the checkpoints.
OPERATIONAL = ("accelerate", "gpus", "threads", "control", "compile", "loss_chunk_tokens", "log_every",
               "checkpoint_every", "frozen_check_every")
KEEP_CHECKPOINTS = 2
CHECKPOINT_GLOB = "step-" + "[0-9]" * 7  # complete checkpoints; one being written is step-NNNNNNN.partial


# ---- settings and inputs -------------------------------------------------------------------------

def parse_value(text: str):
    """A --set value: JSON first (so 1e-3 is a number, which YAML 1.1 reads as a string), else YAML."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.safe_load(text)


def resolve_settings(raw: dict | None, overrides: list[str] = (), validate: bool = True) -> dict:
    """The training settings with schema defaults filled in; --set KEY=VALUE (dotted keys) applied first."""
    raw = json.loads(json.dumps(raw or {}))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item}: expected KEY=VALUE")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(value)
    if not validate:  # the GPU benchmark runs where jsonschema may be missing: defaults only
        schema = yaml.safe_load(SCHEMA.read_text())
        config = {"training": raw}
        fill_defaults(config, schema, schema)
        return config["training"]
    return validate_config({"training": raw}, source="training settings")["training"]


def read_settings_arg(value: str | None) -> dict:
    """--settings: inline JSON (what the rule passes), or a YAML/JSON file whose training: section is used."""
    if not value:
        return {}
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f"--settings: not valid JSON ({err.msg})") from None
    path = Path(value)
    if not path.is_file():
        raise UserError(f"--settings {value}: no such file")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return data.get("training", data) if isinstance(data, dict) else {}


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "meta.json" if folder.is_dir() else folder
    if not path.exists():
        raise UserError(f"{path}: packed data metadata not found (run pack_data.py)")
    meta = json.loads(path.read_text())
    if meta.get("format") != 1:
        raise UserError(f"{path}: unknown packed data format {meta.get('format')!r}")
    return meta


@dataclass(frozen=True)
class Rules:
    reassigned: np.ndarray  # ids whose rows were given new tokens
    frozen: np.ndarray  # ids whose rows must never move (special tokens marked frozen)


def read_rules(path: str | Path, num_rows: int) -> Rules:
    """Reassigned and frozen ids of remap_rules.yaml (docs/DEVELOPING.md), checked against the matrix."""
    ids, frozen = [], []
    for number, entry in enumerate(load_rules(Path(path))["reassignments"]):
        if not isinstance(entry["id"], int) or not 0 <= entry["id"] < num_rows:
            raise UserError(f"{path}: reassignments[{number}]: id {entry['id']!r} is no row of the embedding "
                            f"matrix (0..{num_rows - 1})")
        ids.append(entry["id"])
        if entry.get("frozen", False):
            frozen.append(entry["id"])
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: an id is reassigned twice")
    return Rules(np.array(sorted(ids), dtype=np.int64), np.array(sorted(frozen), dtype=np.int64))


# ---- data ----------------------------------------------------------------------------------------

class PackedBlocks(torch.utils.data.Dataset):
    """Blocks of pack_data.py, memory-mapped; targets are the next token, -100 where it is no label."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.meta = read_meta(folder)
        shape = (self.meta["blocks"], self.meta["block_size"])
        for name, itemsize in (("input_ids.bin", np.dtype(self.meta["dtype"]).itemsize), ("loss_mask.bin", 1)):
            if (folder / name).stat().st_size != shape[0] * shape[1] * itemsize:
                raise UserError(f"{folder / name}: size does not match meta.json")
        self.ids = np.memmap(folder / "input_ids.bin", dtype=self.meta["dtype"], mode="r", shape=shape)
        self.mask = np.memmap(folder / "loss_mask.bin", dtype=np.uint8, mode="r", shape=shape)

    def __len__(self) -> int:
        return self.meta["blocks"]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index].astype(np.int64)
        targets = np.full_like(ids, IGNORE)
        targets[:-1] = np.where(self.mask[index, 1:] == 1, ids[1:], IGNORE)
        return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets)}


class IndexSampler(torch.utils.data.Sampler):
    def __init__(self, indices: np.ndarray) -> None:
        self.indices = indices

    def __iter__(self):
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)


def block_stream(blocks: int, length: int, seed: int) -> np.ndarray:
    """Block order of a whole run: the first epoch in packed order (the same documents first in every
    branch, as packing shuffled them with one seed), each later epoch a seeded permutation."""
    parts, epoch, have = [], 0, 0
    while have < length:
        part = np.arange(blocks) if epoch == 0 else np.random.default_rng([seed, epoch]).permutation(blocks)
        parts.append(part)
        have += blocks
        epoch += 1
    return np.concatenate(parts)[:length]


# ---- stages --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    index: int  # 1 or 2
    kind: str  # rows | full | lora
    first_step: int  # global optimizer step at which it starts
    steps: int
    lr: float
    learn_rows: np.ndarray  # rows of the embedding/head that may change
    held_rows: np.ndarray  # rows that must not change (the rest)


def plan_stages(settings: dict, total_steps: int, num_rows: int, rules: Rules | None) -> list[Stage]:
    every = np.arange(num_rows)
    learnable = np.setdiff1d(rules.reassigned, rules.frozen) if rules else np.zeros(0, np.int64)
    frozen = rules.frozen if rules else np.zeros(0, np.int64)
    rows_steps = 0
    if len(learnable) and settings["stage2"] == "none":
        rows_steps = total_steps
    elif len(learnable) and settings["stage1_share"] > 0:
        rows_steps = min(total_steps, max(1, round(settings["stage1_share"] * total_steps)))
    stages = []
    if rows_steps:
        stages.append(Stage(1, "rows", 0, rows_steps, settings["stage1_lr"], learnable,
                            np.setdiff1d(every, learnable)))
    rest = total_steps - rows_steps
    if rest and settings["stage2"] != "none":
        learn = np.setdiff1d(every, frozen) if settings["stage2"] == "full" else learnable
        stages.append(Stage(2, settings["stage2"], rows_steps, rest, settings["lr"], learn,
                            np.setdiff1d(every, learn)))
    if not stages:
        raise UserError("nothing to train: stage2 is 'none' and there are no reassigned rows (no --rules)")
    return stages


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup, then cosine decay to `floor` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- model and loss ------------------------------------------------------------------------------

def load_model(model_dir: str, trust_remote_code: bool, dtype=torch.float32):
    """The causal LM in fp32 (mixed precision comes from autocast or DeepSpeed), checked for a plain head."""
    model = load_causal_lm(model_dir, trust_remote_code=trust_remote_code, dtype=dtype)
    embedding_layout(model)  # refuses a head with a bias or of another shape than the embedding
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None):
            raise UserError(f"{model_dir}: the model scales its logits ({name}), which the chunked loss does not")
    return model


def embedding_weights(model) -> list[torch.nn.Parameter]:
    """The input embedding matrix and, when not tied to it, the output head's."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    return [emb] if head is emb else [emb, head]


def lora_config(settings: dict):
    from peft import LoraConfig

    lora = settings["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], bias="none")


def load_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Load a state from full_state(); only the duplicate names of tied weights may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"state does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


def set_trainable(model, stage: Stage, settings: dict):
    """The model of a stage, with exactly the parameters it trains set to require gradients."""
    if stage.kind == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(settings))
    elif stage.kind == "rows":
        model.requires_grad_(False)
    for weight in embedding_weights(model):
        weight.requires_grad_(stage.kind == "full" or len(stage.learn_rows) > 0)
    return model


@contextlib.contextmanager
def whole_models(accelerator):
    """Build models unpartitioned under DeepSpeed ZeRO-3.

    accelerate registers its DeepSpeed config with transformers, which then builds every model inside
    deepspeed.zero.Init, partitioned at construction. The stages hand full weights from one model to the
    next and keep CPU copies of the untrained parameters, so models are built whole (prepare partitions
    them); the main process alone also loads one to save the result, which zero.Init would hang.
    """
    plugin = accelerator.state.deepspeed_plugin if is_deepspeed(accelerator) else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def build_stage_model(model_dir: str, stage: Stage, settings: dict, trust_remote_code: bool,
                      weights: dict[str, torch.Tensor] | None = None):
    model = load_model(model_dir, trust_remote_code)
    if weights is not None:
        load_weights(model, weights)
    return set_trainable(model, stage, settings)


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


def param_groups(loss_model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Embedding and head never decay: AdamW's decoupled decay would move held rows whose gradient is
    # masked to zero (../shared/TRAINING_NOTES.md, trap 1), and one matrix cannot be split into groups.
    matrices = {id(w) for w in embedding_weights(loss_model.model)}
    decay, plain = [], []
    for param in loss_model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and id(param) not in matrices else plain).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ---- held rows -----------------------------------------------------------------------------------

def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


def full_fp32(accelerator, param: torch.Tensor) -> torch.Tensor:
    """The whole fp32 value of a trainable parameter: DeepSpeed's master copy, a gathered FSDP shard,
    or the parameter itself. Collective under ZeRO-3 and FSDP: every process must call it."""
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    if hasattr(param, "full_tensor"):
        return param.detach().full_tensor()
    return param.detach()


class RowGuard:
    """Holds rows of the embedding (and of an untied head) fixed and proves they did not move.

    A gradient hook registered before accelerator.prepare zeroes the held rows' gradient; with tied
    weights the one matrix gets one hook that covers both uses. DeepSpeed and DDP keep the parameter
    objects, so the hook stays; FSDP replaces them by sharded ones, and then mask_grads() applies the
    same mask to the sharded gradients before clipping and the optimizer step.
    """

    def __init__(self, weights: list[torch.nn.Parameter], held_rows: np.ndarray, num_rows: int) -> None:
        keep = torch.ones(num_rows, 1)
        keep[torch.from_numpy(held_rows)] = 0
        self.keep = keep
        self.held = torch.from_numpy(held_rows)
        self.params = [w for w in weights if w.requires_grad]
        self.hooked = list(self.params)
        self._keep_cache: dict = {}
        for weight in self.params:
            weight.register_hook(self._mask)
        self.explicit = False
        self.reference: list[torch.Tensor] = []

    def _keep_like(self, grad: torch.Tensor) -> torch.Tensor:
        key = (grad.device, grad.dtype)
        if key not in self._keep_cache:
            self._keep_cache[key] = self.keep.to(grad.device, grad.dtype)
        return self._keep_cache[key]

    def _mask(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self._keep_like(grad)

    def after_prepare(self, accelerator, loss_model) -> None:
        current = [w for w in embedding_weights(accelerator.unwrap_model(loss_model).model) if w.requires_grad]
        if len(current) != len(self.hooked) or any(a is not b for a, b in zip(current, self.hooked)):
            self.explicit = True
            self.params = current
        self.reference = self.held_values(accelerator)

    def mask_grads(self) -> None:
        if not self.explicit:
            return
        for param in self.params:
            grad = param.grad
            if grad is None:
                continue
            if hasattr(grad, "to_local"):
                from torch.distributed.tensor import distribute_tensor

                key = ("dtensor", id(param))
                if key not in self._keep_cache:
                    keep = self.keep.to(grad.to_local().device, grad.dtype)
                    self._keep_cache[key] = distribute_tensor(keep, grad.device_mesh, grad.placements).to_local()
                grad.to_local().mul_(self._keep_cache[key])
            else:
                grad.mul_(self._keep_like(grad))

    def held_values(self, accelerator) -> list[torch.Tensor]:
        values = []
        for param in self.params:
            full = full_fp32(accelerator, param)
            values.append(full[self.held.to(full.device)].float().clone())
        return values

    def max_change(self, accelerator) -> float:
        changes = [(now - ref).abs().max() for now, ref in zip(self.held_values(accelerator), self.reference)
                   if ref.numel()]
        return float(torch.stack(changes).max()) if changes else 0.0

    def digest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for ref in self.reference:
            h.update(ref.cpu().numpy().tobytes())
        return h.hexdigest()


def full_state(accelerator, loss_model, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the (peft) model on CPU, on every process.

    Parameters that did not train are taken from `originals`, their values before prepare: DeepSpeed
    casts them to bf16 and keeps no fp32 copy of them.
    """
    model = accelerator.unwrap_model(loss_model).model
    state = {}
    for name, param in model.named_parameters():
        value = originals[name] if name in originals else full_fp32(accelerator, param)
        state[name] = value.detach().to("cpu", torch.float32, copy=True)
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[f"{module_name}.{name}" if module_name else name] = buffer.detach().cpu().clone()
    return state


# ---- checkpoints ---------------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()


def run_key(model: str, data_meta: dict, budget_meta: dict, rules: str | None, settings: dict,
            world: dict) -> str:
    """Hash of everything a run's result depends on: inputs, settings and the process layout."""
    h = hashlib.blake2b(digest_size=16)
    folder = Path(model)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    h.update(json.dumps([model] if not files else [(p.name, file_digest(p)) for p in files]).encode())
    h.update(json.dumps([data_meta, budget_meta["digest"]], sort_keys=True).encode())
    h.update(Path(rules).read_bytes() if rules else b"no rules")
    semantic = {k: v for k, v in settings.items() if k not in OPERATIONAL}
    h.update(json.dumps([semantic, world], sort_keys=True).encode())
    return h.hexdigest()


class Checkpoints:
    """Checkpoint folder of one run: key.json, train_log.jsonl and step-NNNNNNN/ folders."""

    def __init__(self, root: str | Path, key: str, accelerator, describe: dict) -> None:
        self.root = Path(root)
        self.key = key
        self.accelerator = accelerator
        self.log_path = self.root / "train_log.jsonl"
        key_path = self.root / "key.json"
        if accelerator.is_main_process:
            old = json.loads(key_path.read_text())["key"] if key_path.exists() else None
            if old != key and self.root.exists():
                reason = "no key" if old is None else "inputs or settings changed"
                log.info("checkpoints in %s are from another run (%s): starting fresh", self.root, reason)
                shutil.rmtree(self.root)
            self.root.mkdir(parents=True, exist_ok=True)
            if old != key:
                key_path.write_text(json.dumps({"key": key, **describe}, indent=2, default=str) + "\n")
        accelerator.wait_for_everyone()

    def latest(self) -> tuple[Path, dict] | None:
        done = sorted(p for p in self.root.glob(CHECKPOINT_GLOB) if (p / "trainer_state.json").exists())
        if not done:
            return None
        return done[-1], json.loads((done[-1] / "trainer_state.json").read_text())

    def save(self, state: dict) -> None:
        accelerator = self.accelerator
        name = f"step-{state['step']:07d}"
        partial_dir = self.root / f"{name}.partial"
        if accelerator.is_main_process:
            shutil.rmtree(partial_dir, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial_dir))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial_dir / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str) + "\n")
            shutil.rmtree(self.root / name, ignore_errors=True)
            os.replace(partial_dir, self.root / name)
            for old in sorted(self.root.glob(CHECKPOINT_GLOB))[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def append_log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint a rerun resumes from."""
        if self.accelerator.is_main_process and self.log_path.exists():
            lines = self.log_path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            self.log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# ---- training ------------------------------------------------------------------------------------

def first_loss_warning(loss: float, vocab: int) -> str | None:
    expected = math.log(vocab)
    if loss <= expected + FIRST_LOSS_MARGIN:
        return None
    return (f"first loss {loss:.3f} is far above ln(vocab) = {expected:.3f}, worse than guessing uniformly: "
            "likely a bad initialisation of the reassigned rows, labels that do not match the inputs "
            "(wrong tokenizer for this model, shifted twice), or padding counted in the loss")


class TrainingStopped(Exception):
    """Training stopped on SIGTERM; a checkpoint of `step` was saved."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped by SIGTERM after step {step}")
        self.step = step


class StopRequest:
    """Catches SIGTERM while training runs, so that training can stop after a step with a checkpoint.

    Slurm sends SIGTERM at a job's time limit (and on scancel), then SIGKILL KillWait seconds later
    (30 s unless the cluster says otherwise): time to finish the step and save it, so a retry loses
    nothing instead of going back to the last checkpoint_every boundary. Saving is collective, so every
    process must stop at the same step: with several processes the flag is summed across them only at
    logged steps (log_every), where the loop waits for the device anyway, so no other step stalls.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = None

    def __enter__(self) -> "StopRequest":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self, accelerator, step: int, log_every: int) -> bool:
        if accelerator.num_processes == 1:
            return self.signum is not None
        if step % log_every:
            return False
        flag = torch.tensor(float(self.signum is not None), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0


@dataclass
class Progress:
    step: int = 0  # optimizer steps done (global, across stages)
    tokens: int = 0  # token positions processed
    elapsed: float = 0.0  # seconds of training over all runs
    first_loss: float | None = None
    checks: list | None = None


def make_accelerator(settings: dict):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(
        mixed_precision="bf16" if settings["bf16"] and cuda else "no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=settings["gradient_accumulation"], sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(non_blocking=cuda),
    )


@dataclass
class Prepared:
    """A stage's objects after accelerator.prepare."""

    loss_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object
    guard: RowGuard | None
    originals: dict[str, torch.Tensor]  # CPU values of the parameters this stage does not train


def prepare_stage(accelerator, stage: Stage, model, loader, settings: dict, num_rows: int,
                  compile_mode: str | None = None) -> Prepared:
    """Loss wrapper, row guard (hooks registered before prepare), optimizer and schedule, prepared."""
    loss_model = CausalLMLoss(model, settings["loss_chunk_tokens"])
    weights = embedding_weights(model)
    trains_rows = any(w.requires_grad for w in weights)
    guard = RowGuard(weights, stage.held_rows, num_rows) if trains_rows and len(stage.held_rows) else None
    originals = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if not p.requires_grad}
    if settings["compile"]:
        enable_compile(loss_model, compile_mode)
    optimizer = torch.optim.AdamW(param_groups(loss_model, settings["weight_decay"]), lr=stage.lr, betas=BETAS,
                                  fused=accelerator.device.type == "cuda")
    warmup = math.ceil(settings["warmup_share"] * stage.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=warmup, total=stage.steps, floor=settings["min_lr_share"]))
    if is_deepspeed(accelerator):
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, settings)
    loss_model, optimizer, loader, scheduler = accelerator.prepare(loss_model, optimizer, loader, scheduler)
    if is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        # the head weight is read by CausalLMLoss.forward, outside the head's own forward
        unwrapped = accelerator.unwrap_model(loss_model)
        deepspeed.zero.register_external_parameter(unwrapped, unwrapped.get_output_embeddings().weight)
    return Prepared(loss_model, optimizer, scheduler, loader, guard, originals)


def configure_deepspeed(config: dict, settings: dict) -> None:
    """Clipping from the settings; no bf16 overflow scan; under ZeRO-1/2 the gradient reduction
    overlapped with the backward pass in buckets small enough to overlap (DeepSpeed's defaults reduce
    once, after the backward). Values the user's config sets are kept."""
    config["gradient_clipping"] = settings["grad_clip"]
    # bf16 needs no loss scaling, so DeepSpeed's per-step scan of every gradient for inf/NaN (a loop of
    # small kernels, an all-reduce and a wait for the GPU) buys nothing the single-GPU path has.
    config.setdefault("bf16", {}).setdefault("check_grad_overflow", False)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) <= 2:
        for key, value in (("overlap_comm", True), ("contiguous_gradients", True),
                           ("reduce_bucket_size", 50_000_000), ("allgather_bucket_size", 200_000_000)):
            if zero.get(key, "auto") == "auto":
                zero[key] = value


def optimizer_step(accelerator, prepared: Prepared, batches, accumulate: int, grad_clip: float):
    """One optimizer step over `accumulate` micro-batches; returns their losses and the gradient norm
    (device tensors: nothing here waits for the GPU). DeepSpeed clips and steps inside backward."""
    losses, grad_norm = [], None
    model, optimizer = prepared.loss_model, prepared.optimizer
    for _ in range(accumulate):
        batch = next(batches)
        with accelerator.accumulate(model):
            loss = model(batch["input_ids"], batch["targets"])
            accelerator.backward(loss)
            if accelerator.sync_gradients and not is_deepspeed(accelerator):
                if prepared.guard:
                    prepared.guard.mask_grads()
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses, grad_norm


def run_stage(accelerator, stage: Stage, model, dataset: PackedBlocks, stream: np.ndarray, settings: dict,
              checkpoints: Checkpoints, progress: Progress, resume: tuple[Path, dict] | None, num_rows: int,
              vocab: int, logger, stop: StopRequest | None = None) -> Prepared:
    """Train one stage (resuming inside it when `resume` is one of its checkpoints); raises
    TrainingStopped after saving a checkpoint when `stop` has seen SIGTERM."""
    micro, accumulate = settings["micro_batch_size"], settings["gradient_accumulation"]
    global_batch = micro * accumulate * accelerator.num_processes
    blocks = stream[stage.first_step * global_batch : (stage.first_step + stage.steps) * global_batch]
    # Its own generator: a loader's iterator draws a seed, which must not come from the global RNG that
    # dropout uses and checkpoints restore (a resumed run creates its iterator at another point).
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=IndexSampler(blocks),
                                         pin_memory=accelerator.device.type == "cuda",
                                         generator=torch.Generator().manual_seed(settings["seed"]))
    prepared = prepare_stage(accelerator, stage, model, loader, settings, num_rows)
    guard = prepared.guard
    done = 0
    if resume:
        accelerator.load_state(str(resume[0]))
        done = resume[1]["stage_step"]
        prepared.loader = accelerator.skip_first_batches(prepared.loader, done * accumulate)
        logger.info(f"resumed stage {stage.index} at step {progress.step} from {resume[0]}")
    if guard:
        guard.after_prepare(accelerator, prepared.loss_model)
        if resume and guard.digest() != resume[1]["held_digest"]:
            raise RuntimeError("held rows differ from the values they had when the stage began")
    logger.info(f"stage {stage.index} ({stage.kind}): {stage.steps} steps, {len(stage.learn_rows)} rows of the "
                f"embedding learn, {len(stage.held_rows)} held" + (
                    " (mask applied to sharded gradients)" if guard and guard.explicit else ""))

    def check_held(where: str) -> None:
        if guard is None:
            return
        change = guard.max_change(accelerator)
        logger.info(f"held rows, stage {stage.index} {where}: max abs change of fp32 weights = {change:.1e} "
                    f"over {len(stage.held_rows)} rows")
        progress.checks.append({"stage": stage.index, "step": progress.step, "held_rows": len(stage.held_rows),
                                "max_abs_change": change})
        if change != 0.0:
            raise RuntimeError(f"held rows moved by {change:g} in stage {stage.index}")

    prepared.loss_model.train()
    batches = iter(prepared.loader)
    started = time.perf_counter()
    window_start, window_tokens, window_micro = started, 0, 0
    window_loss = torch.zeros((), device=accelerator.device)
    block_tokens = dataset.meta["block_size"]
    for stage_step in range(done + 1, stage.steps + 1):
        losses, grad_norm = optimizer_step(accelerator, prepared, batches, accumulate, settings["grad_clip"])
        if progress.first_loss is None:
            progress.first_loss = accelerator.reduce(losses[0], "mean").item()
            logger.info(f"first loss {progress.first_loss:.4f} (ln(vocab) = {math.log(vocab):.4f})")
            warning = first_loss_warning(progress.first_loss, vocab)
            if warning:
                logger.warning(warning)
        prepared.scheduler.step()
        window_loss += torch.stack(losses).sum()
        progress.step += 1
        progress.tokens += global_batch * block_tokens
        window_tokens += global_batch * block_tokens
        window_micro += accumulate
        last = stage_step == stage.steps
        if progress.step % settings["log_every"] == 0 or last:
            if is_deepspeed(accelerator):
                grad_norm = accelerator.clip_grad_norm_(prepared.loss_model.parameters(), settings["grad_clip"])
            now = time.perf_counter()
            record = {"step": progress.step, "stage": stage.index,
                      "loss": round(accelerator.reduce(window_loss, "mean").item() / window_micro, 5),
                      "grad_norm": None if grad_norm is None else round(float(grad_norm), 5),
                      "lr": prepared.scheduler.get_last_lr()[0], "tokens": progress.tokens,
                      "tokens_per_s": round(window_tokens / (now - window_start), 1)}
            checkpoints.append_log(record)
            logger.info(json.dumps(record))
            window_loss.zero_()
            window_start, window_tokens, window_micro = now, 0, 0
        if last or progress.step % settings["frozen_check_every"] == 0:
            check_held("end" if last else f"step {progress.step}")
        saved = last or progress.step % settings["checkpoint_every"] == 0
        stopping = not last and stop is not None and stop.requested(accelerator, progress.step, settings["log_every"])
        if saved or stopping:
            checkpoints.save({
                "step": progress.step, "stage": stage.index, "stage_step": stage_step, "tokens": progress.tokens,
                "elapsed": progress.elapsed + time.perf_counter() - started, "first_loss": progress.first_loss,
                "checks": progress.checks, "held_digest": guard.digest() if guard else None,
                "settings": settings, "key": checkpoints.key})
        if stopping:
            raise TrainingStopped(progress.step)
    progress.elapsed += time.perf_counter() - started
    return prepared


def save_output(out: str, model_dir: str, stage: Stage, settings: dict, state: dict[str, torch.Tensor],
                trust_remote_code: bool, log_path: Path, stats: dict) -> None:
    """Write the trained model (LoRA merged) in the input's dtype, with the tokenizer, log and stats.

    Held rows get the input model's exact values back; the checks during training proved they did not
    move since prepare, so this only undoes rounding by a bf16 cast at prepare (DeepSpeed).
    """
    model = load_model(model_dir, trust_remote_code, dtype="auto")
    held = torch.from_numpy(stage.held_rows)
    before = [w.detach()[held].clone() for w in embedding_weights(model)]
    if stage.kind == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(settings))
        load_weights(model, state)
        model = model.merge_and_unload()
    else:
        load_weights(model, state)
    drift = 0.0
    with torch.no_grad():
        for weight, value in zip(embedding_weights(model), before):
            if len(held):
                drift = max(drift, float((weight[held].float() - value.float()).abs().max()))
                weight[held] = value
    stats["held_rows_vs_input"] = {"rows": len(held), "max_abs_change_before_restore": drift}
    log.info("held rows vs the input model: max abs change %.1e over %d rows (restored to the input values)",
             drift, len(held))
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(model_dir, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        shutil.copyfile(log_path, tmp / "train_log.jsonl")
        (tmp / "training_stats.json").write_text(json.dumps(stats, indent=2, default=str) + "\n")


def train(args: argparse.Namespace) -> None:
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed
    from transformers import AutoConfig

    settings = resolve_settings(read_settings_arg(args.settings), args.set or [])
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save/load lines drown ours
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = PackedBlocks(args.data)
    budget = read_meta(args.budget_from) if args.budget_from else dataset.meta
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    num_rows = (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
    if dataset.meta["vocab_size"] > num_rows:
        raise UserError(f"{args.data}: packed with a tokenizer of {dataset.meta['vocab_size']} ids, more than "
                        f"the {num_rows} rows of {args.model}'s embedding")
    rules = read_rules(args.rules, num_rows) if args.rules else None

    accelerator = make_accelerator(settings)
    logger = get_logger("ivr.train")
    set_seed(settings["seed"])
    global_batch = settings["micro_batch_size"] * settings["gradient_accumulation"] * accelerator.num_processes
    epochs = settings["max_tokens"] / budget["tokens"] if settings["max_tokens"] else settings["epochs"]
    total_steps = max(1, math.ceil(epochs * dataset.meta["blocks"] / global_batch))
    stages = plan_stages(settings, total_steps, num_rows, rules)
    stream = block_stream(dataset.meta["blocks"], total_steps * global_batch, settings["seed"])
    world = {"processes": accelerator.num_processes, "distributed": accelerator.distributed_type.name,
             "mixed_precision": accelerator.mixed_precision}
    plan = {"epochs": epochs, "total_steps": total_steps, "blocks_per_step": global_batch,
            "tokens_per_step": global_batch * dataset.meta["block_size"],
            "stages": [{"stage": s.index, "kind": s.kind, "steps": s.steps, "lr": s.lr,
                        "learn_rows": len(s.learn_rows), "held_rows": len(s.held_rows)} for s in stages]}
    key = run_key(args.model, dataset.meta, budget, args.rules, settings, world)
    checkpoints = Checkpoints(args.checkpoint_dir, key, accelerator, {"settings": settings, "plan": plan, **world})
    resume = checkpoints.latest()
    progress = Progress(checks=[])
    if resume:
        state = resume[1]
        progress = Progress(step=state["step"], tokens=state["tokens"], elapsed=state["elapsed"],
                            first_loss=state["first_loss"], checks=state["checks"])
        checkpoints.truncate_log(progress.step)
        logger.info(f"resuming from {resume[0]}: step {progress.step} of {total_steps}")
    else:
        logger.info(f"starting fresh: {total_steps} steps, {epochs:.4g} epochs of {dataset.meta['blocks']} blocks, "
                    f"{global_batch} blocks of {dataset.meta['block_size']} tokens per step, "
                    f"{accelerator.num_processes} process(es), {world['distributed']}, {world['mixed_precision']}")

    prepared = None
    with StopRequest() as stop:
        try:
            for stage in stages:
                if resume and resume[1]["stage"] > stage.index:
                    continue
                weights = None
                if prepared is not None:  # the previous stage's weights, in full fp32, start this one
                    weights = full_state(accelerator, prepared.loss_model, prepared.originals)
                    prepared = None
                    accelerator.free_memory()
                with whole_models(accelerator):
                    model = build_stage_model(args.model, stage, settings, args.trust_remote_code, weights)
                stage_resume = resume if resume and resume[1]["stage"] == stage.index else None
                prepared = run_stage(accelerator, stage, model, dataset, stream, settings, checkpoints, progress,
                                     stage_resume, num_rows, dataset.meta["vocab_size"], logger, stop)
                del model  # the prepared wrapper holds it; free it with the wrapper at the next stage
        except TrainingStopped as stopped:
            logger.warning(f"SIGTERM: stopped after step {stopped.step} of {total_steps} with a checkpoint in "
                           f"{checkpoints.root}; a rerun with the same inputs and settings resumes from it")
            sys.exit(128 + signal.SIGTERM)
    final = full_state(accelerator, prepared.loss_model, prepared.originals)
    if accelerator.is_main_process:
        records = [json.loads(line) for line in checkpoints.log_path.read_text().splitlines()]
        data_bytes = sum(budget["bytes"].values())
        stats = {
            "tokens_seen": progress.tokens,
            "bytes_seen_estimate": round(epochs * data_bytes),
            "epochs": epochs,
            "wall_clock_s": round(progress.elapsed, 1),
            "tokens_per_s": round(progress.tokens / max(progress.elapsed, 1e-9), 1),
            "first_loss": progress.first_loss,
            "ln_vocab": math.log(dataset.meta["vocab_size"]),
            "final_loss": records[-1]["loss"] if records else None,
            "held_row_checks": progress.checks,
            "plan": plan,
            "world": world,
            "settings": settings,
        }
        with whole_models(accelerator):
            save_output(args.out, args.model, stages[-1], settings, final, args.trust_remote_code,
                        checkpoints.log_path, stats)
        logger.info(f"saved {args.out}: {progress.tokens} tokens in {progress.elapsed:.0f} s of training, "
                    f"loss {progress.first_loss:.3f} -> {stats['final_loss']}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(checkpoints.root, ignore_errors=True)
    accelerator.end_training()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder to fine-tune; its tokenizer goes with the result")
    parser.add_argument("--data", required=True, help="folder of packed blocks (pack_data.py)")
    parser.add_argument("--out", required=True, help="output Hugging Face folder")
    parser.add_argument("--checkpoint-dir", required=True, help="folder for resumable checkpoints (not an output)")
    parser.add_argument("--rules", help="remap_rules.yaml: reassigned rows (stage 1) and frozen special tokens")
    parser.add_argument("--budget-from", help="meta.json whose token count turns training.max_tokens into epochs, "
                                              "so that a control run sees the same documents (default: --data's)")
    parser.add_argument("--settings", help="training settings: JSON, or a YAML/JSON file (its training: section)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    parser.add_argument("--trust-remote-code", action="store_true")
    train(parser.parse_args(argv))


if __name__ == "__main__":
    run_main(main)
