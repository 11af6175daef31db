#!/usr/bin/env python3
"""Validate the reassigned model against the right baselines, on held-out text no stage fitted on.

Evaluates the base model (its own tokenizer), the initialized model, the fine-tuned (SFT) model and,
when given, the control (the base model fine-tuned with its own tokenizer on the same documents):
bits per byte and tokens per byte on the held-out domain split, on general text and on unseen texts
(--unseen: sources that no training input reads, in the base's language or the domain's), and
generation speed in bytes of text per second. Gathers distillation fidelity, compression, the frozen-row check,
training curves and sample continuations, then writes validation.json (every number), validation.html
(one self-contained page, plots embedded) and checks the configured gates: a failed gate is recorded
in the report and makes `finalize_model.py` refuse to write the final model.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivr.cli import UserError, atomic_outputs, log, run_main  # noqa: E402
from ivr.corpus import iter_jsonl_texts  # noqa: E402
from ivr.files import read_json  # noqa: E402
from ivr.retention import parse_unseen, read_unseen, shared_documents, training_keys  # noqa: E402

MODELS = ("base", "initialized", "sft", "control")
LABELS = {"base": "base", "initialized": "initialized (IVR, before training)", "sft": "IVR (fine-tuned)", "control": "control (base fine-tuned)"}


def read_texts(path: Path | None, limit: int) -> list[str]:
    if path is None or not path.exists():
        return []
    texts = []
    for text in iter_jsonl_texts(path):
        texts.append(text)
        if len(texts) >= limit:
            break
    return texts


def evaluate(name: str, path: str, domain: list[str], general: list[str], unseen: dict[str, list[str]],
             prompts: list[str], opts: argparse.Namespace) -> dict:
    """Bits and tokens per byte on the held-out texts and the unseen texts, and generation speed, of one model."""
    import torch

    from ivr.metrics import bits_per_byte, generation_speed
    from ivr.modeling import load_causal_lm
    from ivr.tokenization import load_tokenizer

    log.info("evaluating %s (%s)", name, path)
    device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(path, device=device, dtype=torch.float32, trust_remote_code=opts.trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=opts.trust_remote_code)
    result: dict = {"path": path}
    for split, texts in (("domain", domain), ("general", general)):
        if texts:
            scored = bits_per_byte(model, tokenizer, texts, opts.byte_budget, batch_size=opts.batch_size)
            result[split] = scored.to_dict(with_documents=False)
    for text_name, texts in unseen.items():
        scored = bits_per_byte(model, tokenizer, texts, opts.byte_budget, batch_size=opts.batch_size)
        result.setdefault("unseen", {})[text_name] = scored.to_dict(with_documents=False)
    if prompts and opts.new_tokens:
        result["generation"] = asdict(generation_speed(model, tokenizer, prompts, opts.new_tokens))
    del model
    return result


def _plot_png(draw) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=110)
    draw(ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _bars(ax, results: dict, split: str, key: str, title: str) -> None:
    names = [n for n in MODELS if split in results["models"].get(n, {})]
    values = [results["models"][n][split][key] for n in names]
    ax.bar([LABELS[n].split(" (")[0] for n in names], values, color=["#888", "#bbb", "#2a7", "#47c"][: len(names)])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_title(title, fontsize=10)


COLOURS = {"sft": "#2a7", "control": "#47c"}


def _dev_curves(ax, logs: dict, x_key: str, x_label: str, scale: float) -> None:
    """Dev-split bits per byte (solid: domain, dashed: general text) of each branch against compute."""
    for name, rows in logs.items():
        for key, style, what in (("dev_bpb", "-", "domain"), ("general_dev_bpb", "--", "general")):
            points = [(r[x_key] / scale, r[key]) for r in rows if key in r and x_key in r]
            if points:
                ax.plot(*zip(*points), style, marker=".", color=COLOURS.get(name),
                        label=f"{LABELS.get(name, name).split(' (')[0]}, {what}")
    ax.set_xlabel(x_label)
    ax.set_ylabel("dev bits per byte")
    ax.legend(fontsize=7)
    ax.set_title(f"quality against {x_label.split(' (')[0]}", fontsize=10)


def _loss_per_byte(ax, logs: dict, training: dict) -> None:
    """Training loss in bits per byte of training text (comparable across tokenizers) against FLOPs."""
    for name, rows in logs.items():
        stats = training.get(name, {})
        if not stats.get("tokens_seen") or not stats.get("bytes_seen"):
            continue
        bytes_per_token = stats["bytes_seen"] / stats["tokens_seen"]
        points = [(r["flops"] / 1e15, r["loss"] / math.log(2) / bytes_per_token) for r in rows if "loss" in r and "flops" in r]
        if points:
            ax.plot(*zip(*points), color=COLOURS.get(name), label=LABELS.get(name, name).split(" (")[0])
    ax.set_xlabel("training FLOPs (PFLOP)")
    ax.set_ylabel("training loss, bits per byte")
    ax.legend(fontsize=8)
    ax.set_title("training loss per byte against compute", fontsize=10)


COMPUTE_ROWS = (("bytes_seen", "bytes of text seen", 0), ("passes", "passes over its documents", None),
                ("tokens_seen", "training tokens", 0), ("optimizer_steps", "optimizer steps", 0),
                ("training_flops", "training FLOPs", None), ("gpu_seconds", "GPU-seconds", 1),
                ("wall_clock_s", "wall-clock seconds of training", 1))


def compute_table(results: dict) -> str:
    """Rows: what each trained model cost; columns: the IVR model, the control, IVR's share."""
    training = results.get("training", {})
    names = [n for n in ("sft", "control") if training.get(n)]
    if not names:
        return ""
    head = "".join(f"<th>{html.escape(LABELS[n])}</th>" for n in names) + ("<th>IVR / control</th>" if len(names) == 2 else "")
    rows = ""
    for key, label, digits in COMPUTE_ROWS:
        values = [training[n].get(key) for n in names]
        cells = "".join(f"<td>{'–' if v is None else f'{v:.4g}' if digits is None else f'{v:,.{digits}f}'}</td>" for v in values)
        if len(values) == 2:
            cells += f"<td>{fmt(values[0] / values[1], 3) if values[0] is not None and values[1] else '–'}</td>"
        rows += f"<tr><td>{label}</td>{cells}</tr>"
    chosen = [training[n].get("interpolation", {}) for n in names]
    rows += ("<tr><td>interpolation (alpha towards its anchor; 1 = none)</td>"
             + "".join(f"<td>{fmt(c.get('alpha'), 2)} {html.escape(c.get('anchor', ''))}</td>" for c in chosen) + ("<td></td>" if len(names) == 2 else "") + "</tr>")
    for split, label in (("domain", "held-out domain bits per byte"), ("general", "held-out general bits per byte")):
        values = [results["models"].get(n, {}).get(split, {}).get("bits_per_byte") for n in names]
        cells = "".join(f"<td>{fmt(v)}</td>" for v in values)
        if len(values) == 2:
            cells += f"<td>{fmt(values[0] / values[1], 3) if None not in values else '–'}</td>"
        rows += f"<tr><td>{label}</td>{cells}</tr>"
    return f"<table><tr><th>training</th>{head}</tr>{rows}</table>"


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def render_html(results: dict, logs: dict) -> str:
    models = results["models"]
    get = lambda n, s, k: models.get(n, {}).get(s, {}).get(k)  # noqa: E731
    head = results["headline"]
    rows = "".join(
        f"<tr><td>{html.escape(LABELS[n])}</td><td>{fmt(get(n, 'domain', 'bits_per_byte'))}</td>"
        f"<td>{fmt(get(n, 'domain', 'tokens_per_byte'))}</td><td>{fmt(get(n, 'general', 'bits_per_byte'))}</td>"
        f"<td>{fmt(models.get(n, {}).get('generation', {}).get('bytes_per_second'), 1)}</td></tr>"
        for n in MODELS if n in models
    )
    gates = "".join(
        f"<tr class='{'pass' if g['passed'] else 'fail'}'><td>{html.escape(g['name'])}</td><td>{html.escape(g['rule'])}</td>"
        f"<td>{fmt(g['measured'], 4)}</td><td>{fmt(g['threshold'], 4)}</td><td>{fmt(g.get('control'), 4)}</td>"
        f"<td>{'pass' if g['passed'] else 'FAIL'}</td></tr>"
        for g in results["gates"]
    )
    unseen_rows = ""
    for text, info in results.get("unseen", {}).items():
        change = head["unseen_change_vs_base"][text]
        cells = "".join(
            f"<td>{fmt(head['unseen_bpb'][text].get(n))}"
            + (f" ({change[n] * 100:+.1f} %)" if n in change else "") + "</td>"
            for n in MODELS if n in models
        )
        unseen_rows += (f"<tr><td>{html.escape(text)}</td><td>{html.escape(info['language'])}</td>"
                        f"<td>{info['documents']}</td><td>{info['shared_with_training']}</td>{cells}</tr>")
    unseen_head = "".join(f"<th>{html.escape(LABELS[n])}</th>" for n in MODELS if n in models)
    unseen_table = (
        "<h2>Unseen text: what fine-tuning costs outside the training text</h2><p>Sources that no training input "
        "and no choice of settings reads; bits per byte (change against the base). <i>base</i>: the base model's "
        "language; <i>domain</i>: the domain's language outside the domain. Documents shared with a training or dev "
        "input must be 0.</p><table><tr><th>text</th><th>language</th><th>documents</th><th>shared</th>"
        f"{unseen_head}</tr>{unseen_rows}</table>" if unseen_rows else "")
    unseen_line = " ".join(
        f"<b>{html.escape(text)}</b> ({html.escape(info['language'])}): IVR "
        f"{head['unseen_change_vs_base'][text].get('sft', 0) * 100:+.1f} %"
        + (f", control {head['unseen_change_vs_base'][text]['control'] * 100:+.1f} %"
           if 'control' in head['unseen_change_vs_base'][text] else "") + " against the base."
        for text, info in results.get("unseen", {}).items())
    plots = [
        _plot_png(lambda ax: _bars(ax, results, "domain", "bits_per_byte", "domain bits per byte (lower is better)")),
        _plot_png(lambda ax: _bars(ax, results, "domain", "tokens_per_byte", "domain tokens per byte")),
    ]
    if any(get(n, "general", "bits_per_byte") for n in models):
        plots.append(_plot_png(lambda ax: _bars(ax, results, "general", "bits_per_byte", "general-text bits per byte")))
    if any("dev_bpb" in r for rows in logs.values() for r in rows):
        plots.append(_plot_png(lambda ax: _dev_curves(ax, logs, "flops", "training FLOPs (PFLOP)", 1e15)))
        plots.append(_plot_png(lambda ax: _dev_curves(ax, logs, "bytes", "bytes of text seen (MB)", 1e6)))
    if any("flops" in r for rows in logs.values() for r in rows):
        plots.append(_plot_png(lambda ax: _loss_per_byte(ax, logs, results.get("training", {}))))
    images = "".join(f"<img alt='plot {i + 1}' src='data:image/png;base64,{p}'>" for i, p in enumerate(plots))
    samples = ""
    prompts = results.get("prompts", [])
    for i, prompt in enumerate(prompts):
        cells = "".join(
            f"<td>{html.escape(models[n]['generation']['continuations'][i])}</td>"
            for n in MODELS if n in models and "generation" in models[n]
        )
        samples += f"<tr><td class='prompt'>{html.escape(prompt)}</td>{cells}</tr>"
    sample_head = "".join(f"<th>{html.escape(LABELS[n])}</th>" for n in MODELS if n in models and "generation" in models[n])
    details = html.escape(json.dumps({k: v for k, v in results.items() if k not in ("models", "prompts")}, indent=2, ensure_ascii=False))
    verdict = "all gates pass" if results["gates_passed"] else "a gate failed: no final model was written"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>IVR validation</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}} .pass td:last-child{{color:#080}} .fail td{{background:#fdd}}
.headline{{font-size:1.1em}} img{{max-width:48%;margin:.5%}} .samples td{{text-align:left;vertical-align:top;font-size:.85em;overflow-wrap:anywhere}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}}
</style></head><body>
<h1>IVR validation: {html.escape(results['base_model'])}</h1>
<p>Tokenizer backend: <b>{html.escape(str(results['compression'].get('backend', 'unknown')))}</b>.</p>
<p class="headline"><b>Domain:</b> {fmt(head['domain_tokens_per_byte_reduction'] * 100 if head['domain_tokens_per_byte_reduction'] is not None else None, 1)} % fewer tokens than the base;
bits per byte base {fmt(head['domain_bpb']['base'])}, control {fmt(head['domain_bpb'].get('control'))}, IVR {fmt(head['domain_bpb']['sft'])}.
<b>General text:</b> bits per byte base {fmt(head['general_bpb']['base'])}, IVR {fmt(head['general_bpb']['sft'])}.
{unseen_line}
<b>Generation:</b> IVR {fmt(head['generation_speedup_vs_control'], 2)}x the control's bytes per second.
<b>Training compute:</b> IVR {fmt(head.get('ivr_training_flops_share'), 2)}x the control's FLOPs. <b>{verdict}</b>.</p>
<table><tr><th>model</th><th>domain bits/byte</th><th>domain tokens/byte</th><th>general bits/byte</th><th>generation bytes/s</th></tr>{rows}</table>
<h2>Training compute</h2>
<p>Both models have one shape and batch, so FLOPs follow optimizer steps; the dev-split curves below are
measured during training (bits per byte on the same dev documents for both, never the held-out ones).</p>
{compute_table(results)}
{unseen_table}
<h2>Gates</h2><table><tr><th>gate</th><th>rule</th><th>measured (IVR)</th><th>threshold</th><th>control</th><th>result</th></tr>{gates}</table>
<h2>Plots</h2>{images}
<h2>Continuations of held-out prompts (greedy)</h2>
<table class="samples"><tr><th>prompt</th>{sample_head}</tr>{samples}</table>
<h2>Details</h2><pre>{details}</pre>
</body></html>
"""


def unseen_bpb(models: dict, model: str, text: str) -> float | None:
    return models.get(model, {}).get("unseen", {}).get(text, {}).get("bits_per_byte")


def check_gates(results: dict, gates: dict) -> list[dict]:
    models = results["models"]
    bpb = lambda n, s: models.get(n, {}).get(s, {}).get("bits_per_byte")  # noqa: E731
    out = []
    for name, info in results.get("unseen", {}).items():
        ivr, base, control = (unseen_bpb(models, m, name) for m in ("sft", "base", "control"))
        if info["shared_with_training"]:
            out.append({"name": f"unseen_{name}", "rule": "no document of this unseen text is in a training or dev input",
                        "measured": info["shared_with_training"], "threshold": 0, "passed": False})
        if info["language"] == "base" and gates["retention"]:
            limit = base * (1 + gates["retention_tolerance"])
            out.append({"name": f"retention_{name}", "rule": "IVR bits/byte on unseen text in the base's language "
                        "<= base x (1 + retention_tolerance)", "measured": ivr, "threshold": limit,
                        "control": control, "passed": ivr <= limit})
        if info["language"] == "domain" and gates["language_vs_control"] and control is not None:
            limit = control + gates["control_tolerance"]
            out.append({"name": f"language_vs_control_{name}", "rule": "IVR bits/byte on unseen text in the domain's "
                        "language <= control's + tolerance", "measured": ivr, "threshold": limit, "control": control,
                        "passed": ivr <= limit})
    if bpb("sft", "general") is not None and bpb("base", "general") is not None:
        limit = bpb("base", "general") + gates["general_bpb_tolerance"]
        out.append({"name": "general_bpb", "rule": "IVR general-text bits/byte <= base + tolerance",
                    "measured": bpb("sft", "general"), "threshold": limit, "passed": bpb("sft", "general") <= limit})
    if gates["domain_better_than_initialized"] and bpb("initialized", "domain") is not None:
        out.append({"name": "domain_vs_initialized", "rule": "IVR domain bits/byte < initialized model's",
                    "measured": bpb("sft", "domain"), "threshold": bpb("initialized", "domain"),
                    "passed": bpb("sft", "domain") < bpb("initialized", "domain")})
    fidelity = results.get("fidelity", {}).get("pretoken_agreement")
    if fidelity is not None:
        out.append({"name": "fidelity", "rule": "pre-token agreement of the backend that ran >= threshold",
                    "measured": fidelity, "threshold": gates["fidelity_min"], "passed": fidelity >= gates["fidelity_min"]})
    if gates["ivr_vs_control"] and bpb("control", "domain") is not None:
        limit = bpb("control", "domain") + gates["control_tolerance"]
        out.append({"name": "ivr_vs_control", "rule": "IVR domain bits/byte <= control's + tolerance",
                    "measured": bpb("sft", "domain"), "threshold": limit, "passed": bpb("sft", "domain") <= limit})
    if gates["general_vs_control"] and bpb("control", "general") is not None and bpb("sft", "general") is not None:
        limit = bpb("control", "general") + gates["control_tolerance"]
        out.append({"name": "general_vs_control", "rule": "IVR general-text bits/byte <= control's + tolerance",
                    "measured": bpb("sft", "general"), "threshold": limit, "passed": bpb("sft", "general") <= limit})
    return out


def headline(models: dict) -> dict:
    get = lambda n, s, k: models.get(n, {}).get(s, {}).get(k)  # noqa: E731
    base_tpb, ivr_tpb = get("base", "domain", "tokens_per_byte"), get("sft", "domain", "tokens_per_byte")
    speed = lambda n: models.get(n, {}).get("generation", {}).get("bytes_per_second")  # noqa: E731
    anchor = speed("control") or speed("base")
    return {
        "domain_tokens_per_byte": {"base": base_tpb, "ivr": ivr_tpb},
        "domain_tokens_per_byte_reduction": 1 - ivr_tpb / base_tpb if base_tpb and ivr_tpb else None,
        "domain_bpb": {n: get(n, "domain", "bits_per_byte") for n in MODELS if n in models},
        "general_bpb": {n: get(n, "general", "bits_per_byte") for n in MODELS if n in models},
        "generation_bytes_per_second": {n: speed(n) for n in MODELS if n in models},
        "generation_speedup_vs_control": speed("sft") / anchor if speed("sft") and anchor else None,
        "unseen_bpb": {text: {n: unseen_bpb(models, n, text) for n in MODELS if n in models}
                       for text in models.get("base", {}).get("unseen", {})},
        "unseen_change_vs_base": {
            text: {n: unseen_bpb(models, n, text) / unseen_bpb(models, "base", text) - 1 for n in MODELS
                   if n in models and n != "base"}
            for text in models.get("base", {}).get("unseen", {})},
    }


def read_jsonl(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json_if(path: Path | None, what: str) -> dict:
    """An optional input: {} when not given or not made (the control's stats when there is no control)."""
    return read_json(path, what) if path and path.exists() else {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heldout", type=Path, required=True, help="held-out domain split (JSON lines)")
    parser.add_argument("--general-heldout", type=Path, help="held-out general text (JSON lines)")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--initialized", required=True)
    parser.add_argument("--sft", required=True)
    parser.add_argument("--control", help="the control model, if the control branch ran")
    parser.add_argument("--fidelity", type=Path, help="fidelity.json of the distilled tokenizer")
    parser.add_argument("--compression", type=Path, help="compression.json of the remapped tokenizer")
    parser.add_argument("--unseen", action="append", default=[], metavar="NAME:LANGUAGE=PATH[,PATH...]",
                        help="a text from a source no training input reads; LANGUAGE base (the base model's main "
                             "language: the retention gate) or domain (the domain's language outside the domain: "
                             "the language_vs_control gate); repeatable")
    parser.add_argument("--training-texts", action="append", default=[], metavar="PATH",
                        help="a training or dev input (JSON lines) that no unseen document may be part of; repeatable")
    parser.add_argument("--max-documents", type=int, default=200)
    parser.add_argument("--byte-budget", type=int, default=2000, help="bytes scored per document, the same for every model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts for generation speed and samples")
    parser.add_argument("--prompt-bytes", type=int, default=120)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--gates", type=json.loads, default="{}", help="JSON object of gate settings")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--out-json", type=Path, required=True)
    parser.add_argument("--out-html", type=Path, required=True)
    return parser.parse_args(argv)


GATE_DEFAULTS = {"general_bpb_tolerance": 0.1, "domain_better_than_initialized": True, "fidelity_min": 0.999,
                 "ivr_vs_control": False, "general_vs_control": False, "control_tolerance": 0.0,
                 "retention": True, "retention_tolerance": 0.05, "language_vs_control": False}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for flag, value in (("--base-model", args.base_model), ("--initialized", args.initialized), ("--sft", args.sft)):
        if not value:
            raise UserError(f"{flag} is empty: the report compares the IVR model with the base and the initialized model")
    gates = {**GATE_DEFAULTS, **args.gates}
    domain = read_texts(args.heldout, args.max_documents)
    if not domain:
        raise UserError(f"{args.heldout}: the held-out split is empty or missing")
    general = read_texts(args.general_heldout, args.max_documents)
    from ivr.metrics import cut_to_bytes

    prompts = [cut_to_bytes(t, args.prompt_bytes) for t in domain[: args.prompts]]
    texts = [parse_unseen(spec, "--unseen") for spec in args.unseen]
    unseen = {t.name: read_unseen(t, args.max_documents) for t in texts}
    training = training_keys(args.training_texts) if texts else set()
    overlap = {t.name: {"language": t.language, "documents": len(unseen[t.name]),
                        "shared_with_training": shared_documents(unseen[t.name], training)} for t in texts}
    paths = {"base": args.base_model, "initialized": args.initialized, "sft": args.sft, "control": args.control}
    models = {name: evaluate(name, path, domain, general, unseen, prompts, args) for name, path in paths.items() if path}
    logs = {name: read_jsonl(Path(paths[name]) / "train_log.jsonl") for name in ("sft", "control") if paths[name]}
    fidelity = read_json_if(args.fidelity, "fidelity report")
    results = {
        "base_model": args.base_model,
        "protocol": {"documents": len(domain), "general_documents": len(general), "byte_budget": args.byte_budget,
                     "prompts": len(prompts), "prompt_bytes": args.prompt_bytes, "new_tokens": args.new_tokens},
        "models": models,
        "unseen": overlap,
        "prompts": prompts,
        "fidelity": fidelity.get("heldout", fidelity),
        "compression": read_json_if(args.compression, "compression table"),
        "training": {name: read_json_if(Path(paths[name]) / "training_stats.json", "training statistics")
                     for name in ("sft", "control") if paths[name]},
    }
    results["headline"] = headline(models)
    flops = {n: results["training"].get(n, {}).get("training_flops") for n in ("sft", "control")}
    results["headline"]["ivr_training_flops_share"] = flops["sft"] / flops["control"] if flops["sft"] and flops["control"] else None
    results["gates"] = check_gates(results, gates)
    results["gates_passed"] = all(g["passed"] for g in results["gates"])
    with atomic_outputs(args.out_json, args.out_html) as (out_json, out_html):
        out_json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        out_html.write_text(render_html(results, logs), encoding="utf-8")
    for gate in results["gates"]:
        log.info("gate %s: %s (measured %.4f, threshold %.4f)", gate["name"], "pass" if gate["passed"] else "FAIL",
                 gate["measured"], gate["threshold"])


if __name__ == "__main__":
    run_main(main)
