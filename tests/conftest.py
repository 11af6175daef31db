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


def make_workdir(tmp: Path, gpt2_tokenizer_dir: Path) -> Path:
    """A copy of the workflow (tracked files) in tmp, sharing the fetched assets, with the tiny model."""
    import shutil
    import subprocess

    from make_tiny_model import make_tiny_gpt2

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp / name)
    (tmp / "resources").mkdir(exist_ok=True)
    (tmp / "resources" / "assets").symlink_to(ASSETS)
    make_tiny_gpt2(gpt2_tokenizer_dir, tmp / "resources" / "models" / "tiny-gpt2")
    return tmp
