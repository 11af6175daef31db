"""Fine-tuning on CPU with the tiny GPT-2: held rows, LoRA, resume after SIGKILL, the loss."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, pack

from ivr import loss as ivr_loss, trainer
from ivr.checkpoints import CHECKPOINT_GLOB

SCRIPT = ROOT / "scripts" / "train_sft.py"
REASSIGNED = list(range(40000, 40300))  # ids of unused GPT-2 tokens the tiny rules give new "tokens"
FROZEN = 50256  # a special token marked frozen
BASE = ["block_size=32", "micro_batch_size=2", "epochs=0.15", "log_every=2", "checkpoint_every=5",
        "frozen_check_every=4", "weight_decay=0.1", "stage1_share=0.5", "loss_chunk_tokens=24",
        "warmup_share=0.1"]


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory) -> Path:
    entries = [{"id": i, "kind": "ngram", "old_token": None, "new_token": f"t{i}", "base_ids": [1, 2],
                "frozen": False} for i in REASSIGNED]
    entries.append({"id": FROZEN, "kind": "special", "old_token": "<|endoftext|>", "new_token": "<|endoftext|>",
                    "base_ids": [], "frozen": True})
    path = tmp_path_factory.mktemp("rules") / "remap_rules.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "reassignments": sorted(entries, key=lambda e: e["id"])}))
    return path


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_gpt2_dir, bills_sample) -> Path:
    """The first 3 Korean bills packed in blocks of 32 tokens (with the GPT-2 tokenizer)."""
    tmp = tmp_path_factory.mktemp("packed")
    lines = bills_sample.read_text(encoding="utf-8").splitlines()[:3]
    train = tmp / "train.jsonl"
    train.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    pack(tiny_gpt2_dir, tmp / "data", train, "--block-size", "32")
    return tmp / "data"


def train_command(model: Path, data: Path, out: Path, checkpoints: Path, rules: Path | None, *settings: str,
                  launch: bool = False, config: str = "cpu") -> list[str]:
    command = [sys.executable]
    if launch:
        command += ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / f"config/accelerate/{config}.yaml"),
                    "--num_processes", "1", "--num_machines", "1", "--num_cpu_threads_per_process", "1"]
    command += [str(SCRIPT), "--model", str(model), "--data", str(data), "--out", str(out),
                "--checkpoint-dir", str(checkpoints), "--threads", "1"]
    if rules:
        command += ["--rules", str(rules)]
    for item in (*BASE, *settings):
        command += ["--set", item]
    return command


def run(command: list[str]) -> str:
    env = {**os.environ, "IVR_NO_PROGRESS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stderr


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of folder/tensorboard, as written (tag -> (step, value))."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((folder / "tensorboard").rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else None
                if number is None and value.HasField("tensor"):  # newer writers put scalars in a tensor
                    number = float(value.tensor.float_val[0])
                out.setdefault(value.tag, []).append((event.step, number))
    return out


def assert_curve_matches_log(folder: Path) -> None:
    """The TensorBoard loss, lr and tokens/s curves are train_log.jsonl's records, each step once, and the
    held-row checks are there as scalars."""
    records = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    curves = scalars(folder)
    for field in ("loss", "lr", "tokens_per_s", "grad_norm"):
        assert [step for step, _ in curves[field]] == [r["step"] for r in records], field
        assert [value for _, value in curves[field]] == pytest.approx([r[field] for r in records], rel=1e-6), field
    checks = stats(folder)["held_row_checks"]
    assert curves["held_rows_max_abs_change"] == [(c["step"], c["max_abs_change"]) for c in checks]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def stats(folder: Path) -> dict:
    return json.loads((folder / "training_stats.json").read_text())


# ---- training --------------------------------------------------------------------------------------

def test_stage1_holds_every_other_row_bit_identical_with_weight_decay_on(tmp_path, tiny_gpt2_dir, packed,
                                                                           rules_file):
    """Through `accelerate launch` with config/accelerate/cpu.yaml; the tiny GPT-2's head is tied."""
    out = tmp_path / "out"
    log = run(train_command(tiny_gpt2_dir, packed, out, tmp_path / "ck", rules_file, "stage2=none",
                            "stage1_lr=1e-2", launch=True))
    before, after = weights(tiny_gpt2_dir), weights(out)
    emb = "transformer.wte.weight"
    held = np.setdiff1d(np.arange(50257), REASSIGNED)
    assert torch.equal(after[emb][held], before[emb][held])
    assert (after[emb][REASSIGNED] != before[emb][REASSIGNED]).any(dim=1).sum() > len(REASSIGNED) // 2
    for name in before:  # nothing else trained
        if name != emb:
            assert torch.equal(after[name], before[name]), name
    result = stats(out)
    assert result["held_rows_vs_input"]["max_abs_change_before_restore"] == 0.0  # measured before restoring
    assert result["held_row_checks"] and all(c["max_abs_change"] == 0.0 for c in result["held_row_checks"])
    assert "held rows, stage 1 end: max abs change of fp32 weights = 0.0e+00" in log
    # a random model starts near ln(vocab); the log has every field
    assert abs(result["first_loss"] - math.log(50257)) < 0.5
    records = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert set(records[0]) >= {"step", "loss", "grad_norm", "lr", "tokens_per_s"}
    assert not (tmp_path / "ck").exists()  # checkpoints are removed once the model is saved


