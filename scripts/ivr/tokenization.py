"""Loading base tokenizers, checking they are byte-level BPE, and fast exact pre-tokenization."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

from ivr.cli import UserError, first_line
from ivr.files import looks_local, read_json
from ivr.ragged import Ragged, interleave

# The split GPT-2's ByteLevel pre-tokenizer applies when use_regex is on.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> frozenset[str]:
    return frozenset(byte_to_unicode().values())


@lru_cache(maxsize=1)
def _to_bytelevel_table() -> dict[int, str]:
    return {b: c for b, c in byte_to_unicode().items()}  # latin-1 code point == byte value


@lru_cache(maxsize=1)
def _from_bytelevel() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def to_bytelevel(text: str) -> str:
    return bytes_to_bytelevel(text.encode("utf-8"))


def bytes_to_bytelevel(data: bytes) -> str:
    """Bytes as the byte-level token string that stands for them."""
    return data.decode("latin-1").translate(_to_bytelevel_table())


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for."""
    table = _from_bytelevel()
    return bytes(table[c] for c in token)


def readable(token: str) -> str:
    """A byte-level token as text a person can read; incomplete UTF-8 shows as \\xNN escapes."""
    try:
        return token_bytes(token).decode("utf-8", errors="backslashreplace")
    except KeyError:  # not a byte-level string (special or added token)
        return token


def load_tokenizer_json(name_or_path: str, trust_remote_code: bool = False) -> dict:
    """The tokenizer.json of a local HF folder, a tokenizer.json file, or a hub id, as a dict."""
    path = Path(name_or_path)
    if path.is_file():
        return read_json(path, "tokenizer.json")
    if (path / "tokenizer.json").is_file():
        return read_json(path / "tokenizer.json", "tokenizer.json")
    return json.loads(load_tokenizer(name_or_path, trust_remote_code=trust_remote_code).backend_tokenizer.to_str())


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """A fast transformers tokenizer from a local folder or hub id."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    if not Path(name).exists() and looks_local(name):
        raise UserError(f"{name}: tokenizer or model folder does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{name}: cannot load a tokenizer ({first_line(err)})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{name}: only a slow tokenizer is available; IVR needs a fast (tokenizer.json) tokenizer")
    return tokenizer


def _steps(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get("pretokenizers", []) for s in _steps(child)]
    return [node]


SUPPORTED = ("IVR supports byte-level BPE tokenizers (GPT-2, Llama-3, Qwen, SmolLM2) and SentencePiece-style BPE "
             "with byte fallback (Llama-2, Mistral, Phi-3, TinyLlama, Gemma)")


def check_byte_level_bpe(spec: dict, where: str) -> None:
    """For the unigram backend: refuse anything but a byte-level BPE, in one line saying what it is."""
    if token_form(spec, where).byte_level:
        return
    raise UserError(f"{where}: a SentencePiece-style BPE tokenizer: the unigram backend supports byte-level BPE "
                    "tokenizers only; set ivr.backend: bpe")


# ---- the two kinds of BPE tokenizer: what a token string stands for ------------------------------------

SPACE = "\u2581"  # SentencePiece's visible space, "▁"
_BYTE_TOKEN = regex.compile(r"<0x([0-9A-F]{2})>")
# A SentencePiece-style word: its leading spaces and what follows up to the next space, or trailing spaces.
_SENTENCEPIECE_WORD = regex.compile(f"{SPACE}*[^{SPACE}]+|{SPACE}+")


class ByteLevelForm:
    """GPT-2's byte-level BPE: every byte a printable character; a pre-token's text is mapped byte by byte."""

    byte_level = True

    @staticmethod
    def token_bytes(token: str) -> bytes:
        return token_bytes(token)

    @staticmethod
    def readable(token: str) -> str:
        return readable(token)

    @staticmethod
    def model_input(piece: bytes) -> str:
        """A pre-token's bytes as the BPE model reads them."""
        return bytes_to_bytelevel(piece)

    @staticmethod
    def is_piece(token: str) -> bool:
        """Whether a string can be a token of the model (a new token must be)."""
        return set(token) <= _byte_level_alphabet()

    @staticmethod
    def is_byte(token: str) -> bool:
        return len(token) == 1


