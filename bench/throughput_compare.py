"""The throughput benchmark's comparison (bench/train_throughput.py --mode compare): the HF Trainer and our
step at the same batch (--repeats times), our compiled variants and --levers beside them, each side at its
best batch, each measurement in its own process, scheduled so that compiles overlap while exactly one
process at a time is timed; then the tables and the summary."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import throughput_common as common
from throughput_common import MODELS, NAMES, PEAK_FLOPS, ROOT, SCOPE_NAMES
from throughput_measure import own
from throughput_profile import print_profiles


def estimated_gib(side: str, model: str, batch: int) -> float:
    """Peak GPU memory of one measurement (GiB allocated in earlier H100 runs, plus a margin for what
    the allocator keeps): what the scheduler lets sit on the GPU side by side."""
    base, per_block = {("ours", "gpt2"): (3.8, 0.39), ("hf", "gpt2"): (3.0, 0.55),
                       ("ours", "smollm2"): (2.4, 0.70), ("hf", "smollm2"): (2.4, 0.85)}[side, model]
    return 1.25 * (base + per_block * batch * common.SEQ / 1024)


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
          f"transformers {env.get('transformers', '?')}; seq {common.SEQ}; per run {args.warmup} warm-up steps "
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