def test_deepspeed_as_installed_trains_under_zero2_on_cpu_and_holds_the_rows(tmp_path, tiny_gpt2_dir, packed,
                                                                              rules_file):
    """DeepSpeed at requirements.txt's pin, as setup.sh installs it, under `accelerate launch` with
    config/accelerate/deepspeed_zero2.yaml: it runs on CPU too (gloo; the first time DeepSpeed builds its
    shared-memory op with the machine's C++ compiler, a minute or more), and the held rows stay exact."""
    import deepspeed

    pinned = re.search(r"^deepspeed==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)
    assert deepspeed.__version__ == pinned
    out = tmp_path / "out"
    log = run(train_command(tiny_gpt2_dir, packed, out, tmp_path / "ck", rules_file, "accelerate=deepspeed_zero2",
                            launch=True, config="deepspeed_zero2"))
    assert "1 process(es), DEEPSPEED" in log
    result = stats(out)
    assert result["world"]["distributed"] == "DEEPSPEED"
    assert len(result["held_row_checks"]) >= 2 and all(c["max_abs_change"] == 0.0 for c in result["held_row_checks"])
    emb = weights(tiny_gpt2_dir)["transformer.wte.weight"], weights(out)["transformer.wte.weight"]
    assert torch.equal(emb[1][FROZEN], emb[0][FROZEN])  # the frozen special token, through stage 2 (full)
    assert not torch.equal(emb[1][REASSIGNED], emb[0][REASSIGNED])
    assert_curve_matches_log(out)


def test_untied_head_rows_are_held_too(tmp_path, tiny_gpt2_dir, packed, rules_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.clone() * 0.5)
    model.config.tie_word_embeddings = False
    model.save_pretrained(tmp_path / "untied")
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(tmp_path / "untied")
    out = tmp_path / "out"
    run(train_command(tmp_path / "untied", packed, out, tmp_path / "ck", rules_file, "stage2=none",
                      "stage1_lr=1e-2", "tensorboard=false"))
    assert not (out / "tensorboard").exists()
    before, after = weights(tmp_path / "untied"), weights(out)
    held = np.setdiff1d(np.arange(50257), REASSIGNED)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        assert torch.equal(after[name][held], before[name][held]), name
        assert not torch.equal(after[name][REASSIGNED], before[name][REASSIGNED]), name
    assert stats(out)["held_rows_vs_input"]["max_abs_change_before_restore"] == 0.0


def test_a_lora_control_trains_adapters_only(tmp_path, tiny_gpt2_dir, packed):
    """The control (no reassigned rows) with training.control_stage2 lora: its adapters merged, every row of
    the embedding as it was."""
    from ivr.train_settings import branch_settings, resolve_settings

    settings = branch_settings(resolve_settings({"stage2": "lora", "control_stage2": "lora", "control_lr": 0.02}),
                               "control")
    assert (settings["stage2"], settings["lr"]) == ("lora", 0.02) and "control_stage2" not in settings
    assert branch_settings(resolve_settings({"stage2": "lora"}), "control")["stage2"] == "lora"
    assert branch_settings(resolve_settings({"stage2": "lora", "control_stage2": "full"}), "control")["stage2"] == "full"
    out = tmp_path / "out"
    run(train_command(tiny_gpt2_dir, packed, out, tmp_path / "ck", None, "stage2=lora", "lr=1e-2", "lora.r=4"))
    after, before = weights(out), weights(tiny_gpt2_dir)
    attn = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(after[attn], before[attn])
    assert torch.equal(after["transformer.wte.weight"], before["transformer.wte.weight"])


def test_lora_stage_is_merged_and_the_output_loads(tmp_path, tiny_gpt2_dir, packed, rules_file):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run(train_command(tiny_gpt2_dir, packed, out, tmp_path / "ck", rules_file, "stage2=lora", "lr=1e-2",
                      "lora.r=4"))
    after = weights(out)
    assert not any("lora" in name for name in after)
    before = weights(tiny_gpt2_dir)
    assert set(after) == set(before)
    attn = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(after[attn], before[attn])  # the adapters were merged into the weights
    emb = "transformer.wte.weight"
    held = np.setdiff1d(np.arange(50257), REASSIGNED)
    assert torch.equal(after[emb][held], before[emb][held])  # LoRA: only the reassigned rows learn
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[40000, 40001, 50256]])).logits
    assert torch.isfinite(logits).all()
    assert [c["stage"] for c in stats(out)["plan"]["stages"]] == [1, 2]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_gpt2_dir, packed, rules_file) -> Path:
    """An uninterrupted run: stage 1 then full fine-tuning."""
    tmp = tmp_path_factory.mktemp("reference")
    run(train_command(tiny_gpt2_dir, packed, tmp / "out", tmp / "ck", rules_file))
    return tmp / "out"


