"""Bad input, one table: every case runs a real stage script (or Snakemake, for the configuration) and
must stop with a non-zero exit, one last line `error: ...` that names the file, line or key, no
traceback, and no output (not even a temporary one) left behind.

Inputs are real: the GPT-2 tokenizer, a tiny GPT-2 built from its config, Korean bills and konlpy text,
tokenizers trained on that text. Paths hold spaces (and, in one case, shell metacharacters) on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, asset, make_workdir

PY = sys.executable
SCRIPTS = ROOT / "scripts"
GPT2_EOS = 50256
NEW_TOKEN = "ìķĪëħķ"  # "안녕" as a byte-level string: not a GPT-2 token, built by merges inside a pre-token


@dataclass
class Run:
    """One refused run: the command, what its error line must contain, and where nothing may appear."""

    argv: list[str]
    expect: list[str]  # substrings of the error line: the file / line / key, and what is wrong
    out: Path  # folder that must hold no file afterwards (outputs and their temporary copies)
    cwd: Path | None = None
    log: Path | None = None  # read the error from this log (Snakemake rules redirect stderr there)
    wrap: list[str] = field(default_factory=list)  # a prefix such as setpriv
    not_created: list[Path] = field(default_factory=list)  # more paths that must not exist afterwards


def script(name: str, *args) -> list[str]:
    return [PY, str(SCRIPTS / name), *map(str, args)]


# ---- fixtures the cases draw on (each built once, and only when a case asks for it) ----------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A copy of the workflow for the Snakemake cases."""
    for name in ("korean_bills", "python_docs", "konlpy_corpus"):
        asset(name)
    return make_workdir(tmp_path_factory.mktemp("bad inputs workflow"), gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def sentencepiece_tokenizers(tmp_path_factory, korean_texts) -> dict[str, Path]:
    """tokenizer.json files of kinds IVR does not take, trained on real Korean text: a Llama-2 / Mistral style
    BPE (no pre-tokenizer, '▁' for spaces) without byte fallback, a T5 / ALBERT style Unigram and a BERT
    style WordPiece."""
    from tokenizers import BertWordPieceTokenizer, SentencePieceBPETokenizer, SentencePieceUnigramTokenizer

    folder = tmp_path_factory.mktemp("sentencepiece")
    bpe = SentencePieceBPETokenizer()
    bpe.train_from_iterator(korean_texts, vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    spec = json.loads(bpe.to_str())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                              {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    from tokenizers import Tokenizer

    Tokenizer.from_str(json.dumps(spec))  # still a loadable tokenizer
    (folder / "llama").mkdir()
    (folder / "llama" / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(korean_texts, vocab_size=600, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False)
    unigram.save(str(folder / "t5 tokenizer.json"))
    wordpiece = BertWordPieceTokenizer()
    wordpiece.train_from_iterator(korean_texts, vocab_size=600, show_progress=False)
    wordpiece.save(str(folder / "bert tokenizer.json"))
    return {"llama": folder / "llama", "unigram": folder / "t5 tokenizer.json", "wordpiece": folder / "bert tokenizer.json"}


@pytest.fixture(scope="module")
def splits(tmp_path_factory, bills_sample) -> dict[str, Path]:
    """A small domain train/held-out pair as ingest writes them."""
    folder = tmp_path_factory.mktemp("splits")
    lines = bills_sample.read_text(encoding="utf-8").splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:20]) + "\n", encoding="utf-8")
    (folder / "heldout.jsonl").write_text("\n".join(lines[20:25]) + "\n", encoding="utf-8")
    return {"train": folder / "train.jsonl", "heldout": folder / "heldout.jsonl"}


# ---- ingest: corpus files -------------------------------------------------------------------------


def ingest(tmp: Path, corpus: Path, *extra, dataset: bool = False) -> Run:
    """Ingest of a corpus file or folder, or of a dataset folder."""
    out = tmp / "out dir"
    source = ["--dataset", corpus] if dataset else [corpus]
    argv = script("ingest_corpus.py", *source, *extra, "--train-out", out / "train.jsonl", "--dev-out", out / "dev.jsonl",
                  "--heldout-out", out / "heldout.jsonl", "--stats-out", out / "ingest.json")
    return Run(argv, [str(corpus)], out)


def corpus_file(tmp: Path, name: str, content: bytes | None) -> Path:
    path = tmp / "my corpus" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is not None:
        path.write_bytes(content)
    return path


def ingest_case(name: str, content: bytes | None, expect: list[str], *extra) -> Callable:
    def build(tmp: Path, get) -> Run:
        run = ingest(tmp, corpus_file(tmp, name, content), *extra)
        run.expect += expect
        return run

    return build


def unreadable_corpus(tmp: Path, get) -> Run:
    path = corpus_file(tmp, "locked.txt", "국회 법률안\n".encode())
    path.chmod(0)
    run = ingest(tmp, path)
    run.expect.append("not readable (permission denied)")
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        if not shutil.which("setpriv"):
            pytest.fail("setpriv (util-linux) is needed to test an unreadable file as root")
        caps = "-dac_override,-dac_read_search"
        run.wrap = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    return run


def empty_folder(tmp: Path, get) -> Run:
    folder = tmp / "my corpus"
    folder.mkdir()
    (folder / ".hidden").write_text("hidden files are skipped\n")
    run = ingest(tmp, folder)
    run.expect.append("corpus folder holds no files")
    return run


def parquet_without_column(tmp: Path, get) -> Run:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = corpus_file(tmp, "bills.parquet", None)
    pq.write_table(pa.table({"propose_reason": ["국회 법률안"]}), path)
    run = ingest(tmp, path, "--text-column", "body")
    run.expect.append("no column 'body'")
    return run


BILL_LINES = "".join(json.dumps({"text": f"국회 법률안 {n}호: 제안이유 및 주요내용"}, ensure_ascii=False) + "\n"
                     for n in range(2000)).encode()


def truncated_gzip(tmp: Path, get) -> Run:
    import gzip

    whole = gzip.compress(BILL_LINES)
    run = ingest(tmp, corpus_file(tmp, "bills.jsonl.gz", whole[: len(whole) // 2]))
    run.expect.append("not readable as gzip data, truncated or damaged")
    return run


def zstd_damaged_frame(tmp: Path, get) -> Run:
    import zstandard

    frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(BILL_LINES))  # as the zstd tool writes
    frame[len(frame) // 2] ^= 0xFF
    run = ingest(tmp, corpus_file(tmp, "bills.jsonl.zst", bytes(frame)))
    run.expect.append("not readable as zstd data, truncated or damaged")
    return run


def saved_dataset(tmp: Path) -> Path:
    import datasets

    folder = tmp / "my dataset"
    texts = ["국회 법률안", "제안이유 및 주요내용"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"propose_reason": texts}),
                          "test": datasets.Dataset.from_dict({"propose_reason": texts[:1]})}).save_to_disk(folder)
    return folder


def dataset_without_column(tmp: Path, get) -> Run:
    folder = saved_dataset(tmp)
    run = ingest(tmp, folder, "--text-column", "text", dataset=True)
    run.expect.append("split 'train' has no column 'text' (columns: propose_reason; set corpus.text_column)")
    return run


def dataset_split_missing(tmp: Path, get) -> Run:
    folder = saved_dataset(tmp)
    run = ingest(tmp, folder, "--text-column", "propose_reason", "--dataset-split", "validation", dataset=True)
    run.expect.append("the dataset has no split 'validation' (splits: train, test; set corpus.dataset.split)")
    return run


ENORMOUS = 16 * 1024 * 1024 + 1  # one byte over the default corpus.max_document_bytes


# ---- analysis and selection: tokenizers, budgets, rules files ----------------------------------------


def analyze(tmp: Path, get, tokenizer: Path | str) -> Run:
    data = get("splits")
    out = tmp / "analysis out"
    argv = script("analyze_corpus.py", "--tokenizer", tokenizer, "--train", data["train"], "--heldout", data["heldout"],
                  "--out-dir", out, "--threads", "1")
    return Run(argv, [str(tokenizer)], out)


def sentencepiece_bpe_without_byte_fallback(tmp: Path, get) -> Run:
    folder = get("sentencepiece_tokenizers")["llama"]
    run = analyze(tmp, get, folder)
    run.expect += ["a SentencePiece-style BPE tokenizer without byte fallback", "Llama-2"]
    return run


def sentencepiece_unigram(tmp: Path, get) -> Run:
    path = get("sentencepiece_tokenizers")["unigram"]
    run = analyze(tmp, get, path)
    run.expect += ["a SentencePiece Unigram tokenizer (pre-tokenizer", "is not supported"]
    return run


def wordpiece(tmp: Path, get) -> Run:
    path = get("sentencepiece_tokenizers")["wordpiece"]
    run = analyze(tmp, get, path)
    run.expect += ["a WordPiece tokenizer (pre-tokenizer BertPreTokenizer) is not supported"]
    return run


def corrupt_tokenizer_json(tmp: Path, get) -> Run:
    folder = tmp / "my tokenizer"
    folder.mkdir()
    text = (get("gpt2_tokenizer_dir") / "tokenizer.json").read_text(encoding="utf-8")
    (folder / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")  # cut short
    run = analyze(tmp, get, folder)
    run.expect = [str(folder / "tokenizer.json"), "not a readable tokenizer.json"]
    return run


def select(tmp: Path, get, *extra) -> Run:
    analysis = get("gpt2_bills_analysis")
    out = tmp / "remap out"
    argv = script("select_candidates.py", "--tokenizer", analysis["tokenizer"],
                  "--pretokens", analysis["analysis"] / "pretokens.parquet",
                  "--frequencies", analysis["analysis"] / "token_frequencies.parquet", *extra,
                  "--candidates-out", out / "candidates.tsv", "--rules-out", out / "remap_rules.yaml",
                  "--log-out", out / "selection_log.md")
    return Run(argv, [], out)


def budget_too_large(tmp: Path, get) -> Run:
    run = select(tmp, get, "--n-reassign", "60000", "--min-count", "2")
    run.expect += ["ivr.n_reassign = 60000", "needs more ids than the"]
    return run


def rules_file(tmp: Path, entries: list[dict]) -> Path:
    path = tmp / "my rules" / "remap rules.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"version": 1, "reassignments": entries}, allow_unicode=True), encoding="utf-8")
    return path


def rules_case(entries: list[dict], expect: list[str], *extra) -> Callable:
    def build(tmp: Path, get) -> Run:
        path = rules_file(tmp, entries)
        run = select(tmp, get, "--rules-file", path, *extra)
        run.expect += [str(path), *expect]
        return run

    return build


def more_ids_than_rows(tmp: Path, get) -> Run:
    model = tmp / "my model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50000}))
    run = select(tmp, get, "--model", model)
    run.expect += [str(model), "50000 embedding rows but the tokenizer 50257 ids"]
    return run


# ---- models: missing, damaged, unsafe, GGUF -------------------------------------------------------------


def reorder(tmp: Path, model: Path | str) -> Run:
    rules = rules_file(tmp, [{"id": 40000, "kind": "ngram", "new_token": NEW_TOKEN, "base_ids": [168, 243]}])
    out = tmp / "embeddings out"
    argv = script("reorder_embeddings.py", "--base-model", model, "--rules", rules,
                  "--out", out / "reordered.safetensors", "--meta-out", out / "reordered.json")
    return Run(argv, [str(model)], out)


def model_missing(tmp: Path, get) -> Run:
    run = reorder(tmp, tmp / "no such model")
    run.expect.append("model folder does not exist")
    return run


def model_copy(tmp: Path, get, keep: tuple[str, ...] = ("config.json", "tokenizer.json", "tokenizer_config.json")) -> Path:
    model = tmp / "my model"
    model.mkdir()
    for name in keep:
        shutil.copy2(get("tiny_gpt2_dir") / name, model / name)
    return model


def corrupt_safetensors(tmp: Path, get) -> Run:
    model = model_copy(tmp, get)
    weights = (get("tiny_gpt2_dir") / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 3])  # a download cut short
    run = reorder(tmp, model)
    run.expect.append("safetensors weights file is not readable")
    return run


def pickle_weights_only(tmp: Path, get) -> Run:
    model = model_copy(tmp, get)
    import torch

    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, model / "pytorch_model.bin")
    run = reorder(tmp, model)
    run.expect.append("holds no .safetensors weights")
    return run


