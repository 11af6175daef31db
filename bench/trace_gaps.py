"""Where the GPU idles in a traced training step: the gaps between its kernels, summed by the pair of
kernels around them, and what the memsets inside the step cost with their gaps.

    python bench/trace_gaps.py TRACE.json.gz [--steps 3]

TRACE is a timeline written by `bench/train_throughput.py --mode compare --profile --trace-dir DIR`
(3 profiled steps). The window starts from an idle GPU, so its first gaps (the first step waiting for
the CPU to launch it) are the window's ramp-up, not the steady state: gaps over --ramp-us are listed
apart and left out of the sums.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter, defaultdict

from throughput_profile import short_kernel_name as short

GPU = ("kernel", "gpu_memset", "gpu_memcpy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--steps", type=int, default=3, help="steps in the traced window")
    parser.add_argument("--ramp-us", type=float, default=200, help="gaps longer than this are listed apart")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    with gzip.open(args.trace) if args.trace.endswith(".gz") else open(args.trace) as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU), key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit(f"{args.trace}: no GPU kernels in the trace (profiled on a CPU?)")
    idle: dict[tuple[str, str], float] = defaultdict(float)
    count: Counter = Counter()
    long_gaps = []
    memsets, memset_us = 0, 0.0
    busy_until, gap_before = gpu[0]["ts"], 0.0
    for before, event in zip([None, *gpu], gpu):
        gap = max(0.0, event["ts"] - busy_until)
        pair = (short(before["name"]) if before else "-", short(event["name"]))
        if gap > args.ramp_us:
            long_gaps.append((gap, pair))
        else:
            idle[pair] += gap
            count[pair] += 1
        after_memset = before is not None and before["cat"] == "gpu_memset"
        if after_memset:  # the memset with the gaps before and after it
            memsets += 1
            memset_us += gap_before + before["dur"] + gap
        gap_before = 0.0 if gap > args.ramp_us or after_memset else gap  # a gap counted once
        busy_until = max(busy_until, event["ts"] + event["dur"])
    window = (busy_until - gpu[0]["ts"]) / args.steps
    total_idle = sum(idle.values()) / args.steps
    print(f"per step: {window / 1e3:.2f} ms of window, {total_idle / 1e3:.2f} ms idle between kernels "
          f"(gaps over {args.ramp_us:.0f} us left out: {sum(g for g, _ in long_gaps) / args.steps / 1e3:.2f} ms)")
    print(f"memsets: {memsets / args.steps:.0f} per step, {memset_us / args.steps / 1e3:.2f} ms per step with "
          f"the gaps around them")
    print("idle us per step by the kernels around the gap (gaps per step):")
    for pair, us in sorted(idle.items(), key=lambda item: -item[1])[:args.top]:
        print(f"  {us / args.steps:8.1f}  ({count[pair] / args.steps:5.1f})  {pair[0]} -> {pair[1]}")
    for gap, pair in sorted(long_gaps, reverse=True)[:5]:
        print(f"  left out: {gap:.0f} us  {pair[0]} -> {pair[1]}")


if __name__ == "__main__":
    main()