def test_training_compiled_as_one_body_holds_rows_and_starts_at_the_eager_loss(tmp_path, tiny_gpt2_dir, packed,
                                                                                  rules_file, reference):
    """training.compile_scope=body through train_sft.py: both stages, held rows bit-identical, and the
    first loss that of the eager run (compiled dropout draws from the same generator)."""
    out = tmp_path / "out"
    log = run(train_command(tiny_gpt2_dir, packed, out, tmp_path / "ck", rules_file, "compile=true",
                            "compile_scope=body"))
    assert "compiling by blocks" not in log
    before, after = weights(tiny_gpt2_dir), weights(out)
    emb = "transformer.wte.weight"
    assert torch.equal(after[emb][FROZEN], before[emb][FROZEN])
    assert stats(out)["held_rows_vs_input"]["max_abs_change_before_restore"] == 0.0
    assert all(c["max_abs_change"] == 0.0 for c in stats(out)["held_row_checks"])
    assert abs(stats(out)["first_loss"] - stats(reference)["first_loss"]) < 1e-4


def test_tensorboard_event_files_hold_the_loss_curve(reference):
    """What `tensorboard --logdir results/model/sft` plots: the run's loss curve from train_log.jsonl."""
    assert_curve_matches_log(reference)
    loss = [value for _, value in scalars(reference)["loss"]]
    assert len(loss) > 3 and loss[-1] < loss[0]  # it learns


