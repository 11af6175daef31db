#!/usr/bin/env python3
"""Benchmark: our fine-tuning step (scripts/train_sft.py) vs Hugging Face's Trainer, and held rows.

Models are built from their configs (no weights needed): GPT-2 124M and SmolLM2-135M, random tokens,
sequence length 1024. MFU counts 6 * parameters + 12 * layers * width * sequence FLOPs per token
(attention included, as in the PaLM paper) against a peak of 989 TFLOP/s (H100/H200 bf16 dense).

  python bench/train_throughput.py --mode compare --profile
      one GPU, one command (8-10 minutes on an H200; --budget, 540 s, caps the compiles): for GPT-2 and
      SmolLM2, the HF Trainer (bf16 + torch_compile) and our step at the same batch (--batch, 16) first,
      our step with CUDA graphs and compiled by blocks at that batch too (the before/after of
      training.cuda_graphs and training.compile_scope), then
      each side at its best batch (--hf-best, --ours-best), then extras while the budget lasts.
      --scopes picks our compiled variants at the same batch (body,graphs,blocks); --levers adds our step
      with CUDA graphs plus inductor settings or an attention backend (e.g. flash,cd-tuned,autotuned, or
      several joined by +), each profiled with --profile, those that autotune started first. Each
      measurement is its own process; up to --concurrency of them compile at once, while the one being
      timed has the GPU to itself (the others are paused with SIGSTOP during its timed steps). Defaults
      here: 10 warm-up steps (the first 2 compiling) and 25 timed steps. --profile adds the GPU kernel
      time per step of our step at the same batch by kind and by kernel, blocks, body and graphs. The table
      comes last.
  python bench/train_throughput.py --mode scaling --config deepspeed_zero2 --gpus 2
      our step on one GPU (config/accelerate/single_gpu.yaml), then on --gpus GPUs under --config,
      each through `accelerate launch`; prints the speed-up.
  accelerate launch --config_file config/accelerate/<name>.yaml --num_processes N \\
      bench/train_throughput.py --mode frozen
      the held-row check under any accelerate config (DeepSpeed ZeRO-2/3, FSDP, DDP): stage 1 (only
      2,000 rows of the embedding learn, weight decay 0.1) then full fine-tuning with one frozen special
      token; prints the maximum absolute change of the held rows' fp32 weights (DeepSpeed's master copy,
      FSDP's gathered shards), which must be exactly 0, and that of the learning rows, which must not.
  --mode ours / --mode hf run one measurement (the pieces the modes above start).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from ivr.compute import flops_per_token  # noqa: E402
from ivr import loss as ivr_loss  # noqa: E402
from ivr import trainer as ivr_trainer  # noqa: E402
from ivr.held_rows import full_fp32, full_state  # noqa: E402
from ivr.modeling import embedding_weights, load_weights  # noqa: E402
from ivr.packed_data import IGNORE, IndexSampler  # noqa: E402
from ivr.stages import Rules, Stage, plan_stages  # noqa: E402
from ivr.train_settings import resolve_settings  # noqa: E402
from ivr.trainer import make_accelerator, optimizer_step, prepare_stage, set_trainable, whole_models  # noqa: E402

PEAK_FLOPS = 989e12
SEQ = 1024  # --seq changes it (small values only make sense for a CPU smoke test)


def set_seq(seq: int) -> None:
    global SEQ
    SEQ = seq


def model_config(name: str, untied: bool = False):
    from transformers import GPT2Config, LlamaConfig

    if name == "gpt2":
        return GPT2Config(n_positions=SEQ, tie_word_embeddings=not untied)
    if name == "smollm2":
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                           rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=not untied)
    raise SystemExit(f"unknown model {name}")


def build_model(name: str, untied: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(name, untied), attn_implementation="sdpa",
                                            dtype=torch.float32)


class RandomBlocks(torch.utils.data.Dataset):
    """Seeded random token blocks, shaped like train_sft's packed blocks."""

    def __init__(self, blocks: int, vocab: int, seq: int = SEQ, hf: bool = False) -> None:
        self.ids = torch.randint(0, vocab, (blocks, seq), generator=torch.Generator().manual_seed(0))
        self.hf = hf

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        if self.hf:
            return {"input_ids": ids, "labels": ids}
        targets = torch.full_like(ids, IGNORE)
        targets[:-1] = ids[1:]
        return {"input_ids": ids, "targets": targets}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def result(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


def environment() -> dict:
    import transformers

    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "torch": torch.__version__, "transformers": transformers.__version__}


def prefer_attention(name: str) -> None:
    """Experiment: put one SDPA backend first for everything that follows (compiled graphs included)."""
    if name == "default":
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    rest = [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH) if b != first]
    sdpa_kernel([first, *rest], set_priority=True).__enter__()


def wait_for_turn(args) -> None:
    """--handshake (set by --mode compare): the compile steps are done; say so, then wait until the
    comparing process gives this one the GPU (it pauses the measurements still compiling meanwhile)."""
    if not args.handshake:
        return
    sync()
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("the comparing process went away")