def gguf(tmp: Path, content: bytes, expect: str) -> Run:
    path = tmp / "my models" / "model Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(content)
    out = tmp / "converted"
    return Run(script("gguf_to_hf.py", path, "--out", out / "model"), [str(path), expect], out)


def gguf_corrupt(tmp: Path, get) -> Run:
    # The real SmolLM2 GGUF, cut off inside its tensor data: the header reads, the weights do not.
    real = asset("smollm2_gguf") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(real, "rb") as handle:
        head = handle.read(4 << 20)
    return gguf(tmp, head, "cannot read the GGUF file")


def gguf_bad_magic(tmp: Path, get) -> Run:
    weights = (get("tiny_gpt2_dir") / "model.safetensors").read_bytes()
    return gguf(tmp, weights, "not a GGUF file")


# ---- packing and the final model --------------------------------------------------------------------


def pack(tmp: Path, get, *extra) -> Run:
    out = tmp / "data out"
    argv = script("pack_data.py", "--tokenizer", get("tiny_gpt2_dir"), "--train", get("splits")["train"], *extra,
                  "--block-size", "32", "--threads", "1", "--out-dir", out)
    return Run(argv, [], out)


def sft_case(lines: list[str], expect: list[str]) -> Callable:
    def build(tmp: Path, get) -> Run:
        path = tmp / "my sft" / "examples.jsonl"
        path.parent.mkdir()
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        run = pack(tmp, get, "--sft", path)
        run.expect += [str(path), *expect]
        return run

    return build