def start_and_kill(command: list[str], checkpoints: Path, after_step: int) -> None:
    """Start a training run and SIGKILL it as soon as a checkpoint past `after_step` exists."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        # complete checkpoints only: a step-N.partial/ may hold a trainer_state.json being written
        done = [json.loads(p.read_text())["step"] for p in checkpoints.glob(f"{CHECKPOINT_GLOB}/trainer_state.json")]
        if done and max(done) > after_step:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    process.kill()
    raise AssertionError("the run ended before it could be killed: " + process.stderr.read()[-2000:])


def test_resume_after_sigkill_ends_at_the_same_step_with_the_same_weights(tmp_path, tiny_gpt2_dir, packed,
                                                                            rules_file, reference):
    command = train_command(tiny_gpt2_dir, packed, tmp_path / "out", tmp_path / "ck", rules_file)
    stage1 = stats(reference)["plan"]["stages"][0]["steps"]
    start_and_kill(command, tmp_path / "ck", after_step=stage1)  # killed inside stage 2
    assert not (tmp_path / "out").exists()
    log = run(command)
    assert "resuming from" in log and "starting fresh" not in log
    ref_log = (reference / "train_log.jsonl").read_text().splitlines()
    new_log = (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in new_log] == [json.loads(l)["step"] for l in ref_log]
    assert json.loads(new_log[-1])["step"] == stats(reference)["plan"]["total_steps"]
    a, b = weights(reference), weights(tmp_path / "out")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert_curve_matches_log(tmp_path / "out")  # the resumed run's TensorBoard curve holds each step once
    # the loss log matches too, except the one window cut by the kill (it averages fewer steps)
    differ = [json.loads(a)["step"] for a, b in zip(ref_log, new_log) if json.loads(a)["loss"] != json.loads(b)["loss"]]
    assert len(differ) <= 1


def test_sigterm_checkpoints_the_step_and_the_rerun_resumes_there_with_the_same_weights(tmp_path, tiny_gpt2_dir,
                                                                                       packed, rules_file,
                                                                                       reference):
    """What a cluster's time limit does: SIGTERM, then a rerun."""
    command = train_command(tiny_gpt2_dir, packed, tmp_path / "out", tmp_path / "ck", rules_file)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not list((tmp_path / "ck").glob("step-*")):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143, stderr[-2000:]
    stopped = re.search(r"SIGTERM: stopped after step (\d+) of", stderr)
    assert stopped, stderr[-2000:]
    assert not (tmp_path / "out").exists()
    log = run(command)
    assert f"step {stopped.group(1)} of" in re.search(r"resuming from .*", log).group(0)
    a, b = weights(reference), weights(tmp_path / "out")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_changed_setting_starts_fresh_instead_of_resuming(tmp_path, tiny_gpt2_dir, packed, rules_file):
    command = train_command(tiny_gpt2_dir, packed, tmp_path / "out", tmp_path / "ck", rules_file)
    start_and_kill(command, tmp_path / "ck", after_step=0)
    log = run(command + ["--set", "lr=3e-4"])  # a different learning rate: stale checkpoints
    assert "from another run (inputs or settings changed): starting fresh" in log
    assert "resuming from" not in log
    assert stats(tmp_path / "out")["settings"]["lr"] == 3e-4


def test_first_loss_far_above_uniform_is_named():
    assert trainer.first_loss_warning(10.0, 50257) is None
    warning = trainer.first_loss_warning(14.0, 50257)
    assert "ln(vocab)" in warning and "padding" in warning and "initialisation" in warning


@pytest.mark.parametrize("max_norm", [1.0, 1e6])
def test_clipping_inside_the_fused_adamw_step_equals_clipping_first(max_norm):
    """prepare_stage's path for a fused AdamW (on GPU): the step divides the gradients by
    max(norm / max_norm, 1) itself. Same norm, optimizer state and weights as clip_grad_norm_ then the
    step, over steps whose gradients are far above the limit (clipped) or far below it (left alone)."""
    torch.manual_seed(0)
    shapes = [(300, 7), (7,), (5, 3, 2)]
    clipped_first = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    in_step = [torch.nn.Parameter(p.detach().clone()) for p in clipped_first]
    unclipped = [torch.nn.Parameter(p.detach().clone()) for p in clipped_first]
    optimizers = [torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True)
                  for ps in (clipped_first, in_step, unclipped)]
    for step in range(3):
        for group in zip(clipped_first, in_step, unclipped):
            grad = torch.randn_like(group[0]) * 10 ** step
            for p in group:
                p.grad = grad.clone()
        norm = torch.nn.utils.clip_grad_norm_(clipped_first, max_norm)
        assert torch.allclose(trainer.clip_in_optimizer_step(optimizers[1], in_step, max_norm), norm)
        for optimizer in optimizers:
            optimizer.step()
    for a, b, c in zip(clipped_first, in_step, unclipped):
        first, inside, plain = (optimizers[i].state[p]["exp_avg"] for i, p in enumerate((a, b, c)))
        assert torch.allclose(inside, first, rtol=1e-5, atol=1e-9) and torch.allclose(b, a, rtol=1e-5, atol=1e-7)
        assert torch.allclose(plain, first) == (max_norm > 1e3)  # the limit was applied only where exceeded


