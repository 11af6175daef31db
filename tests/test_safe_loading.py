"""Safe loading: no user file can run code. Weights only through safetensors (or
torch.load(weights_only=True)), trust_remote_code only from the config, no pickle, eval or exec, YAML only
through the safe loaders, no shell between paths and commands. An audit of every script's source."""

from __future__ import annotations

import ast

import yaml

from conftest import ROOT

UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Every place in a Python source that could load or run untrusted code, as 'file:line: what'."""
    import warnings

    with warnings.catch_warnings():  # a stray escape in a docstring is not what this audit is about
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(source, filename)
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in ("eval", "exec", "__import__") or name.endswith(("os.system", "os.popen")):
            found.append(f"{where}: calls {name}")
        if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        if _is_true(_keyword(node, "trust_remote_code")):
            found.append(f"{where}: trust_remote_code=True")
        if _is_true(_keyword(node, "shell")):
            found.append(f"{where}: {name}(shell=True)")
        if _is_true(_keyword(node, "allow_pickle")) or last == "read_pickle":
            found.append(f"{where}: {name} may unpickle")
        if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            found.append(f"{where}: {name}")
        if name == "yaml.load" and "Safe" not in ast.unparse(_keyword(node, "Loader") or (node.args[1:2] or [ast.Constant(None)])[0]):
            found.append(f"{where}: yaml.load without a safe loader")
        if last == "from_pretrained" and (name.startswith("AutoModel") or name.split(".")[0].endswith(("LM", "Model"))):
            if not _is_true(_keyword(node, "use_safetensors")) and _keyword(node, "gguf_file") is None:
                found.append(f"{where}: {name} without use_safetensors=True")
        if last == "add_argument" and any(isinstance(a, ast.Constant) and a.value == "--trust-remote-code" for a in node.args):
            if _is_true(_keyword(node, "default")) or (_keyword(node, "action") is not None and ast.literal_eval(_keyword(node, "action")) != "store_true"):
                found.append(f"{where}: --trust-remote-code is on by default")
    return found


def test_the_audit_finds_unsafe_code():
    bad = """
import pickle
from joblib import load
import torch, yaml, numpy as np
from transformers import AutoModelForCausalLM, GPT2LMHeadModel
torch.load(path)
torch.load(path, weights_only=False)
eval(text); exec(text)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
np.load(path, allow_pickle=True)
AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True)
GPT2LMHeadModel.from_pretrained(name)
subprocess.run(f"python {path}", shell=True)
parser.add_argument("--trust-remote-code", default=True)
"""
    found = unsafe_calls(bad, "bad.py")
    for what in ("imports pickle", "imports joblib", "torch.load without weights_only=True", "calls eval", "calls exec",
                 "yaml.load without a safe loader", "yaml.unsafe_load", "may unpickle", "trust_remote_code=True",
                 "AutoModelForCausalLM.from_pretrained without use_safetensors=True",
                 "GPT2LMHeadModel.from_pretrained without use_safetensors=True", "(shell=True)",
                 "--trust-remote-code is on by default"):
        assert any(what in f for f in found), what
    assert len([f for f in found if "torch.load" in f]) == 2
    good = """
torch.load(path, weights_only=True)
yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, trust_remote_code=trust_remote_code)
AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
model.eval()
parser.add_argument("--trust-remote-code", action="store_true")
"""
    assert unsafe_calls(good, "good.py") == []


def test_no_script_can_load_or_run_untrusted_code():
    files = sorted((ROOT / "scripts").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    assert len(files) > 20
    found = [f for path in files for f in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert found == []


def test_rules_pass_trust_remote_code_only_when_the_config_turns_it_on():
    import re

    for path in sorted((ROOT / "rules").glob("*.smk")) + [ROOT / "Snakefile"]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if "--trust-remote-code" in line:
                assert re.search(r'if config\["trust_remote_code"\] else ""', line), f"{path.name}:{number}: {line.strip()}"
            assert "trust_remote_code=True" not in line, f"{path.name}:{number}"
    schema = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())
    assert schema["properties"]["trust_remote_code"]["default"] is False
