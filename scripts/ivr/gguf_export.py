"""A Hugging Face Llama folder as a GGUF file that llama.cpp runs (scripts/export_gguf.py).

The `gguf` package writes the F16 file the way llama.cpp's convert_hf_to_gguf.py writes a plain Llama
(query and key rows permuted, norms kept in F32); llama.cpp's own quantiser (through llama-cpp-python)
makes every other type from it. The tokenizer carries over as llama.cpp's `gpt2` (byte-level BPE) type:
tokens by id, token types, merges, special tokens, chat template, and `tokenizer.ggml.pre`, the name of
the pre-tokenizer in ivr/gguf_vocab.py's PRE_TOKENIZERS that is exactly the tokenizer's own. A tokenizer
or model it cannot carry is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from ivr.base_bpe import split_merge
from ivr.cli import UserError, first_line
from ivr.files import read_json
from ivr.gguf_vocab import CONTROL, NORMAL, PRE_TOKENIZERS, UNUSED, USER_DEFINED, read_fields

# Hugging Face Llama weight name (inside model.layers.N.) -> llama.cpp tensor name (inside blk.N.).
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _steps(pre_tokenizer: dict | None) -> tuple:
    """A pre-tokenizer as the tuple of what each step does, so that equal behaviour compares equal."""
    if pre_tokenizer is None:
        return ()
    kind = pre_tokenizer["type"]
    if kind == "Sequence":
        return tuple(step for inner in pre_tokenizer["pretokenizers"] for step in _steps(inner))
    if kind == "ByteLevel":
        return ((kind, pre_tokenizer.get("add_prefix_space", True), pre_tokenizer.get("use_regex", True)),)
    if kind == "Split":
        pattern = json.dumps(pre_tokenizer["pattern"], sort_keys=True)
        return ((kind, pattern, pre_tokenizer["behavior"], pre_tokenizer.get("invert", False)),)
    if kind == "Digits":
        return ((kind, pre_tokenizer.get("individual_digits", False)),)
    return ((kind, json.dumps(pre_tokenizer, sort_keys=True)),)


def _nfc(normalizer: dict | None, where: str) -> bool:
    steps = normalizer.get("normalizers", [normalizer]) if normalizer else []
    kinds = [s["type"] for s in steps]
    if kinds not in ([], ["NFC"]):
        raise UserError(f"{where}: normalizer {'+'.join(kinds)} has no llama.cpp equivalent (none or NFC only)")
    return kinds == ["NFC"]


def pre_tokenizer_name(spec: dict, where: str) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the tokenizer's pre-tokenizer, normalizer and merge rule."""
    own = (_steps(spec.get("pre_tokenizer")), _nfc(spec.get("normalizer"), where), bool(spec["model"].get("ignore_merges")))
    for name, (pre_tokenizer, nfc, ignore_merges) in PRE_TOKENIZERS.items():
        if (_steps(pre_tokenizer), nfc, ignore_merges) == own:
            return name
    raise UserError(f"{where}: its pre-tokenizer is none of those llama.cpp knows (tokenizer.ggml.pre: "
                    f"{', '.join(PRE_TOKENIZERS)}), so llama.cpp would cut text differently")