def pack_train_missing(tmp: Path, get) -> Run:
    run = pack(tmp, get)
    missing = tmp / "no split" / "train.jsonl"
    run.argv[run.argv.index("--train") + 1] = str(missing)
    run.expect += [str(missing), "does not exist"]
    return run


def finalize_model_missing(tmp: Path, get) -> Run:
    folder = tmp / "my run"
    folder.mkdir()
    (folder / "validation.json").write_text(json.dumps({"gates": [], "headline": {}}))
    (folder / "remap_rules.yaml").write_text("version: 1\nreassignments: []\n")
    out = tmp / "final out"
    argv = script("finalize_model.py", "--model", folder / "no model", "--validation", folder / "validation.json",
                  "--rules", folder / "remap_rules.yaml", "--base-model", get("tiny_gpt2_dir"), "--out", out / "final_model")
    return Run(argv, [str(folder / "no model"), "fine-tuned model folder does not exist"], out)


# ---- the configuration, through Snakemake -----------------------------------------------------------


def snakemake_config(override: str, expect: list[str], prepare: Callable[[Path], None] | None = None) -> Callable:
    def build(tmp: Path, get) -> Run:
        workdir = get("workdir")
        if prepare:
            prepare(workdir)
        bad = tmp / "my config.yaml"
        bad.write_text(override, encoding="utf-8")
        argv = [PY, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "tests/config/tiny.yaml", str(bad)]
        return Run(argv, [f"error: {bad}: ", *expect], workdir / "results", cwd=workdir)  # the file that set the key

    return build