class StepTimes:
    """The timed window's wall-clock (what tokens/s is computed from) and, on GPU, each step's time on
    the stream from CUDA events: a median step far from the mean flags a disturbed window."""

    def __init__(self) -> None:
        self.events: list = []
        self.started = 0.0
        self.seconds = 0.0

    def start(self) -> None:
        sync()
        self.started = time.perf_counter()
        if torch.cuda.is_available():
            self.events = [torch.cuda.Event(enable_timing=True)]
            self.events[0].record()

    def step(self) -> None:
        if self.events:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()

    def stop(self) -> None:
        sync()
        self.seconds = time.perf_counter() - self.started

    def record(self, steps: int, tokens_per_step: int) -> dict:
        out = {"tokens_per_s": steps * tokens_per_step / self.seconds, "seconds": self.seconds}
        if len(self.events) > 1:
            ms = sorted(a.elapsed_time(b) for a, b in zip(self.events, self.events[1:]))
            median = (ms[(len(ms) - 1) // 2] + ms[len(ms) // 2]) / 2
            out["median_step_tokens_per_s"] = tokens_per_step / (median / 1e3)
            out["step_ms"] = [round(ms[0], 2), round(median, 2), round(ms[-1], 2)]
        return out


# What a kernel is, from its name (first match wins): for the profile's before/after.
KERNEL_KINDS = (
    ("loss (Triton)", re.compile(r"loss_and_logit_grads")),  # ivr.loss_kernel (profiled as "other" before)
    ("matmul", re.compile(r"^triton_tem", re.I)),  # inductor's matmul templates (max-autotune)
    ("fused (inductor)", re.compile(r"^triton_", re.I)),  # named after the ops they fuse, which may be any
    ("attention", re.compile(r"flash|fmha|attention|sdpa|attn", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|cublas|splitk|sm\d\d_", re.I)),
    ("optimizer + clip", re.compile(r"multi_tensor|adam|foreach", re.I)),
    ("copy / memset", re.compile(r"memcpy|memset|copy_kernel|cat_", re.I)),
    ("eager element-wise", re.compile(r"elementwise|vectorized|reduce|index|scatter|gather|embedding|sort|"
                                      r"softmax|norm|dropout|fill|where|arange", re.I)),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def short_kernel_name(name: str) -> str:
    """A kernel's name without return type, namespaces and template arguments."""
    short = re.sub(r"^void |\(anonymous namespace\)::", "", name)
    short = re.split(r"[<(]", short)[0].rsplit("::", 1)[-1]
    return (short.strip() or name)[:64]


PROFILE_TOP_MOST = 60  # kernels a profiled run reports; --profile-top prints the first of them


def kernel_profile(run_step, steps: int, trace: str | None = None) -> dict:
    """GPU kernel time per step over `steps` more steps under torch.profiler, by kind and by kernel;
    `trace`: also the CPU's operators, and the whole timeline written there (Chrome's trace format)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()  # on CPU (a smoke test) the operators, nested ones counted twice
    sync()
    activities = {ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU}
    if trace:
        activities.add(ProfilerActivity.CPU)
    with profile(activities=list(activities)) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            run_step()
        sync()
        wall = time.perf_counter() - started
    if trace:
        prof.export_chrome_trace(trace)
    by_name: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    by_kind: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type != (DeviceType.CUDA if cuda else DeviceType.CPU) or event.is_user_annotation:
            continue  # an annotation (the optimizer's step, when the CPU is profiled too) spans kernels
        us = (event.time_range.end - event.time_range.start) / steps
        name = short_kernel_name(event.name)
        by_name[name] += us
        launches[name] += 1
        by_kind[kernel_kind(event.name)] += us
    top = sorted(by_name.items(), key=lambda item: -item[1])[:PROFILE_TOP_MOST]
    return {"steps": steps, "wall_ms": 1e3 * wall / steps, "kernel_ms": sum(by_kind.values()) / 1e3,
            "kinds": {k: v / 1e3 for k, v in by_kind.items()},
            "top": [[n, v / 1e3, launches[n] / steps] for n, v in top]}


def run_ours(args) -> None:
    prefer_attention(args.attention)
    if args.cd_tuning or args.inductor:
        from torch._inductor import config as inductor_config

        if args.cd_tuning:
            inductor_config.coordinate_descent_tuning = True
        for key, value in args.inductor:
            setattr(inductor_config, key, value)
    overrides = [f"micro_batch_size={args.batch}", f"compile={str(args.compile).lower()}",
                 f"loss_chunk_tokens={args.chunk}", "weight_decay=0.1", "warmup_share=0"]
    if args.scope:
        overrides.append(f"compile_scope={args.scope}")
    overrides.append(f"cuda_graphs={str(args.cuda_graphs).lower()}")
    settings = resolve_settings({}, overrides, validate=False)
    accelerator = make_accelerator(settings)
    with whole_models(accelerator):
        model = build_model(args.model)
    flops = flops_per_token(model, SEQ)
    rows = model.get_input_embeddings().weight.shape[0]
    total = args.warmup + args.steps + args.profile_steps
    stage = Stage(2, "full", 0, total, settings["lr"], np.arange(rows), np.zeros(0, np.int64))
    model = set_trainable(model, stage, settings)
    world = accelerator.num_processes
    dataset = RandomBlocks(total * args.batch * world, rows, SEQ)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=IndexSampler(np.arange(len(dataset))),
                                         pin_memory=True)
    if args.inline_rotary:  # before prepare_stage, which compiles
        ivr_loss.rotary_tables_stored = False
    if args.torch_adamw:  # before prepare_stage, which makes the optimizer
        ivr_trainer.adamw_kernel_on_cuda = False
    prepared = prepare_stage(accelerator, stage, model, loader, settings, rows, args.compile_mode)
    if args.inductor_rng:  # before the first step, which compiles
        from torch._inductor import config as inductor_config

        inductor_config.fallback_random = False
    if args.clip_apart:
        prepared.clip_in_step = False
    if args.inductor_loss:
        ivr_loss.triton_on_cuda = False
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
        timing = timer.record(args.steps, args.batch * SEQ * world)
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
    flops = flops_per_token(model, SEQ)
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
        dataset = RandomBlocks(total * args.batch, model.get_input_embeddings().weight.shape[0], SEQ, hf=True)
        Trainer(model=model, args=training, train_dataset=dataset, callbacks=[Timer()]).train()
    optimizer = getattr(seen.get("optimizer"), "optimizer", seen.get("optimizer"))
    timing = timer.record(args.steps, args.batch * SEQ)
    result({"mode": "hf", "model": args.model, "batch": args.batch, "gpus": 1, "compile": args.compile, **timing,
            "mfu": timing["tokens_per_s"] * flops / PEAK_FLOPS, "peak_memory_gib": peak_memory_gib(),
            "optimizer": f"{type(optimizer).__name__} fused={getattr(optimizer, 'defaults', {}).get('fused')}",
            **environment()})


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
        dataset = RandomBlocks(stage.steps * settings["micro_batch_size"] * world, rows, SEQ)
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


# Levers tried beside the default at the same batch (compare's extras): what each adds to our command line.
LEVERS = {"flash": ["--attention", "flash"],
          "autotuned": ["--compile-mode", "max-autotune-no-cudagraphs"], "cd-tuned": ["--cd-tuning"],
          # the shipped optimisations undone, one each: their "before"
          "inductor-rng": ["--inductor-rng"], "clip-apart": ["--clip-apart"], "inductor-loss": ["--inductor-loss"],
          "inline-rotary": ["--inline-rotary"], "torch-adamw": ["--torch-adamw"],
          # inductor settings tried as they are
          "combo": ["--inductor", "combo_kernels=True"],
          "no-mix-order": ["--inductor", "triton.mix_order_reduction=False"],
          # the loss over the whole batch of 16 at once (two chunks at the training default of 8,192)
          "chunk16k": ["--chunk", "16384"]}


def own(args, mode: str, model: str, batch: int, scope: str | None = None, profile_steps: int = 0,
        handshake: bool = False, lever: str | None = None) -> list[str]:
    """The command line of one measurement; scope "graphs" is the body with training.cuda_graphs."""
    scope = scope or args.scope
    graphs = scope == "graphs" or args.cuda_graphs
    scope = "body" if scope == "graphs" else scope
    return (["bench/train_throughput.py", "--mode", mode, "--model", model, "--batch", str(batch),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--compile-steps", str(args.compile_steps),
             "--chunk", str(args.chunk), "--seq", str(SEQ), "--compile" if args.compile else "--no-compile"]
            + (["--compile-mode", args.compile_mode] if args.compile_mode else [])
            + (["--scope", scope] if scope and mode == "ours" else [])
            + (["--cuda-graphs"] if graphs and mode == "ours" else [])
            + (["--attention", args.attention] if args.attention != "default" and mode == "ours" else [])
            + (["--profile-steps", str(profile_steps)] if profile_steps else [])
            + (["--handshake"] if handshake else [])
            + (["--cd-tuning"] if args.cd_tuning and mode == "ours" else [])
            + ([flag for name in lever.split("+") for flag in LEVERS[name]] if lever and mode == "ours" else []))


def describe(name: str, r: dict, anchor: dict | None = None) -> str:
    if "error" in r:
        return f"{name:<44} failed ({r['error']})"
    ratio = f"{r['tokens_per_s'] / anchor['tokens_per_s']:.2f}x" if anchor and "tokens_per_s" in anchor else ""
    return (f"{name:<44} {r['tokens_per_s'] / 1e3:9.1f}k tok/s  MFU {100 * r['mfu']:5.1f}%  "
            f"{r['peak_memory_gib']:5.1f} GiB  {ratio}")


# ---- --mode compare -------------------------------------------------------------------------------
MODELS = ("gpt2", "smollm2")
NAMES = {"gpt2": "GPT-2 124M", "smollm2": "SmolLM2-135M"}
SCOPE_NAMES = {"body": "ours (body)", "blocks": "ours (blocks)", "graphs": "ours (body, CUDA graphs)",
               "eager": "ours (eager)"}
SCOPES = ("blocks", "body", "graphs")  # graphs: the body compiled with training.cuda_graphs


def estimated_gib(side: str, model: str, batch: int) -> float:
    """Peak GPU memory of one measurement (GiB allocated in earlier H100 runs, plus a margin for what
    the allocator keeps): what the scheduler lets sit on the GPU side by side."""
    base, per_block = {("ours", "gpt2"): (3.8, 0.39), ("hf", "gpt2"): (3.0, 0.55),
                       ("ours", "smollm2"): (2.4, 0.70), ("hf", "smollm2"): (2.4, 0.85)}[side, model]
    return 1.25 * (base + per_block * batch * SEQ / 1024)


def gpu_memory_gib() -> float | None:
    """GPU 0's memory from nvidia-smi (this process never touches CUDA), None without one."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
        return float(done.stdout.split()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


@dataclass
class Job:
    """One measurement of --mode compare, run in its own process."""

    model: str
    side: str  # hf | ours
    batch: int
    scope: str | None = None  # ours: body | blocks | graphs
    section: str = "same"  # same: at the same batch; best: each side's best batch; extra
    profile_steps: int = 0
    lever: str | None = None  # ours: one of LEVERS on top of the scope
    repeat: int = 0  # --repeats: which measurement of the same-batch pair this is
    alone: bool = False  # ran out of GPU memory next to others: again, alone
    state: str = "pending"  # pending -> compiling -> ready -> measuring -> done
    paused: bool = False
    killed: bool = False
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ready_at: float = 0.0
    go_at: float = 0.0
    result: dict | None = None
    error: str | None = None
    stderr: Path | None = None
    stdout: deque = field(default_factory=lambda: deque(maxlen=20))

    @property
    def label(self) -> str:
        return (f"{self.model} {self.side}{' ' + self.scope if self.scope else ''} b{self.batch}"
                + (f" {self.lever}" if self.lever else "") + self.mark)

    @property
    def mark(self) -> str:
        """Which of --repeats' measurements of the pair this is; nothing for the first."""
        return f" #{self.repeat + 1}" if self.repeat else ""

    @property
    def gib(self) -> float:
        return estimated_gib(self.side, self.model, self.batch)


def compare_jobs(args) -> list[Job]:
    """In the order they start in: our step with levers that compile slowly (autotuning), the same-batch
    pairs (the HF Trainer and our step by --scopes), our step with the other --levers, each side at its best
    batch, then extras. Our runs at the same batch are profiled with --profile."""
    hf_best, ours_best = dict(zip(MODELS, args.hf_best)), dict(zip(MODELS, args.ours_best))
    profile = args.profile_steps if args.profile else 0
    levers = [Job(model, "ours", args.batch, "graphs", lever=lever, profile_steps=profile)
              for lever in args.levers for model in args.models]
    slow = [job for job in levers if "autotuned" in job.lever.split("+")]
    jobs = list(slow)
    for model in args.models:
        jobs.append(Job(model, "hf", args.batch))
        jobs += [Job(model, "ours", args.batch, scope, profile_steps=profile) for scope in args.scopes[:1]]
    for repeat in range(1, args.repeats):  # the pair again, each in new processes, after the first of each
        for model in args.models:
            jobs += [Job(model, "hf", args.batch, repeat=repeat),
                     Job(model, "ours", args.batch, args.scopes[0], repeat=repeat)]
    for scope in args.scopes[1:]:
        jobs += [Job(model, "ours", args.batch, scope, profile_steps=profile) for model in args.models]
    jobs += [job for job in levers if job not in slow]
    for model in args.models:
        if hf_best[model] != args.batch:
            jobs.append(Job(model, "hf", hf_best[model], section="best"))
        if ours_best[model] != args.batch:
            jobs += [Job(model, "ours", ours_best[model], scope, section="best") for scope in ("body", "graphs")]
    if args.extras:
        for model in args.models:
            if ours_best[model] != args.batch:
                jobs.append(Job(model, "ours", ours_best[model], "blocks", section="extra"))
    return jobs


def die_with_parent() -> None:
    """In a measurement's process, before it starts: SIGKILL when the comparing process dies (its own
    session keeps it out of the signals sent to the comparing process's group)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Scheduler:
    """Runs the jobs, up to --concurrency processes at once, so that compiles overlap, while exactly one
    process at a time does its timed steps: a process that has compiled (its first --compile-steps
    steps) says READY and waits; the GPU goes to the first READY job in order of importance, after the
    jobs still compiling are paused (SIGSTOP to their process group, resumed once it is done) and their
    queued GPU work has drained. Each process has its own inductor and triton caches (no file lock held
    by a paused process). --budget bounds the whole: no compile starts or continues past it."""

    def __init__(self, args, jobs: list[Job]) -> None:
        self.args, self.jobs = args, jobs
        self.events: queue.Queue = queue.Queue()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        total = gpu_memory_gib()
        self.memory = None if total is None else args.memory_share * total
        self.workdir = Path(tempfile.mkdtemp(prefix="ivr_bench_"))
        self.measuring: Job | None = None
        self.count = 0

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:4.0f}s] {text}", flush=True)

    def alive(self) -> list[Job]:
        return [j for j in self.jobs if j.state in ("compiling", "ready", "measuring")]

    def start(self, job: Job) -> None:
        self.count += 1
        cache = self.workdir / f"{self.count:02d}"
        cache.mkdir()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
               "TRITON_CACHE_DIR": str(cache / "triton")}
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(2, (os.cpu_count() or 8) // self.args.concurrency)))
        argv = own(self.args, job.side, job.model, job.batch, job.scope, job.profile_steps, handshake=True,
                   lever=job.lever)
        if self.args.trace_dir and job.profile_steps:
            Path(self.args.trace_dir).mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{job.model} {job.scope} {job.lever or ''} b{job.batch}")
            argv += ["--trace", str(Path(self.args.trace_dir).resolve() / f"{name.strip('_')}.json.gz")]
        job.stderr = cache / "stderr.txt"
        with open(job.stderr, "w") as err:
            job.proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                        start_new_session=True, preexec_fn=die_with_parent)
        job.state, job.started, job.result, job.error, job.killed = "compiling", time.monotonic(), None, None, False
        threading.Thread(target=self.read, args=(job, job.proc), daemon=True).start()

    def read(self, job: Job, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.events.put((job, proc, line.rstrip("\n")))
        self.events.put((job, proc, None))

    def signal(self, job: Job, sig: int) -> None:
        try:
            os.killpg(job.proc.pid, sig)  # the job's own session: it and its compile workers
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self, job: Job, why: str) -> None:
        job.killed, job.error = True, why
        self.signal(job, signal.SIGKILL)

    def admit(self) -> None:
        if self.measuring or time.monotonic() > self.deadline - self.args.min_compile_s:
            return
        alive = self.alive()
        for job in self.jobs:
            if job.state != "pending":
                continue
            if len(alive) >= self.args.concurrency or (alive and (job.alone or any(j.alone for j in alive))):
                return
            if alive and self.memory is not None and sum(j.gib for j in alive) + job.gib > self.memory:
                return  # in order: nothing after it starts before it
            self.start(job)
            alive.append(job)

    def give_gpu(self) -> None:
        ready = [j for j in self.jobs if j.state == "ready"]
        if self.measuring or not ready:
            return
        job = ready[0]
        paused = [j for j in self.alive() if j.state == "compiling" and not j.paused]
        for other in paused:
            self.signal(other, signal.SIGSTOP)
            other.paused = True
        if paused:
            time.sleep(self.args.settle)  # their kernels already queued on the GPU finish meanwhile
        job.state, job.go_at, self.measuring = "measuring", time.monotonic(), job
        try:
            job.proc.stdin.write("go\n")
            job.proc.stdin.flush()
        except OSError:
            pass  # it died: its end of output follows

    def resume(self) -> None:
        for job in self.alive():
            if job.paused:
                self.signal(job, signal.SIGCONT)
                job.paused = False

    def handle(self, job: Job, proc: subprocess.Popen, line: str | None) -> None:
        if proc is not job.proc:
            return  # from a run of this job that was given up
        if line is None:
            self.finish(job)
        elif line == "READY":
            job.state, job.ready_at = "ready", time.monotonic()
        elif line.startswith("RESULT "):
            job.result = json.loads(line[len("RESULT "):])
        else:
            job.stdout.append(line)

    def finish(self, job: Job) -> None:
        code = job.proc.wait()
        if job is self.measuring:
            self.measuring = None
            self.resume()
        if job.result is None:
            lines = [l for l in job.stderr.read_text(errors="replace").splitlines() if l.strip()]
            text = "\n".join([*job.stdout, *lines[-60:]])
            if not job.killed and not job.alone and ("OutOfMemoryError" in text or "out of memory" in text):
                self.say(f"{job.label}: out of GPU memory next to other runs; again, alone")
                job.state, job.alone, job.proc = "pending", True, None
                return
            if not job.killed:
                job.error = f"exit {code}: " + (lines[-1][:120] if lines else "no output")
                print(f"---- {job.label} failed; the end of its output:\n" + "\n".join(lines[-12:]), flush=True)
        job.state = "done"
        if job.result:
            r = job.result
            self.say(f"{job.label}: {r['tokens_per_s'] / 1e3:.1f}k tokens/s (ready after "
                     f"{job.ready_at - job.started:.0f} s, measured in {time.monotonic() - job.go_at:.0f} s)")
        else:
            self.say(f"{job.label}: {job.error}")

    def enforce_budget(self) -> None:
        now = time.monotonic()
        if now > self.deadline:
            for job in self.jobs:
                if job.state == "pending":
                    job.state, job.error = "done", "not run: --budget spent"
                elif job.state == "compiling" and not job.killed:
                    self.kill(job, "given up: still compiling when --budget was spent")
        late = now > self.deadline + self.args.grace_s
        for job in self.alive():
            if job.killed:
                continue
            if job is self.measuring and now - job.go_at > self.args.measure_timeout_s:
                self.kill(job, f"given up: timed steps took over {self.args.measure_timeout_s} s")
            elif late:
                self.kill(job, "given up: --budget spent")

    def run(self) -> None:
        try:
            while any(j.state != "done" for j in self.jobs):
                self.enforce_budget()
                self.admit()
                self.give_gpu()
                try:
                    self.handle(*self.events.get(timeout=0.5))
                except queue.Empty:
                    pass
        finally:
            for job in self.jobs:
                if job.proc is not None and job.proc.poll() is None:
                    self.signal(job, signal.SIGKILL)
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)


def ratio(job: Job | None, anchor: Job | None) -> float | None:
    if job is None or anchor is None or not job.result or not anchor.result:
        return None
    return job.result["tokens_per_s"] / anchor.result["tokens_per_s"]


def median_ratio(pairs: list[tuple[Job | None, Job | None]]) -> dict | None:
    """--repeats: the median tokens/s of each side over the pairs both of whose runs finished, their
    ratio, and the lowest and highest ratio within one pair."""
    done = [(hf.result["tokens_per_s"], ours.result["tokens_per_s"]) for hf, ours in pairs
            if hf and ours and hf.result and ours.result]
    if not done:
        return None
    hf, ours = float(np.median([h for h, _ in done])), float(np.median([o for _, o in done]))
    ratios = [o / h for h, o in done]
    return {"pairs": len(done), "hf": hf, "ours": ours, "ratio": ours / hf, "low": min(ratios), "high": max(ratios)}


def disturbed(r: dict) -> bool:
    median = r.get("median_step_tokens_per_s")
    return bool(median) and abs(median / r["tokens_per_s"] - 1) > 0.03


def table_row(job: Job, anchor: Job | None) -> str:
    r = job.result or {}
    if job.side == "hf":
        run = "HF Trainer (bf16+compile)" if r.get("compile", True) else "HF Trainer (eager)"
    else:
        run = SCOPE_NAMES.get(r.get("scope", job.scope), f"ours ({job.scope})")
        if r.get("scope") == "eager":
            run = f"ours ({job.scope}, eager)"
        run = run[:-1] + f", {job.lever})" if job.lever else run
    head = f"  {NAMES[job.model]:<13} {run:<25} {job.batch:>5}"
    if not job.result:
        return f"{head}  {job.error or 'not run'}"
    x = ratio(job, anchor)
    return (f"{head} {r['tokens_per_s'] / 1e3:8.1f}k {100 * r['mfu']:5.1f} % {r['peak_memory_gib']:6.1f} GiB"
            f"{'' if x is None else f'  {x:.2f}x'}{' ~' if disturbed(r) else ''}")


def print_profiles(args, jobs: list[Job]) -> None:
    """Before/after: our step at the same batch compiled by blocks, as one body, with CUDA graphs and with
    each lever, kernel time by kind."""
    for model in MODELS:
        runs = {}
        for job in jobs:
            if job.model == model and job.section == "same" and job.side == "ours" and job.result \
                    and job.result.get("profile"):
                name = job.scope + (f"+{job.lever}" if job.lever else "")
                if "error" in job.result["profile"]:
                    print(f"\nPROFILE {job.label} failed: {job.result['profile']['error']}")
                else:
                    runs[name] = job
        if not runs:
            continue
        names = sorted(runs, key=lambda n: (SCOPES.index(runs[n].scope), n))
        profiles = {n: runs[n].result["profile"] for n in names}
        kinds = sorted({k for p in profiles.values() for k in p["kinds"]},
                       key=lambda k: -max(p["kinds"].get(k, 0) for p in profiles.values()))
        width = max(17, *(len(n) + 2 for n in names))
        print(f"\nPROFILE {NAMES[model]} b{runs[names[0]].batch}, our step: GPU kernel ms per step (share), "
              f"{next(iter(profiles.values()))['steps']} steps under torch.profiler")
        print(f"  {'kind':<20}" + "".join(f"{n:>{width}}" for n in names))
        for kind in kinds:
            cells = "".join(f"{p['kinds'].get(kind, 0):{width - 7}.2f} "
                            f"({100 * p['kinds'].get(kind, 0) / max(p['kernel_ms'], 1e-9):3.0f}%)"
                            for p in profiles.values())
            print(f"  {kind:<20}{cells}")
        print(f"  {'all kernels':<20}" + "".join(f"{p['kernel_ms']:{width - 7}.2f}{'':7}" for p in profiles.values()))
        print(f"  {'wall, profiler on':<20}" + "".join(f"{p['wall_ms']:{width - 7}.2f}{'':7}" for p in profiles.values()))
        # the timed steps' median on the GPU's clock; above "all kernels" by the GPU's idle time within a step
        medians = [runs[n].result["step_ms"][1] if "step_ms" in runs[n].result else None for n in names]
        print(f"  {'step, timed median':<20}" + "".join(f"{'-':>{width - 7}}{'':7}" if ms is None else
                                                       f"{ms:{width - 7}.2f}{'':7}" for ms in medians))
        for name, p in profiles.items():
            print(f"  top kernels, {name} (ms per step, launches per step): "
                  + "; ".join(f"{k} {ms:.2f} ({n:g})" for k, ms, n in p["top"][:args.profile_top]))


def run_compare(args) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through Scheduler.run's cleanup
    jobs = compare_jobs(args)
    scheduler = Scheduler(args, jobs)
    scheduler.say(f"{len(jobs)} measurements, up to {args.concurrency} at once, budget {args.budget:.0f} s"
                  + (f", {scheduler.memory:.0f} GiB of GPU memory for them" if scheduler.memory else ""))
    scheduler.run()
    elapsed = time.monotonic() - scheduler.t0
    print_profiles(args, jobs)
    env = next((j.result for j in jobs if j.result), {})

    def find(model, side, batch, scope=None, lever=None, repeat=0):
        return next((j for j in jobs if (j.model, j.side, j.batch, j.lever, j.repeat)
                     == (model, side, batch, lever, repeat) and (side == "hf" or j.scope == scope)), None)

    hf_best, ours_best = dict(zip(MODELS, args.hf_best)), dict(zip(MODELS, args.ours_best))
    b = args.batch
    print(f"\n== IVR training step vs HF Trainer: {env.get('device', '?')}, torch {env.get('torch', '?')}, "
          f"transformers {env.get('transformers', '?')}; seq {SEQ}; per run {args.warmup} warm-up steps "
          f"({args.compile_steps} compiling) then {args.steps} timed; MFU of {PEAK_FLOPS / 1e12:.0f} TFLOP/s; "
          f"{elapsed:.0f} s in all")
    header = f"  {'model':<13} {'run':<25} {'batch':>5} {'tokens/s':>9} {'MFU':>7} {'memory':>10}  vs HF"
    print(f"SAME BATCH ({b}): our step / the HF Trainer, both at batch {b}")
    print(header)
    for model in args.models:
        hf = find(model, "hf", b)
        for job in (hf, find(model, "ours", b, "body"), find(model, "ours", b, "graphs"),
                    find(model, "ours", b, "blocks"), *(find(model, "ours", b, "graphs", l) for l in args.levers)):
            if job is not None:
                print(table_row(job, None if job is hf else hf))
    medians = {}
    if args.repeats > 1:
        print(f"SAME BATCH ({b}), {args.repeats} measurements of each side in their own processes, in turn: "
              f"{SCOPE_NAMES[args.scopes[0]]} / HF Trainer")
        for model in args.models:
            pairs = [(find(model, "hf", b, repeat=r), find(model, "ours", b, args.scopes[0], repeat=r))
                     for r in range(args.repeats)]
            for hf, ours in pairs[1:]:
                print(table_row(hf, None) + f" {hf.mark}")
                print(table_row(ours, hf) + f" {ours.mark}")
            medians[model] = median_ratio(pairs)
            m = medians[model]
            print(f"  {NAMES[model]:<13} median of {m['pairs']} pairs: HF {m['hf'] / 1e3:.1f}k, ours "
                  f"{m['ours'] / 1e3:.1f}k, {m['ratio']:.2f}x (the pairs' ratios {m['low']:.2f}-{m['high']:.2f}x)"
                  if m else f"  {NAMES[model]:<13} no complete pair")
    print("BEST BATCH OF EACH (labelled; not the same-batch figure): ours vs HF, each at its own batch")
    print(header)
    for model in args.models:
        if hf_best[model] == ours_best[model] == b:
            print(f"  {NAMES[model]:<13} best batch {b} on both sides: the same-batch rows above")
            continue
        hf = find(model, "hf", hf_best[model])
        for job in (hf, *(find(model, "ours", ours_best[model], scope) for scope in ("body", "graphs", "blocks"))):
            if job is not None:
                print(table_row(job, None if job is hf else hf))
    print("SUMMARY")
    for model, m in medians.items():
        if m:
            print(f"  same batch {b}, median of {m['pairs']} measurements of each side, {NAMES[model]}: "
                  f"{m['ratio']:.2f}x ({'>=' if m['ratio'] >= 1.5 else '<'} 1.5; pairs {m['low']:.2f}-{m['high']:.2f}x)")
    for scope, lever in (*((s, None) for s in args.scopes), *(("graphs", l) for l in args.levers)):
        cells = []
        for model in args.models:
            x = ratio(find(model, "ours", b, scope, lever), find(model, "hf", b))
            cells.append(f"{NAMES[model]} {'-' if x is None else f'{x:.2f}x'}" + ("" if x is None else
                         (" (>= 1.5)" if x >= 1.5 else " (< 1.5)")))
        if not lever or any(find(model, "ours", b, scope, lever) and find(model, "ours", b, scope, lever).result
                            for model in args.models):
            setting = "compile_scope=body, cuda_graphs" if scope == "graphs" else f"compile_scope={scope}"
            print(f"  same batch {b}, {setting}{' + ' + lever if lever else ''}: " + ", ".join(cells))
    # bench/gpu_session.sh reads these two lines to choose training.compile_scope and training.cuda_graphs
    for after, before, advice in (("body", "blocks", "compile_scope: body"), ("graphs", "body", "cuda_graphs: on")):
        cells = []
        for model in args.models:
            x = ratio(find(model, "ours", b, after), find(model, "ours", b, before))
            cells.append(f"{NAMES[model]} {'-' if x is None else f'{x:.3f}x'}")
        print(f"  {after} / {before}, our step at batch {b}: " + ", ".join(cells)
              + f"  ({advice} is the better default where this is > 1 for both)")
    cells = [f"{NAMES[j.model]} {j.scope}{' ' + j.lever if j.lever else ''} b{j.batch}{j.mark}: {j.result['loss']:.4f}"
             for j in jobs if j.side == "ours" and j.result]
    print("  final loss of our runs (same seeds and data, so alike across scopes): " + "; ".join(cells))
    if any(j.result and disturbed(j.result) for j in jobs):
        print("  ~ : median step and mean differ by more than 3 %: a disturbed window, rerun that measurement")


def run_scaling(args) -> None:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    one = spawn(launch + ["--config_file", "config/accelerate/single_gpu.yaml", "--num_processes", "1"]
                + own(args, "ours", args.model, args.batch))
    many = spawn(launch + ["--config_file", f"config/accelerate/{args.config}.yaml", "--num_processes",
                           str(args.gpus)] + own(args, "ours", args.model, args.batch))
    print(f"\n{args.model}, per-GPU batch {args.batch}, seq {SEQ}")
    print(describe("1 GPU (single_gpu)", one))
    print(describe(f"{args.gpus} GPUs ({args.config})", many, one))


def inductor_setting(text: str) -> tuple[str, object]:
    """--inductor's KEY=VALUE, the value a Python literal."""
    import ast

    from torch._inductor import config as inductor_config

    key, equals, value = (part.strip() for part in text.partition("="))
    try:
        functools.reduce(getattr, key.split("."), inductor_config)
    except AttributeError:
        raise argparse.ArgumentTypeError(f"{key!r}: no such inductor setting") from None
    try:
        if equals:
            return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, VALUE a Python literal")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["compare", "scaling", "ours", "hf", "frozen"], default="compare")
    parser.add_argument("--model", choices=MODELS, default="gpt2")
    parser.add_argument("--batch", type=int, help="blocks of --seq tokens per GPU per step (compare: the same "
                        "batch for both sides, 16; otherwise 64)")
    parser.add_argument("--steps", type=int, help="timed steps (compare: 25, otherwise 40)")
    parser.add_argument("--warmup", type=int, help="steps before timing, compilation included (compare: 10, "
                        "otherwise 15)")
    parser.add_argument("--compile-steps", type=int, help="of the warm-up steps, those that compile (compare: "
                        "run while other measurements compile too); 2, or --warmup if fewer")
    parser.add_argument("--chunk", type=int, default=8192, help="tokens per chunk of the loss (the training default)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile-mode", help="torch.compile mode for ours, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--scope", choices=["blocks", "body"], help="ours: training.compile_scope (compare: both)")
    parser.add_argument("--cuda-graphs", action="store_true", help="ours, scaling: training.cuda_graphs (compare "
                        "measures the body with and without)")
    parser.add_argument("--profile", action="store_true", help="compare: profile our step at the same batch")
    parser.add_argument("--profile-top", type=int, default=12, metavar="N",
                        help=f"compare with --profile: kernels listed per profiled run, longest first (at most "
                        f"{PROFILE_TOP_MOST})")
    parser.add_argument("--trace-dir", help="compare with --profile: each profiled run's timeline (GPU kernels "
                        "and CPU operators) written here, as Chrome trace files")
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    parser.add_argument("--profile-steps", type=int, default=0, help="steps profiled after the timed ones "
                        "(compare with --profile: 3)")
    parser.add_argument("--models", type=lambda text: text.split(","), default=list(MODELS),
                        help="compare: gpt2,smollm2")
    parser.add_argument("--hf-best", type=lambda text: [int(x) for x in text.split(",")], default=[64, 32],
                        help="compare: the HF Trainer's best batch for gpt2,smollm2")
    parser.add_argument("--ours-best", type=lambda text: [int(x) for x in text.split(",")], default=[64, 64],
                        help="compare: our best batch for gpt2,smollm2")
    parser.add_argument("--scopes", type=lambda text: text.split(","), default=["body", "graphs", "blocks"],
                        help="compare: our step at the same batch compiled this way, the first beside each HF run: "
                        "body,graphs,blocks (graphs: body with training.cuda_graphs)")
    parser.add_argument("--levers", type=lambda text: [t for t in text.split(",") if t], default=[],
                        help=f"compare: our step with CUDA graphs plus each lever, a lever being +-joined names "
                        f"from {','.join(LEVERS)} (e.g. flash+cd-tuned)")
    parser.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                        help="compare: also our step by blocks at the best batch, if the budget allows")
    parser.add_argument("--budget", type=float, default=540, help="compare: seconds after which no compile "
                        "starts or continues (timed steps of runs already compiled still finish)")
    parser.add_argument("--repeats", type=int, default=1, help="compare: measure the same-batch pair (the HF "
                        "Trainer and the first of --scopes) this many times, each in new processes, and print "
                        "the ratio of the medians (the Trainer's speed moves by several %% between processes)")
    parser.add_argument("--concurrency", type=int, default=4, help="compare: processes at once")
    parser.add_argument("--memory-share", type=float, default=0.7, help="compare: share of GPU memory the "
                        "processes at once may need (by estimate)")
    parser.add_argument("--settle", type=float, default=1.0, help="compare: seconds between pausing the "
                        "compiling processes and the timed steps")
    parser.add_argument("--min-compile-s", type=float, default=60, help="compare: no process starts with less "
                        "budget left")
    parser.add_argument("--measure-timeout-s", type=float, default=240)
    parser.add_argument("--grace-s", type=float, default=90, help="compare: after the budget, at most this "
                        "long for runs already compiled")
    parser.add_argument("--cd-tuning", action="store_true", help="ours: inductor's coordinate-descent tuning "
                        "(compare: an extra run at the same batch has it anyway)")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE", type=inductor_setting,
                        help="ours: an inductor config setting (a Python literal), e.g. combo_kernels=True")
    parser.add_argument("--handshake", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inductor-rng", action="store_true", help="ours: dropout's random numbers from "
                        "inductor's own generator (before 2026-12-02: not ATen's, see enable_compile)")
    parser.add_argument("--clip-apart", action="store_true", help="ours: clip the gradients in a pass of their "
                        "own, not inside the fused AdamW step (before 2026-12-02)")
    parser.add_argument("--inductor-loss", action="store_true", help="ours: the loss's softmax and gradient as "
                        "inductor compiles them, not ivr.loss_kernel's Triton kernel (before 2026-12-02)")
    parser.add_argument("--inline-rotary", action="store_true", help="ours: the rotary tables' cos and sin "
                        "inlined into every layer's kernels by inductor, not stored once (the step before "
                        "2026-12-02's fifth session)")
    parser.add_argument("--torch-adamw", action="store_true", help="ours: torch's fused AdamW step, not "
                        "ivr.adamw_kernel's one launch per parameter group (the step before 2026-12-02's seventh session)")
    parser.add_argument("--config", default="deepspeed_zero2", help="accelerate config for --mode scaling")
    parser.add_argument("--gpus", type=int, default=2, help="GPUs for --mode scaling")
    parser.add_argument("--seq", type=int, default=SEQ, help="sequence length (1024 for the numbers that count)")
    parser.add_argument("--untied", action="store_true", help="frozen mode: an untied output head")
    parser.add_argument("--attention", choices=["default", "cudnn", "flash"], default="default",
                        help="ours: the SDPA backend tried first")
    args = parser.parse_args()
    compare = args.mode == "compare"
    args.batch = args.batch or (16 if compare else 64)
    args.steps = args.steps or (25 if compare else 40)
    args.warmup = args.warmup if args.warmup is not None else (10 if compare else 15)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not 1 <= args.profile_top <= PROFILE_TOP_MOST:
        parser.error(f"--profile-top: 1 to {PROFILE_TOP_MOST}")
    if compare and args.profile and not args.profile_steps:
        args.profile_steps = 3
    if args.compile_steps is None:
        args.compile_steps = min(2, args.warmup)
    if not 1 <= args.compile_steps <= args.warmup:
        parser.error("--compile-steps must be between 1 and --warmup")
    if any(m not in MODELS for m in args.models):
        parser.error(f"--models: choose from {','.join(MODELS)}")
    if any(scope not in SCOPES for scope in args.scopes):
        parser.error(f"--scopes: choose from {','.join(SCOPES)}")
    if any(name not in LEVERS for lever in args.levers for name in lever.split("+")):
        parser.error(f"--levers: +-joined names from {','.join(LEVERS)}")
    return args


def main() -> None:
    args = parse_args()
    set_seq(args.seq)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    {"compare": run_compare, "scaling": run_scaling, "ours": run_ours, "hf": run_hf, "frozen": run_frozen}[args.mode](args)


if __name__ == "__main__":
    main()