class SentencePieceForm:
    """SentencePiece-style BPE (Llama-2, Mistral, Phi-3, Gemma): text with spaces as "▁", and a character the
    vocabulary lacks spelt as its UTF-8 bytes, <0xNN> tokens. Pre-tokens are kept in the "▁" form."""

    byte_level = False

    @staticmethod
    def token_bytes(token: str) -> bytes:
        byte = _BYTE_TOKEN.fullmatch(token)
        return bytes([int(byte.group(1), 16)]) if byte else token.replace(SPACE, " ").encode("utf-8")

    @classmethod
    def readable(cls, token: str) -> str:
        return cls.token_bytes(token).decode("utf-8", errors="backslashreplace")

    @staticmethod
    def model_input(piece: bytes) -> str:
        return piece.decode("utf-8", errors="surrogateescape")

    @staticmethod
    def is_piece(token: str) -> bool:
        return not _BYTE_TOKEN.search(token)

    @staticmethod
    def is_byte(token: str) -> bool:
        """Byte-fallback tokens and single characters: what every text falls back to."""
        return len(token) == 1 or _BYTE_TOKEN.fullmatch(token) is not None


def token_form(spec: dict, where: str) -> ByteLevelForm | SentencePieceForm:
    """The kind of BPE a tokenizer.json holds; refuses anything else in one line saying what it is."""
    model = spec.get("model", {})
    kind = model.get("type")
    steps = _steps(spec.get("pre_tokenizer"))
    kinds = ", ".join(s.get("type", "?") for s in steps) or "none"
    if kind == "BPE" and any(s.get("type") == "ByteLevel" for s in steps):
        return ByteLevelForm()
    if kind == "BPE" and all(s.get("type") == "Metaspace" for s in steps):
        vocab = model.get("vocab", {})
        if model.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256)):
            return SentencePieceForm()
        raise UserError(
            f"{where}: a SentencePiece-style BPE tokenizer without byte fallback (model BPE, pre-tokenizer {kinds}, "
            "no <0x00>..<0xFF> byte tokens): text outside its vocabulary has no tokens; " + SUPPORTED
        )
    what = "a SentencePiece Unigram tokenizer" if kind == "Unigram" else f"a {kind} tokenizer"
    raise UserError(f"{where}: {what} (pre-tokenizer {kinds}) is not supported; {SUPPORTED}")


def sentencepiece_pretokenizer(spec: dict, tok) -> Callable[[str], list[str]]:
    """Exact pre-tokens of a SentencePiece-style BPE, in the "▁" form its model reads: the tokenizer's own
    normalizer and pre-tokenizer, then, unless some token joins a letter to a following space, each piece
    cut into words (a run of spaces with what follows up to the next space): no merge crosses such a cut."""
    normalize = tok.normalizer.normalize_str if tok.normalizer else None
    pre = tok.pre_tokenizer
    joined = regex.compile(f"[^{SPACE}]{SPACE}")
    added = {t["content"] for t in spec.get("added_tokens", [])}
    by_word = not any(joined.search(t) for t in spec["model"]["vocab"] if t not in added)

    def pretokenize(text: str) -> list[str]:
        if normalize:
            text = normalize(text)
        pieces = [p for p, _ in pre.pre_tokenize_str(text)] if pre else [text]
        return [w for p in pieces for w in _SENTENCEPIECE_WORD.findall(p)] if by_word else pieces

    return pretokenize


def _split(pattern: regex.Pattern, behavior: str, invert: bool) -> Callable[[str], list[str]]:
    """HF's Split semantics: which parts of a string become pieces, for one pattern and behaviour."""

    def parts(text: str) -> list[tuple[str, bool]]:
        out, pos = [], 0
        for match in pattern.finditer(text):
            if match.start() == match.end():
                continue
            if match.start() > pos:
                out.append((text[pos : match.start()], invert))
            out.append((match.group(), not invert))
            pos = match.end()
        if pos < len(text):
            out.append((text[pos:], invert))
        return out

    fast_isolated = behavior == "Isolated" and not invert and pattern.groups == 0

    def apply(text: str) -> list[str]:
        if fast_isolated:  # findall is several times faster; exact when the matches cover the text
            found = pattern.findall(text, concurrent=True)  # releases the GIL
            if sum(map(len, found)) == len(text):
                return found
        segs = parts(text)
        if behavior == "Isolated":
            return [s for s, _ in segs]
        if behavior == "Removed":
            return [s for s, is_delim in segs if not is_delim]
        if behavior == "MergedWithPrevious":
            out: list[str] = []
            for s, is_delim in segs:
                if is_delim and out:
                    out[-1] += s
                else:
                    out.append(s)
            return out
        if behavior == "MergedWithNext":
            out, pending = [], ""
            for s, is_delim in segs:
                if is_delim:
                    pending += s
                else:
                    out.append(pending + s)
                    pending = ""
            if pending:
                out.append(pending)
            return out
        if behavior == "Contiguous":
            out, last = [], None
            for s, is_delim in segs:
                if is_delim and last:
                    out[-1] += s
                else:
                    out.append(s)
                last = is_delim
            return out
        raise NotImplementedError(behavior)

    return apply