def test_chunked_loss_matches_full_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    targets[::4] = -100
    full = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    grads = torch.autograd.grad(full, (hidden, weight))
    chunked = ivr_loss.linear_cross_entropy(hidden, weight, targets, chunk_tokens=7)
    mine = torch.autograd.grad(chunked, (hidden, weight))
    assert torch.allclose(chunked, full, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(mine, grads))
    # the vocabulary padding used on GPU: padded rows get no probability and no gradient
    padded = torch.nn.functional.pad(weight.detach(), (0, 0, 0, 20))
    scale = 1 / (targets != -100).sum()
    loss, g_h, g_w = ivr_loss._chunk_loss_and_grads(hidden.detach(), padded, targets, scale, 300)
    assert torch.allclose(loss * scale, full, atol=1e-5)
    assert torch.allclose(g_h, grads[0], atol=1e-6) and torch.allclose(g_w[:300], grads[1], atol=1e-6)
    assert not g_w[300:].any()


def tiny_lm(family: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    config = (GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=100) if family == "gpt2" else
              LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=64, num_attention_heads=3,
                          num_key_value_heads=1, vocab_size=100))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def spy_on_sdpa(monkeypatch) -> list[tuple[bool, bool]]:
    """(no mask, is_causal) of every SDPA call from now on; enable_compile's replacement of the loss
    kernel is undone after the test too."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(ivr_loss, "_chunk_fn", ivr_loss._chunk_fn)
    return calls


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_blocks_leave_attention_causal_without_a_dense_mask(monkeypatch, family):
    """Compiled whole, the model would hand SDPA a dense causal mask (twice attention's work on GPU)."""
    model = tiny_lm(family)
    loss_model = ivr_loss.CausalLMLoss(model, chunk_tokens=64)
    ids = torch.randint(0, 100, (2, 16))
    eager_loss = loss_model(ids, ids)
    calls = spy_on_sdpa(monkeypatch)
    torch._dynamo.reset()
    try:
        regions = ivr_loss.compiled_regions(model)
        assert len(regions) == 2 and all(r in list(model.base_model.modules()) for r in regions)
        ivr_loss.enable_compile(loss_model)
        compiled_loss = loss_model(ids, ids)
    finally:
        torch._dynamo.reset()
    assert calls and all(no_mask and causal for no_mask, causal in calls)
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_body_runs_attention_causal_without_a_mask_and_leaves_evaluation_alone(monkeypatch, family):
    """training.compile_scope=body: embedding, every block and the final norm in one graph; traced whole,
    transformers would build a dense causal mask, CAUSAL_SDPA keeps SDPA causal without one. Same loss and
    gradients as eager (GQA included: 3 query heads on 1 key/value head)."""
    model = tiny_lm(family)
    loss_model = ivr_loss.CausalLMLoss(model, chunk_tokens=12)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    eager_loss = loss_model(ids, targets)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    calls = spy_on_sdpa(monkeypatch)
    torch._dynamo.reset()
    try:
        assert ivr_loss.body_without_mask(model) is None
        assert ivr_loss.compiled_regions(model, "body") == [model.base_model]
        assert ivr_loss.enable_compile(loss_model, scope="body") == "body"
        compiled_loss = loss_model(ids, targets)
        compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
        traced = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert model.base_model._compiled_call_impl is not None  # the body itself is compiled, in place
    assert traced >= 1
    assert len(calls) >= 2 and all(no_mask and causal for no_mask, causal in calls)
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(compiled_grads, eager_grads))
    # only our training forward used CAUSAL_SDPA: the model's own forward (evaluation, generation) is
    # back on sdpa and gets its padding mask
    assert model.config._attn_implementation == "sdpa"
    calls.clear()  # the spy is still in place
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        model(ids, attention_mask=padding)
    assert calls and not any(no_mask for no_mask, _ in calls)


