"""Reading user corpora, strictly, with exact error locations: .txt, .jsonl, .json and .parquet files (the
text formats also compressed as .gz, .zst, .bz2 or .xz), and Hugging Face datasets."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ivr.cli import UserError, first_line

FORMATS = ("txt", "jsonl", "json", "parquet")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bzip2", ".xz": "xz"}
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class ReadOptions:
    format: str = "auto"  # auto | txt | jsonl | json | parquet
    txt_mode: str = "line"  # line: one document per line; file: one document per file
    text_key: str = "text"  # key of the text in .jsonl / .json records
    text_column: str = "text"  # column of the text in .parquet files
    max_document_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class DatasetSource:
    """A Hugging Face dataset: a save_to_disk folder, a folder or hub id that load_dataset reads."""

    name: str
    config: str | None = None
    split: str = "train"


def compression_of(path: Path) -> str | None:
    return COMPRESSIONS.get(path.suffix.lower())


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = (path.with_suffix("") if compression_of(path) else path).suffix.lower()
    for name in FORMATS:
        if suffix == f".{name}":
            return name
    raise UserError(
        f"{path}: cannot tell the corpus format from the suffix '{suffix}'; "
        "set corpus.format to one of txt, jsonl, json, parquet (compressed files end in .gz, .zst, .bz2 or .xz)"
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


class _ZstdReader(io.RawIOBase):
    """The frames of a .zst file decompressed one after another. zstandard's own stream reader ends
    quietly where a cut-off file ends inside a frame; this raises EOFError there, as gzip, bz2 and lzma do."""

    def __init__(self, path: Path):
        import zstandard

        self._file = open(path, "rb")
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._pending = b""  # decompressed bytes not yet handed out, from self._offset on
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset == len(self._pending):
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("compressed file ended inside a zstd frame")
                return 0
            parts = []
            while chunk:
                parts.append(self._frame.decompress(chunk))
                self._in_frame = not self._frame.eof
                if self._frame.eof:  # the rest of the chunk starts the next frame
                    chunk = self._frame.unused_data
                    self._frame = self._decompressor.decompressobj()
                else:
                    chunk = b""
            self._pending, self._offset = b"".join(parts), 0
        size = min(len(buffer), len(self._pending) - self._offset)
        buffer[:size] = memoryview(self._pending)[self._offset:self._offset + size]
        self._offset += size
        return size

    def close(self) -> None:
        self._file.close()
        super().close()


def open_binary(path: Path) -> BinaryIO:
    """The bytes of a file, decompressed by its suffix (.gz, .zst, .bz2, .xz), as one stream."""
    compression = compression_of(path)
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "bzip2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "zstd":
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 16)
    return open(path, "rb")


def _decompression_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError


def _read_all(path: Path) -> bytes:
    with open_binary(path) as handle:
        return handle.read()


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                _check_bom(path, raw)
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
    compression = compression_of(path)
    if compression is None:
        yield from _read_documents(path, fmt, opts)
        return
    if fmt == "parquet":
        raise UserError(f"{path}: a compressed parquet file is not read (parquet compresses its columns itself); "
                        "decompress it")
    try:
        yield from _read_documents(path, fmt, opts)
    except _decompression_errors() as err:
        raise UserError(f"{path}: not readable as {compression} data, truncated or damaged ({first_line(err)})") from None


def _read_documents(path: Path, fmt: str, opts: ReadOptions) -> Iterator[str]:
    if fmt == "txt" and opts.txt_mode == "file":
        raw = _read_all(path)
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
        raw = _read_all(path)
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
            if text is not None:
                yield _checked_text(text, f"{path}: row {row}", opts)


def _checked_text(text: str, where: str, opts: ReadOptions) -> str:
    if "\x00" in text:
        raise UserError(f"{where}: contains a NUL character (binary data is not text)")
    _check_size(text, where, opts)
    return text


def read_dataset(source: DatasetSource, opts: ReadOptions) -> Iterator[str]:
    """Yield the raw documents of a Hugging Face dataset's split, streamed: a save_to_disk folder through
    load_from_disk (memory-mapped Arrow), anything else (a hub id, a folder of data files) through
    load_dataset(streaming=True). The text is in column opts.text_column."""
    import datasets

    if os.environ.get("IVR_NO_PROGRESS"):
        datasets.disable_progress_bars()
    name, column = source.name, opts.text_column
    saved = Path(name, "dataset_dict.json").is_file() or Path(name, "state.json").is_file()
    if saved and source.config is not None:
        raise UserError(f"{name}: a save_to_disk folder has no configurations; set corpus.dataset.config to null")
    try:
        loaded = datasets.load_from_disk(name) if saved else datasets.load_dataset(name, source.config, streaming=True)
    except Exception as err:  # whatever the datasets library raises for a dataset it cannot find or read
        raise UserError(f"{name}: cannot load the dataset ({first_line(err)})") from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if source.split not in loaded:
            raise UserError(f"{name}: the dataset has no split '{source.split}' (splits: {', '.join(loaded)}; "
                            "set corpus.dataset.split)")
        data = loaded[source.split]
    else:  # a single dataset saved to disk: its own split, 'train' when it names none
        own = str(loaded.split) if loaded.split is not None else "train"
        if source.split != own:
            raise UserError(f"{name}: the dataset holds one split, '{own}', not '{source.split}' (set corpus.dataset.split)")
        data = loaded
    if data.column_names is not None:  # a streamed dataset may not know its columns before its first row
        if column not in data.column_names:
            raise UserError(f"{name}: split '{source.split}' has no column '{column}' "
                            f"(columns: {', '.join(data.column_names)}; set corpus.text_column)")
        data = data.select_columns([column])
    row = 0
    try:
        for text in _column_values(data, column, f"{name}: split '{source.split}'"):
            row += 1
            if text is None:
                continue
            where = f"{name}: split '{source.split}' row {row}"
            if not isinstance(text, str):
                raise UserError(f"{where}: column '{column}' holds {type(text).__name__}, expected a string")
            yield _checked_text(text, where, opts)
    except UserError:
        raise
    except Exception as err:  # a data file that the dataset's loader cannot read
        raise UserError(f"{name}: split '{source.split}' row {row + 1}: cannot read the dataset ({first_line(err)})") from None


def _column_values(data, column: str, where: str) -> Iterator:
    import datasets

    if isinstance(data, datasets.Dataset):  # memory-mapped Arrow, read in batches
        for batch in data.iter(batch_size=4096):
            yield from batch[column]
        return
    for record in data:
        if column not in record:
            raise UserError(f"{where} has no column '{column}' (columns: {', '.join(record)}; set corpus.text_column)")
        yield record[column]


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
            yield split_line_text(raw, path, number)


def split_line_text(raw: bytes, path: str | os.PathLike, number: int) -> str:
    """The document of line number of a split written by ingest; UserError naming the line otherwise."""
    try:
        text = json.loads(raw)["text"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        text = None
    if not isinstance(text, str):
        raise UserError(
            f"{path}: line {number}: not a split written by ingest_corpus.py "
            "(one JSON object with a string 'text' per line)"
        )
    return text
