"""One measurement of the throughput benchmark in its own process (bench/train_throughput.py --mode ours,
--mode hf), and the command line that starts one."""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch

import throughput_common as common
import throughput_levers as levers
from throughput_common import (PEAK_FLOPS, RandomBlocks, StepTimes, build_model, environment, peak_memory_gib,
                               result, sync)
from throughput_profile import kernel_profile

from ivr import loss as ivr_loss
from ivr.compute import flops_per_token
from ivr.packed_data import IndexSampler
from ivr.stages import Stage
from ivr.train_settings import resolve_settings
from ivr.trainer import make_accelerator, optimizer_step, prepare_stage, set_trainable, whole_models


def wait_for_turn(args) -> None:
    """--handshake (set by --mode compare): the compile steps are done; say so, then wait until the
    comparing process gives this one the GPU (it pauses the measurements still compiling meanwhile)."""
    if not args.handshake:
        return
    sync()
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("the comparing process went away")


def run_ours(args) -> None:
    levers.before_prepare(args)
    overrides = [f"micro_batch_size={args.batch}", f"compile={str(args.compile).lower()}",
                 f"loss_chunk_tokens={args.chunk}", "weight_decay=0.1", "warmup_share=0"]
    if args.scope:
        overrides.append(f"compile_scope={args.scope}")
    overrides.append(f"cuda_graphs={str(args.cuda_graphs).lower()}")
    settings = resolve_settings({}, overrides, validate=False)
    accelerator = make_accelerator(settings)
    with whole_models(accelerator):
        model = build_model(args.model)
    flops = flops_per_token(model, common.SEQ)
    rows = model.get_input_embeddings().weight.shape[0]
    total = args.warmup + args.steps + args.profile_steps
    stage = Stage(2, "full", 0, total, settings["lr"], np.arange(rows), np.zeros(0, np.int64))
    model = set_trainable(model, stage, settings)
    world = accelerator.num_processes
    dataset = RandomBlocks(total * args.batch * world, rows, common.SEQ)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=IndexSampler(np.arange(len(dataset))),
                                         pin_memory=True)
    prepared = prepare_stage(accelerator, stage, model, loader, settings, rows, args.compile_mode)
    levers.after_prepare(args, prepared)
    scope = "eager"
    if args.compile:
        scope = "body" if accelerator.unwrap_model(prepared.loss_model).causal_attention else "blocks"
        scope = "graphs" if scope == "body" and prepared.cuda_graphs else scope
    prepared.loss_model.train()
    batches = iter(prepared.loader)
    losses = []

    def step() -> None:
        losses[:] = optimizer_step(accelerator, prepared, batches, 1, settings["grad_clip"])[0]
        prepared.scheduler.step()

    for _ in range(args.compile_steps):
        step()
    wait_for_turn(args)
    for _ in range(args.compile_steps, args.warmup):
        step()
    accelerator.wait_for_everyone()
    timer = StepTimes()
    timer.start()
    for _ in range(args.steps):
        step()
        timer.step()
    timer.stop()
    accelerator.wait_for_everyone()
    profile = None
    if args.profile_steps:
        try:
            profile = kernel_profile(step, args.profile_steps, args.trace)
        except Exception as err:  # the measurement above still counts
            profile = {"error": f"{type(err).__name__}: {err}"[:300]}
    if accelerator.is_main_process:
        timing = timer.record(args.steps, args.batch * common.SEQ * world)
        result({"mode": "ours", "model": args.model, "batch": args.batch, "gpus": world,
                "distributed": accelerator.distributed_type.name, "compile": args.compile, "scope": scope,
                "cd_tuning": args.cd_tuning, "inductor": args.inductor, "inductor_rng": args.inductor_rng,
                "clip_in_step": prepared.clip_in_step, "triton_loss": ivr_loss.triton_on_cuda,
                "rotary_tables_stored": ivr_loss.rotary_tables_stored,
                "optimizer": type(getattr(prepared.optimizer, "optimizer", prepared.optimizer)).__name__,
                "attention": args.attention, "compile_mode": args.compile_mode,
                **timing, "mfu": timing["tokens_per_s"] / world * flops / PEAK_FLOPS, "loss": float(losses[-1]),
                "peak_memory_gib": peak_memory_gib(), **environment(), "profile": profile})


def run_hf(args) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = build_model(args.model)
    flops = flops_per_token(model, common.SEQ)
    total = args.warmup + args.steps
    timer = StepTimes()
    seen = {}

    class Timer(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            step = state.global_step
            if step == args.compile_steps:
                wait_for_turn(args)
            if step == args.warmup:
                timer.start()
            elif args.warmup < step <= total:
                timer.step()
                if step == total:
                    timer.stop()
            seen["optimizer"] = kwargs.get("optimizer")

    with tempfile.TemporaryDirectory() as out:
        cuda = torch.cuda.is_available()
        training = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, max_steps=total,
                                     bf16=cuda, torch_compile=args.compile, learning_rate=1e-4, weight_decay=0.1,
                                     logging_steps=10**6, save_strategy="no", report_to="none",
                                     disable_tqdm=True, dataloader_num_workers=0)
        dataset = RandomBlocks(total * args.batch, model.get_input_embeddings().weight.shape[0], common.SEQ, hf=True)
        Trainer(model=model, args=training, train_dataset=dataset, callbacks=[Timer()]).train()
    optimizer = getattr(seen.get("optimizer"), "optimizer", seen.get("optimizer"))
    timing = timer.record(args.steps, args.batch * common.SEQ)
    result({"mode": "hf", "model": args.model, "batch": args.batch, "gpus": 1, "compile": args.compile, **timing,
            "mfu": timing["tokens_per_s"] * flops / PEAK_FLOPS, "peak_memory_gib": peak_memory_gib(),
            "optimizer": f"{type(optimizer).__name__} fused={getattr(optimizer, 'defaults', {}).get('fused')}",
            **environment()})


def own(args, mode: str, model: str, batch: int, scope: str | None = None, profile_steps: int = 0,
        handshake: bool = False, lever: str | None = None) -> list[str]:
    """The command line of one measurement; scope "graphs" is the body with training.cuda_graphs."""
    scope = scope or args.scope
    graphs = scope == "graphs" or args.cuda_graphs
    scope = "body" if scope == "graphs" else scope
    return (["bench/train_throughput.py", "--mode", mode, "--model", model, "--batch", str(batch),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--compile-steps", str(args.compile_steps),
             "--chunk", str(args.chunk), "--seq", str(common.SEQ), "--compile" if args.compile else "--no-compile"]
            + (["--compile-mode", args.compile_mode] if args.compile_mode else [])
            + (["--scope", scope] if scope and mode == "ours" else [])
            + (["--cuda-graphs"] if graphs and mode == "ours" else [])
            + (["--attention", args.attention] if args.attention != "default" and mode == "ours" else [])
            + (["--profile-steps", str(profile_steps)] if profile_steps else [])
            + (["--handshake"] if handshake else [])
            + (["--cd-tuning"] if args.cd_tuning and mode == "ours" else [])
            + ([flag for name in lever.split("+") for flag in levers.LEVERS[name]] if lever and mode == "ours" else []))