def tokenizer_fields(folder: Path, n_rows: int) -> dict:
    """The tokenizer.* keys of the GGUF, from the folder's tokenizer.json and its transformers tokenizer.

    n_rows: the embedding's rows; ids the tokenizer does not use become unused [PAD<id>] tokens.
    """
    from transformers import AutoTokenizer

    where = str(folder / "tokenizer.json")
    try:
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{where}: cannot read the tokenizer ({first_line(err)})") from None
    model = spec["model"]
    if model["type"] != "BPE":
        backend = " (ivr.backend: unigram; use ivr.backend: bpe)" if model["type"] == "Unigram" else ""
        raise UserError(f"{where}: a {model['type']} tokenizer{backend}; a GGUF carries only byte-level BPE")
    if model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{where}: not a byte-level BPE (a SentencePiece-style BPE is not carried to GGUF yet)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError(f"{where}: a BPE with subword prefixes or suffixes has no llama.cpp equivalent")
    pre = pre_tokenizer_name(spec, where)
    for added in spec.get("added_tokens", []):
        if any(added.get(key) for key in ("lstrip", "rstrip", "single_word")):
            raise UserError(f"{where}: added token {added['content']!r} takes spaces beside it or whole words only "
                            "(lstrip, rstrip or single_word), which llama.cpp does not do")

    tokens: list[str | None] = [None] * n_rows
    types = [NORMAL] * n_rows
    for token, token_id in [*model["vocab"].items(), *((a["content"], a["id"]) for a in spec.get("added_tokens", []))]:
        if token_id >= n_rows:
            raise UserError(f"{where}: token id {token_id} ({token!r}) has no embedding row (the model has {n_rows})")
        tokens[token_id] = token
    for added in spec.get("added_tokens", []):
        types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    for token_id, token in enumerate(tokens):
        if token is None:
            tokens[token_id], types[token_id] = f"[PAD{token_id}]", UNUSED

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    start = with_special.index(plain[0]) if plain and plain[0] in with_special else 0
    fields = {
        "model": "gpt2", "pre": pre, "tokens": tokens, "types": types,
        "merges": [" ".join(split_merge(m)) for m in model["merges"]],
        "add_bos": start > 0, "add_eos": len(with_special) > start + len(plain),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }
    for name in ("bos", "eos", "unk", "pad"):
        fields[f"{name}_id"] = getattr(tokenizer, f"{name}_token_id")
    return fields


def permute(weights, heads: int):
    """llama.cpp's order of the query and key rows (convert_hf_to_gguf.py), which its loader undoes."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def read_config(folder: Path) -> dict:
    where = folder / "config.json"
    try:
        config = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{where}: cannot read the model's config ({first_line(err)})") from None
    architectures = config.get("architectures") or [config.get("model_type")]
    if architectures != ["LlamaForCausalLM"]:
        raise UserError(f"{where}: architecture {architectures[0]} is not exported to GGUF (LlamaForCausalLM only)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{where}: rope scaling {rope['rope_type']!r} is not exported to GGUF (plain RoPE only)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UserError(f"{where}: attention or MLP biases are not exported to GGUF")
    return config


def read_weights(folder: Path) -> dict:
    """The folder's safetensors weights, by name, as float32 tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: holds no .safetensors weights")
    weights = {}
    for path in files:
        try:
            weights.update({k: v.float() for k, v in load_file(path).items()})
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: a .safetensors weights file is not readable ({first_line(err)})") from None
    return weights


