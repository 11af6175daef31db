"""The tokenizer a GGUF file holds, as a Hugging Face tokenizer (scripts/gguf_to_hf.py).

llama.cpp stores a vocabulary (tokens, token types, merges or scores) and names how text is cut before
the merges: `tokenizer.ggml.model` (gpt2: byte-level BPE; llama: SentencePiece BPE with byte fallback)
and, for gpt2, `tokenizer.ggml.pre`. PRE_TOKENIZERS maps each supported pre-tokenizer name to the
pre-tokenizer of the family's own tokenizer.json, with the split patterns llama.cpp applies
(src/llama-vocab.cpp). Anything else is refused in one line that names it.
"""

from __future__ import annotations

from pathlib import Path

from ivr.cli import UserError
from ivr.tokenization import LLAMA3_PATTERN, QWEN2_PATTERN

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

QWEN35_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The Latin, Greek, Cyrillic... letters DeepSeek-LLM keeps together, as llama.cpp lists them.
DEEPSEEK_LETTERS = (
    r"A-Za-z\x{b5}\x{c0}-\x{d6}\x{d8}-\x{f6}\x{f8}-\x{1ba}\x{1bc}-\x{1bf}\x{1c4}-\x{293}\x{295}-\x{2af}"
    r"\x{370}-\x{373}\x{376}\x{377}\x{37b}-\x{37d}\x{37f}\x{386}\x{388}-\x{38a}\x{38c}\x{38e}-\x{3a1}"
    r"\x{3a3}-\x{3f5}\x{3f7}-\x{481}\x{48a}-\x{52f}\x{531}-\x{556}\x{10a0}-\x{10c5}\x{13a0}-\x{13f5}"
    r"\x{13f8}-\x{13fd}\x{1c90}-\x{1cba}\x{1cbd}-\x{1cbf}\x{1d00}-\x{1d2b}\x{1d6b}-\x{1d77}\x{1d79}-\x{1d9a}"
    r"\x{1e00}-\x{1f15}\x{1f18}-\x{1f1d}\x{1f20}-\x{1f45}\x{1f48}-\x{1f4d}\x{1f50}-\x{1f57}\x{1f59}"
    r"\x{1f5b}\x{1f5d}\x{1f5f}-\x{1f7d}\x{1f80}-\x{1fb4}\x{1fb6}-\x{1fbc}\x{1fbe}\x{1fc2}-\x{1fc4}"
    r"\x{1fc6}-\x{1fcc}\x{1fd0}-\x{1fd3}\x{1fd6}-\x{1fdb}\x{1fe0}-\x{1fec}\x{1ff2}-\x{1ff4}\x{1ff6}-\x{1ffc}"
    r"\x{2102}\x{2107}\x{210a}-\x{2113}\x{2115}\x{2119}-\x{211d}\x{2124}\x{2126}\x{2128}\x{212a}-\x{212d}"
    r"\x{212f}-\x{2134}\x{2139}\x{213c}-\x{213f}\x{2145}-\x{2149}\x{214e}\x{2183}\x{2184}\x{2c00}-\x{2c7b}"
    r"\x{2c7e}-\x{2ce4}\x{2ceb}-\x{2cee}\x{2cf2}\x{2cf3}\x{a640}-\x{a66d}\x{a680}-\x{a69b}\x{a722}-\x{a76f}"
    r"\x{a771}-\x{a787}\x{a78b}-\x{a78e}\x{ab70}-\x{abbf}\x{fb00}-\x{fb06}\x{fb13}-\x{fb17}\x{ff21}-\x{ff3a}"
    r"\x{ff41}-\x{ff5a}\x{10400}-\x{1044f}\x{104b0}-\x{104d3}\x{104d8}-\x{104fb}\x{10c80}-\x{10cb2}"
    r"\x{10cc0}-\x{10cf2}\x{118a0}-\x{118df}\x{1e900}-\x{1e943}"
)


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _sequence(*steps: dict) -> dict:
    return {"type": "Sequence", "pretokenizers": list(steps)}


_DIGITS_APART = {"type": "Digits", "individual_digits": True}
_GPT2 = _byte_level(True)
_LLAMA3 = _sequence(_split(LLAMA3_PATTERN), _byte_level(False))
_STARCODER = _sequence(_DIGITS_APART, _byte_level(True))

