"""The training loop of scripts/train_sft.py: the accelerator, a stage's model, optimizer and schedule,
optimizer steps, logging, held-row checks and checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ivr import tracking
from ivr.checkpoints import Checkpoints, StopRequest, TrainingStopped
from ivr.cli import UserError, log
from ivr.dev_eval import DevEval
from ivr.held_rows import RowGuard, is_deepspeed
from ivr.loss import CausalLMLoss, enable_compile
from ivr.modeling import embedding_layout, embedding_weights, load_causal_lm, load_weights
from ivr.packed_data import IndexSampler, PackedBlocks
from ivr.stages import Stage, lr_factor


FIRST_LOSS_MARGIN = 1.0  # nats above ln(vocab), i.e. clearly worse than guessing uniformly
BETAS = (0.9, 0.95)
adamw_kernel_on_cuda = True  # one process or DDP on CUDA: ivr.adamw_kernel's step (bench: --torch-adamw)
# Settings that change how a run is carried out or reported, not what it computes: they may change
# between a kill and the rerun without invalidating the checkpoints.


def load_model(model_dir: str, trust_remote_code: bool, dtype=torch.float32):
    """The causal LM in fp32 (mixed precision comes from autocast or DeepSpeed), checked for a plain head."""
    model = load_causal_lm(model_dir, trust_remote_code=trust_remote_code, dtype=dtype)
    embedding_layout(model)  # refuses a head with a bias or of another shape than the embedding
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None):
            raise UserError(f"{model_dir}: the model scales its logits ({name}), which the chunked loss does not")
    return model


def lora_config(settings: dict):
    from peft import LoraConfig

    lora = settings["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], bias="none")


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


def first_loss_warning(loss: float, vocab: int) -> str | None:
    expected = math.log(vocab)
    if loss <= expected + FIRST_LOSS_MARGIN:
        return None
    return (f"first loss {loss:.3f} is far above ln(vocab) = {expected:.3f}, worse than guessing uniformly: "
            "likely a bad initialisation of the reassigned rows, labels that do not match the inputs "
            "(wrong tokenizer for this model, shifted twice), or padding counted in the loss")


@dataclass
class Progress:
    step: int = 0  # optimizer steps done (global, across stages)
    tokens: int = 0  # token positions processed
    elapsed: float = 0.0  # seconds of training over all runs
    first_loss: float | None = None
    checks: list | None = None


def make_accelerator(settings: dict, checkpoint_dir: str | Path | None = None):
    """The Accelerator; with a checkpoint folder and training.tensorboard on, with the TensorBoard tracker
    (ivr.tracking) writing into its tensorboard/."""
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
        **(tracking.accelerator_kwargs(settings, checkpoint_dir) if checkpoint_dir is not None else {}),
    )


def compile_scope(accelerator, settings: dict) -> str:
    """training.compile_scope where the body may be compiled whole: one process or DDP (whose compiled
    graphs dynamo splits at the gradient buckets); DeepSpeed and FSDP compile the blocks (their hooks
    gather, shard or reduce per module)."""
    scope = settings.get("compile_scope", "blocks")
    return scope if accelerator.distributed_type.name in ("NO", "MULTI_GPU") else "blocks"


def cuda_graphs_off(accelerator, settings: dict) -> str | None:
    """Why training.cuda_graphs does not take effect here, or None where it does: compiled, one process, on
    a CUDA device, one micro-batch per optimizer step. Under DDP, DeepSpeed or FSDP the gradient hooks of
    the backward pass talk to other processes, which a replayed graph would skip. With gradient
    accumulation, training on an H200 stopped with "accessing tensor output of CUDAGraphs that has been
    overwritten by a subsequent run": most likely a replayed backward's gradients, which live in the
    graphs' memory, reused by the next micro-batch's replay before the two are added."""
    if not settings.get("cuda_graphs"):
        return "training.cuda_graphs is false"
    if not settings["compile"]:
        return "training.compile is false"
    if accelerator.device.type != "cuda":
        return "not on a CUDA device"
    if accelerator.distributed_type.name != "NO":
        return f"more than one process ({accelerator.distributed_type.name})"
    if settings.get("gradient_accumulation", 1) != 1:
        return "gradient_accumulation is above 1 (a replay would overwrite the micro-batch before's gradients)"
    return None


@dataclass
class Prepared:
    """A stage's objects after accelerator.prepare."""

    loss_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object
    guard: RowGuard | None
    originals: dict[str, torch.Tensor]  # CPU values of the parameters this stage does not train
    cuda_graphs: bool = False  # the compiled regions replay CUDA graphs (cuda_graphs_off)
    clip_in_step: bool = False  # gradients clipped inside the fused AdamW step (clip_in_optimizer_step)


