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
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The parts, one concern each: throughput_common (models, data, timing, the RESULT line), throughput_measure
# (one measurement: --mode ours, --mode hf), throughput_levers, throughput_profile, throughput_compare
# (--mode compare: the scheduler, the tables) and throughput_scaling (--mode scaling, --mode frozen).

import throughput_common as common  # noqa: E402
from throughput_common import MODELS, SCOPES  # noqa: E402
from throughput_compare import run_compare  # noqa: E402
from throughput_levers import LEVERS, inductor_setting  # noqa: E402
from throughput_measure import run_hf, run_ours  # noqa: E402
from throughput_profile import PROFILE_TOP_MOST  # noqa: E402
from throughput_scaling import run_frozen, run_scaling  # noqa: E402


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
    parser.add_argument("--seq", type=int, default=common.SEQ, help="sequence length (1024 for the numbers that count)")
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
    common.set_seq(args.seq)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    {"compare": run_compare, "scaling": run_scaling, "ours": run_ours, "hf": run_hf,
     "frozen": run_frozen}[args.mode](args)


if __name__ == "__main__":
    main()
