"""Corpus ingest: formats, cleaning, the held-out split, and bad input."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import subprocess
import sys
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from ingest_corpus import ingest
from ivr.cli import UserError
from ivr.corpus import DatasetSource, ReadOptions, iter_jsonl_texts

SCRIPT = ROOT / "scripts" / "ingest_corpus.py"


def run_ingest(tmp_path: Path, inputs: list[Path], **kw) -> dict:
    opts = ReadOptions(**{k: v for k, v in kw.items() if k in ReadOptions.__dataclass_fields__})
    outputs = {split: tmp_path / f"{split}.jsonl" for split in ("train", "dev", "heldout")}
    return ingest([str(p) for p in inputs], opts, outputs, kw.get("fraction", 0.2), kw.get("seed", 7),
                  dev_fraction=kw.get("dev_fraction", 0.1), dataset=kw.get("dataset"))


def all_texts(tmp_path: Path) -> list[str]:
    return [t for split in ("train", "dev", "heldout") for t in iter_jsonl_texts(tmp_path / f"{split}.jsonl")]


def split_sets(folder: Path) -> dict[str, set[str]]:
    return {split: set(iter_jsonl_texts(folder / f"{split}.jsonl")) for split in ("train", "dev", "heldout")}


def zstd_compress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


COMPRESS = {"gz": gzip.compress, "zst": zstd_compress, "bz2": bz2.compress, "xz": lzma.compress}


@pytest.fixture(scope="module")
def mixed_texts(korean_texts, english_texts) -> list[str]:
    """Real Korean bills and constitution lines with English documentation pages, one line each."""
    return [t.replace("\n", " ") for t in korean_texts[:60] + english_texts[:20]]


def as_jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()


@pytest.mark.parametrize("compression", sorted(COMPRESS))
def test_compressed_files_give_the_same_documents_and_split(tmp_path, mixed_texts, compression):
    plain = {"txt": "\n".join(mixed_texts).encode(), "jsonl": as_jsonl(mixed_texts),
             "json": json.dumps([{"text": t} for t in mixed_texts], ensure_ascii=False).encode()}
    for fmt, data in plain.items():
        (tmp_path / f"c.{fmt}").write_bytes(data)
        (tmp_path / f"c.{fmt}.{compression}").write_bytes(COMPRESS[compression](data))
        results = []
        for name in (f"c.{fmt}", f"c.{fmt}.{compression}"):
            out = tmp_path / f"out {name}"
            out.mkdir()
            stats = run_ingest(out, [tmp_path / name])
            assert stats["documents_read"] == len(mixed_texts)
            results.append(split_sets(out))
        assert results[0] == results[1]
        assert sum(map(len, results[0].values())) == len(set(mixed_texts))


def test_compressed_parquet_is_refused(tmp_path):
    pq.write_table(pa.table({"text": ["국회 법률안"]}), tmp_path / "p.parquet")
    (tmp_path / "p.parquet.gz").write_bytes(gzip.compress((tmp_path / "p.parquet").read_bytes()))
    with pytest.raises(UserError, match=r"p\.parquet\.gz: a compressed parquet file is not read"):
        run_ingest(tmp_path, [tmp_path / "p.parquet.gz"])


def test_folder_of_mixed_shards_equals_the_single_file(tmp_path, mixed_texts):
    """Shards in sorted path order hold the single file's documents in order: the outputs are the same
    files; shuffled over the shards, the same documents fall in the same splits."""
    docs = mixed_texts + mixed_texts[:5]  # duplicates across shards are dropped as in one file
    (tmp_path / "single.jsonl").write_bytes(as_jsonl(docs))
    cuts = [0, 13, 26, 39, 52, 65, len(docs)]
    parts = [docs[start:end] for start, end in zip(cuts, cuts[1:])]
    for order, shards in (("sorted", parts), ("shuffled", [parts[3], parts[0], parts[5], parts[1], parts[4], parts[2]])):
        folder = tmp_path / order
        (folder / "sub").mkdir(parents=True)
        (folder / "00.txt").write_bytes("\n".join(shards[0]).encode())
        (folder / "01.jsonl.gz").write_bytes(gzip.compress(as_jsonl(shards[1])))
        (folder / "02.jsonl.zst").write_bytes(zstd_compress(as_jsonl(shards[2])))
        (folder / "03.txt.zst").write_bytes(zstd_compress("\n".join(shards[3]).encode()))
        (folder / "sub" / "04.jsonl").write_bytes(as_jsonl(shards[4]))
        pq.write_table(pa.table({"text": shards[5]}), folder / "sub" / "05.parquet")
    results = {}
    for name in ("single.jsonl", "sorted", "shuffled"):
        out = tmp_path / f"out {name}"
        out.mkdir()
        stats = run_ingest(out, [tmp_path / name])
        assert stats["documents_read"] == len(docs) and stats["dropped_duplicate"] == 5
        results[name] = out
    for split in ("train", "dev", "heldout"):
        single = (results["single.jsonl"] / f"{split}.jsonl").read_bytes()
        assert (results["sorted"] / f"{split}.jsonl").read_bytes() == single
    assert split_sets(results["shuffled"]) == split_sets(results["single.jsonl"])
    assert all(split_sets(results["single.jsonl"]).values())


def test_datasets_saved_to_disk_and_data_file_folders_give_the_same_split(tmp_path, mixed_texts):
    import datasets

    (tmp_path / "c.jsonl").write_bytes(as_jsonl(mixed_texts))
    datasets.Dataset.from_dict({"text": mixed_texts, "n": list(range(len(mixed_texts)))}).save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["validation text"]}),
                          "validation": datasets.Dataset.from_dict({"body": mixed_texts})}).save_to_disk(tmp_path / "two")
    (tmp_path / "files").mkdir()  # data files as load_dataset reads them, streamed: the split from the name
    (tmp_path / "files" / "test.jsonl.gz").write_bytes(gzip.compress(as_jsonl(mixed_texts)))
    sources = {"file": None, "one": DatasetSource(str(tmp_path / "one")),
               "two": DatasetSource(str(tmp_path / "two"), split="validation"),
               "files": DatasetSource(str(tmp_path / "files"), split="test")}
    results = {}
    for name, source in sources.items():
        out = tmp_path / f"out {name}"
        out.mkdir()
        stats = run_ingest(out, [tmp_path / "c.jsonl"] if source is None else [], dataset=source,
                           text_column="body" if name == "two" else "text")
        assert stats["documents_read"] == len(mixed_texts)
        results[name] = split_sets(out)
    assert results["one"] == results["two"] == results["files"] == results["file"]


def test_every_format_gives_the_same_documents(tmp_path, korean_texts):
    docs = korean_texts[:30]
    (tmp_path / "a.txt").write_text("\n".join(d.replace("\n", " ") for d in docs), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d.replace("\n", " ")}) + "\n" for d in docs))
    (tmp_path / "a.json").write_text(json.dumps([{"body": d.replace("\n", " ")} for d in docs]))
    pq.write_table(pa.table({"body": [d.replace("\n", " ") for d in docs]}), tmp_path / "a.parquet")
    results = {}
    for name in ("a.txt", "a.jsonl", "a.json", "a.parquet"):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        run_ingest(out, [tmp_path / name], text_key="body", text_column="body")
        results[name] = sorted(all_texts(out))
    assert len(results["a.txt"]) == 30
    assert results["a.txt"] == results["a.jsonl"] == results["a.json"] == results["a.parquet"]


def test_one_document_per_file_keeps_newlines(tmp_path, korean_texts):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(korean_texts[:5]):
        (folder / f"{i}.txt").write_text(text, encoding="utf-8")
    stats = run_ingest(tmp_path, [folder], txt_mode="file")
    assert stats["documents_read"] == 5
    assert sorted(all_texts(tmp_path)) == sorted(t.strip() for t in korean_texts[:5])
    assert any("\n" in t for t in all_texts(tmp_path))


def test_nfc_empty_and_duplicates(tmp_path):
    decomposed = unicodedata.normalize("NFD", "대한민국 헌법")
    lines = [decomposed, "대한민국 헌법", "", "   ", "국회 법률안", "국회 법률안"]
    (tmp_path / "c.txt").write_text("\n".join(lines), encoding="utf-8")
    stats = run_ingest(tmp_path, [tmp_path / "c.txt"])
    assert stats["documents_read"] == 6
    assert stats["dropped_empty"] == 2
    assert stats["dropped_duplicate"] == 2  # the NFD copy equals the NFC one after normalisation
    assert sorted(all_texts(tmp_path)) == ["국회 법률안", "대한민국 헌법"]
    assert sum(stats[s]["bytes"] for s in ("train", "dev", "heldout")) == len("국회 법률안대한민국 헌법".encode())


def test_split_is_seeded_and_independent_of_order(tmp_path, korean_texts):
    docs = [t.replace("\n", " ") for t in korean_texts]
    (tmp_path / "fwd.txt").write_text("\n".join(docs), encoding="utf-8")
    (tmp_path / "rev.txt").write_text("\n".join(reversed(docs)), encoding="utf-8")
    splits = []
    for name, seed in (("fwd.txt", 7), ("rev.txt", 7), ("fwd.txt", 8)):
        out = tmp_path / f"{name}{seed}"
        out.mkdir()
        run_ingest(out, [tmp_path / name], seed=seed, fraction=0.3)
        splits.append(set(iter_jsonl_texts(out / "heldout.jsonl")))
    assert splits[0] == splits[1]
    assert splits[0] != splits[2]
    assert 0.1 < len(splits[0]) / len(set(docs)) < 0.5


def test_dev_split_is_carved_from_training_documents_and_never_overlaps_heldout(tmp_path, korean_texts):
    docs = [t.replace("\n", " ") for t in korean_texts]
    (tmp_path / "c.txt").write_text("\n".join(docs), encoding="utf-8")
    splits = {}
    for dev_fraction in (0.0, 0.2):
        out = tmp_path / f"dev{dev_fraction}"
        out.mkdir()
        stats = run_ingest(out, [tmp_path / "c.txt"], fraction=0.2, dev_fraction=dev_fraction)
        splits[dev_fraction] = {s: set(iter_jsonl_texts(out / f"{s}.jsonl")) for s in ("train", "dev", "heldout")}
        assert stats["dev"]["documents"] == len(splits[dev_fraction]["dev"])
    without, with_dev = splits[0.0], splits[0.2]
    assert not without["dev"] and 0.1 < len(with_dev["dev"]) / len(set(docs)) < 0.3
    # the held-out set does not depend on the dev split; dev documents come out of training
    assert with_dev["heldout"] == without["heldout"]
    assert with_dev["dev"] | with_dev["train"] == without["train"]
    assert not with_dev["dev"] & with_dev["heldout"] and not with_dev["dev"] & with_dev["train"]


def cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    outs = ["--train-out", str(tmp_path / "out" / "train.jsonl"), "--dev-out", str(tmp_path / "out" / "dev.jsonl"),
            "--heldout-out", str(tmp_path / "out" / "heldout.jsonl"), "--stats-out", str(tmp_path / "out" / "stats.json")]
    return subprocess.run([sys.executable, str(SCRIPT), *args, *outs], capture_output=True, text=True)


BAD_INPUTS = {
    "missing": (None, [], "does not exist"),
    "invalid_utf8": (b"good line\n\xff\xfe bad\n", [], "line 2: invalid UTF-8"),
    "not_json": (b'{"text": "ok"}\n{"text": broken\n', [], "line 2: not valid JSON"),
    "no_key": (b'{"text": "ok"}\n{"body": "x"}\n', [], "line 2: no key 'text'"),
    "non_string": (b'{"text": "ok"}\n{"text": 5}\n', [], "line 2: key 'text' holds int"),
    "nul_byte": (b"fine\nbad\x00line\n", [], "line 2: contains a NUL byte"),
    "bom": (b"\xef\xbb\xbfline one\n", [], "byte-order mark"),
    "empty_after_cleaning": (b"\n   \n\n", [], "corpus is empty after cleaning"),
    "enormous_line": (b"a" * 5000 + b"\n", ["--max-document-bytes", "1000"], "line 1: document of 5000 bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_no_output(tmp_path, case):
    content, extra, expected = BAD_INPUTS[case]
    suffix = ".jsonl" if case in ("not_json", "no_key", "non_string") else ".txt"
    path = tmp_path / f"corpus {case}{suffix}"  # a space in the path on purpose
    if content is not None:
        path.write_bytes(content)
    result = cli([str(path), *extra], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert expected in lines[0]
    assert str(path) in lines[0] or case == "empty_after_cleaning"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_parquet_column_of_numbers_is_refused(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match="holds int64, expected strings"):
        run_ingest(tmp_path, [tmp_path / "n.parquet"])
