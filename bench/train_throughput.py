#!/usr/bin/env python3
"""Benchmark: our fine-tuning step (scripts/train_sft.py) vs Hugging Face's Trainer, and held rows.

Models are built from their configs (no weights needed): GPT-2 124M and SmolLM2-135M, random tokens,
sequence length 1024. MFU counts 6 * parameters + 12 * layers * width * sequence FLOPs per token
(attention included, as in the PaLM paper) against a peak of 989 TFLOP/s (H100/H200 bf16 dense).

  python bench/train_throughput.py --mode compare
      one GPU, one command: HF Trainer (bf16 + torch_compile, batch 16) and our step (batch 16 and
      --batch) on GPT-2 in separate processes of the same run, then our step on SmolLM2-135M; prints
      tokens/s, the ratio to the Trainer and MFU.
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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

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


def flops_per_token(model, seq: int) -> float:
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    width = getattr(config, "hidden_size", None) or config.n_embd
    params = sum(p.numel() for p in model.parameters())
    return 6 * params + 12 * layers * width * seq


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


def prefer_attention(name: str) -> None:
    """Experiment: put one SDPA backend first for everything that follows (compiled graphs included)."""
    if name == "default":
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    rest = [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH) if b != first]
    sdpa_kernel([first, *rest], set_priority=True).__enter__()


def run_ours(args) -> None:
    prefer_attention(args.attention)
    settings = resolve_settings({}, [f"micro_batch_size={args.batch}", f"compile={str(args.compile).lower()}",
                                       f"loss_chunk_tokens={args.chunk}", "weight_decay=0.1", "warmup_share=0"],
                                  validate=False)
    accelerator = make_accelerator(settings)
    with whole_models(accelerator):
        model = build_model(args.model)
    flops = flops_per_token(model, SEQ)
    rows = model.get_input_embeddings().weight.shape[0]
    total = args.warmup + args.steps
    stage = Stage(2, "full", 0, total, settings["lr"], np.arange(rows), np.zeros(0, np.int64))
    model = set_trainable(model, stage, settings)
    world = accelerator.num_processes
    dataset = RandomBlocks(total * args.batch * world, rows, SEQ)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=IndexSampler(np.arange(len(dataset))),
                                         pin_memory=True)
    prepared = prepare_stage(accelerator, stage, model, loader, settings, rows, args.compile_mode)
    prepared.loss_model.train()
    batches = iter(prepared.loader)
    for step in range(total):
        if step == args.warmup:
            sync()
            accelerator.wait_for_everyone()
            started = time.perf_counter()
        losses, _ = optimizer_step(accelerator, prepared, batches, 1, settings["grad_clip"])
        prepared.scheduler.step()
    sync()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    tokens_per_s = args.steps * args.batch * SEQ * world / seconds
    if accelerator.is_main_process:
        result({"mode": "ours", "model": args.model, "batch": args.batch, "gpus": world,
                "distributed": accelerator.distributed_type.name, "compile": args.compile,
                "tokens_per_s": tokens_per_s, "mfu": tokens_per_s / world * flops / PEAK_FLOPS,
                "loss": float(losses[-1]), "peak_memory_gib": peak_memory_gib()})


def run_hf(args) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = build_model(args.model)
    flops = flops_per_token(model, SEQ)
    total = args.warmup + args.steps
    marks: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step in (args.warmup, total):
                sync()
                marks["start" if state.global_step == args.warmup else "end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, max_steps=total,
                                     bf16=True, torch_compile=True, learning_rate=1e-4, weight_decay=0.1,
                                     logging_steps=10**6, save_strategy="no", report_to="none",
                                     disable_tqdm=True, dataloader_num_workers=0)
        dataset = RandomBlocks(total * args.batch, model.get_input_embeddings().weight.shape[0], SEQ, hf=True)
        Trainer(model=model, args=training, train_dataset=dataset, callbacks=[Timer()]).train()
    tokens_per_s = args.steps * args.batch * SEQ / (marks["end"] - marks["start"])
    result({"mode": "hf", "model": args.model, "batch": args.batch, "gpus": 1, "compile": True,
            "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops / PEAK_FLOPS,
            "peak_memory_gib": peak_memory_gib()})


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


def own(args, mode: str, model: str, batch: int) -> list[str]:
    return ["bench/train_throughput.py", "--mode", mode, "--model", model, "--batch", str(batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--chunk", str(args.chunk),
            "--seq", str(SEQ), "--compile" if args.compile else "--no-compile"] + (
                ["--compile-mode", args.compile_mode] if args.compile_mode else [])


def describe(name: str, r: dict, anchor: dict | None = None) -> str:
    if "error" in r:
        return f"{name:<44} failed ({r['error']})"
    ratio = f"{r['tokens_per_s'] / anchor['tokens_per_s']:.2f}x" if anchor and "tokens_per_s" in anchor else ""
    return (f"{name:<44} {r['tokens_per_s'] / 1e3:9.1f}k tok/s  MFU {100 * r['mfu']:5.1f}%  "
            f"{r['peak_memory_gib']:5.1f} GiB  {ratio}")


def run_compare(args) -> None:
    python = [sys.executable]
    hf = spawn(python + own(args, "hf", "gpt2", 16))
    ours16 = spawn(python + own(args, "ours", "gpt2", 16))
    ours = spawn(python + own(args, "ours", "gpt2", args.batch)) if args.batch != 16 else ours16
    smol = spawn(python + own(args, "ours", "smollm2", min(args.batch, 32)))  # 30 layers: more activations
    smol_hf = spawn(python + own(args, "hf", "smollm2", 16)) if args.hf_smollm2 else None
    print(f"\n{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, seq {SEQ}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps, peak {PEAK_FLOPS / 1e12:.0f} TFLOP/s")
    print(describe("GPT-2 124M, HF Trainer bf16+compile, b16", hf))
    print(describe("GPT-2 124M, ours, b16", ours16, hf))
    if ours is not ours16:
        print(describe(f"GPT-2 124M, ours, b{args.batch}", ours, hf))
    if smol_hf:
        print(describe("SmolLM2-135M, HF Trainer bf16+compile, b16", smol_hf))
    print(describe(f"SmolLM2-135M, ours, b{min(args.batch, 32)}", smol, smol_hf))


def run_scaling(args) -> None:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    one = spawn(launch + ["--config_file", "config/accelerate/single_gpu.yaml", "--num_processes", "1"]
                + own(args, "ours", args.model, args.batch))
    many = spawn(launch + ["--config_file", f"config/accelerate/{args.config}.yaml", "--num_processes",
                           str(args.gpus)] + own(args, "ours", args.model, args.batch))
    print(f"\n{args.model}, per-GPU batch {args.batch}, seq {SEQ}")
    print(describe("1 GPU (single_gpu)", one))
    print(describe(f"{args.gpus} GPUs ({args.config})", many, one))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["compare", "scaling", "ours", "hf", "frozen"], default="compare")
    parser.add_argument("--model", choices=["gpt2", "smollm2"], default="gpt2")
    parser.add_argument("--batch", type=int, default=64, help="blocks of 1024 tokens per GPU per step (ours)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=15, help="steps before timing (compilation happens here)")
    parser.add_argument("--chunk", type=int, default=8192, help="tokens per chunk of the loss")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile-mode", help="torch.compile mode for ours, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--hf-smollm2", action="store_true", help="also time the HF Trainer on SmolLM2-135M")
    parser.add_argument("--config", default="deepspeed_zero2", help="accelerate config for --mode scaling")
    parser.add_argument("--gpus", type=int, default=2, help="GPUs for --mode scaling")
    parser.add_argument("--seq", type=int, default=SEQ, help="sequence length (1024 for the numbers that count)")
    parser.add_argument("--untied", action="store_true", help="frozen mode: an untied output head")
    parser.add_argument("--attention", choices=["default", "cudnn", "flash"], default="default",
                        help="ours: the SDPA backend tried first")
    args = parser.parse_args()
    set_seq(args.seq)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    {"compare": run_compare, "scaling": run_scaling, "ours": run_ours, "hf": run_hf, "frozen": run_frozen}[args.mode](args)


if __name__ == "__main__":
    main()