METACHAR_NAME = "bills $(touch INJECTED); `touch INJECTED2` & 'quoted' \"twice\" #.txt"


def metacharacters(tmp: Path, get) -> Run:
    """A corpus whose path holds shell metacharacters, run for real through the workflow's shell rule."""
    workdir = get("workdir")
    path = workdir / "my data" / METACHAR_NAME
    path.parent.mkdir(exist_ok=True)
    path.write_bytes("제안이유\n국회 법률안\x00 끝\n".encode())
    config = tmp / "metachar.yaml"
    config.write_text(yaml.safe_dump({"corpus": {"paths": [f"my data/{METACHAR_NAME}"], "format": "txt"}}))
    argv = [PY, "-m", "snakemake", "--cores", "1", "--configfile", "tests/config/tiny.yaml", str(config),
            "--", "results/corpus/domain/train.jsonl"]
    return Run(argv, [f"my data/{METACHAR_NAME}: line 2: contains a NUL byte"], workdir / "results", cwd=workdir,
               log=workdir / "logs/ingest_corpus/domain.log",
               not_created=[workdir / "INJECTED", workdir / "INJECTED2", workdir / "my data" / "INJECTED"])


def first_rule_entry() -> dict:
    return {"id": 40000, "kind": "ngram", "new_token": NEW_TOKEN}


