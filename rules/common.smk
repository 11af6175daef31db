# Helpers shared by the rules: validated config, script paths, where inputs come from.
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))
from ivr.cli import UserError  # noqa: E402
from ivr.config import validate_config  # noqa: E402

try:
    config.update(
        validate_config(
            config, source=" + ".join(map(str, workflow.configfiles)) or "config"
        )
    )
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
    parts = Path(path).parts
    if len(parts) >= 3 and parts[:2] == ("resources", "assets"):
        return str(Path(*parts[:3]))
    return path


def corpus_config(corpus):
    return config["corpus"] if corpus == "domain" else config["general_corpus"]


def corpus_inputs(wildcards):
    return sorted({asset_folder(p) for p in corpus_config(wildcards.corpus)["paths"]})


def has_general():
    return config["general_corpus"] is not None


def general_split_args(wildcards, input):
    """Analysis arguments for the general-text splits, when a general corpus is configured."""
    if not has_general():
        return ""
    return f"--general-train {input.general_train!r} --general-heldout {input.general_heldout!r}"


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
