"""What a fine-tuned model keeps outside its training text: unseen texts, interpolation with the start.

Unseen texts come from sources that no training input and no choice of settings reads (config key
`unseen_texts`): `report` texts are scored once by the report, `dev` texts (from still other sources)
are where training watches retention and where settings are chosen. Each has a language: `base` (the
base model's main language, where the model must stay within a tolerance of the base) or `domain`
(the domain's language outside the domain).

Interpolation (WiSE-FT, Wortsman et al. 2022) moves every weight back towards an anchor: anchor + alpha
x (trained - anchor). Alpha 1 is the trained model. Two anchors:
- `start`, the model training started from: the reassigned rows move back towards their initialisation,
  which the base's blocks read poorly;
- `stage1`, the start with the reassigned rows as stage 1 (rows only) left them: rows trained for the
  base's own blocks, so that the line ends at a model that reads the domain's new tokens.
Rows that training held are the same in the anchor and the trained model, so they stay put.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ivr.cli import UserError, log
from ivr.corpus import iter_jsonl_texts

LANGUAGES = ("base", "domain")
AUTO_ALPHAS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
ANCHORS = ("start", "stage1")


@dataclass(frozen=True)
class UnseenText:
    name: str
    language: str  # base | domain
    paths: tuple[str, ...]  # JSON lines of {"text"}


def unseen_spec(text: dict) -> str:
    """A config entry of unseen_texts as the scripts take it: NAME:LANGUAGE=PATH[,PATH...]."""
    return f"{text['name']}:{text['language']}={','.join(text['paths'])}"


def parse_unseen(spec: str, flag: str) -> UnseenText:
    """NAME:LANGUAGE=PATH[,PATH...], as the rules pass them (--unseen, --unseen-dev)."""
    head, sep, paths = spec.partition("=")
    name, _, language = head.partition(":")
    if not sep or not name or not paths or language not in LANGUAGES:
        raise UserError(f"{flag} {spec!r}: expected NAME:LANGUAGE=PATH[,PATH...] with LANGUAGE one of "
                        f"{', '.join(LANGUAGES)}")
    return UnseenText(name, language, tuple(paths.split(",")))


def read_unseen(text: UnseenText, limit: int) -> list[str]:
    """The first `limit` documents of an unseen text (all when 0)."""
    docs = []
    for path in text.paths:
        for doc in iter_jsonl_texts(path):
            docs.append(doc)
            if limit and len(docs) >= limit:
                return docs
    if not docs:
        raise UserError(f"{text.paths[0]}: unseen text '{text.name}' holds no documents")
    return docs


def _key(text: str) -> bytes:
    return hashlib.sha256(unicodedata.normalize("NFC", text).strip().encode("utf-8")).digest()


def training_keys(paths: Iterable[str]) -> set[bytes]:
    """The hashes of every document of the training and dev inputs (JSON lines), read once."""
    return {_key(doc) for path in paths for doc in iter_jsonl_texts(path)}


def shared_documents(unseen: Iterable[str], training: set[bytes]) -> int:
    """How many documents of an unseen text also occur, whole, in the training inputs (their training_keys)."""
    return len({_key(t) for t in unseen} & training)


def interpolate(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """start + alpha x (trained - start), in fp32, for every tensor of trained (same keys in both)."""
    missing = sorted(set(trained) - set(start))
    if missing:
        raise UserError(f"interpolation: the start model lacks {missing[0]} (and {len(missing) - 1} more)")
    if alpha == 1.0:
        return dict(trained)
    return {k: torch.lerp(start[k].float(), v.float(), alpha).to(v.dtype) if v.is_floating_point() else v
            for k, v in trained.items()}


def alphas_of(setting) -> tuple[float, ...]:
    """The interpolation weights to try: a number is itself, `auto` the grid from 1.0 down to 0.1."""
    return AUTO_ALPHAS if setting == "auto" else (float(setting),)


def anchors_of(setting: str, has_stage1: bool) -> tuple[str, ...]:
    """The anchors to try (training.interpolation_anchor): `auto` is both when a stage 1 (rows only)
    preceded the last stage, else `start`."""
    if setting == "auto":
        return ANCHORS if has_stage1 else ("start",)
    if setting == "stage1" and not has_stage1:
        raise UserError("training.interpolation_anchor: stage1 needs a stage 1 (rows only) before the last stage: "
                        "reassigned rows (--rules), training.stage1_share > 0 and training.stage2 full or lora")
    return (setting,)


def with_rows(start: dict[str, torch.Tensor], keys: list[list[str]], rows: torch.Tensor,
              values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The start with `rows` of each embedding matrix set to `values` (keys[i]: every state key of matrix i,
    tied aliases included); the other tensors are shared with start, not copied."""
    anchor = dict(start)
    for names, value in zip(keys, values):
        for name in names:
            anchor[name] = start[name].clone()
            anchor[name][rows] = value.to(start[name].dtype)
    return anchor


def retention_ratio(scores: dict[str, float], reference: dict[str, float]) -> float:
    """The worst ratio, over the base-language dev texts (the keys of reference), of bits per byte to the base's."""
    return max((scores[k] / v for k, v in reference.items()), default=0.0)


def choose_weight(scores: dict[tuple[str, float], dict[str, float]], reference: dict[str, float],
                  tolerance: float) -> tuple[tuple[str, float], str]:
    """The retention rule over the weights tried, each an (anchor, alpha): the one with the best domain dev
    bits per byte (`dev_bpb`) among those that keep every base-language dev text (the keys of `reference`,
    the base model's bits per byte there) within (1 + tolerance) of the base; with none, the one that comes
    closest. Ties go to the higher alpha. Returns it and why.
    """
    def worst(weight: tuple[str, float]) -> float:
        return retention_ratio(scores[weight], reference)

    kept = [w for w in scores if worst(w) <= 1 + tolerance]
    if kept:
        best = min(kept, key=lambda w: (scores[w]["dev_bpb"], -w[1]))
        return best, f"best domain dev among {len(kept)} of {len(scores)} within {tolerance:.0%} of the base"
    best = min(scores, key=lambda w: (worst(w), -w[1]))
    log.warning("interpolation: no weight keeps the base-language dev texts within %.0f%% of the base; "
                "taking alpha %.2f towards %s (worst ratio %.3f)", tolerance * 100, best[1], best[0], worst(best))
    return best, f"none within {tolerance:.0%} of the base: the closest ({worst(best):.3f}x)"
