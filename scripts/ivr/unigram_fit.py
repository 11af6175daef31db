"""Unigram scores fitted so that the Unigram's Viterbi segmentation reproduces a BPE's (scripts/distill_tokenizer.py).

A cutting-plane method with a squared-hinge margin: starting from log token frequencies, each round
segments all pre-tokens with the current scores (the Rust Unigram Viterbi of `tokenizers`), adds a
constraint "the BPE segmentation beats the one found by at least the margin" for every pre-token
segmented differently, and re-solves all constraints gathered so far with L-BFGS. The round with the
best expected agreement on new text (seen pre-tokens as on the fit, unseen ones as on a dev set) wins,
and rounds stop when it stops improving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ivr.cli import log, progress
from ivr.ragged import Ragged

FIXED_SCORE = -1e6  # pieces the BPE never builds from text (added tokens in the model vocabulary)
BATCH = 2048  # pre-tokens per string handed to the Rust segmenter


@dataclass(frozen=True)
class FitOptions:
    include_general: bool = True  # fit the general-text pre-tokens too
    vocabulary_weight: float = 1.0  # weight of each vocabulary string as an extra example (0: none)
    margin: float = 1.0  # score by which the BPE segmentation must beat any other
    l2: float = 0.01  # pull towards the log-frequency start
    max_rounds: int = 10
    patience: int = 2  # rounds without a better expected agreement before stopping
    lbfgs_iterations: int = 100
    dev_fraction: float = 0.05  # share of rare (count <= 2) pre-tokens kept out as the dev set
    seed: int = 0


@dataclass
class Examples:
    """Pre-token types (byte-level strings) with their BPE segmentation, as flat arrays."""

    strings: list[str]
    counts: np.ndarray  # occurrences in the fitted splits (0 for vocabulary strings)
    weights: np.ndarray  # weight in the fit
    lens: np.ndarray  # BPE tokens per string
    flat: np.ndarray  # BPE ids, strings back to back

    def subset(self, index: np.ndarray) -> Examples:
        rows = Ragged(self.lens, self.flat).take(index)
        return Examples([self.strings[i] for i in index], self.counts[index], self.weights[index], rows.lens, rows.flat)

    def concat(self, other: Examples) -> Examples:
        return Examples(self.strings + other.strings, np.concatenate([self.counts, other.counts]),
                        np.concatenate([self.weights, other.weights]), np.concatenate([self.lens, other.lens]),
                        np.concatenate([self.flat, other.flat]))


def _ranks(lens: np.ndarray) -> np.ndarray:
    """0, 1, ..., len-1 for each group, back to back."""
    return np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)


# ---- the segmenters ----------------------------------------------------------------------------


def model_segmenter(model: dict):
    """A tokenizer that segments space-joined byte-level strings with `model` alone."""
    from tokenizers import Tokenizer

    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None, "model": model}
    return Tokenizer.from_str(json.dumps(spec))


def unigram_segmenter(vocab: list[str], scores: np.ndarray):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.Unigram(list(zip(vocab, scores.tolist())), None, False))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def joined(strings: list[str]) -> list[str]:
    """Batches of byte-level strings joined by spaces (byte-level strings never contain white space)."""
    return [" ".join(strings[i : i + BATCH]) for i in range(0, len(strings), BATCH)]


def segment(tok, batches: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment n strings given as joined batches: (tokens per string, ids back to back)."""
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    encodings = tok.encode_batch(batches, add_special_tokens=False)
    flat = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings])
    words = np.concatenate([np.asarray(e.word_ids, dtype=np.int64) + i * BATCH for i, e in enumerate(encodings)])
    return np.bincount(words, minlength=n), flat


