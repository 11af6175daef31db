"""What the throughput benchmark's parts share (bench/train_throughput.py): the models built from their
configs, random token blocks, the timing of steps and the RESULT line a measurement prints."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from ivr.packed_data import IGNORE  # noqa: E402

PEAK_FLOPS = 989e12
SEQ = 1024  # --seq changes it (small values only make sense for a CPU smoke test)
MODELS = ("gpt2", "smollm2")
NAMES = {"gpt2": "GPT-2 124M", "smollm2": "SmolLM2-135M"}
SCOPE_NAMES = {"body": "ours (body)", "blocks": "ours (blocks)", "graphs": "ours (body, CUDA graphs)",
               "eager": "ours (eager)"}
SCOPES = ("blocks", "body", "graphs")  # graphs: the body compiled with training.cuda_graphs


def set_seq(seq: int) -> None:
    global SEQ
    SEQ = seq


def model_config(name: str, untied: bool = False):
    from transformers import GPT2Config, LlamaConfig

    if name == "gpt2":
        return GPT2Config(n_positions=SEQ, tie_word_embeddings=not untied)
    if name == "smollm2":
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                           rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=not untied)
    raise SystemExit(f"unknown model {name}")


def build_model(name: str, untied: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(name, untied), attn_implementation="sdpa",
                                            dtype=torch.float32)


class RandomBlocks(torch.utils.data.Dataset):
    """Seeded random token blocks, shaped like train_sft's packed blocks."""

    def __init__(self, blocks: int, vocab: int, seq: int, hf: bool = False) -> None:
        self.ids = torch.randint(0, vocab, (blocks, seq), generator=torch.Generator().manual_seed(0))
        self.hf = hf

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        if self.hf:
            return {"input_ids": ids, "labels": ids}
        targets = torch.full_like(ids, IGNORE)
        targets[:-1] = ids[1:]
        return {"input_ids": ids, "targets": targets}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def result(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


def environment() -> dict:
    import transformers

    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "torch": torch.__version__, "transformers": transformers.__version__}


class StepTimes:
    """The timed window's wall-clock (what tokens/s is computed from) and, on GPU, each step's time on
    the stream from CUDA events: a median step far from the mean flags a disturbed window."""

    def __init__(self) -> None:
        self.events: list = []
        self.started = 0.0
        self.seconds = 0.0

    def start(self) -> None:
        sync()
        self.started = time.perf_counter()
        if torch.cuda.is_available():
            self.events = [torch.cuda.Event(enable_timing=True)]
            self.events[0].record()

    def step(self) -> None:
        if self.events:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()

    def stop(self) -> None:
        sync()
        self.seconds = time.perf_counter() - self.started

    def record(self, steps: int, tokens_per_step: int) -> dict:
        out = {"tokens_per_s": steps * tokens_per_step / self.seconds, "seconds": self.seconds}
        if len(self.events) > 1:
            ms = sorted(a.elapsed_time(b) for a, b in zip(self.events, self.events[1:]))
            median = (ms[(len(ms) - 1) // 2] + ms[len(ms) // 2]) / 2
            out["median_step_tokens_per_s"] = tokens_per_step / (median / 1e3)
            out["step_ms"] = [round(ms[0], 2), round(median, 2), round(ms[-1], 2)]
        return out
