#!/usr/bin/env python3
"""Benchmark: how time and peak memory of the workflow's CPU stages grow with the size of the domain corpus.

For each --scales value N, a corpus of N copies of the default domain corpus (the Korean bills'
propose_reason column, resources/assets/korean_bills/bill_texts.parquet, as config/config.yaml reads it)
is written as one Parquet file with that column. Copy 0 is the real text. Copy k >= 1 is a seeded
relabelling of it: each Hangul syllable that occurs in the bills is, with probability --substitution
(0.08), replaced everywhere in that copy by a syllable drawn by its frequency in the bills (a table seeded
by --seed and k, applied with str.translate). Everything else stays the bills': word lengths,
punctuation, numbers, Latin and Hanja, and which words repeat. A word holding a replaced syllable becomes
a new word, the others stay, so distinct pre-tokens grow less than linearly, as they do in more real
text: the copies are neither exact duplicates (which ingest drops) nor noise (where every word is new).
The run checks this: it prints each scale's distinct pre-tokens of the training split (the analysis's
pretokens.parquet, domain count > 0) and their exponent against size, beside the real bills' own
exponent from a seeded random quarter of the 1x training split to all of it (the analysis script on
both; run when 1 is among the scales). Heaps' law flattens as text grows, so the real exponent from a
quarter to 1x is, if anything, above the one from 1x to 4x.

Each scale runs in a fresh copy of the workflow (its tracked files, the fetched assets shared, the base
model converted from its GGUF once and shared by every scale, outside the timing): `snakemake --cores 2`
to results/model/initialized, results/data/ivr/meta.json and results/data/control/meta.json (config/
config.yaml, the corpus path overridden by an extra config file). Every stage's wall and CPU time come
from its rule's benchmark file (benchmarks/*.tsv: s, cpu_time); its peak RSS is sampled here every 0.2 s
(the summed RSS of the job's processes, known by their output going to its log), as Snakemake's
benchmark samples every 30 s after a job's first 15 s and misses the peaks of longer jobs (its max_rss
is in the JSON too). Printed, and with --json written:
per stage, wall time and peak RSS at each scale and the exponent of time against size (the least-squares
slope of log time on log corpus bytes over the scales run, all measured in this run), and the same
exponent of its CPU time (user + system, which other work on the machine disturbs less); the corpus's text
bytes, documents kept by ingest and distinct pre-tokens per scale. On 2 cores Snakemake runs one-thread
jobs two at once (the two ingests; remap_tokenizer beside reorder_embeddings), so their times include
sharing the cores. Stages that start by loading a tokenizer or the model have a fixed cost, which lowers
their exponent over small scales.

    nice python bench/scale_cpu_stages.py --scales 1 4 --json scale_cpu_stages.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from ivr.cli import UserError, run_main  # noqa: E402

TARGETS = ["results/model/initialized", "results/data/ivr/meta.json", "results/data/control/meta.json"]
FIRST_SYLLABLE, LAST_SYLLABLE = "\uac00", "\ud7a3"  # the precomposed Hangul syllables


def syllable_frequencies(texts) -> dict[str, int]:
    """How often each Hangul syllable occurs in the texts, by syllable in code point order."""
    counts: Counter = Counter()
    for text in texts:
        if text:
            counts.update(text)
    return {s: counts[s] for s in sorted(counts) if FIRST_SYLLABLE <= s <= LAST_SYLLABLE}


def variation_table(frequencies: dict[str, int], copy: int, substitution: float, seed: int) -> dict[int, str]:
    """The str.translate table of copy `copy`: each syllable, with probability `substitution`, mapped to
    one drawn by frequency; copy 0 maps nothing."""
    import numpy as np

    if copy == 0:
        return {}
    syllables = list(frequencies)
    weights = np.array(list(frequencies.values()), dtype=np.float64)
    rng = np.random.default_rng([seed, copy])
    replaced = np.flatnonzero(rng.random(len(syllables)) < substitution)
    drawn = rng.choice(len(syllables), size=len(replaced), p=weights / weights.sum())
    return {ord(syllables[i]): syllables[j] for i, j in zip(replaced, drawn)}


def write_corpus(source: Path, column: str, scale: int, substitution: float, seed: int, out: Path) -> dict:
    """`scale` copies of the source's column (copy 0 the real text, the others varied) as one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def batches():
        return (b.column(0).to_pylist() for b in pq.ParquetFile(source).iter_batches(batch_size=4096, columns=[column]))

    frequencies = syllable_frequencies(text for batch in batches() for text in batch)
    documents = text_bytes = 0
    with pq.ParquetWriter(out, pa.schema([(column, pa.string())])) as writer:
        for copy in range(scale):
            table = variation_table(frequencies, copy, substitution, seed)
            for batch in batches():
                texts = [t.translate(table) if t else t for t in batch]
                writer.write_table(pa.table({column: pa.array(texts, pa.string())}))
                documents += len(texts)
                text_bytes += sum(len(t.encode("utf-8")) for t in texts if t)
    return {"documents": documents, "text_bytes": text_bytes}