# tokenizer.ggml.pre -> (pre-tokenizer, NFC normalizer?, ignore_merges?)
PRE_TOKENIZERS: dict[str, tuple[dict, bool, bool]] = {
    "gpt-2": (_GPT2, False, False),
    "phi-2": (_GPT2, False, False),
    "mpt": (_GPT2, True, False),
    "olmo": (_GPT2, False, False),
    "llama-bpe": (_LLAMA3, False, True),
    "llama3": (_LLAMA3, False, True),
    "llama-v3": (_LLAMA3, False, True),
    "qwen2": (_sequence(_split(QWEN2_PATTERN), _byte_level(False)), True, False),
    "qwen35": (_sequence(_split(QWEN35_PATTERN), _byte_level(False)), False, False),
    "smollm": (_STARCODER, False, False),
    "starcoder": (_STARCODER, False, False),
    "refact": (_STARCODER, False, False),
    "command-r": (_STARCODER, True, False),
    "deepseek-llm": (_sequence(
        _split(r"[\r\n]"),
        _split(rf"\s?[{DEEPSEEK_LETTERS}]+"),
        _split(r"\s?[!-/:-~\x{ff01}-\x{ff0f}\x{ff1a}-\x{ff5e}\x{2018}-\x{201f}\x{3000}-\x{3002}]+"),
        _split(r"\s+$"),
        _split(r"[\x{4e00}-\x{9fa5}\x{800}-\x{4e00}\x{ac00}-\x{d7ff}]+"),
        _split(r"\p{N}+"),
        _byte_level(False),
    ), False, False),
    "deepseek-coder": (_sequence(
        _split(r"[\r\n]"),
        _split(r"\s?\p{L}+"),
        _split(r"\s?\p{P}+"),
        _split(r"[\x{4e00}-\x{9fa5}\x{800}-\x{4e00}\x{ac00}-\x{d7ff}]+"),
        _split(r"\p{N}"),
        _byte_level(False),
    ), False, False),
    "falcon": (_sequence(
        _split(r"[\p{P}\$\+<=>\^~\|`]+"),
        _split(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"),
        _split(r"[0-9][0-9][0-9]"),
        _byte_level(False),
    ), False, False),
}


# GGUF value types: (struct format, size) of the scalar ones; 8 is a string, 9 an array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9


def read_fields(path: Path, prefix: str = "tokenizer.") -> dict:
    """The keys of a GGUF file (version 2 or 3) under prefix: strings, numbers, and lists of either.

    Read directly from the header, the file mapped rather than read (the tensors after it are most of it):
    the gguf package's reader takes seconds per large vocabulary.
    """
    import mmap
    import struct

    import numpy as np

    with open(path, "rb") as file:
        if file.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file (bad magic number)")
        data = memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
    version, _, n_keys = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    pos = 24

    def string() -> str:
        nonlocal pos
        (size,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + size
        return bytes(data[pos - size : pos]).decode("utf-8")

    def value(kind: int):
        nonlocal pos
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item == _STRING:
                return [string() for _ in range(count)]
            fmt, size = _SCALARS[item]
            values = np.frombuffer(data, fmt, count, pos).tolist()
            pos += size * count
            return values
        fmt, size = _SCALARS[kind]
        pos += size
        return struct.unpack_from(fmt, data, pos - size)[0]

    out = {}
    try:
        for _ in range(n_keys):
            key = string()
            (kind,) = struct.unpack_from("<I", data, pos)
            pos += 4
            found = value(kind)
            if key.startswith(prefix):
                out[key] = found
    except (struct.error, KeyError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the GGUF file's keys ({type(err).__name__}: {str(err)[:200]})") from None
    return out


def _added(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def tokenizer_spec(fields: dict, where: str) -> dict:
    """tokenizer.json of the GGUF's tokenizer; UserError naming the type for one we do not support."""
    kind = fields.get("tokenizer.ggml.model")
    tokens: list[str] = fields.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise UserError(f"{where}: holds no tokenizer (no tokenizer.ggml.tokens)")
    types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    added = [_added(i, t, types[i] != USER_DEFINED) for i, t in enumerate(tokens)
             if types[i] in (UNKNOWN, CONTROL, USER_DEFINED) and vocab[t] == i]
    if kind == "gpt2":
        pre = fields.get("tokenizer.ggml.pre")
        if pre not in PRE_TOKENIZERS:
            raise UserError(
                f"{where}: llama.cpp pre-tokenizer type {pre or 'none'!r} (tokenizer.ggml.pre) is not supported; "
                f"supported: {', '.join(PRE_TOKENIZERS)}"
            )
        pre_tokenizer, nfc, ignore_merges = PRE_TOKENIZERS[pre]
        merges = fields.get("tokenizer.ggml.merges") or []
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"} if nfc else None,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
        }
    if kind == "llama":
        scores = fields.get("tokenizer.ggml.scores")
        if scores is None:
            raise UserError(f"{where}: a llama (SentencePiece) vocabulary without scores (tokenizer.ggml.scores)")
        if sum(t == BYTE for t in types) != 256:
            raise UserError(f"{where}: a llama (SentencePiece) vocabulary without the 256 byte tokens <0x00>..<0xFF>")
        prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        unk = fields.get("tokenizer.ggml.unknown_token_id", 0)
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        decode = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
        if prefix:
            decode.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace]}
            if prefix else replace,
            "pre_tokenizer": None,
            "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": decode},
            "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk], "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": sentencepiece_merges(tokens, types, scores)},
        }
    raise UserError(f"{where}: llama.cpp tokenizer type {kind!r} (tokenizer.ggml.model) is not supported; supported: gpt2, llama")


def sentencepiece_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[list[str]]:
    """BPE merges equivalent to SentencePiece's: every split of a normal token into two normal tokens,
    the merge of the higher-scoring token first (SentencePiece merges the best-scoring pair)."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    found = []
    for token, token_id in ids.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                found.append((-scores[token_id], ids[left], ids[right], left, right))
    found.sort()
    return [[left, right] for *_, left, right in found]


def special_tokens(fields: dict) -> dict:
    """The bos/eos/unk/pad tokens the GGUF names, as keyword arguments of a transformers tokenizer."""
    tokens = fields["tokenizer.ggml.tokens"]
    out = {}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            out[name] = tokens[token_id]
    return out


def gguf_tokenizer(gguf: Path):
    """The GGUF's tokenizer as a transformers fast tokenizer (save_pretrained writes its folder)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fields = read_fields(gguf)
    spec = tokenizer_spec(fields, str(gguf))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **special_tokens(fields))
    tokenizer.add_bos_token = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    if fields.get("tokenizer.chat_template"):
        tokenizer.chat_template = fields["tokenizer.chat_template"]
    return tokenizer
