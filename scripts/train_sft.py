#!/usr/bin/env python3
"""Fine-tune a causal LM on packed blocks (from pack_data.py), launched by `accelerate launch`.

    accelerate launch --config_file config/accelerate/<name>.yaml --num_processes N \\
        scripts/train_sft.py --model DIR --data DIR --out DIR --checkpoint-dir DIR [--rules remap_rules.yaml]

Works on CPU, one or several GPUs (DDP), DeepSpeed ZeRO-2/3 and FSDP2. The settings are the `training:`
section of the workflow config (--settings, --set KEY=VALUE). The budget: the control makes
training.epochs passes over its data (or training.max_tokens tokens); a run given --compute-reference
(the control's packed data) takes training.budget of the control's optimizer steps with the same batch
shape, so that share of its training FLOPs (or, with budget one_pass, the same passes over its own data).
Training runs in up to two stages:

  1. rows  only the reassigned rows of the input embedding (and of an untied head) learn; every other
           row is held by a gradient mask (needs --rules; training.stage1_share of the steps);
  2. full  every weight learns except special tokens marked `frozen` in the rules, or
     lora  LoRA adapters on the linear layers plus the reassigned rows; merged into the saved model.

Held rows are checked during training and at the end: the maximum absolute change of their fp32 weights
(DeepSpeed's fp32 master copy) since the stage began must be exactly 0. The embedding and head matrices
never get weight decay, which would move held rows although their gradient is zero.

After training the weights may be interpolated with an anchor (training.interpolation and
training.interpolation_anchor, ivr/retention.py): the model training started from, or that model with the
reassigned rows as stage 1 left them. `auto` keeps the weight with the best --dev bits per byte among those
that hold every base-language --unseen-dev text within training.retention_tolerance of --reference-model
(the base), trying 1.0, 0.9, ... towards each anchor until the --dev bits per byte get worse than the best
such weight's; the weights tried and their scores go into training_stats.json.

Checkpoints (model, optimizer, scheduler, RNG, step, data position, resolved settings) go to
--checkpoint-dir every training.checkpoint_every steps, under a key hashed from the inputs and settings: a
rerun resumes from the newest one only when the key matches, otherwise it starts fresh. --out gets a
Hugging Face folder with the tokenizer of --model, train_log.jsonl (step, loss, grad norm, lr, tokens/s,
bytes and FLOPs so far, and bits per byte on --dev / --general-dev before the first step, every
training.eval_every steps and after the last), training_stats.json (steps, tokens, bytes, passes, FLOPs,
GPU-seconds, first and final loss, final dev bits per byte, held-row checks) and, unless
training.tensorboard is off, tensorboard/ (the same records and checks as TensorBoard scalars, written in
--checkpoint-dir's tensorboard/ while training).

SIGTERM (what Slurm sends at a job's time limit, KillWait seconds before SIGKILL) stops training after the
current optimizer step with a checkpoint of that step, and the script exits with status 143; the retry
resumes from there.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr import tracking  # noqa: E402
from ivr.checkpoints import Checkpoints, TrainingStopped, StopRequest, run_key  # noqa: E402
from ivr.cli import UserError, atomic_path, log, run_main  # noqa: E402
from ivr.compute import flops_per_token, plan_steps, reference_steps  # noqa: E402
from ivr.dev_eval import DevEval, read_dev_texts  # noqa: E402
from ivr.held_rows import full_state  # noqa: E402
from ivr.modeling import embedding_weights, load_causal_lm, load_weights  # noqa: E402
from ivr.tokenization import load_tokenizer  # noqa: E402
from ivr.packed_data import PackedBlocks, block_stream, read_meta  # noqa: E402
from ivr.retention import (alphas_of, anchors_of, choose_weight, interpolate, parse_unseen,  # noqa: E402
                           read_unseen, retention_ratio, with_rows)
from ivr.stages import Stage, plan_stages, read_rules  # noqa: E402
from ivr.train_settings import read_settings_arg, resolve_settings  # noqa: E402
from ivr.trainer import (Progress, Watch, build_stage_model, load_model, lora_config,  # noqa: E402
                         make_accelerator, run_stage, whole_models)


def score(model, tokenizer, texts: dict[str, list[str]], byte_budget: int, device) -> dict[str, float]:
    """Bits per byte of a model on each named set of documents, measured as the dev split is while training
    (bf16 autocast on a GPU)."""
    import contextlib

    from ivr.metrics import bits_per_byte

    cuda = torch.device(device).type == "cuda"
    batch_tokens = 32768 if cuda else 4096
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        return {key: round(bits_per_byte(model, tokenizer, docs, byte_budget, max_batch_tokens=batch_tokens,
                                         device=device).bits_per_byte, 6)
                for key, docs in texts.items() if docs}


def retain(model, anchors: dict[str, dict[str, torch.Tensor]], args: argparse.Namespace, settings: dict,
           device) -> dict:
    """Interpolate the trained model with an anchor (training.interpolation, training.interpolation_anchor),
    the weight chosen by the retention rule on the dev texts when `auto`; returns what was measured."""
    alphas = alphas_of(settings["interpolation"])
    if alphas == (1.0,):
        return {"alpha": 1.0, "rule": "off (training.interpolation: 1.0)"}
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if len(alphas) == 1 and len(anchors) == 1:
        (anchor, start), = anchors.items()
        load_weights(model, interpolate(start, trained, alphas[0]))
        return {"alpha": alphas[0], "anchor": anchor, "rule": "fixed (training.interpolation)"}
    unseen = [parse_unseen(spec, "--unseen-dev") for spec in args.unseen_dev]
    docs = {t: read_unseen(t, settings["eval_documents"]) for t in unseen}
    base_language = {f"{t.name}_bpb": d for t, d in docs.items() if t.language == "base"}
    if not base_language:
        return {"alpha": 1.0, "rule": "auto, but no base-language dev text (--unseen-dev) to keep: none"}
    texts = {"dev_bpb": read_dev_texts(args.dev, settings["eval_documents"]),
             "general_dev_bpb": read_dev_texts(args.general_dev, settings["eval_documents"]),
             **{f"{t.name}_bpb": d for t, d in docs.items()}}
    reference_dir = args.reference_model or args.model  # the base model, with its own tokenizer
    base = load_causal_lm(reference_dir, device=device, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    reference = score(base, load_tokenizer(reference_dir, trust_remote_code=args.trust_remote_code), base_language,
                      settings["eval_byte_budget"], device)
    del base
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    scores: dict[tuple[str, float], dict[str, float]] = {}
    model.to(device)
    tolerance = settings["retention_tolerance"]
    for anchor, start in anchors.items():
        for alpha in alphas:  # from 1.0 down, until the domain dev gets worse than the best weight that keeps the base
            if alpha == 1.0 and scores:  # the trained model itself, whatever the anchor
                scores[anchor, alpha] = next(iter(scores.values()))
                continue
            load_weights(model, interpolate(start, trained, alpha))
            scores[anchor, alpha] = score(model, tokenizer, texts, settings["eval_byte_budget"], device)
            log.info("interpolation %.2f towards %s: %s", alpha, anchor, scores[anchor, alpha])
            kept = [w for w in scores if retention_ratio(scores[w], reference) <= 1 + tolerance]
            if kept and scores[anchor, alpha]["dev_bpb"] > min(scores[w]["dev_bpb"] for w in kept):
                break
    (anchor, alpha), why = choose_weight(scores, reference, tolerance)
    load_weights(model, interpolate(anchors[anchor], trained, alpha))
    model.to("cpu")
    log.info("interpolation: alpha %.2f towards %s (%s)", alpha, anchor, why)
    return {"alpha": alpha, "anchor": anchor, "rule": why, "tolerance": settings["retention_tolerance"],
            "reference": reference,
            "scores": {name: {f"{a:g}": s for (n, a), s in scores.items() if n == name} for name in anchors}}


def embedding_keys(model) -> list[list[str]]:
    """The state keys of each embedding matrix (embedding_weights' order), tied aliases included."""
    state = model.state_dict(keep_vars=True)
    return [[k for k, v in state.items() if v is weight] for weight in embedding_weights(model)]


def save_stage1_rows(path: Path, model, state: dict[str, torch.Tensor], rows) -> None:
    """The reassigned rows as stage 1 left them (the `stage1` anchor), one tensor per embedding matrix."""
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    values = {f"matrix{i}": state[names[id(w)]][rows].contiguous() for i, w in enumerate(embedding_weights(model))}
    partial = path.with_suffix(".partial")
    save_file({"rows": torch.from_numpy(rows), **values}, partial)
    partial.replace(path)


def save_output(out: str, args: argparse.Namespace, stage: Stage, settings: dict, state: dict[str, torch.Tensor],
                log_path: Path, stats: dict, device, stage1_rows: dict[str, torch.Tensor] | None) -> None:
    """Write the trained model (LoRA merged, interpolated as training.interpolation says) in the input's
    dtype, with the tokenizer, log and stats.

    Held rows get the input model's exact values back; the checks during training proved they did not
    move since prepare, so this only undoes rounding by a bf16 cast at prepare (DeepSpeed).
    """
    model_dir, trust_remote_code = args.model, args.trust_remote_code
    model = load_model(model_dir, trust_remote_code, dtype="auto")
    held = torch.from_numpy(stage.held_rows)
    before = [w.detach()[held].clone() for w in embedding_weights(model)]
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    anchors = {"start": start}
    if stage1_rows is not None:
        anchors["stage1"] = with_rows(start, embedding_keys(model), stage1_rows["rows"],
                                      [stage1_rows[f"matrix{i}"] for i in range(len(embedding_weights(model)))])
    anchors = {name: anchors[name] for name in anchors_of(settings["interpolation_anchor"], stage1_rows is not None)}
    if stage.kind == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(settings))
        load_weights(model, state)
        model = model.merge_and_unload()
    else:
        load_weights(model, state)
    stats["interpolation"] = retain(model, anchors, args, settings, device)
    del start, anchors
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
        tracking.copy_events(log_path.parent, tmp)
        (tmp / "training_stats.json").write_text(json.dumps(stats, indent=2, default=str) + "\n")


