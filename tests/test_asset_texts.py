"""The text assets, general (Moby-Dick) and evaluation (scripts/ivr/asset_texts.py): real archives fetched,
turned into documents.jsonl, each document long enough and in its language, the same bytes on every fetch;
damaged files refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ASSETS, ROOT, asset
from fetch_assets import DEFAULT_MANIFEST, TEXT_ASSETS, extract, fetch
from ivr.asset_texts import MIN_DOCUMENT_BYTES, gutenberg_lines, hangul_share, read_r_lazy_load_db
from ivr.cli import UserError

DOWNLOADS = ROOT / "resources" / ".downloads"
# asset -> (documents, language, the start of the first document)
EXPECTED = {
    "moby_dick": (272, "English", "Call me Ishmael. Some years ago"),
    "austen_novels": (921, "English", "Emma Woodhouse, handsome, clever, and rich"),
    "convention_speeches": (273, "English", "BARACK OBAMA: Thank you."),
    "libreoffice_help_ko": (609, "Korean", "구현된 매크로 목록:"),
    "gnome_help_ko": (126, "Korean", "탄력키 켜기"),
}


def documents(folder: Path) -> list[str]:
    with open(folder / "documents.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def ascii_share(text: str) -> float:
    letters = [char for char in text if char.isalpha()]
    return sum(char.isascii() for char in letters) / len(letters)


@pytest.mark.parametrize("name", EXPECTED)
def test_a_text_asset_is_documents_of_its_language(name):
    count, language, start = EXPECTED[name]
    folder = asset(name)
    kept = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # Snakemake may leave a timestamp
    assert kept == ["SOURCE.json", "documents.jsonl"]  # the raw files are gone
    texts = documents(folder)
    assert len(texts) == count and len(set(texts)) == count
    assert texts[0].startswith(start)
    assert min(len(text.encode("utf-8")) for text in texts) >= MIN_DOCUMENT_BYTES
    if language == "English":
        assert all(ascii_share(text) > 0.99 for text in texts)
    else:
        assert all(hangul_share(text) >= 0.5 for text in texts)


def test_what_is_not_text_is_left_out():
    austen, speeches = documents(asset("austen_novels")), documents(asset("convention_speeches"))
    paragraphs = [paragraph for text in austen for paragraph in text.split("\n\n")]
    assert not any(paragraph.startswith(("CHAPTER", "Chapter", "VOLUME", "THE END")) for paragraph in paragraphs)
    assert not any("(Applause" in t or "(Cheers" in t or "(Laughter" in t for t in speeches)
    moby = documents(asset("moby_dick"))
    paragraphs = [paragraph for text in moby for paragraph in text.split("\n\n")]
    assert not any(paragraph.startswith(("CHAPTER", "Epilogue", "ETYMOLOGY", "EXTRACTS")) for paragraph in paragraphs)
    assert not any("Gutenberg" in text for text in moby)  # the e-text's header and licence
    assert moby[-1].endswith("only found another orphan.")  # the epilogue's last words
    libreoffice, gnome = documents(asset("libreoffice_help_ko")), documents(asset("gnome_help_ko"))
    assert not any("LibreOffice 7.4 Help" in t or "debug info" in t or "관련 주제" in t for t in libreoffice)
    assert not any("조성호" in t for t in gnome)  # the translator's credit, in each page's <info>


def test_two_fetches_give_the_same_bytes(tmp_path):
    for name in EXPECTED:
        asset(name)
        fetch(name, tmp_path / name, cache=DOWNLOADS)
        assert (tmp_path / name / "documents.jsonl").read_bytes() == (ASSETS / name / "documents.jsonl").read_bytes()


def _damage_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff" + path.read_bytes())


@pytest.mark.parametrize(
    "name, member, damage",
    [
        ("austen_novels", "data/Rdata.rdb", _damage_truncated),
        ("moby_dick", "data/Rdata.rdb", _damage_truncated),
        ("convention_speeches", "political_data.json", _damage_truncated),
        ("gnome_help_ko", "gnome-help/a11y-bouncekeys.page", _damage_truncated),
        ("libreoffice_help_ko", "text/sbasic/guide/access2base.html", _damage_not_utf8),
    ],
)
def test_a_damaged_file_is_refused_in_one_line(tmp_path, name, member, damage):
    asset(name)
    entry = yaml.safe_load(DEFAULT_MANIFEST.read_text())[name]
    extract(entry, DOWNLOADS / entry["source"]["file"], tmp_path)
    damage(tmp_path / member)
    raw, to_documents = TEXT_ASSETS[name]
    with pytest.raises(UserError) as refused:
        to_documents(tmp_path / raw)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / member}: ") and "\n" not in message


def test_an_e_text_without_its_gutenberg_marks_is_refused(tmp_path):
    asset("moby_dick")
    entry = yaml.safe_load(DEFAULT_MANIFEST.read_text())["moby_dick"]
    extract(entry, DOWNLOADS / entry["source"]["file"], tmp_path)
    path = tmp_path / "data" / "Rdata.rdb"
    text = read_r_lazy_load_db(path.parent)["mobydick"]["mobydick"]
    unmarked = "\n".join(line for line in text.splitlines() if "START OF THIS PROJECT GUTENBERG" not in line)
    with pytest.raises(UserError) as refused:
        gutenberg_lines(unmarked, path)
    assert str(refused.value) == f"{path}: not a Project Gutenberg e-text (no start and end marks)"
