"""Shared fixtures: real assets (fetched once into resources/assets), tiny real text, a tiny model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("IVR_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fetch_assets import fetch  # noqa: E402

ASSETS = ROOT / "resources" / "assets"


def asset(name: str) -> Path:
    """A fetched asset folder, fetching it (checksummed) the first time."""
    folder = ASSETS / name
    if not folder.exists():
        fetch(name, folder, cache=ROOT / "resources" / ".downloads")
    return folder


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    return asset("gpt2_tokenizer")


@pytest.fixture(scope="session")
def korean_texts() -> list[str]:
    """Real Korean text: the kobill bills and the constitution's lines (konlpy's corpus)."""
    folder = asset("konlpy_corpus")
    texts = [p.read_text(encoding="utf-8") for p in sorted((folder / "kobill").glob("*.txt"))]
    texts += [line for line in (folder / "constitution.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts


@pytest.fixture(scope="session")
def bills_sample(tmp_path_factory) -> Path:
    """The first 400 propose-reason texts of the Korean bills corpus, as a JSON-lines file."""
    import pyarrow.parquet as pq

    table = pq.read_table(asset("korean_bills") / "bill_texts.parquet", columns=["propose_reason"])
    texts = [t for t in table.column(0).to_pylist()[:400] if t]
    path = tmp_path_factory.mktemp("bills") / "bills.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def english_texts() -> list[str]:
    """Real English prose: pages of the Python documentation."""
    path = asset("python_docs") / "python_docs.jsonl"
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for _, line in zip(range(40), handle)]


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A small randomly initialised GPT-2 (2 layers, width 64) with the real GPT-2 tokenizer."""
    from make_tiny_model import make_tiny_gpt2

    return make_tiny_gpt2(gpt2_tokenizer_dir, tmp_path_factory.mktemp("tiny") / "tiny-gpt2")


EOS_GPT2 = 50256


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def pack(tokenizer: Path, out: Path, train: Path, *extra: str) -> dict:
    import pack_data

    pack_data.main(["--tokenizer", str(tokenizer), "--train", str(train), "--out-dir", str(out), "--threads", "1",
                    *extra])
    return json.loads((out / "meta.json").read_text())


def make_workdir(tmp: Path, gpt2_tokenizer_dir: Path) -> Path:
    """A copy of the workflow (tracked files) in tmp, sharing the fetched assets, with the tiny model."""
    import shutil
    import subprocess

    from make_tiny_model import make_tiny_gpt2

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).is_symlink():  # e.g. slurm -> profiles/slurm, the profile `--profile slurm` finds
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).symlink_to(os.readlink(ROOT / name))
        elif (ROOT / name).is_file():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp / name)
    (tmp / "resources").mkdir(exist_ok=True)
    (tmp / "resources" / "assets").symlink_to(ASSETS)
    make_tiny_gpt2(gpt2_tokenizer_dir, tmp / "resources" / "models" / "tiny-gpt2")
    return tmp


@pytest.fixture(scope="session")
def gpt2_bills_analysis(tmp_path_factory, gpt2_tokenizer_dir, bills_sample, english_texts) -> dict[str, Path]:
    """The analysis (scripts/analyze_corpus.py) of 300 real bills and 30 pages of English with GPT-2,
    plus 100 held-out bills and 10 held-out pages, all as JSON-lines splits."""
    from analyze_corpus import analyze

    folder = tmp_path_factory.mktemp("gpt2_bills")
    bills = [json.loads(line)["text"] for line in bills_sample.read_text(encoding="utf-8").splitlines()]

    def split(name: str, texts: list[str]) -> Path:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
        return path

    splits = {
        "train": split("train", bills[:300]),
        "heldout": split("heldout", bills[300:]),
        "general_train": split("general_train", english_texts[:30]),
        "general_heldout": split("general_heldout", english_texts[30:]),
    }
    analyze(str(gpt2_tokenizer_dir), splits, folder / "analysis", threads=1)
    return {**splits, "analysis": folder / "analysis", "tokenizer": gpt2_tokenizer_dir}


@pytest.fixture(scope="session")
def gpt2_unigram_standin(tmp_path_factory, gpt2_bills_analysis) -> Path:
    """A crude Unigram with GPT-2's vocabulary and ids (scores: log token frequency on the fixture's
    training splits), standing in for the distilled tokenizer."""
    import math

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("unigram") / "distilled"
    AutoTokenizer.from_pretrained(gpt2_bills_analysis["tokenizer"]).save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    table = pq.read_table(gpt2_bills_analysis["analysis"] / "token_frequencies.parquet").to_pydict()
    counts = {i: c + g for i, c, g in zip(table["id"], table["count"], table["general_count"])}
    total = sum(counts.values()) + len(counts)
    vocab = spec["model"]["vocab"]
    pieces = [None] * len(vocab)
    for token, token_id in vocab.items():
        pieces[token_id] = [token, math.log((counts.get(token_id, 0) + 1) / total)]
    spec["model"] = {"type": "Unigram", "unk_id": None, "vocab": pieces, "byte_fallback": False}
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "TokenizersBackend"
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