def write_f16(folder: Path, out: Path) -> None:
    """The model folder as an F16 GGUF (norms F32, as llama.cpp's converter writes them)."""
    import gguf
    import numpy as np

    config = read_config(folder)
    weights = read_weights(folder)
    embedding = weights.pop("model.embed_tokens.weight")
    tok = tokenizer_fields(folder, embedding.shape[0])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}

    writer = gguf.GGUFWriter(str(out), "llama")
    # the name and licence llama.cpp and ollama show: the base model's, from finalize_model's provenance
    provenance = folder / "PROVENANCE.json"
    base = read_json(provenance, "provenance").get("base_model", {}) if provenance.exists() else {}
    writer.add_name(f"{base['name']}-IVR" if base.get("name") else folder.name)
    if base.get("licence"):
        writer.add_license(base["licence"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(embedding.shape[0])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if tok[f"{name}_id"] is not None:
            add(tok[f"{name}_id"])
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    writer.add_add_space_prefix(False)
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])

    def add(name: str, tensor) -> None:
        array = tensor.numpy()
        writer.add_tensor(name, array.astype(np.float16 if array.ndim == 2 else np.float32))

    add("token_embd.weight", embedding)
    add("output_norm.weight", weights.pop("model.norm.weight"))
    output = weights.pop("lm_head.weight", None)
    if output is not None and not config.get("tie_word_embeddings", False):
        add("output.weight", output)
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            tensor = weights.pop(f"model.layers.{layer}.{hf_name}.weight")
            if hf_name == "self_attn.q_proj":
                tensor = permute(tensor, heads)
            elif hf_name == "self_attn.k_proj":
                tensor = permute(tensor, kv_heads)
            add(f"blk.{layer}.{gguf_name}.weight", tensor)
    unused = [name for name in weights if "rotary_emb" not in name]
    if unused:
        raise UserError(f"{folder}: weight {unused[0]} has no place in a llama.cpp Llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ftype(name: str) -> int:
    """llama.cpp's file type for a type name (F32, F16, BF16, Q8_0, Q4_1, Q4_K_M, ...)."""
    import llama_cpp

    value = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if value is None:
        raise UserError(f"GGUF type {name!r} is not one llama.cpp's quantiser makes")
    return value


def gguf_type(path: Path) -> str:
    """The type a GGUF file records (general.file_type), by llama.cpp's name: Q4_1, F16, ..."""
    from gguf import LlamaFileType

    value = read_fields(path, prefix="general.file_type").get("general.file_type")
    if value is None:
        raise UserError(f"{path}: records no type (general.file_type)")
    return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def quantize(source: Path, out: Path, name: str, threads: int) -> None:
    """llama.cpp's quantiser, source (F16) -> out in the named type."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(name)
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise UserError(f"{source}: llama.cpp could not quantise it to {name}")


_LLAMA_ERRORS: list[str] = []  # what llama.cpp logged as errors while loading, for the one line


def _keep_errors():
    """Route llama.cpp's log to _LLAMA_ERRORS (errors only), once; the callback must stay referenced."""
    import llama_cpp

    global _keep_errors_callback
    if "_keep_errors_callback" not in globals():
        @llama_cpp.llama_log_callback
        def _keep_errors_callback(level: int, text: bytes, user_data) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                _LLAMA_ERRORS.append(text.decode("utf-8", "replace").strip().split(": ")[-1])

        llama_cpp.llama_log_set(_keep_errors_callback, None)


def open_gguf(path: Path, vocab_only: bool = False, n_ctx: int = 512, threads: int = 2, logits_all: bool = False):
    """The GGUF loaded by llama.cpp (llama_cpp.Llama), or one line saying why it cannot be; logits_all keeps
    the logits of every position (llm.scores), else only of the last."""
    from llama_cpp import Llama

    _keep_errors()
    _LLAMA_ERRORS.clear()
    if not path.is_file():
        raise UserError(f"{path}: GGUF file does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file (bad magic number)")
    try:
        return Llama(str(path), vocab_only=vocab_only, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                     n_threads_batch=threads, logits_all=logits_all, verbose=False)
    except (ValueError, RuntimeError) as err:
        reason = next((e for e in _LLAMA_ERRORS if e), first_line(err))
        raise UserError(f"{path}: llama.cpp cannot load it ({reason[:200]})") from None


def llama_ids(llm, text: str) -> list[int]:
    """llama.cpp's ids for text, special tokens in it recognised as the transformers tokenizer does."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def compare_ids(llm, tokenizer, texts: list[str], where: str) -> dict:
    """Documents llama.cpp tokenizes into exactly the transformers tokenizer's ids; UserError at the first
    that differs, naming it and the first id position where they part."""
    for number, text in enumerate(texts, start=1):
        ours, theirs = llama_ids(llm, text), tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise UserError(f"{where}: document {number}: llama.cpp's ids differ from the tokenizer's from id {at} "
                            f"on ({ours[at:at + 3]} vs {theirs[at:at + 3]})")
    return {"identical": len(texts), "checked": len(texts)}


def compare_logits(llm, model, prompts: list[list[int]], new_tokens: int) -> dict:
    """The largest absolute difference of next-token logits over every prompt position, and how many
    of the greedy tokens after each prompt agree before the first that differs."""
    import numpy as np
    import torch

    worst, agreed = 0.0, []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].float().numpy()
        worst = max(worst, float(np.abs(ours - theirs).max()))
        reference, generated = [], []
        for _ in range(new_tokens):
            with torch.no_grad():
                reference.append(int(model(torch.tensor([ids + reference])).logits[0, -1].argmax()))
            generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([generated[-1]])
        agreed.append(next((i for i, (a, b) in enumerate(zip(generated, reference)) if a != b), new_tokens))
    return {"max_abs_logit_difference": worst, "greedy_tokens_agreeing": agreed, "greedy_tokens": new_tokens}