CASES: dict[str, Callable] = {
    # corpus files (scripts/ingest_corpus.py)
    "corpus_missing": ingest_case("gone.txt", None, ["corpus path does not exist"]),
    "corpus_unreadable": unreadable_corpus,
    "corpus_folder_without_files": empty_folder,
    "corpus_suffix_unknown": ingest_case("bills.csv", "국회,법률안\n".encode(), ["cannot tell the corpus format", "corpus.format"]),
    "invalid_utf8": ingest_case("bills.txt", "국회 법률안\n".encode() + b"\xc0\xaf bad\n", ["line 2: invalid UTF-8"]),
    "nul_byte": ingest_case("bills.txt", "국회 법률안\n제안\x00이유\n".encode(), ["line 2: contains a NUL byte"]),
    "byte_order_mark": ingest_case("bills.txt", b"\xef\xbb\xbf" + "국회 법률안\n".encode(), ["byte-order mark"]),
    "jsonl_not_json": ingest_case("bills.jsonl", '{"text": "국회"}\n{"text": "법률안"\n'.encode(), ["line 2: not valid JSON"]),
    "jsonl_without_key": ingest_case("bills.jsonl", '{"text": "국회"}\n{"body": "법률안"}\n'.encode(),
                                     ["line 2: no key 'text'", "corpus.text_key"]),
    "jsonl_non_string": ingest_case("bills.jsonl", '{"text": "국회"}\n{"text": ["법률안"]}\n'.encode(),
                                    ["line 2: key 'text' holds list, expected a string"]),
    "jsonl_not_an_object": ingest_case("bills.jsonl", '{"text": "국회"}\n\n[1, 2]\n'.encode(),
                                       ["line 3: expected an object with key 'text'"]),
    "empty_after_cleaning": ingest_case("bills.txt", b"\n   \n\t\n", ["corpus is empty after cleaning", "3 empty"]),
    "one_enormous_line": ingest_case("bills.txt", "국회 법률안\n".encode() + b"a" * ENORMOUS + b"\n",
                                     [f"line 2: document of {ENORMOUS} bytes exceeds corpus.max_document_bytes"]),
    "parquet_without_column": parquet_without_column,
    "gzip_truncated": truncated_gzip,
    "zstd_damaged_frame": zstd_damaged_frame,
    "dataset_without_text_column": dataset_without_column,
    "dataset_split_missing": dataset_split_missing,
    # the configuration (Snakemake, before any job runs)
    "config_unknown_key": snakemake_config("training:\n  learning_rate: 1.0e-4\n", ["unknown key 'training.learning_rate'"]),
    "config_wrong_type": snakemake_config("analysis:\n  threads: two\n", ["key 'analysis.threads'", "'two' is not of type 'integer'"]),
    "config_out_of_range": snakemake_config("training:\n  block_size: 8\n", ["key 'training.block_size'", "less than the minimum of 16"]),
    "config_rules_file_missing": snakemake_config("ivr:\n  rules_file: my rules.yaml\n",
                                                  ["key 'ivr.rules_file'", "'my rules.yaml' does not exist"]),
    "config_corpus_path_missing": snakemake_config("corpus:\n  paths: [data/bills 2024.jsonl]\n",
                                                   ["key 'corpus.paths.0'", "'data/bills 2024.jsonl' does not exist"]),
    "config_dataset_folder_missing": snakemake_config("corpus:\n  dataset: {name: ./my datasets/bills}\n",
                                                      ["key 'corpus.dataset.name'", "'./my datasets/bills' does not exist"]),
    "config_special_tokens_and_rules_file": snakemake_config(
        "ivr:\n  special_tokens: [{token: '<ToW>', init_text: a thought}]\n  rules_file: my rules.yaml\n",
        ["ivr.special_tokens and ivr.rules_file are both set", "list the special tokens in the rules file"]),
    "config_sft_data_missing": snakemake_config("training:\n  sft_data: sft/examples.jsonl\n",
                                                ["key 'training.sft_data'", "'sft/examples.jsonl' does not exist"]),
    "path_with_shell_metacharacters": metacharacters,
    # tokenizers (scripts/analyze_corpus.py) and the reassignment (scripts/select_candidates.py)
    "tokenizer_sentencepiece_bpe_without_byte_fallback": sentencepiece_bpe_without_byte_fallback,
    "tokenizer_sentencepiece_unigram": sentencepiece_unigram,
    "tokenizer_wordpiece": wordpiece,
    "tokenizer_json_cut_short": corrupt_tokenizer_json,
    "tokenizer_more_ids_than_model_rows": more_ids_than_rows,
    "budget_larger_than_vocabulary": budget_too_large,
    "rules_sacrifice_special": rules_case([{"id": GPT2_EOS, "kind": "ngram", "new_token": NEW_TOKEN}],
                                          ["reassignments[0] (id 50256)", "special token '<|endoftext|>'"]),
    "rules_sacrifice_protected": rules_case([first_rule_entry()], ["reassignments[0] (id 40000)", "protected in ivr.protected_ids"],
                                            "--protected-ids", "40000"),
    "rules_id_named_twice": rules_case([first_rule_entry(), dict(first_rule_entry(), new_token="ìķĪ" + "ëħķëħķ")],
                                       ["reassignments[1] (id 40000)", "named twice (also in reassignments[0])"]),
    # models (scripts/reorder_embeddings.py, scripts/gguf_to_hf.py)
    "model_path_missing": model_missing,
    "model_safetensors_cut_short": corrupt_safetensors,
    "model_pickle_weights_only": pickle_weights_only,
    "gguf_cut_short": gguf_corrupt,
    "gguf_not_gguf": gguf_bad_magic,
    # packing (scripts/pack_data.py) and the final model (scripts/finalize_model.py)
    "sft_missing_field": sft_case(['{"prompt": "제안이유는?", "completion": "국회 법률안"}', '{"prompt": "무엇?"}'],
                                  ["line 2: expected an object with string keys 'prompt' and 'completion'"]),
    "sft_not_json": sft_case(['{"prompt": "제안이유는?", "completion": "국회"', ""], ["line 1: not valid JSON"]),
    "pack_train_split_missing": pack_train_missing,
    "finalize_model_missing": finalize_model_missing,
}

XFAIL: dict[str, str] = {}


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


@pytest.mark.parametrize(
    "case", [pytest.param(name, marks=pytest.mark.xfail(reason=XFAIL[name], strict=True)) if name in XFAIL else name
             for name in CASES],
)
def test_bad_input_is_refused_with_one_line_naming_it(case, tmp_path, request):
    run = CASES[case](tmp_path, request.getfixturevalue)
    before = set(files_under(run.out))
    env = {**os.environ, "IVR_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([*run.wrap, *run.argv], cwd=run.cwd or tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = run.log.read_text(encoding="utf-8") if run.log else result.stderr
    assert "Traceback" not in result.stderr + report, report[-3000:]
    lines = [line for line in report.splitlines() if line.strip()]
    assert lines, result.stdout[-2000:] + result.stderr[-2000:]
    last = lines[-1]
    print(last)  # pytest -rP shows every case's line
    assert last.startswith("error: "), report[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, report[-3000:]
    for expected in run.expect:
        assert expected in last, f"{expected!r} not in {last!r}"
    assert set(files_under(run.out)) <= before, f"left behind: {sorted(set(files_under(run.out)) - before)}"
    for path in run.not_created:
        assert not path.exists(), path
