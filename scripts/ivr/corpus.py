"""Reading user corpora: .txt, .jsonl, .json and .parquet, strictly, with exact error locations."""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ivr.cli import UserError

FORMATS = ("txt", "jsonl", "json", "parquet")
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class ReadOptions:
    format: str = "auto"  # auto | txt | jsonl | json | parquet
    txt_mode: str = "line"  # line: one document per line; file: one document per file
    text_key: str = "text"  # key of the text in .jsonl / .json records
    text_column: str = "text"  # column of the text in .parquet files
    max_document_bytes: int = 16 * 1024 * 1024


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    for name in FORMATS:
        if suffix == f".{name}":
            return name
    raise UserError(
        f"{path}: cannot tell the corpus format from the suffix '{suffix}'; "
        "set corpus.format to one of txt, jsonl, json, parquet"
    )


def expand_paths(paths: list[str]) -> list[Path]:
    """Files named directly, or every file below a named folder (sorted, hidden files skipped)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{path}: corpus path does not exist")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise UserError(f"{path}: corpus folder holds no files")
            out.extend(files)
        else:
            out.append(path)
    for path in out:
        if not os.access(path, os.R_OK):
            raise UserError(f"{path}: corpus file is not readable (permission denied)")
    return out


def _decode(raw: bytes, where: str) -> str:
    if b"\x00" in raw:
        raise UserError(f"{where}: contains a NUL byte (binary data is not text)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{where}: invalid UTF-8 at byte {err.start} of the line") from None


def _check_bom(path: Path, head: bytes) -> None:
    if head.startswith(BOM):
        raise UserError(
            f"{path}: starts with a UTF-8 byte-order mark; save the file without it "
            "(it would otherwise become part of the first document)"
        )


def _check_size(text: str, where: str, opts: ReadOptions) -> None:
    if len(text) > opts.max_document_bytes or len(text.encode("utf-8")) > opts.max_document_bytes:
        raise UserError(
            f"{where}: document of {len(text.encode('utf-8'))} bytes exceeds "
            f"corpus.max_document_bytes = {opts.max_document_bytes}"
        )


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        head = handle.read(3)
        _check_bom(path, head)
        handle.seek(0)
        for number, raw in enumerate(handle, start=1):
            yield number, raw.rstrip(b"\r\n")


def _from_record(record, key: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with key '{key}', found {type(record).__name__}")
    if key not in record:
        raise UserError(f"{where}: no key '{key}' (set corpus.text_key)")
    value = record[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: key '{key}' holds {type(value).__name__}, expected a string")
    return value


def read_documents(path: Path, opts: ReadOptions) -> Iterator[str]:
    """Yield the raw documents of one file, raising UserError with file and line on bad input."""
    fmt = detect_format(path, opts.format)
    if fmt == "txt" and opts.txt_mode == "file":
        raw = path.read_bytes()
        _check_bom(path, raw[:3])
        text = _decode(raw, str(path))
        _check_size(text, str(path), opts)
        yield text
    elif fmt == "txt":
        for number, raw in _iter_lines(path):
            where = f"{path}: line {number}"
            if len(raw) > opts.max_document_bytes:
                _check_size(raw.decode("utf-8", "replace"), where, opts)
            yield _decode(raw, where)
    elif fmt == "jsonl":
        for number, raw in _iter_lines(path):
            where = f"{path}: line {number}"
            if not raw.strip():
                continue
            line = _decode(raw, where)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            text = _from_record(record, opts.text_key, where)
            _check_size(text, where, opts)
            yield text
    elif fmt == "json":
        raw = path.read_bytes()
        _check_bom(path, raw[:3])
        try:
            data = json.loads(_decode(raw, str(path)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
        if isinstance(data, dict) and isinstance(data.get(opts.text_key), list):
            data = data[opts.text_key]
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records or strings")
        for index, record in enumerate(data):
            where = f"{path}: record {index}"
            text = _from_record(record, opts.text_key, where)
            _check_size(text, where, opts)
            yield text
    elif fmt == "parquet":
        yield from _read_parquet(path, opts)
    else:
        raise UserError(f"{path}: unknown corpus format '{fmt}'")


def _read_parquet(path: Path, opts: ReadOptions) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    names = handle.schema_arrow.names
    if opts.text_column not in names:
        raise UserError(f"{path}: no column '{opts.text_column}' (columns: {', '.join(names)}; set corpus.text_column)")
    field = handle.schema_arrow.field(opts.text_column)
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise UserError(f"{path}: column '{opts.text_column}' holds {field.type}, expected strings")
    row = 0
    for batch in handle.iter_batches(columns=[opts.text_column], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            where = f"{path}: row {row}"
            if "\x00" in text:
                raise UserError(f"{where}: contains a NUL character (binary data is not text)")
            _check_size(text, where, opts)
            yield text


def clean(text: str) -> str:
    """The one cleaning every document gets: Unicode NFC and surrounding white space removed."""
    return unicodedata.normalize("NFC", text).strip()


def document_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_of(text: str, seed: int, heldout_fraction: float, dev_fraction: float = 0.0) -> str:
    """Deterministic, order-independent split: a seeded hash of the document decides.

    The lowest heldout_fraction of hash values is held out, the next dev_fraction is the dev split
    (carved out of what would otherwise be training text, so the held-out set does not depend on it),
    the rest is training text."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    value = int.from_bytes(digest, "big")
    if value < heldout_fraction * 2**64:
        return "heldout"
    return "dev" if value < (heldout_fraction + dev_fraction) * 2**64 else "train"


def iter_jsonl_texts(path: str | os.PathLike) -> Iterator[str]:
    """Read back the documents of a split written by ingest (one JSON object per line, key 'text')."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = json.loads(raw)["text"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise UserError(
                    f"{path}: line {number}: not a split written by ingest_corpus.py "
                    "(one JSON object with a string 'text' per line)"
                )
            yield text
