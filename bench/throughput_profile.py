"""The throughput benchmark's profile (bench/train_throughput.py --profile, --trace-dir): GPU kernel time
per step under torch.profiler, by kind and by kernel, and the before/after table of our step's variants."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from throughput_common import MODELS, NAMES, SCOPES, sync

if TYPE_CHECKING:
    from throughput_compare import Job

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