# Split patterns of well-known byte-level tokenizers (Llama-3, Qwen2) besides GPT-2's.
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def splits_at_single_spaces(spec: dict) -> bool:
    r"""Whether no pre-token of this pre-tokenizer ever spans a space that has non-whitespace on at
    least one side (the end of the text counting as whitespace), and each pre-token depends only
    on the text from its start.

    Then a text split at such spaces, each part but the first keeping its space in front, pre-tokenizes
    part by part into exactly the pre-tokens of the whole. True for GPT-2's pattern and the Split
    patterns above (their space-taking alternatives all start at the space, and the only lookahead,
    (?!\S), follows whitespace). Not for Digits: its part ends act like text ends for (?!\S).
    Other patterns are not assumed.
    """
    steps = _steps(spec.get("pre_tokenizer"))
    if not steps:
        return False
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            continue  # its regex, when used, is GPT-2's
        if kind == "Split" and step.get("behavior", "Isolated") == "Isolated" and not step.get("invert"):
            if step.get("pattern", {}).get("Regex") in (GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN):
                continue
        return False
    return True


def compile_pretokenizer(spec: dict) -> Callable[[str], list[str]] | None:
    """A pure-Python twin of the tokenizer's pre-tokenizer that returns raw (not byte-mapped) pieces.

    Only the steps byte-level BPE tokenizers use are emulated (ByteLevel, Split, Digits); for
    anything else this returns None and callers use the tokenizer's own, slower pre-tokenizer.
    """
    funcs: list[Callable[[str], list[str]]] = []
    for step in _steps(spec.get("pre_tokenizer")):
        kind = step.get("type")
        if kind == "ByteLevel":
            prefix = bool(step.get("add_prefix_space"))
            split = _split(regex.compile(GPT2_PATTERN), "Isolated", False) if step.get("use_regex", True) else None

            def bytelevel(text: str, prefix=prefix, split=split) -> list[str]:
                if prefix and not text.startswith(" "):
                    text = " " + text
                return split(text) if split else [text]

            funcs.append(bytelevel)
        elif kind == "Split":
            pat = step["pattern"]
            source = pat["Regex"] if "Regex" in pat else regex.escape(pat["String"])
            try:
                funcs.append(_split(regex.compile(source), step.get("behavior", "Isolated"), bool(step.get("invert"))))
            except regex.error:
                return None
        elif kind == "Digits":
            behavior = "Isolated" if step.get("individual_digits") else "Contiguous"
            funcs.append(_split(regex.compile(r"\p{N}"), behavior, False))
        else:
            return None

    if len(funcs) == 1:
        return funcs[0]

    def pretokenize(text: str) -> list[str]:
        pieces = [text]
        for func in funcs:
            pieces = [p for piece in pieces for p in func(piece) if p]
        return pieces

    return pretokenize


# Separates pre-tokens in one call into tiktoken: never in ingested text (ingest refuses NUL bytes).
_SEPARATOR = "\x00"


