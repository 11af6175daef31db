#!/usr/bin/env python3
"""Choose the training settings of each branch on the dev split, at reduced scale, with the same number of
trials for the IVR model and the control.

Run in a workflow folder where the default run has made the initialized model, the packed data and the
corpus splits (snakemake ... results/model/initialized results/data/control/meta.json):

    python bench/tune_training.py --configfile config/gpu.yaml --share 0.125 --parallel 6

It packs the first --share of the training documents for both branches (the general-text share as
configured), then trains (scripts/train_sft.py, as the training rule does, each trial interpolated with
its start as training.interpolation says) and scores every trial by bits per byte on the whole dev split
(documents cut to --eval-bytes) and on the dev texts of unseen_texts, never on the held-out split or the
report's unseen texts:

peak learning rates 3e-4, 6e-4, 1.2e-3 and 2.4e-3 for each branch (IVR: the configured budget and
stages), all trained at once when --parallel allows.

Each branch gets the same four trials, chosen by the same retention rule: the best domain dev bits per byte among
the trials whose bits per byte on every base-language dev text stay within training.retention_tolerance
of the base model's (with none, the trial that comes closest). Writes into --out: trials.jsonl (one line
a trial: settings, dev bits per byte before and after interpolation, tokens, FLOPs, wall-clock),
ablation.md (the table) and chosen.yaml (the winners, as a config file to pass after the others:
training.lr, training.control_lr).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from ivr.config import read_configs  # noqa: E402
from ivr.retention import retention_ratio, unseen_spec  # noqa: E402
from ivr.train_settings import branch_settings  # noqa: E402

GRID = (3e-4, 6e-4, 1.2e-3, 2.4e-3)


def base_model(config: dict) -> str:
    model = config["base_model"]
    return f"resources/models/{Path(model).stem}" if model.endswith(".gguf") else model


def run(command: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=Path.cwd())
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:3])} ... failed (exit {done.returncode}); see {log}")


def pack_reduced(config: dict, share: float, out: Path) -> dict[str, Path]:
    """The first `share` of the domain training documents, packed for each branch."""
    lines = Path("results/corpus/domain/train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    subset = out / "train.jsonl"
    subset.write_text("".join(lines[: max(1, round(share * len(lines)))]), encoding="utf-8")
    training = config["training"]
    general = (["--general", "results/corpus/general/train.jsonl", "--general-share", str(training["general_share"])]
               if config["general_corpus"] and training["general_share"] > 0 else [])
    folders = {}
    jobs = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for branch, tokenizer in (("ivr", "results/model/initialized"), ("control", base_model(config))):
            folders[branch] = out / "data" / branch
            command = [sys.executable, str(ROOT / "scripts" / "pack_data.py"), "--tokenizer", tokenizer,
                       "--train", str(subset), *general, "--block-size", str(training["block_size"]),
                       "--seed", str(training["seed"]), "--threads", str(max(1, (os.cpu_count() or 2) // 2)),
                       "--out-dir", str(folders[branch])]
            jobs.append(pool.submit(run, command, out / f"pack_{branch}.log"))
        for job in jobs:
            job.result()
    return folders


def trial_command(config: dict, branch: str, name: str, overrides: dict, data: dict[str, Path], out: Path,
                  eval_bytes: int, micro_batch: int) -> list[str]:
    settings = branch_settings(config["training"], branch)
    settings.update(overrides)
    global_batch = settings["micro_batch_size"] * settings["gradient_accumulation"]
    if micro_batch and global_batch % micro_batch == 0:  # the same global batch in less memory
        settings.update(micro_batch_size=micro_batch, gradient_accumulation=global_batch // micro_batch)
    settings.update(eval_every=0, eval_documents=0, eval_byte_budget=eval_bytes, checkpoint_every=10**9,
                    frozen_check_every=10**9, log_every=25)
    command = [sys.executable, str(ROOT / "scripts" / "train_sft.py"),
               "--model", "results/model/initialized" if branch == "ivr" else base_model(config),
               "--data", str(data[branch]), "--out", str(out / name / "model"),
               "--checkpoint-dir", str(out / name / "checkpoints"), "--settings", json.dumps(settings),
               "--dev", "results/corpus/domain/dev.jsonl"]
    if config["general_corpus"]:
        command += ["--general-dev", "results/corpus/general/dev.jsonl"]
    for text in config["unseen_texts"]["dev"]:
        command += ["--unseen-dev", unseen_spec(text)]
    command += ["--reference-model", base_model(config)]
    if branch == "ivr":
        command += ["--rules", "results/remap/remap_rules.yaml", "--compute-reference", str(data["control"])]
    return command


def run_trials(trials: list[tuple[str, str, dict]], config: dict, data: dict[str, Path], out: Path, parallel: int,
               eval_bytes: int, micro_batch: int) -> list[dict]:
    """Train the trials, `parallel` at a time; each one's settings and results."""
    def one(trial: tuple[str, str, dict]) -> dict:
        branch, name, overrides = trial
        (out / name).mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        run(trial_command(config, branch, name, overrides, data, out, eval_bytes, micro_batch), out / name / "train.log")
        stats = json.loads((out / name / "model" / "training_stats.json").read_text())
        shutil.copyfile(out / name / "model" / "train_log.jsonl", out / name / "train_log.jsonl")
        shutil.rmtree(out / name / "model")  # the dev figures are all a trial leaves
        interpolation = stats["interpolation"]
        anchor = interpolation.get("anchor", "start")
        after = interpolation.get("scores", {}).get(anchor, {}).get(f"{interpolation['alpha']:g}", {})
        record = {"branch": branch, "name": name, "overrides": overrides, **stats["dev_bpb"],
                  "alpha": interpolation["alpha"], "anchor": anchor, "interpolated": {**stats["dev_bpb"], **after},
                  "reference": interpolation.get("reference", {}),
                  "optimizer_steps": stats["optimizer_steps"], "tokens": stats["tokens_seen"],
                  "flops": stats["training_flops"], "passes": stats["passes"], "train_seconds": stats["wall_clock_s"],
                  "process_seconds": round(time.perf_counter() - began, 1), "parallel": parallel}
        print(json.dumps(record), flush=True)
        return record

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, trials))