def plan_compute(args: argparse.Namespace, settings: dict, dataset: PackedBlocks, global_batch: int) -> tuple[int, dict]:
    """Optimizer steps of this run (its budget: its own, or a share of --compute-reference's) and how
    that was decided, for the stats."""
    reference = read_meta(args.compute_reference) if args.compute_reference else None
    steps = plan_steps(settings, dataset.meta, global_batch, reference)
    budget = {"kind": "control" if reference is None else "share of the control's compute"}
    if reference is not None:
        control_steps = reference_steps(settings, reference, global_batch)
        budget.update(setting=settings["budget"], control_steps=control_steps, share=steps / control_steps)
    return steps, budget


def dev_watch(args: argparse.Namespace, settings: dict, dataset: PackedBlocks, total_steps: int) -> Watch:
    """Compute per token and the dev-split measurements the train log gets."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    with torch.device("meta"):  # the shape is enough to count parameters
        shape = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    texts = {"dev_bpb": read_dev_texts(args.dev, settings["eval_documents"]),
             "general_dev_bpb": read_dev_texts(args.general_dev, settings["eval_documents"])}
    for text in (parse_unseen(spec, "--unseen-dev") for spec in args.unseen_dev):
        texts[f"{text.name}_bpb"] = read_unseen(text, settings["eval_documents"])
    dev = None
    if any(texts.values()):
        dev = DevEval(load_tokenizer(args.model, trust_remote_code=args.trust_remote_code), texts,
                      settings["eval_byte_budget"])
    meta = dataset.meta
    return Watch(dev, settings["eval_every"], total_steps, flops_per_token(shape, meta["block_size"]),
                 sum(meta["bytes"].values()) / max(1, meta["blocks"] * meta["block_size"]))


def train(args: argparse.Namespace) -> None:
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed
    from transformers import AutoConfig

    settings = resolve_settings(read_settings_arg(args.settings), args.set or [])
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save/load lines drown ours
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = PackedBlocks(args.data)
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    num_rows = (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
    if dataset.meta["vocab_size"] > num_rows:
        raise UserError(f"{args.data}: packed with a tokenizer of {dataset.meta['vocab_size']} ids, more than "
                        f"the {num_rows} rows of {args.model}'s embedding")
    rules = read_rules(args.rules, num_rows) if args.rules else None

    accelerator = make_accelerator(settings, args.checkpoint_dir)
    logger = get_logger("ivr.train")
    set_seed(settings["seed"])
    global_batch = settings["micro_batch_size"] * settings["gradient_accumulation"] * accelerator.num_processes
    total_steps, budget = plan_compute(args, settings, dataset, global_batch)
    epochs = total_steps * global_batch / dataset.meta["blocks"]
    stages = plan_stages(settings, total_steps, num_rows, rules)
    has_stage1 = len(stages) == 2 and stages[0].kind == "rows"
    anchors_of(settings["interpolation_anchor"], has_stage1)  # an anchor this run cannot have: refused before training
    stream = block_stream(dataset.meta["blocks"], total_steps * global_batch, settings["seed"])
    watch = dev_watch(args, settings, dataset, total_steps)
    world = {"processes": accelerator.num_processes, "distributed": accelerator.distributed_type.name,
             "mixed_precision": accelerator.mixed_precision}
    plan = {"epochs": epochs, "total_steps": total_steps, "blocks_per_step": global_batch,
            "tokens_per_step": global_batch * dataset.meta["block_size"], "budget": budget,
            "stages": [{"stage": s.index, "kind": s.kind, "steps": s.steps, "lr": s.lr,
                        "learn_rows": len(s.learn_rows), "held_rows": len(s.held_rows)} for s in stages]}
    reference_digest = read_meta(args.compute_reference)["digest"] if args.compute_reference else None
    key = run_key(args.model, dataset.meta, reference_digest, args.rules, settings, world)
    checkpoints = Checkpoints(args.checkpoint_dir, key, accelerator, {"settings": settings, "plan": plan, **world})
    resume = checkpoints.latest()
    progress = Progress(checks=[])
    if resume:
        state = resume[1]
        progress = Progress(step=state["step"], tokens=state["tokens"], elapsed=state["elapsed"],
                            first_loss=state["first_loss"], checks=state["checks"])
        logger.info(f"resuming from {resume[0]}: step {progress.step} of {total_steps}")
    else:
        logger.info(f"starting fresh: {total_steps} steps ({budget['kind']}), {epochs:.4g} passes over "
                    f"{dataset.meta['blocks']} blocks, {global_batch} blocks of {dataset.meta['block_size']} tokens "
                    f"per step, {accelerator.num_processes} process(es), {world['distributed']}, "
                    f"{world['mixed_precision']}")

    checkpoints.truncate_log(progress.step)  # what a killed run logged after its checkpoint (all, if none)
    tracking.start(accelerator, args.checkpoint_dir, checkpoints.log_path, progress.checks)

    # the `stage1` anchor of the interpolation, kept beside the checkpoints so that a resumed stage 2 has it
    stage1_path = checkpoints.root / "stage1_rows.safetensors"
    prepared = None
    with StopRequest() as stop:
        try:
            for stage in stages:
                if resume and resume[1]["stage"] > stage.index:
                    continue
                weights = None
                if prepared is not None:  # the previous stage's weights, in full fp32, start this one
                    weights = full_state(accelerator, prepared.loss_model, prepared.originals)
                    if accelerator.is_main_process:
                        save_stage1_rows(stage1_path, accelerator.unwrap_model(prepared.loss_model).model, weights,
                                         stages[0].learn_rows)
                    prepared = None
                    accelerator.free_memory()
                with whole_models(accelerator):
                    model = build_stage_model(args.model, stage, settings, args.trust_remote_code, weights)
                stage_resume = resume if resume and resume[1]["stage"] == stage.index else None
                prepared = run_stage(accelerator, stage, model, dataset, stream, settings, checkpoints, progress,
                                     stage_resume, num_rows, dataset.meta["vocab_size"], logger, stop, watch)
                del model  # the prepared wrapper holds it; free it with the wrapper at the next stage
        except TrainingStopped as stopped:
            logger.warning(f"SIGTERM: stopped after step {stopped.step} of {total_steps} with a checkpoint in "
                           f"{checkpoints.root}; a rerun with the same inputs and settings resumes from it")
            sys.exit(128 + signal.SIGTERM)
    final = full_state(accelerator, prepared.loss_model, prepared.originals)
    if accelerator.is_main_process:
        records = [json.loads(line) for line in checkpoints.log_path.read_text().splitlines()]
        losses = [r for r in records if "loss" in r]
        devs = [r for r in records if "dev_bpb" in r]
        stats = {
            "optimizer_steps": progress.step,
            "tokens_seen": progress.tokens,
            "bytes_seen": watch.compute(progress.tokens)["bytes"],
            "passes": epochs,
            "training_flops": watch.compute(progress.tokens)["flops"],
            "flops_per_token": watch.flops_per_token,
            "flops_note": "6 x parameters + 12 x layers x width x sequence per token, every step counted as full "
                          "fine-tuning (stage-1 steps compute no weight gradients, so they cost less than counted)",
            "wall_clock_s": round(progress.elapsed, 1),
            "gpu_seconds": round(progress.elapsed * accelerator.num_processes, 1)
            if accelerator.device.type == "cuda" else 0.0,
            "tokens_per_s": round(progress.tokens / max(progress.elapsed, 1e-9), 1),
            "first_loss": progress.first_loss,
            "ln_vocab": math.log(dataset.meta["vocab_size"]),
            "final_loss": losses[-1]["loss"] if losses else None,
            "dev_bpb": {k: v for k, v in devs[-1].items() if k.endswith("_bpb")} if devs else None,
            "held_row_checks": progress.checks,
            "plan": plan,
            "world": world,
            "settings": settings,
        }
        tracking.flush(accelerator)
        with whole_models(accelerator):
            stage1_rows = None
            if has_stage1:
                from safetensors.torch import load_file

                stage1_rows = load_file(stage1_path)
            save_output(args.out, args, stages[-1], settings, final, checkpoints.log_path, stats, accelerator.device,
                        stage1_rows)
        logger.info(f"saved {args.out}: {progress.tokens} tokens in {progress.elapsed:.0f} s of training, "
                    f"loss {progress.first_loss:.3f} -> {stats['final_loss']}"
                    + (f", dev bits per byte {stats['dev_bpb']}" if stats["dev_bpb"] else ""))
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
    parser.add_argument("--compute-reference", help="the control's packed data (folder or meta.json): this run's "
                                                    "steps are training.budget of the control's (default: its own budget)")
    parser.add_argument("--dev", help="dev split (JSON lines) whose bits per byte the train log reports")
    parser.add_argument("--general-dev", help="general-text dev split, reported beside --dev")
    parser.add_argument("--unseen-dev", action="append", default=[], metavar="NAME:LANGUAGE=PATH",
                        help="a dev text from a source no training input reads (LANGUAGE base or domain), reported "
                             "beside --dev; the base-language ones decide training.interpolation: auto (repeatable)")
    parser.add_argument("--reference-model", help="the base model whose bits per byte on the base-language "
                                                  "--unseen-dev texts the retention rule keeps (default: --model)")
    parser.add_argument("--settings", help="training settings: JSON, or a YAML/JSON file (its training: section)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    parser.add_argument("--trust-remote-code", action="store_true")
    train(parser.parse_args(argv))


if __name__ == "__main__":
    run_main(main)