@pytest.mark.parametrize("stored", [True, False])
def test_compiled_body_computes_the_rotary_tables_once(monkeypatch, stored):
    """Compiled as one body, inductor would inline the rotary tables' cos and sin into every layer's
    kernels, forward and backward (on an H200 SmolLM2's two rotary kernels took 3.2 ms per step);
    stored once (ivr.loss.store_rotary_tables) the generated code computes them in one place, in the
    forward, and the loss and gradients stay the eager ones."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(ivr_loss, "rotary_tables_stored", stored)
    model = tiny_lm("llama")
    loss_model = ivr_loss.CausalLMLoss(model, chunk_tokens=12)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    eager_loss = loss_model(ids, ids)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))

    def step():
        loss = loss_model(ids, ids)
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    spy_on_sdpa(monkeypatch)  # undoes enable_compile's replacement of the loss kernel afterwards
    torch._dynamo.reset()
    try:
        ivr_loss.enable_compile(loss_model, scope="body")
        (compiled_loss, compiled_grads), codes = run_and_get_code(step)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(compiled_grads, eager_grads))
    # the body's compiled forward and backward (they have its norms' rsqrt; the loss's code has none)
    [forward] = [code for code in codes if "_forward']" in code.split("\n")[0] and "rsqrt" in code]
    [backward] = [code for code in codes if "_backward']" in code.split("\n")[0] and "rsqrt" in code]
    recomputed = len(re.findall(r"\b(?:cos|sin)\(", backward))
    if stored:
        assert "stored_table" in forward and recomputed == 0
    else:
        assert recomputed > 0  # what storing them saves


@pytest.mark.parametrize("scope", ["blocks", "body"])
def test_compiled_training_draws_the_eager_dropout(monkeypatch, scope):
    """With dropout on (GPT-2's 0.1 everywhere), the compiled step takes its random numbers from the
    generator eager training uses (inductor's fallback_random, which enable_compile sets because it is
    also faster on GPU): same seed, same masks, so the same loss and gradients as eager."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", False)
    model = tiny_lm("gpt2").train()
    loss_model = ivr_loss.CausalLMLoss(model, chunk_tokens=12)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    torch.manual_seed(5)
    eager_loss = loss_model(ids, targets)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch.manual_seed(6)
    other_seed = loss_model(ids, targets).detach()
    spy_on_sdpa(monkeypatch)  # undoes enable_compile's replacement of the loss kernel afterwards
    torch._dynamo.reset()
    try:
        ivr_loss.enable_compile(loss_model, scope=scope)
        torch.manual_seed(5)
        compiled_loss = loss_model(ids, targets)
        compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    finally:
        torch._dynamo.reset()
    assert abs(other_seed - eager_loss) > 1e-3  # dropout is on: another seed gives another loss
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(compiled_grads, eager_grads))


def test_held_rows_get_no_gradient_from_a_body_compiled_whole(monkeypatch):
    """The row guard's gradient hook (registered before compiling, as prepare_stage does) still zeroes the
    held rows when the embedding's gradient comes out of the compiled body (tied head: two uses)."""
    from ivr.held_rows import RowGuard

    model = tiny_lm("gpt2")
    weight = model.get_input_embeddings().weight
    held = np.arange(0, 100, 2)
    RowGuard([weight], held, 100)
    loss_model = ivr_loss.CausalLMLoss(model, chunk_tokens=12)
    monkeypatch.setattr(ivr_loss, "_chunk_fn", ivr_loss._chunk_fn)
    torch._dynamo.reset()
    try:
        assert ivr_loss.enable_compile(loss_model, scope="body") == "body"
        ids = torch.arange(32).reshape(2, 16) * 3 % 100
        loss_model(ids, ids.roll(-1, 1)).backward()
    finally:
        torch._dynamo.reset()
    assert not weight.grad[held].any()
    assert weight.grad[np.setdiff1d(np.arange(100), held)].abs().sum(dim=1).gt(0).sum() > 40


