"""Packed training data (pack_data.py writes it, training reads it): token blocks, their loss mask and
meta.json, and the order in which a run visits the blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ivr.cli import UserError
from ivr.files import read_json


IGNORE = -100


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "meta.json" if folder.is_dir() else folder
    if not path.exists():
        raise UserError(f"{path}: packed data metadata not found (run pack_data.py)")
    meta = read_json(path, "packed data metadata")
    if meta.get("format") != 1:
        raise UserError(f"{path}: unknown packed data format {meta.get('format')!r}")
    return meta


class PackedBlocks(torch.utils.data.Dataset):
    """Blocks of pack_data.py, memory-mapped; targets are the next token, -100 where it is no label."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.meta = read_meta(folder)
        shape = (self.meta["blocks"], self.meta["block_size"])
        for name, itemsize in (("input_ids.bin", np.dtype(self.meta["dtype"]).itemsize), ("loss_mask.bin", 1)):
            if (folder / name).stat().st_size != shape[0] * shape[1] * itemsize:
                raise UserError(f"{folder / name}: size does not match meta.json")
        self.ids = np.memmap(folder / "input_ids.bin", dtype=self.meta["dtype"], mode="r", shape=shape)
        self.mask = np.memmap(folder / "loss_mask.bin", dtype=np.uint8, mode="r", shape=shape)

    def __len__(self) -> int:
        return self.meta["blocks"]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index].astype(np.int64)
        targets = np.full_like(ids, IGNORE)
        targets[:-1] = np.where(self.mask[index, 1:] == 1, ids[1:], IGNORE)
        return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets)}


class IndexSampler(torch.utils.data.Sampler):
    def __init__(self, indices: np.ndarray) -> None:
        self.indices = indices

    def __iter__(self):
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)


def block_stream(blocks: int, length: int, seed: int) -> np.ndarray:
    """Block order of a whole run: the first epoch in packed order (the same documents first in every
    branch, as packing shuffled them with one seed), each later epoch a seeded permutation."""
    parts, epoch, have = [], 0, 0
    while have < length:
        part = np.arange(blocks) if epoch == 0 else np.random.default_rng([seed, epoch]).permutation(blocks)
        parts.append(part)
        have += blocks
        epoch += 1
    return np.concatenate(parts)[:length]


def pack_examples(prompts: list[np.ndarray], completions: list[np.ndarray], pad_id: int,
                  block_size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Whole examples packed in order into padded blocks; labels (mask 1) only on completions.

    An example longer than a block is cut at the block end; one whose prompt fills the block is
    skipped, as it would teach nothing.
    """
    rows_ids: list[np.ndarray] = []
    rows_mask: list[np.ndarray] = []
    ids = np.full(block_size, pad_id, dtype=np.int64)
    mask = np.zeros(block_size, dtype=np.uint8)
    used = truncated = skipped = tokens = 0
    for prompt, completion in zip(prompts, completions):
        if len(prompt) >= block_size:
            skipped += 1
            continue
        example = np.concatenate([prompt, completion]).astype(np.int64)
        labels = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(completion), np.uint8)])
        if len(example) > block_size:
            example, labels = example[:block_size], labels[:block_size]
            truncated += 1
        if used + len(example) > block_size:
            rows_ids.append(ids)
            rows_mask.append(mask)
            ids = np.full(block_size, pad_id, dtype=np.int64)
            mask = np.zeros(block_size, dtype=np.uint8)
            used = 0
        ids[used : used + len(example)] = example
        mask[used : used + len(example)] = labels
        used += len(example)
        tokens += len(example)
    if used:
        rows_ids.append(ids)
        rows_mask.append(mask)
    shape = (len(rows_ids), block_size)
    stack = (lambda rows, dt: np.stack(rows) if rows else np.zeros(shape, dt))
    counts = {"truncated": truncated, "skipped": skipped, "tokens": tokens}
    return stack(rows_ids, np.int64), stack(rows_mask, np.uint8), counts



def interleave(first: int, second: int) -> np.ndarray:
    """Order of first+second blocks that spreads the second kind evenly through the first."""
    keys = np.concatenate([(np.arange(first) + 0.5) / max(first, 1), (np.arange(second) + 0.5) / max(second, 1)])
    return np.argsort(keys, kind="stable")