def best(records: list[dict], tolerance: float) -> dict:
    """The retention rule: the best domain dev among the trials that keep the base within the tolerance."""
    def ratio(record: dict) -> float:
        return retention_ratio(record["interpolated"], record["reference"])

    kept = [r for r in records if ratio(r) <= 1 + tolerance]
    if not kept:
        return min(records, key=ratio)
    return min(kept, key=lambda r: r["interpolated"]["dev_bpb"])


def table(records: list[dict], unseen: list[str]) -> str:
    """Each trial's dev figures as trained (alpha 1) -> after its interpolation (alpha towards its anchor)."""
    keys = ["dev_bpb", "general_dev_bpb", *(f"{name}_bpb" for name in unseen)]
    heads = ["domain dev", "general dev", *unseen]
    lines = ["| branch | trial | settings | alpha (anchor) | " + " | ".join(f"{h} bits/byte" for h in heads)
             + " | steps | tokens | training FLOPs | train s | process s |",
             "|---" * (9 + len(keys)) + "|"]
    for r in records:
        settings = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["overrides"].items())
        cells = " | ".join(f"{r.get(k, math.nan):.4f} -> {r['interpolated'].get(k, r.get(k, math.nan)):.4f}" for k in keys)
        lines.append(f"| {r['branch']} | {r['name']} | {settings} | {r['alpha']:g} ({r.get('anchor', 'start')}) | {cells} | {r['optimizer_steps']} | "
                     f"{r['tokens']:,} | {r['flops']:.3e} | {r['train_seconds']:.0f} | {r['process_seconds']:.0f} |")
    reference = next((r["reference"] for r in records if r["reference"]), {})
    if reference:
        lines.append("\nThe base model on the base-language dev texts: "
                     + ", ".join(f"{k.removesuffix('_bpb')} {v:.4f}" for k, v in reference.items()) + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", action="append", default=[], help="config files after config/config.yaml")
    parser.add_argument("--share", type=float, default=0.125, help="share of the training documents the trials use")
    parser.add_argument("--parallel", type=int, default=1, help="trials trained at the same time (one GPU may hold several)")
    parser.add_argument("--micro-batch", type=int, default=0, help="blocks per forward pass in trials (same global batch)")
    parser.add_argument("--eval-bytes", type=int, default=2000, help="bytes of each dev document scored")
    parser.add_argument("--grid", type=float, nargs="+", help="learning rates (default 3e-4 6e-4 1.2e-3 2.4e-3)")
    parser.add_argument("--out", type=Path, default=Path("results/tuning"))
    args = parser.parse_args()
    global GRID
    if args.grid:
        GRID = tuple(sorted(args.grid))
    config = read_configs(args.configfile)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    data = pack_reduced(config, args.share, args.out)
    print(f"packed {args.share:g} of the training documents in {time.perf_counter() - began:.0f} s", flush=True)
    runs = args.out / "runs"
    trials = [(branch, f"{branch}_lr{lr:g}", {"lr": lr}) for branch in ("control", "ivr") for lr in GRID]
    records = run_trials(trials, config, data, runs, args.parallel, args.eval_bytes, args.micro_batch)
    tolerance = config["training"]["retention_tolerance"]
    chosen = {branch: best([r for r in records if r["branch"] == branch], tolerance) for branch in ("control", "ivr")}
    training = {"control_lr": chosen["control"]["overrides"]["lr"], "lr": chosen["ivr"]["overrides"]["lr"]}
    with open(args.out / "trials.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    (args.out / "chosen.yaml").write_text(
        "# Chosen on the dev split by bench/tune_training.py (" + f"share {args.share:g}, {len(records) // 2} trials "
        "per branch)\n" + yaml.safe_dump({"training": training}, sort_keys=True))
    unseen = [text["name"] for text in config["unseen_texts"]["dev"]]
    (args.out / "ablation.md").write_text(table(records, unseen))
    print(table(records, unseen))
    print(f"chosen: {training} ({time.perf_counter() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