def prepare_stage(accelerator, stage: Stage, model, loader, settings: dict, num_rows: int,
                  compile_mode: str | None = None) -> Prepared:
    """Loss wrapper, row guard (hooks registered before prepare), optimizer and schedule, prepared."""
    loss_model = CausalLMLoss(model, settings["loss_chunk_tokens"])
    weights = embedding_weights(model)
    trains_rows = any(w.requires_grad for w in weights)
    guard = RowGuard(weights, stage.held_rows, num_rows) if trains_rows and len(stage.held_rows) else None
    originals = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if not p.requires_grad}
    why_not = cuda_graphs_off(accelerator, settings)
    if why_not and settings.get("cuda_graphs") and accelerator.device.type == "cuda":
        log.info("CUDA graphs off: %s", why_not)
    cuda_graphs = why_not is None
    if settings["compile"]:
        enable_compile(loss_model, compile_mode, compile_scope(accelerator, settings), cuda_graphs)
    fused = accelerator.device.type == "cuda"
    # one process or DDP (whose gradients are whole and reduced after backward); FSDP clips its shards
    whole_gradients = accelerator.distributed_type.name in ("NO", "MULTI_GPU")
    optimizer_class = torch.optim.AdamW
    if fused and whole_gradients and adamw_kernel_on_cuda:
        from ivr.adamw_kernel import TritonAdamW as optimizer_class
    optimizer = optimizer_class(param_groups(loss_model, settings["weight_decay"]), lr=stage.lr, betas=BETAS,
                                fused=fused)
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
    clip_in_step = fused and whole_gradients
    return Prepared(loss_model, optimizer, scheduler, loader, guard, originals, cuda_graphs, clip_in_step)


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


