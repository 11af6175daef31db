"""The analysis's tables that later stages read (columns in docs/DEVELOPING.md), written and read only here:
pretokens.parquet, the distinct pre-tokens of the training splits with their counts and base
segmentations, and token_frequencies.parquet, the counts of every id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ivr.cli import UserError, first_line


@dataclass
class Pretokens:
    """The distinct pre-tokens, most frequent in the domain first."""

    strings: list[str]  # the form the BPE model reads (byte-level, or SentencePiece's with "▁" for spaces)
    count: np.ndarray  # occurrences in the domain training split
    general_count: np.ndarray  # occurrences in the general-text training split
    lens: np.ndarray  # base tokens of each
    ids: np.ndarray  # their base segmentations, back to back
    nbytes: np.ndarray  # UTF-8 bytes of each pre-token's text


def write_pretokens(path: str | os.PathLike, strings, texts, count: np.ndarray, general_count: np.ndarray,
                    lens: np.ndarray, ids: np.ndarray) -> None:
    """strings and texts: pyarrow string arrays (the model's form and the text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]), pa.int32())
    table = pa.table(
        {
            "pretoken": strings,
            "text": texts,
            "count": pa.array(count, pa.int64()),
            "general_count": pa.array(general_count, pa.int64()),
            "ids": pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())),
        }
    )
    pq.write_table(table, path, use_dictionary=["ids"])  # the strings are distinct


def read_pretokens(path: str | os.PathLike) -> Pretokens:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    _exists(path, "pretokens table")
    try:
        table = pq.read_table(path, columns=["pretoken", "text", "count", "general_count", "ids"])
    except Exception as err:  # pyarrow raises several kinds for a missing column or a damaged file
        raise UserError(f"{path}: not a pretokens table from the analysis ({first_line(err)})") from None
    ids = table.column("ids").combine_chunks()
    offsets = ids.offsets.to_numpy()
    return Pretokens(
        strings=table.column("pretoken").to_pylist(),
        count=table.column("count").to_numpy().astype(np.int64),
        general_count=table.column("general_count").to_numpy().astype(np.int64),
        lens=np.diff(offsets).astype(np.int64),
        ids=ids.values.to_numpy()[offsets[0] : offsets[-1]].astype(np.int64),
        nbytes=pc.binary_length(table.column("text")).to_numpy().astype(np.int64),
    )


def write_frequencies(path: str | os.PathLike, vocab: dict, count: np.ndarray, general_count: np.ndarray) -> None:
    """vocab: the columns id, token, readable (pyarrow arrays)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({**vocab, "count": count, "general_count": general_count}), path)


def read_frequencies(path: str | os.PathLike, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Domain and general-text counts of every id below n_ids."""
    import pyarrow.parquet as pq

    _exists(path, "token frequency table")
    try:
        table = pq.read_table(path, columns=["id", "count", "general_count"])
    except Exception as err:  # pyarrow raises several kinds for a missing column or a damaged file
        raise UserError(f"{path}: not a token frequency table from the analysis ({first_line(err)})") from None
    ids = table.column("id").to_numpy()
    if len(ids) and ids.max() >= n_ids:
        raise UserError(f"{path}: has ids up to {ids.max()} but the base tokenizer only {n_ids}; was it made with another tokenizer?")
    domain, general = np.zeros(n_ids, np.int64), np.zeros(n_ids, np.int64)
    domain[ids] = table.column("count").to_numpy()
    general[ids] = table.column("general_count").to_numpy()
    return domain, general


def _exists(path: str | os.PathLike, what: str) -> None:
    if not Path(path).is_file():
        raise UserError(f"{path}: {what} does not exist (an output of the analysis)")