def copy_workflow(dest: Path, models: Path) -> None:
    """The workflow's tracked (and untracked, not ignored) files in dest, with the fetched assets and the
    shared folder of converted models linked in (as tests/conftest.py make_workdir does)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for name in files:
        src, dst = ROOT / name, dest / name
        if src.is_symlink():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (dest / "resources").mkdir(exist_ok=True)
    (dest / "resources" / "assets").symlink_to((ROOT / "resources" / "assets").resolve())
    (dest / "resources" / "models").symlink_to(models)


class PeakRss(threading.Thread):
    """Peak RSS of each job, sampled every 0.2 s: the summed RSS of the processes under `pid` whose output
    goes to the job's log, logs/<stage>.log (Snakemake's benchmark samples every 30 s after a job's first
    15 s, so it misses the peaks of longer jobs)."""

    def __init__(self, pid: int, logs: Path):
        super().__init__(daemon=True)
        self.pid, self.logs, self.peaks, self.done = pid, str(logs) + os.sep, {}, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.wait(0.2):
            try:
                procs = psutil.Process(self.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            now: Counter = Counter()
            for proc in procs:
                try:
                    out = os.readlink(f"/proc/{proc.pid}/fd/1")
                    if out.startswith(self.logs) and out.endswith(".log"):
                        now[out[len(self.logs) : -len(".log")]] += proc.memory_info().rss
                except (OSError, psutil.Error):  # gone in between
                    continue
            for stage, rss in now.items():
                self.peaks[stage] = max(self.peaks.get(stage, 0), rss)


def snakemake(workdir: Path, targets: list[str], config: Path, cores: int) -> tuple[float, dict[str, int]]:
    """Wall seconds of one Snakemake run in workdir and each job's peak RSS (bytes); its output goes to
    workdir/snakemake.log."""
    start = time.perf_counter()
    with open(workdir / "snakemake.log", "a") as log:
        run = subprocess.Popen([sys.executable, "-m", "snakemake", *targets, "--cores", str(cores), "--configfile",
                                str(config)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "IVR_NO_PROGRESS": "1"})
        sampler = PeakRss(run.pid, (workdir / "logs").resolve())
        sampler.start()
        code = run.wait()
        sampler.done.set()
        sampler.join()
    if code:
        raise UserError(f"snakemake failed in {workdir} (exit {code}): see {workdir / 'snakemake.log'}")
    return time.perf_counter() - start, sampler.peaks


def stage_figures(benchmarks: Path, peaks: dict[str, int]) -> dict[str, dict]:
    """{stage: {s, cpu_s, max_rss_mib, peak_rss_mib}} from each rule's benchmark file and the sampled
    peaks, in the order the stages finished; the stage is the file's path under benchmarks/ (rule, and
    the wildcard where the rule has one), as it is under logs/."""
    figures = {}
    for path in sorted(benchmarks.rglob("*.tsv"), key=lambda p: p.stat().st_mtime):
        stage = path.relative_to(benchmarks).with_suffix("").as_posix()
        if stage.startswith("gguf_to_hf/"):
            continue
        header, row = path.read_text().splitlines()[:2]
        values = dict(zip(header.split("\t"), row.split("\t")))
        figures[stage] = {"s": float(values["s"]), "cpu_s": float(values["cpu_time"]), "max_rss_mib": float(values["max_rss"]),
                          "peak_rss_mib": peaks.get(stage, 0) / 2**20}
    return figures


def distinct_pretokens(pretokens: Path) -> int:
    """Distinct pre-tokens of the domain training split: rows of pretokens.parquet with a domain count."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return int(pc.sum(pc.greater(pq.read_table(pretokens, columns=["count"]).column(0), 0)).as_py() or 0)