def clip_in_optimizer_step(optimizer, parameters, max_norm: float | None) -> torch.Tensor:
    """Gradient clipping for a fused AdamW, whose kernel divides each gradient by `grad_scale` as it
    reads it (how torch's GradScaler unscales): the next step clips by max(norm / max_norm, 1) within its
    own pass, saving the pass that multiplies every gradient in place. Returns the total norm, unclipped."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper steps the torch optimizer
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], foreach=True)
    if max_norm:
        inner.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # clip_grad_norm_'s 1e-6
    return norm


def optimizer_step(accelerator, prepared: Prepared, batches, accumulate: int, grad_clip: float):
    """One optimizer step over `accumulate` micro-batches; returns their losses and the gradient norm
    (device tensors: nothing here waits for the GPU). DeepSpeed clips and steps inside backward."""
    losses, grad_norm = [], None
    model, optimizer = prepared.loss_model, prepared.optimizer
    for _ in range(accumulate):
        batch = next(batches)
        if prepared.cuda_graphs:  # the graphs' outputs of the last micro-batch are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        with accelerator.accumulate(model):
            loss = model(batch["input_ids"], batch["targets"])
            accelerator.backward(loss)
            if accelerator.sync_gradients and not is_deepspeed(accelerator):
                if prepared.guard:
                    prepared.guard.mask_grads()
                if prepared.clip_in_step:
                    grad_norm = clip_in_optimizer_step(optimizer, model.parameters(), grad_clip)
                else:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses, grad_norm


@dataclass
class Watch:
    """What the train log reports beside the loss: the compute spent so far, and bits per byte on the
    dev split before the first step, every `eval_every` steps and after the last."""

    dev: DevEval | None
    eval_every: int
    total_steps: int
    flops_per_token: float
    bytes_per_token: float  # text bytes per token position of the packed data

    def due(self, step: int) -> bool:
        if self.dev is None:
            return False
        return step == self.total_steps or (self.eval_every > 0 and step % self.eval_every == 0)

    def compute(self, tokens: int) -> dict:
        return {"bytes": round(tokens * self.bytes_per_token), "flops": tokens * self.flops_per_token}


def run_stage(accelerator, stage: Stage, model, dataset: PackedBlocks, stream: np.ndarray, settings: dict,
              checkpoints: Checkpoints, progress: Progress, resume: tuple[Path, dict] | None, num_rows: int,
              vocab: int, logger, stop: StopRequest | None = None, watch: Watch | None = None) -> Prepared:
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
        tracking.log_held_check(accelerator, progress.step, change)
        if change != 0.0:
            raise RuntimeError(f"held rows moved by {change:g} in stage {stage.index}")

    def measure_dev(record: dict) -> float:
        """Add dev bits per byte to a log record; returns the seconds it took (not training time)."""
        began = time.perf_counter()
        record.update(watch.dev.measure(accelerator, accelerator.unwrap_model(prepared.loss_model).lm))
        return time.perf_counter() - began

    if watch and watch.due(0) and progress.step == 0:  # before the clock starts, so not training time
        record = {"step": 0, "stage": stage.index, "tokens": 0, **watch.compute(0)}
        measure_dev(record)
        checkpoints.append_log(record)
        logger.info(json.dumps(record))
    prepared.loss_model.train()
    batches = iter(prepared.loader)
    started = time.perf_counter()
    evaluating = 0.0  # seconds spent measuring the dev split since, kept out of training time and tokens/s
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
        evaluate = watch is not None and watch.due(progress.step)
        if progress.step % settings["log_every"] == 0 or last or evaluate:
            if is_deepspeed(accelerator):
                grad_norm = accelerator.clip_grad_norm_(prepared.loss_model.parameters(), settings["grad_clip"])
            now = time.perf_counter()
            record = {"step": progress.step, "stage": stage.index,
                      "loss": round(accelerator.reduce(window_loss, "mean").item() / window_micro, 5),
                      "grad_norm": None if grad_norm is None else round(float(grad_norm), 5),
                      "lr": prepared.scheduler.get_last_lr()[0], "tokens": progress.tokens,
                      "tokens_per_s": round(window_tokens / (now - window_start), 1)}
            if watch:
                record.update(watch.compute(progress.tokens))
            if evaluate:
                evaluating += measure_dev(record)
            checkpoints.append_log(record)
            logger.info(json.dumps(record))
            window_loss.zero_()
            window_start, window_tokens, window_micro = time.perf_counter(), 0, 0
        if last or progress.step % settings["frozen_check_every"] == 0:
            check_held("end" if last else f"step {progress.step}")
        saved = last or progress.step % settings["checkpoint_every"] == 0
        stopping = not last and stop is not None and stop.requested(accelerator, progress.step, settings["log_every"])
        if saved or stopping:
            checkpoints.save({
                "step": progress.step, "stage": stage.index, "stage_step": stage_step, "tokens": progress.tokens,
                "elapsed": progress.elapsed + time.perf_counter() - started - evaluating,
                "first_loss": progress.first_loss,
                "checks": progress.checks, "held_digest": guard.digest() if guard else None,
                "settings": settings, "key": checkpoints.key})
        if stopping:
            raise TrainingStopped(progress.step)
    progress.elapsed += time.perf_counter() - started - evaluating
    return prepared