def mismatched(ex: Examples, lens: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Which strings a segmentation (lens, flat) splits differently from the BPE."""
    same_len = lens == ex.lens
    owner = np.repeat(np.arange(len(ex.lens)), ex.lens)
    ranks = _ranks(ex.lens)
    aligned = same_len[owner]
    pred_pos = (np.cumsum(lens) - lens)[owner[aligned]] + ranks[aligned]
    differs = np.zeros(len(owner), dtype=bool)
    differs[aligned] = ex.flat[aligned] != flat[pred_pos]
    return ~same_len | (np.bincount(owner, weights=differs, minlength=len(ex.lens)) > 0)


# ---- the fit -----------------------------------------------------------------------------------


class Constraints:
    """Rows a.w >= margin, a = piece counts of the BPE segmentation minus those of a rival one.

    Identical rows are merged (their weights add), which keeps the squared hinge exact.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.index: dict[bytes, int] = {}
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.weight: list[float] = []

    def add(self, ex: Examples, wrong: np.ndarray, lens: np.ndarray, flat: np.ndarray) -> int:
        """Add a row for each wrongly segmented string; returns how many rows are new."""
        bad = np.nonzero(wrong)[0]
        if not len(bad):
            return 0
        gold_owner = np.repeat(np.arange(len(ex.lens)), ex.lens)
        pred_owner = np.repeat(np.arange(len(lens)), lens)
        gold_sel, pred_sel = wrong[gold_owner], wrong[pred_owner]
        keys = np.concatenate([gold_owner[gold_sel] * self.vocab_size + ex.flat[gold_sel],
                               pred_owner[pred_sel] * self.vocab_size + flat[pred_sel]])
        signs = np.concatenate([np.ones(gold_sel.sum()), -np.ones(pred_sel.sum())])
        keys, inverse = np.unique(keys, return_inverse=True)
        vals = np.bincount(inverse, weights=signs)
        keep = vals != 0
        keys, vals = keys[keep], vals[keep]
        owners, cols = keys // self.vocab_size, keys % self.vocab_size
        bounds = np.searchsorted(owners, bad, side="left"), np.searchsorted(owners, bad, side="right")
        new = 0
        for string, start, end in zip(bad, *bounds):
            if start == end:  # same pieces in another order: no score can tell them apart
                continue
            row_cols, row_vals = cols[start:end], vals[start:end]
            key = row_cols.tobytes() + row_vals.tobytes()
            row = self.index.get(key)
            if row is None:
                row = self.index[key] = len(self.weight)
                self.rows.append(np.full(end - start, row))
                self.cols.append(row_cols)
                self.vals.append(row_vals)
                self.weight.append(0.0)
                new += 1
            self.weight[row] += float(ex.weights[string])
        return new

    def objective(self, w0: np.ndarray, free: np.ndarray, margin: float, l2: float):
        """f(w) -> (value, gradient) of l2/2 |w - w0|^2 + sum_k c_k max(0, margin - a_k.w)^2."""
        rows, cols, vals = (np.concatenate(x) for x in (self.rows, self.cols, self.vals))
        weight = np.asarray(self.weight)
        n, size = len(weight), len(w0)

        def f(w: np.ndarray) -> tuple[float, np.ndarray]:
            short = np.maximum(0.0, margin - np.bincount(rows, weights=vals * w[cols], minlength=n))
            value = 0.5 * l2 * float(((w - w0) ** 2).sum()) + float((weight * short * short).sum())
            grad = l2 * (w - w0) - 2.0 * np.bincount(cols, weights=vals * (weight * short)[rows], minlength=size)
            return value, grad * free

        return f

    def violated(self, w: np.ndarray) -> int:
        """How many rows the scores w break outright (the BPE segmentation does not win)."""
        if not self.weight:
            return 0
        rows, cols, vals = (np.concatenate(x) for x in (self.rows, self.cols, self.vals))
        return int((np.bincount(rows, weights=vals * w[cols], minlength=len(self.weight)) <= 0).sum())


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # not `a @ b`: a multithreaded BLAS dot is slow on a busy machine, and this is exact enough
    return float(np.multiply(a, b).sum())


def lbfgs(f, x: np.ndarray, iterations: int, memory: int = 10) -> np.ndarray:
    """Minimize a smooth f (value, gradient) with limited-memory BFGS and a backtracking line search."""
    value, grad = f(x)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(iterations):
        if not np.any(grad):
            break
        q = grad.copy()
        alphas = []
        for s, y, rho in reversed(pairs):
            alpha = rho * _dot(s, q)
            q -= alpha * y
            alphas.append(alpha)
        if pairs:
            s, y, _ = pairs[-1]
            q *= _dot(s, y) / _dot(y, y)
        else:
            q /= max(1.0, float(np.abs(grad).sum()))
        for (s, y, rho), alpha in zip(pairs, reversed(alphas)):
            q += (alpha - rho * _dot(y, q)) * s
        direction = -q
        slope = _dot(grad, direction)
        if slope >= 0:  # not a descent direction: start over from the gradient
            pairs.clear()
            direction = -grad / max(1.0, float(np.abs(grad).sum()))
            slope = _dot(grad, direction)
        step = 1.0
        while True:
            new_x = x + step * direction
            new_value, new_grad = f(new_x)
            if new_value <= value + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s, y = new_x - x, new_grad - grad
        if _dot(s, y) > 1e-12:
            pairs = (pairs + [(s, y, 1.0 / _dot(s, y))])[-memory:]
        converged = value - new_value <= 1e-12 * max(1.0, abs(value))
        x, value, grad = new_x, new_value, new_grad
        if converged:
            break
    return x


def fit_scores(vocab: list[str], fixed: np.ndarray, fit: Examples, dev: Examples, unseen: float,
               opts: FitOptions) -> tuple[np.ndarray, dict]:
    """Unigram scores whose Viterbi segmentation reproduces the BPE's on `fit`.

    Each round's scores are judged by the agreement they can be expected to reach on new text of the
    same kind: pre-tokens seen in training (a share 1 - unseen of the occurrences) agree as on `fit`,
    unseen ones as on `dev`; unseen is the Good-Turing estimate (share of occurrences that are
    pre-tokens met once). The best round wins; once a round has beaten the log-frequency start,
    rounds stop when that has not improved for `patience` rounds.
    """
    size = len(vocab)
    free = np.ones(size)
    free[fixed] = 0.0
    counts = np.bincount(fit.flat, weights=np.repeat(fit.counts, fit.lens), minlength=size).astype(np.float64)
    w0 = np.log((counts + 0.1) / (counts.sum() + 0.1 * size))
    w0[fixed] = FIXED_SCORE
    fit_batches, dev_batches = joined(fit.strings), joined(dev.strings)
    occurrences = max(1, int(fit.counts.sum()))
    constraints = Constraints(size)
    scores, best, best_scores, best_round, stale = w0, -1.0, w0, 0, 0
    history = []
    bar = progress(total=opts.max_rounds + 1, desc="distill rounds", unit="round")
    for round_ in range(opts.max_rounds + 1):
        segmenter = unigram_segmenter(vocab, scores)
        lens, flat = segment(segmenter, fit_batches, len(fit.strings))
        wrong = mismatched(fit, lens, flat)
        fit_agreement = 1.0 - float(fit.counts[wrong].sum()) / occurrences
        dev_wrong = mismatched(dev, *segment(segmenter, dev_batches, len(dev.strings)))
        dev_agreement = 1.0 - float(dev_wrong.mean()) if dev.strings else 1.0
        expected = float((1.0 - unseen) * fit_agreement + unseen * dev_agreement)
        entry = {"round": round_, "fit_pretokens_wrong": int(wrong.sum()), "fit_agreement": round(fit_agreement, 8),
                 "dev_agreement": round(dev_agreement, 8), "expected_agreement": round(expected, 8),
                 "violated": constraints.violated(scores)}
        if expected > best:
            best, best_scores, best_round, stale = expected, scores, round_, 0
        elif best_round > 0:  # the first rounds may do worse than the start: a few constraints overshoot
            stale += 1
        go_on = round_ < opts.max_rounds and stale < opts.patience
        new_rows = constraints.add(fit, wrong, lens, flat) if go_on else 0
        entry["constraints"] = len(constraints.weight)
        history.append(entry)
        log.info("round %d: %d pre-tokens segmented differently, agreement %.6f on the fit, %.6f on dev, "
                 "%.6f expected; %d of %d constraints violated", round_, entry["fit_pretokens_wrong"], fit_agreement,
                 dev_agreement, expected, entry["violated"], entry["constraints"])
        bar.update(1)
        bar.set_postfix(wrong=entry["fit_pretokens_wrong"], expected=f"{expected:.6f}")
        if not new_rows:
            break
        scores = lbfgs(constraints.objective(w0, free, opts.margin, opts.l2), scores, opts.lbfgs_iterations)
    bar.close()
    return best_scores, {"rounds": history, "chosen_round": best_round, "unseen_share": round(unseen, 8)}


def split_dev(ex: Examples, opts: FitOptions) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the fitted and the dev examples: dev is a seeded sample of rare pre-tokens."""
    rng = np.random.default_rng(opts.seed)
    dev = (ex.counts > 0) & (ex.counts <= 2) & (rng.random(len(ex.counts)) < opts.dev_fraction)
    return np.nonzero(~dev)[0], np.nonzero(dev)[0]
