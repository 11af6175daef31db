"""The throughput benchmark's modes across GPUs (bench/train_throughput.py): --mode scaling, our step on one
GPU and on several through `accelerate launch`, and --mode frozen, the held-row check under any accelerate
config."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

import throughput_common as common
from throughput_common import ROOT, RandomBlocks, build_model, model_config, result
from throughput_measure import own

from ivr.held_rows import full_fp32, full_state
from ivr.modeling import embedding_weights, load_weights
from ivr.packed_data import IndexSampler
from ivr.stages import Rules, plan_stages
from ivr.train_settings import resolve_settings
from ivr.trainer import make_accelerator, optimizer_step, prepare_stage, set_trainable, whole_models


def run_frozen(args) -> None:
    settings = resolve_settings({}, ["micro_batch_size=4", "weight_decay=0.1", "lr=1e-3", "stage1_lr=1e-3",
                                       "warmup_share=0", "stage1_share=0.5", "stage2=full", "compile=false",
                                       f"loss_chunk_tokens={args.chunk}"], validate=False)
    accelerator = make_accelerator(settings)
    rows = model_config(args.model).vocab_size
    special = rows - 1
    learn = np.setdiff1d(np.random.default_rng(0).choice(rows, 2000, replace=False), [special])
    rules = Rules(np.union1d(learn, [special]), np.array([special]))
    stages = plan_stages(settings, 2 * args.steps, rows, rules)
    world = accelerator.num_processes
    weights, prepared = None, None
    for stage in stages:
        if prepared is not None:
            weights = full_state(accelerator, prepared.loss_model, prepared.originals)
            prepared = None
            accelerator.free_memory()
        with whole_models(accelerator):
            model = build_model(args.model, args.untied)
        if weights is not None:
            load_weights(model, weights)
        model = set_trainable(model, stage, settings)
        dataset = RandomBlocks(stage.steps * settings["micro_batch_size"] * world, rows, common.SEQ)
        loader = torch.utils.data.DataLoader(dataset, batch_size=settings["micro_batch_size"],
                                             sampler=IndexSampler(np.arange(len(dataset))))
        prepared = prepare_stage(accelerator, stage, model, loader, settings, rows)
        prepared.guard.after_prepare(accelerator, prepared.loss_model)
        emb = embedding_weights(accelerator.unwrap_model(prepared.loss_model).model)[0]
        watch = torch.from_numpy(stage.learn_rows[:4096])
        before = full_fp32(accelerator, emb)[watch.to(accelerator.device)].float().clone()
        prepared.loss_model.train()
        batches = iter(prepared.loader)
        for _ in range(stage.steps):
            optimizer_step(accelerator, prepared, batches, 1, settings["grad_clip"])
            prepared.scheduler.step()
        held = prepared.guard.max_change(accelerator)
        moved = float((full_fp32(accelerator, emb)[watch.to(accelerator.device)].float() - before).abs().max())
        if accelerator.is_main_process:
            plugin = accelerator.state.deepspeed_plugin
            kind = f"{accelerator.distributed_type.name}" + (f" ZeRO-{plugin.zero_stage}" if plugin else "")
            print(f"FROZEN-CHECK {kind}, {world} process(es), {accelerator.mixed_precision}, "
                  f"{'untied' if args.untied else 'tied'} head, stage {stage.index} ({stage.kind}), "
                  f"{stage.steps} steps, weight decay {settings['weight_decay']}: held rows {len(stage.held_rows)} "
                  f"max abs change {held:.3e} (fp32); learning rows max abs change {moved:.3e}"
                  + (", gradient mask on sharded gradients" if prepared.guard.explicit else ""), flush=True)
            result({"mode": "frozen", "distributed": kind, "stage": stage.index, "held_rows": len(stage.held_rows),
                    "held_max_abs_change": held, "learning_max_abs_change": moved, "ok": held == 0.0 and moved > 0})


def spawn(command: list[str]) -> dict:
    """Run one measurement in its own process (fresh CUDA context and compile caches)."""
    print("$ " + " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(done.stdout[-3000:] + done.stderr[-6000:], flush=True)
        return {"error": f"exit {done.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def describe(name: str, r: dict, anchor: dict | None = None) -> str:
    if "error" in r:
        return f"{name:<44} failed ({r['error']})"
    ratio = f"{r['tokens_per_s'] / anchor['tokens_per_s']:.2f}x" if anchor and "tokens_per_s" in anchor else ""
    return (f"{name:<44} {r['tokens_per_s'] / 1e3:9.1f}k tok/s  MFU {100 * r['mfu']:5.1f}%  "
            f"{r['peak_memory_gib']:5.1f} GiB  {ratio}")


def run_scaling(args) -> None:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    one = spawn(launch + ["--config_file", "config/accelerate/single_gpu.yaml", "--num_processes", "1"]
                + own(args, "ours", args.model, args.batch))
    many = spawn(launch + ["--config_file", f"config/accelerate/{args.config}.yaml", "--num_processes",
                           str(args.gpus)] + own(args, "ours", args.model, args.batch))
    print(f"\n{args.model}, per-GPU batch {args.batch}, seq {common.SEQ}")
    print(describe("1 GPU (single_gpu)", one))
    print(describe(f"{args.gpus} GPUs ({args.config})", many, one))
