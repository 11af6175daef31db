# Helpers shared by the rules: validated config, script paths, where inputs come from.
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))
from ivr.cli import UserError  # noqa: E402
from ivr.config import check_input_paths, validate_config  # noqa: E402
from ivr.files import asset_folder as fetched_folder  # noqa: E402
from ivr.retention import unseen_spec  # noqa: E402
from ivr import train_settings  # noqa: E402

# Config sources, lowest precedence first (--configfile files override the Snakefile's, --config
# overrides both), so that an error names the one whose value is in effect.
_cli_configs = [str(f) for f in workflow.overwrite_configfiles]
_configs = [
    str(f) for f in workflow.configfiles if str(f) not in _cli_configs
] + _cli_configs
_sources = _configs + [("--config", dict(workflow.config_settings.config or {}))]
try:
    _source = " + ".join(_configs) or "config"
    config.update(validate_config(config, source=_source, files=_sources))
    check_input_paths(config, source=_source, files=_sources)
except UserError as err:
    sys.exit(f"error: {err}")

SCRIPTS = Path(workflow.basedir) / "scripts"
ENV = "../envs/ivr.yaml"


envvars:
    "PATH",


# Rules call `python`: the interpreter Snakemake itself runs in (the project's venv) comes first on
# PATH, unless rules run in their conda environments, which put their own python there.
if "conda" not in str(workflow.deployment_settings.deployment_method).lower():
    os.environ["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    )


wildcard_constraints:
    asset="[a-z0-9_]+",
    corpus="domain|general",


def script(name):
    """Path of a stage script, for use in shell commands."""
    return str(SCRIPTS / name)


def asset_folder(path):
    """The folder a fetched asset lands in, if path lies inside one (Snakemake then fetches it)."""
    return fetched_folder(path) or path


def corpus_config(corpus):
    return config["corpus"] if corpus == "domain" else config["general_corpus"]


def corpus_sources(corpus_cfg):
    """What a corpus reads: its dataset when one is set (a hub id among them), else its paths."""
    dataset = corpus_cfg["dataset"]
    return [dataset["name"]] if dataset else list(corpus_cfg["paths"])


def corpus_inputs(wildcards):
    """The corpus's files and folders; a local dataset folder is one, a dataset's hub id is none."""
    cfg = corpus_config(wildcards.corpus)
    local = [p for p in corpus_sources(cfg) if not cfg["dataset"] or os.path.exists(p)]
    return sorted({asset_folder(p) for p in local})


def corpus_source_args(wildcards):
    """The ingest arguments naming what it reads: the corpus paths, or --dataset and its split."""
    dataset = corpus_config(wildcards.corpus)["dataset"]
    if not dataset:
        args = corpus_config(wildcards.corpus)["paths"]
    else:
        args = ["--dataset", dataset["name"], "--dataset-split", dataset["split"]]
        args += ["--dataset-config", dataset["config"]] if dataset["config"] else []
    return " ".join(shlex.quote(str(a)) for a in args)


def has_general():
    return config["general_corpus"] is not None


def general_split_args(wildcards, input):
    """Analysis arguments for the general-text splits, when a general corpus is configured."""
    if not has_general():
        return ""
    return f"--general-train {input.general_train!r} --general-heldout {input.general_heldout!r}"


def heldout_texts():
    """The held-out splits: the domain corpus's, and the general corpus's when one is configured."""
    general = ["results/corpus/general/heldout.jsonl"] if has_general() else []
    return ["results/corpus/domain/heldout.jsonl", *general]


def base_model():
    """Local folder (or hub id) of the base model; a .gguf file is converted under resources/models."""
    model = config["base_model"]
    if model.endswith(".gguf"):
        return f"resources/models/{Path(model).stem}"
    return model


def base_tokenizer():
    return config["base_tokenizer"] or base_model()


def local_inputs(*names):
    """Those of the given model/tokenizer references that are local paths or made by a rule."""
    out = []
    for name in names:
        if name.startswith("resources/") or Path(name).exists():
            out.append(asset_folder(name))
    return sorted(set(out))


# ---- reassignment (rules/select_candidates.smk, rules/remap_tokenizer.smk) ----
def select_inputs(wildcards):
    inputs = {
        "pretokens": "results/analysis/pretokens.parquet",
        "frequencies": "results/analysis/token_frequencies.parquet",
        "base": local_inputs(base_tokenizer(), base_model()),
    }
    if config["ivr"]["rules_file"]:
        inputs["rules_file"] = config["ivr"]["rules_file"]
    return inputs


def select_args(wildcards, input):
    """Selection's choices: protected ids, named special tokens, or a user's rules file."""
    ivr = config["ivr"]
    args = ["--protected-ids", " ".join(map(str, ivr["protected_ids"]))]
    if ivr["special_tokens"]:
        args += ["--special-tokens", json.dumps(ivr["special_tokens"], sort_keys=True)]
    if ivr["rules_file"]:
        args += ["--rules-file", input.rules_file]
    return " ".join(shlex.quote(str(a)) for a in args)


def unseen_texts(role):
    """The unseen texts of a role (report or dev), as configured."""
    return config["unseen_texts"][role]


def unseen_inputs(*roles):
    return sorted(
        {
            asset_folder(p)
            for role in roles
            for t in unseen_texts(role)
            for p in t["paths"]
        }
    )


def unseen_args(flag, role):
    """[flag, spec, flag, spec, ...] for the unseen texts of a role."""
    return [a for t in unseen_texts(role) for a in (flag, unseen_spec(t))]


def remap_inputs(wildcards):
    inputs = {
        "rules": "results/remap/remap_rules.yaml",
        "candidates": "results/remap/candidates.tsv",
        "pretokens": "results/analysis/pretokens.parquet",
        "heldout": "results/corpus/domain/heldout.jsonl",
        "base": local_inputs(base_tokenizer()),
        "eval_texts": sorted(
            {asset_folder(p) for t in config["ivr"]["eval_texts"] for p in t["paths"]}
        ),
    }
    if has_general():
        inputs["general_heldout"] = "results/corpus/general/heldout.jsonl"
    if config["ivr"]["backend"] == "unigram":
        inputs["distilled"] = "results/tokenizer/distilled"
    return inputs


def remap_args(wildcards, input):
    args = []
    if "distilled" in input.keys():
        args += ["--distilled", input.distilled]
    if "general_heldout" in input.keys():
        args += ["--general-heldout", input.general_heldout]
    for texts in config["ivr"]["eval_texts"]:
        args += ["--extra", f"{texts['name']}={','.join(texts['paths'])}"]
    return " ".join(shlex.quote(str(a)) for a in args)


# ---- fine-tuning (rules/pack_data.smk, rules/train_sft.smk) ----
wildcard_constraints:
    branch="ivr|control",
    trained="sft|control",


def branch_model(branch):
    """The model folder (and tokenizer) of a branch: the initialized IVR model or the base model."""
    return "results/model/initialized" if branch == "ivr" else base_model()


def branch_model_inputs(branch):
    model = branch_model(branch)
    return [model] if branch == "ivr" else local_inputs(model)


def trained_branch(wildcards):
    return "ivr" if wildcards.trained == "sft" else "control"


def uses_general():
    return has_general() and config["training"]["general_share"] > 0


def pack_inputs(wildcards):
    training = config["training"]
    inputs = {
        "train": "results/corpus/domain/train.jsonl",
        "model": branch_model_inputs(wildcards.branch),
    }
    if uses_general():
        inputs["general"] = "results/corpus/general/train.jsonl"
    if training["sft_data"]:
        inputs["sft"] = training["sft_data"]
        inputs["template"] = local_inputs(base_model())
    return inputs


def pack_args(wildcards, input):
    training = config["training"]
    args = []
    if uses_general():
        args += [
            "--general",
            input.general,
            "--general-share",
            training["general_share"],
        ]
    if training["sft_data"]:
        args += ["--sft", input.sft, "--chat-template-from", base_model()]
    return " ".join(shlex.quote(str(a)) for a in args)


def train_inputs(wildcards):
    """A branch's model and packed data, the dev splits it is watched on and, for the IVR model, its
    rules and the control's packed data, against whose compute its budget is measured.
    """
    branch = trained_branch(wildcards)
    inputs = {
        "model": branch_model_inputs(branch),
        "data": f"results/data/{branch}/meta.json",
        "dev": "results/corpus/domain/dev.jsonl",
    }
    if has_general():
        inputs["general_dev"] = "results/corpus/general/dev.jsonl"
    inputs["unseen_dev"] = unseen_inputs("dev")
    if branch == "ivr":
        inputs["base"] = local_inputs(base_model())
        inputs["rules"] = "results/remap/remap_rules.yaml"
        inputs["reference"] = "results/data/control/meta.json"
    return inputs


def train_args(wildcards, input):
    args = ["--dev", input.dev]
    for key, flag in (
        ("general_dev", "--general-dev"),
        ("rules", "--rules"),
        ("reference", "--compute-reference"),
    ):
        if key in input.keys():
            args += [flag, input[key]]
    if "base" in input.keys():
        args += ["--reference-model", base_model()]
    args += unseen_args("--unseen-dev", "dev")
    return " ".join(shlex.quote(str(a)) for a in args)


def branch_settings(wildcards):
    """The training settings of a branch (ivr.train_settings.branch_settings), as JSON."""
    settings = train_settings.branch_settings(
        config["training"], trained_branch(wildcards)
    )
    return json.dumps(settings, sort_keys=True)


def train_nodes():
    nodes = config["training"]["nodes"]
    if nodes > 1 and config["training"]["accelerate"] in ("cpu", "single_gpu"):
        sys.exit(
            f"error: training.nodes = {nodes} needs a distributed accelerate config "
            "(training.accelerate: multi_gpu, deepspeed_zero2, deepspeed_zero3 or fsdp)"
        )
    return nodes


def train_resources():
    """Resources of the training job: `gpu` on one node; nodes, one task per node, GPUs per node (Slurm);
    with training.serial one unit of `training`, of which the profiles allow one at a time.

    training.serial is a resource, not a DAG edge from the control to the IVR model: Snakemake does not
    check the parameters of a job downstream of one it reruns, so a change to both branches' settings
    would retrain the control alone.
    """
    gpus, nodes = config["training"]["gpus"], train_nodes()
    serial = {"training": 1} if config["training"]["serial"] else {}
    if nodes == 1:
        return {"gpu": gpus, **serial}
    per_node = {"gres": f"gpu:{gpus}", "tasks_per_gpu": 0} if gpus else {}
    return {"nodes": nodes, "tasks": nodes, "mpi": "srun", **per_node, **serial}


def train_processes(wildcards, resources):
    """accelerate's --num_processes, over all nodes: one per GPU, or one per node on CPU."""
    if train_nodes() == 1:
        return max(1, int(resources.gpu))
    return train_nodes() * max(1, config["training"]["gpus"])


def accelerate_config():
    name = config["training"]["accelerate"]
    return str(Path(workflow.basedir) / "config" / "accelerate" / f"{name}.yaml")


# ---- validation and the final model (rules/validate.smk, rules/finalize_model.smk) ----
def validate_inputs(wildcards):
    inputs = {
        "heldout": "results/corpus/domain/heldout.jsonl",
        "initialized": "results/model/initialized",
        "sft": "results/model/sft",
        "compression": "results/remap/compression.json",
        "base": local_inputs(base_model()),
    }
    if has_general():
        inputs["general"] = "results/corpus/general/heldout.jsonl"
    if config["training"]["control"]:
        inputs["control"] = "results/model/control"
    if config["ivr"]["backend"] == "unigram":
        inputs["fidelity"] = "results/tokenizer/fidelity.json"
    inputs["unseen"] = unseen_inputs("report")
    inputs["training_texts"] = sorted({asset_folder(p) for p in training_texts()})
    return inputs


def training_texts():
    """Every split and text that training or a choice of settings reads, which no unseen text may share."""
    corpora = ["domain", "general"] if has_general() else ["domain"]
    splits = [
        f"results/corpus/{c}/{s}.jsonl" for c in corpora for s in ("train", "dev")
    ]
    return splits + [p for t in unseen_texts("dev") for p in t["paths"]]


def validate_args(wildcards, input):
    """Optional validation arguments: general text, the control, distillation fidelity."""
    args = ["--compression", input.compression]
    for key, flag in (
        ("general", "--general-heldout"),
        ("control", "--control"),
        ("fidelity", "--fidelity"),
    ):
        if key in input.keys():
            args += [flag, input[key]]
    for path in training_texts():
        args += ["--training-texts", path]
    args += unseen_args("--unseen", "report")
    return " ".join(shlex.quote(str(a)) for a in args)


def final_model_checksummed_inputs():
    """Inputs whose SHA-256 goes into the final model's provenance: corpora and the base model."""
    paths = corpus_sources(config["corpus"])
    if has_general():
        paths += corpus_sources(config["general_corpus"])
    if Path(config["base_model"]).exists():
        paths.append(config["base_model"])
    return paths


# ---- the GGUF export (rules/export_gguf.smk) ----
def gguf_outputs():
    """{results/final_model.gguf: the first of export.types, results/final_model.<TYPE>.gguf: each other}."""
    types = config["export"]["types"]
    base_is_gguf = config["base_model"].endswith(".gguf")
    if types is None:
        types = ["base", "F16"] if base_is_gguf else ["F16"]
    if "base" in types and not base_is_gguf:
        sys.exit(
            "error: export.types names 'base', the type of the base model's GGUF, but base_model "
            f"({config['base_model']}) is not a .gguf file"
        )
    return {
        ("results/final_model.gguf" if i == 0 else f"results/final_model.{t}.gguf"): t
        for i, t in enumerate(types)
    }


def export_args(wildcards, input, output):
    """The export's --out TYPE=PATH, --base-gguf and --check NAME=PATH arguments."""
    args = [a for path, t in gguf_outputs().items() for a in ("--out", f"{t}={path}")]
    if "base" in gguf_outputs().values():
        args += ["--base-gguf", config["base_model"]]
    for name, path in zip(("domain", "general"), input.checks):
        args += ["--check", f"{name}={path}"]
    return " ".join(shlex.quote(str(a)) for a in args)