def test_a_model_without_plain_causal_attention_is_compiled_by_blocks(monkeypatch):
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=100, sliding_window=8)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert "sliding" in ivr_loss.body_without_mask(model)
    monkeypatch.setattr(ivr_loss, "_chunk_fn", ivr_loss._chunk_fn)
    loss_model = ivr_loss.CausalLMLoss(model, chunk_tokens=12)
    assert ivr_loss.enable_compile(loss_model, scope="body") == "blocks" and not loss_model.causal_attention
    assert model.base_model._compiled_call_impl is None
    assert all(block._compiled_call_impl is not None for block in model.base_model.layers)
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert "eager" in ivr_loss.body_without_mask(eager)
    assert ivr_loss.body_without_mask(tiny_lm("gpt2")) is None


def test_compile_scope_body_only_where_one_graph_may_span_the_blocks():
    from types import SimpleNamespace

    def scope(kind, settings):
        return trainer.compile_scope(SimpleNamespace(distributed_type=SimpleNamespace(name=kind)), settings)

    assert scope("NO", {"compile_scope": "body"}) == "body" and scope("MULTI_GPU", {"compile_scope": "body"}) == "body"
    assert scope("DEEPSPEED", {"compile_scope": "body"}) == "blocks" and scope("FSDP", {"compile_scope": "body"}) == "blocks"
    assert scope("NO", {"compile_scope": "blocks"}) == "blocks" and scope("NO", {}) == "blocks"


def test_cuda_graphs_only_where_one_process_replays_the_whole_step():
    from types import SimpleNamespace

    def uses(kind, device, **changes):
        accelerator = SimpleNamespace(distributed_type=SimpleNamespace(name=kind), device=torch.device(device))
        return trainer.cuda_graphs_off(accelerator, {"cuda_graphs": True, "compile": True, **changes}) is None

    assert uses("NO", "cuda")
    assert not uses("NO", "cpu")  # inductor would skip the graphs there anyway
    assert not any(uses(kind, "cuda") for kind in ("MULTI_GPU", "DEEPSPEED", "FSDP"))
    assert not uses("NO", "cuda", compile=False) and not uses("NO", "cuda", cuda_graphs=False)
    assert uses("NO", "cuda", gradient_accumulation=1) and not uses("NO", "cuda", gradient_accumulation=2)
    accelerator = SimpleNamespace(distributed_type=SimpleNamespace(name="NO"), device=torch.device("cuda"))
    why = trainer.cuda_graphs_off(accelerator, {"cuda_graphs": True, "compile": True, "gradient_accumulation": 4})
    assert "gradient_accumulation" in why  # what the training log says when graphs were asked for


def test_cuda_graphs_compile_the_transformer_for_replay_and_every_step_starts_a_new_replay(monkeypatch):
    """training.cuda_graphs: the body in reduce-overhead mode (the loss kernel in the default mode), one
    cudagraph_mark_step_begin per step (a replay overwrites the outputs of the one before), and the same
    loss as eager (on CPU inductor runs the graphs' code without recording them)."""
    from accelerate import Accelerator

    modes, marks = [], []
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kwargs: (modes.append(kwargs.get("mode")), compile_module(self, **kwargs))[1])
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(ivr_loss, "_chunk_fn", ivr_loss._chunk_fn)
    model = tiny_lm("llama").train()
    loss_model = ivr_loss.CausalLMLoss(model, chunk_tokens=12)
    generator = torch.Generator().manual_seed(2)
    batches = [{"input_ids": ids, "targets": ids.roll(-1, 1)}
               for ids in (torch.randint(0, 100, (2, 16), generator=generator) for _ in range(2))]
    with torch.no_grad():
        eager_first = loss_model(batches[0]["input_ids"], batches[0]["targets"])
    torch._dynamo.reset()
    try:
        assert ivr_loss.enable_compile(loss_model, scope="body", cuda_graphs=True) == "body"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        accelerator = Accelerator(cpu=True)
        prepared = trainer.Prepared(loss_model, optimizer, None, None, None, {}, cuda_graphs=True)
        batch_iter = iter(batches)
        losses, grad_norm = trainer.optimizer_step(accelerator, prepared, batch_iter, 1, 1.0)
        losses += trainer.optimizer_step(accelerator, prepared, batch_iter, 1, 1.0)[0]
    finally:
        torch._dynamo.reset()
    assert modes == ["reduce-overhead"]
    ivr_loss.enable_compile(ivr_loss.CausalLMLoss(tiny_lm("llama"), chunk_tokens=12), "max-autotune-no-cudagraphs",
                            scope="body", cuda_graphs=True)
    torch._dynamo.reset()
    assert modes[1:] == ["max-autotune"]  # the mode asked for, with graphs (bench/train_throughput.py --levers)
    assert len(marks) == 2 and len(losses) == 2 and grad_norm is not None
    assert torch.allclose(losses[0], eager_first, atol=1e-5)


