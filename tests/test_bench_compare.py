"""bench/train_throughput.py --mode compare --repeats: the same-batch figure over several measurements."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import throughput_compare as compare  # noqa: E402
import train_throughput  # noqa: E402


def measured(side: str, repeat: int, tokens_per_s: float | None) -> compare.Job:
    job = compare.Job("gpt2", side, 16, None if side == "hf" else "graphs", repeat=repeat)
    job.result = None if tokens_per_s is None else {"tokens_per_s": tokens_per_s}
    return job


def test_the_repeated_figure_is_the_ratio_of_medians_over_complete_pairs():
    pairs = [(measured("hf", 0, 300e3), measured("ours", 0, 450e3)),
             (measured("hf", 1, 280e3), measured("ours", 1, 460e3)),
             (measured("hf", 2, 320e3), measured("ours", 2, None)),  # ours failed: the pair is left out
             (measured("hf", 3, 310e3), measured("ours", 3, 455e3))]
    m = compare.median_ratio(pairs)
    assert m["pairs"] == 3
    assert (m["hf"], m["ours"]) == (300e3, 455e3)
    assert m["ratio"] == pytest.approx(455 / 300)
    assert (m["low"], m["high"]) == (pytest.approx(455 / 310), pytest.approx(460 / 280))
    assert compare.median_ratio([(measured("hf", 0, None), measured("ours", 0, 450e3))]) is None


def test_repeats_measure_the_same_batch_pair_again_in_turn_before_anything_else(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train_throughput.py", "--mode", "compare", "--repeats", "3",
                                     "--scopes", "graphs,blocks", "--no-extras"])
    args = train_throughput.parse_args()
    jobs = compare.compare_jobs(args)
    same = [(j.model, j.side, j.repeat) for j in jobs[:12]]
    assert same == [(m, side, r) for r in range(3) for m in compare.MODELS for side in ("hf", "ours")]
    assert all(j.scope == "graphs" for j in jobs[:12] if j.side == "ours")
    assert [j.scope for j in jobs[12:14]] == ["blocks", "blocks"]
