"""training.cuda_graphs on a GPU: the compiled body replayed as CUDA graphs trains exactly as it does without
them, in both kinds of stage, after an evaluation in eval mode (what the dev split's measurement does before
the first step). Needs CUDA (skipped elsewhere); on the GPU machine:
`python3 -m pytest tests/test_cuda_graphs.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ivr import trainer
from ivr.stages import Stage
from ivr.train_settings import resolve_settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

ROWS = 100
HELD = np.arange(90, ROWS)  # rows of the embedding that must not move


def train(cuda_graphs: bool, kind: str, steps: int = 7, accumulate: int = 1):
    """`steps` optimizer steps of a tiny Llama (no dropout) through the training loop's own pieces: body
    compiled, bf16 autocast, clipping that bites, a warm-up-then-decay schedule, a held-row guard; before
    them, one forward in eval mode without gradients."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch._dynamo.reset()
    settings = resolve_settings({}, ["micro_batch_size=4", f"gradient_accumulation={accumulate}", "compile=true",
                                     "compile_scope=body", f"cuda_graphs={str(cuda_graphs).lower()}",
                                     "loss_chunk_tokens=48", "weight_decay=0.1", "warmup_share=0.3",
                                     "grad_clip=0.05", "lr=3e-3"], validate=False)
    accelerator = trainer.make_accelerator(settings)
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=ROWS, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    stage = Stage(1 if kind == "rows" else 2, kind, 0, steps, settings["lr"], np.arange(90), HELD)
    model = trainer.set_trainable(model, stage, settings)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ROWS, (steps * accumulate * 4, 33), generator=generator)
    data = [{"input_ids": row[:-1], "targets": row[1:]} for row in ids]
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    prepared = trainer.prepare_stage(accelerator, stage, model, loader, settings, ROWS)
    prepared.guard.after_prepare(accelerator, prepared.loss_model)
    lm = accelerator.unwrap_model(prepared.loss_model).lm
    lm.eval()
    with torch.no_grad():
        lm(input_ids=ids[:2, :-1].to(accelerator.device))
    prepared.loss_model.train()
    batches = iter(prepared.loader)
    losses, norms, lrs = [], [], []
    for _ in range(steps):
        step_losses, grad_norm = trainer.optimizer_step(accelerator, prepared, batches, accumulate,
                                                        settings["grad_clip"])
        losses.append(torch.stack(step_losses).float().cpu())
        norms.append(float(grad_norm))
        lrs.append(prepared.optimizer.param_groups[0]["lr"])
        prepared.scheduler.step()
    params = {n: p.detach().float().cpu().clone() for n, p in prepared.loss_model.named_parameters()}
    return prepared, torch.stack(losses), norms, lrs, params, prepared.guard.max_change(accelerator)


@pytest.fixture
def deterministic(monkeypatch):
    """torch's deterministic algorithms for the test: the compiled embedding backward then sums its
    gradient without atomic adds (inductor falls back to ATen's sorted index_put), which otherwise adds in
    an order that differs from run to run. Under bf16 autocast a last-bit change there can round an
    activation the other way, and Adam turns that into differences far above 1e-6 in rows with tiny
    gradients (stage 1 failed that way on an H200, on the norms once and on lm_head's weights once)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS asks for it under deterministic mode
    torch.use_deterministic_algorithms(True, warn_only=True)  # where an op has no such version: a warning
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("kind", ["rows", "full"])
def test_the_replayed_graphs_train_exactly_like_the_compiled_body_without_them(kind, deterministic):
    graphed, losses, norms, lrs, params, held_change = train(True, kind)
    assert graphed.cuda_graphs
    eager, eager_losses, eager_norms, eager_lrs, eager_params, _ = train(False, kind)
    assert not eager.cuda_graphs
    assert lrs == eager_lrs and len(set(lrs)) > 3
    assert torch.isfinite(losses).all() and min(norms) > 0.05  # clipping scaled every step's gradients
    torch.testing.assert_close(losses, eager_losses, rtol=0, atol=1e-5)
    # A replay reusing memory it should not would be off by far more than these tolerances.
    assert norms == pytest.approx(eager_norms, rel=2e-4)
    for name, value in params.items():
        torch.testing.assert_close(value, eager_params[name], rtol=0, atol=1e-6, msg=name)
    assert held_change == 0.0