def test_deepspeed_config_drops_the_bf16_overflow_scan_unless_the_user_set_it():
    settings = {"grad_clip": 1.0}
    config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
    trainer.configure_deepspeed(config, settings)
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert config["gradient_clipping"] == 1.0 and config["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    mine = {"bf16": {"enabled": True, "check_grad_overflow": True}, "zero_optimization": {"stage": 2,
                                                                                        "overlap_comm": False}}
    trainer.configure_deepspeed(mine, settings)
    assert mine["bf16"]["check_grad_overflow"] is True and mine["zero_optimization"]["overlap_comm"] is False


# ---- budget and the dev split -------------------------------------------------------------------------

@pytest.mark.parametrize("budget,expected", [(1.0, 40), (0.5, 20), (0.22, 9), (2.0, 80)])
def test_budget_is_a_share_of_the_controls_steps(budget, expected):
    """The control makes 2 passes over 640 blocks (40 steps of 32 blocks); IVR, with the same batch shape,
    takes the budget's share of those steps: at 1.0 exactly the control's tokens and FLOPs."""
    from ivr.compute import plan_steps
    from ivr.train_settings import resolve_settings

    settings = resolve_settings({"epochs": 2.0, "budget": budget})
    control = {"blocks": 640, "block_size": 1024, "tokens": 640 * 1024}
    ivr = {"blocks": 150, "block_size": 1024, "tokens": 150 * 1024}  # the same documents, fewer tokens
    assert plan_steps(settings, control, 32) == 40
    assert plan_steps(settings, ivr, 32, reference=control) == expected
    one_pass = resolve_settings({"epochs": 2.0, "budget": "one_pass"})
    assert plan_steps(one_pass, ivr, 32, reference=control) == 10  # 2 passes over its own 150 blocks
    tokens = resolve_settings({"max_tokens": 32 * 1024 * 25, "budget": 1.0})
    assert plan_steps(tokens, control, 32) == 25 == plan_steps(tokens, ivr, 32, reference=control)


def test_dev_bits_per_byte_in_the_log_equal_the_saved_models(tmp_path, tiny_gpt2_dir, packed, rules_file, korean_texts):
    """The train log's dev measurement is the project's bits_per_byte of the model being trained: after
    the last step it equals what ivr.metrics says of the saved model on the same documents."""
    from ivr.metrics import bits_per_byte
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in korean_texts[:5]), encoding="utf-8")
    command = train_command(tiny_gpt2_dir, packed, tmp_path / "out", tmp_path / "ck", rules_file,
                            "eval_every=3", "eval_documents=4", "eval_byte_budget=200")
    run(command + ["--dev", str(dev)])
    records = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    total = stats(tmp_path / "out")["optimizer_steps"]
    measured = [r for r in records if "dev_bpb" in r]
    assert [r["step"] for r in measured] == sorted({0, *range(3, total + 1, 3), total})
    assert len({r["step"] for r in records}) == len(records)  # one record a step
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    expected = bits_per_byte(model, tokenizer, korean_texts[:4], 200).bits_per_byte
    assert measured[-1]["dev_bpb"] == pytest.approx(expected, abs=2e-6)
    assert stats(tmp_path / "out")["dev_bpb"] == {"dev_bpb": measured[-1]["dev_bpb"]}
    assert stats(tmp_path / "out")["wall_clock_s"] > 0  # training time, without the dev measurements