def quarter_pretokens(workdir: Path, tokenizer: str, seed: int, out: Path) -> dict:
    """Text bytes and distinct pre-tokens of a seeded random quarter of workdir's training split, by the
    analysis script (the real text's own growth, to compare the variation's with)."""
    rng = random.Random(seed)
    quarter, text_bytes = out / "quarter.jsonl", 0
    with open(workdir / "results/corpus/domain/train.jsonl", encoding="utf-8") as src, open(quarter, "w", encoding="utf-8") as dst:
        for line in src:
            if rng.random() < 0.25:
                dst.write(line)
                text_bytes += len(json.loads(line)["text"].encode("utf-8"))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "analyze_corpus.py"), "--tokenizer", str(workdir / tokenizer),
                    "--train", str(quarter), "--heldout", str(workdir / "results/corpus/domain/heldout.jsonl"),
                    "--out-dir", str(out / "analysis"), "--threads", "2"],
                   check=True, env={**os.environ, "IVR_NO_PROGRESS": "1", "IVR_LOG_LEVEL": "WARNING"})
    return {"text_bytes": text_bytes, "distinct_pretokens": distinct_pretokens(out / "analysis" / "pretokens.parquet")}


def slope(sizes: list[float], values: list[float]) -> float | None:
    """Least-squares slope of log value on log size; None with fewer than two sizes or a value of 0."""
    if len(sizes) < 2 or min(values) <= 0:
        return None
    xs, ys = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def measure_scale(scale: int, args, scratch: Path, models: Path, model_folder: str) -> dict:
    workdir = scratch / f"{scale}x"
    workdir.mkdir()
    copy_workflow(workdir, models)
    corpus = write_corpus(args.source, args.column, scale, args.substitution, args.seed, scratch / f"bills_{scale}x.parquet")
    config = workdir / "scale.yaml"
    config.write_text(json.dumps({"corpus": {"paths": [str(scratch / f"bills_{scale}x.parquet")]}}))
    snakemake(workdir, [model_folder], config, args.cores)  # once for all scales, then found there
    wall, peaks = snakemake(workdir, TARGETS, config, args.cores)
    ingest = json.loads((workdir / "results/corpus/domain/ingest.json").read_text())
    figures = {
        "scale": scale,
        "corpus_documents": corpus["documents"],
        "corpus_text_bytes": corpus["text_bytes"],
        "documents_kept": sum(ingest[split]["documents"] for split in ("train", "dev", "heldout")),
        "duplicates_dropped": ingest["dropped_duplicate"],
        "train_text_bytes": ingest["train"]["bytes"],
        "distinct_pretokens": distinct_pretokens(workdir / "results/analysis/pretokens.parquet"),
        "snakemake_wall_s": wall,
        "stages": stage_figures(workdir / "benchmarks", peaks),
    }
    if scale == 1:
        (workdir / "quarter").mkdir()
        figures["real_quarter"] = quarter_pretokens(workdir, model_folder, args.seed, workdir / "quarter")
    if not args.keep:
        shutil.rmtree(workdir)
        (scratch / f"bills_{scale}x.parquet").unlink()
    return figures


def summarize(runs: list[dict]) -> dict:
    sizes = [r["corpus_text_bytes"] for r in runs]
    stages = list(dict.fromkeys(s for r in runs for s in r["stages"]))
    exponents = {s: slope(sizes, [r["stages"][s]["s"] for r in runs]) for s in stages if all(s in r["stages"] for r in runs)}
    exponents["all stages"] = slope(sizes, [sum(f["s"] for f in r["stages"].values()) for r in runs])
    exponents["snakemake wall"] = slope(sizes, [r["snakemake_wall_s"] for r in runs])
    cpu = {s: slope(sizes, [r["stages"][s]["cpu_s"] for r in runs]) for s in exponents if s in stages}
    summary = {"time_exponents": exponents, "cpu_time_exponents": cpu, "distinct_pretokens_exponent": slope(sizes, [r["distinct_pretokens"] for r in runs])}
    one = next((r for r in runs if "real_quarter" in r), None)
    if one:  # the real bills, from a quarter of the 1x training split to all of it
        quarter = one["real_quarter"]
        summary["real_text_distinct_pretokens_exponent"] = slope(
            [quarter["text_bytes"], one["train_text_bytes"]], [quarter["distinct_pretokens"], one["distinct_pretokens"]])
    return summary