class RankSegmenter:
    """Exact byte-level BPE segmentation of single pre-tokens by tiktoken's rank-based merger.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF's BPE merges
    the pair listed first in its merges. With ranks increasing in merge order the two agree, except
    (1) a piece that is itself a token: tiktoken returns it whole, HF only if its merges reach it
    (unless the model sets ignore_merges), so such pieces go to HF; and (2) a pair that concatenates
    to a token through a split other than its listed merge, which no byte-level tokenizer we met
    produces on real text. Callers verify a sample against HF and fall back to it on any difference.
    build() returns None for BPE options tiktoken cannot express.
    """

    def __init__(self, core, rank_to_id: np.ndarray | None, whole_tokens: frozenset[bytes], hf_tokenize) -> None:
        self._core = core
        self._rank_to_id = rank_to_id
        self._whole_tokens = whole_tokens
        import pyarrow as pa

        self._whole_array = pa.array(sorted(t.decode("utf-8") for t in whole_tokens if _is_utf8(t)), pa.string())
        self._hf_tokenize = hf_tokenize
        self._separator_rank = core.encode_single_token(_SEPARATOR.encode())
        buffer = getattr(core, "encode_to_tiktoken_buffer", None)  # tiktoken >= 0.8: no Python list in between
        self._encode_all = (lambda text: np.frombuffer(buffer(text, set()), np.uint32)) if buffer else (
            lambda text: np.array(core.encode_ordinary(text), np.uint32))

    @classmethod
    def build(cls, spec: dict, hf_tokenize: Callable[[bytes], list[int]]) -> RankSegmenter | None:
        """hf_tokenize: the HF model's segmentation of one pre-token's bytes, as ids."""
        model = spec.get("model", {})
        if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
            return None
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            return None
        try:
            import tiktoken
        except ImportError:
            return None
        vocab: dict[str, int] = model["vocab"]
        decode = _from_bytelevel()
        ids: dict[bytes, int] = {}  # token bytes -> id, single bytes first, then in merge order
        for byte in range(256):
            token = byte_to_unicode()[byte]
            if token not in vocab:
                return None
            ids[bytes([byte])] = vocab[token]
        for merge in model.get("merges", []):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            merged = left + right
            if merged not in vocab:
                return None
            try:
                data = bytes(decode[c] for c in merged)
            except KeyError:  # not byte-level
                return None
            if data in ids:
                return None
            ids[data] = vocab[merged]
        merged_ids = list(ids.values())[256:]
        if all(a < b for a, b in zip(merged_ids, merged_ids[1:])) and len(set(ids.values())) == len(ids):
            ranks, rank_to_id = ids, None  # ids already grow in merge order (GPT-2, SmolLM2): use them as ranks
        else:
            ranks, rank_to_id = {data: rank for rank, data in enumerate(ids)}, np.fromiter(ids.values(), np.int64)
        # The pattern keeps each separated piece whole: tiktoken only merges, the caller pre-tokenized.
        pattern = f"[^{_SEPARATOR}]+|{_SEPARATOR}"
        encoding = tiktoken.Encoding("ivr-segmenter", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        whole = frozenset() if model.get("ignore_merges") else frozenset(list(ids)[256:])
        return cls(encoding._core_bpe, rank_to_id, whole, hf_tokenize)

    def __call__(self, piece: bytes) -> list[int]:
        if piece in self._whole_tokens:
            return self._hf_tokenize(piece)
        ranks = self._core.encode_single_piece(piece)
        return ranks if self._rank_to_id is None else self._rank_to_id[ranks].tolist()

    def many(self, pieces) -> Ragged:
        """Segmentations of many pre-tokens (a list or pyarrow array of strings) through one call into
        tiktoken, a row a pre-token."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not isinstance(pieces, (pa.Array, pa.ChunkedArray)):
            pieces = pa.array(pieces, pa.string())
        alone = pc.or_(pc.is_in(pieces, value_set=self._whole_array), pc.match_substring(pieces, _SEPARATOR))
        alone = alone.to_numpy(zero_copy_only=False)
        batch = pieces.filter(pa.array(~alone)) if alone.any() else pieces
        joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(batch)], pa.int32()), batch), _SEPARATOR)
        ranks = self._encode_all(joined[0].as_py())
        cuts = np.flatnonzero(ranks == self._separator_rank)
        if len(cuts) != max(len(batch) - 1, 0):
            raise AssertionError("tiktoken merged across a separator")
        lens = np.diff(np.concatenate([[-1], cuts, [len(ranks)]])) - 1 if len(batch) else np.zeros(0, np.int64)
        flat = np.delete(ranks, cuts).astype(np.int64)
        if self._rank_to_id is not None:
            flat = self._rank_to_id[flat]
        if not alone.any():
            return Ragged(lens, flat)
        lone = Ragged.of([self(p.encode("utf-8")) for p in pieces.filter(pa.array(alone)).to_pylist()])
        return interleave([(np.flatnonzero(~alone), Ragged(lens, flat)), (np.flatnonzero(alone), lone)], len(pieces))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