def print_table(runs: list[dict], summary: dict) -> None:
    def row(name: str, cells: list[tuple[str, str]], *exponents: float | None) -> str:
        end = "".join(f"{e:>10.2f}" if e is not None else f"{'':>10}" for e in exponents)
        return f"{name:<24}" + "".join(f"{a:>10}{b:>10}" for a, b in cells) + end

    exponents = summary["time_exponents"]
    print(row("stage", [(f"{r['scale']}x s", f"{r['scale']}x MiB") for r in runs]) + f"{'exponent':>10}{'cpu exp.':>10}")
    for stage, exponent in exponents.items():
        if stage not in ("all stages", "snakemake wall"):
            print(row(stage, [(f"{r['stages'][stage]['s']:.1f}", f"{r['stages'][stage]['peak_rss_mib']:.0f}") for r in runs],
                      exponent, summary["cpu_time_exponents"][stage]))
    print(row("all stages (sum; max)", [(f"{sum(f['s'] for f in r['stages'].values()):.1f}",
                                         f"{max(f['peak_rss_mib'] for f in r['stages'].values()):.0f}") for r in runs],
              exponents["all stages"]))
    print(row("snakemake wall", [(f"{r['snakemake_wall_s']:.1f}", "") for r in runs], exponents["snakemake wall"]))
    print(row("corpus MB (text)", [(f"{r['corpus_text_bytes'] / 1e6:.1f}", "") for r in runs]))
    print(row("documents kept", [(str(r["documents_kept"]), "") for r in runs]))
    print(row("distinct pre-tokens", [(str(r["distinct_pretokens"]), "") for r in runs], summary["distinct_pretokens_exponent"]))
    real = summary.get("real_text_distinct_pretokens_exponent")
    if real is not None:
        print(f"real bills, a random quarter of the 1x training split to all of it: distinct pre-tokens exponent {real:.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16], help="corpus sizes, in copies of the bills")
    parser.add_argument("--substitution", type=float, default=0.08, help="probability that a syllable is replaced in a copy")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--source", type=Path, default=ROOT / "resources/assets/korean_bills/bill_texts.parquet")
    parser.add_argument("--column", default="propose_reason")
    parser.add_argument("--scratch", type=Path, help="folder for the corpora and workflow copies (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep each scale's corpus and workflow copy")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import yaml

    args = parse_args(argv)
    if any(s < 1 for s in args.scales) or len(set(args.scales)) != len(args.scales):
        raise UserError(f"--scales must be distinct whole numbers of 1 or more, not {args.scales}")
    if not 0 < args.substitution <= 1:
        raise UserError(f"--substitution must be in (0, 1], not {args.substitution}")
    if not args.source.exists():
        raise UserError(f"{args.source}: no such corpus (fetch the korean_bills asset first)")
    base_model = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["base_model"]
    model_folder = f"resources/models/{Path(base_model).stem}" if base_model.endswith(".gguf") else base_model
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="scale_cpu_stages_"))
    scratch.mkdir(parents=True, exist_ok=True)
    models = scratch / "models"
    models.mkdir(exist_ok=True)
    runs = []
    for scale in sorted(args.scales):
        print(f"{scale}x: corpus and workflow in {scratch}", file=sys.stderr, flush=True)
        runs.append(measure_scale(scale, args, scratch, models, model_folder))
    summary = summarize(runs)
    conditions = (f"config/config.yaml with the corpus replaced, snakemake --cores {args.cores} to {', '.join(TARGETS)}; "
                  f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); copies varied with substitution "
                  f"{args.substitution}, seed {args.seed}; one run per scale")
    print(conditions)
    print_table(runs, summary)
    if args.json:
        args.json.write_text(json.dumps({"conditions": conditions, "scales": runs, **summary}, indent=2) + "\n")
    if not args.keep and not args.scratch:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    run_main(main)
