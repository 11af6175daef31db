"""Loading causal LMs safely, and finding (or replacing) their input-embedding and output-head matrices."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ivr.cli import UserError, first_line
from ivr.files import looks_local


@dataclass(frozen=True)
class EmbeddingLayout:
    """Where a model keeps its token matrices, as parameter names of the loaded model."""

    input_name: str  # e.g. model.embed_tokens.weight (Llama) or transformer.wte.weight (GPT-2)
    output_name: str | None  # e.g. lm_head.weight; None when the head is tied to the input matrix
    rows: int
    dim: int

    @property
    def tied(self) -> bool:
        return self.output_name is None


def _check_local(name_or_path: str) -> None:
    path = Path(name_or_path)
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise UserError(f"{path}: holds no .safetensors weights (other weight formats are refused: they can run code)")
    elif path.exists():
        raise UserError(f"{path}: expected a model folder, not a file")
    elif looks_local(name_or_path):
        raise UserError(f"{name_or_path}: model folder does not exist")


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
):
    """A causal LM from a local folder or hub id, from safetensors only, in eval mode."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    name = str(name_or_path)
    _check_local(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype
        )
    except SafetensorError as err:  # a damaged or truncated weights file
        raise UserError(f"{name}: a .safetensors weights file is not readable ({first_line(err)})") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{name}: cannot load a causal LM ({first_line(err)})") from None
    return model.to(device).eval()


def _module_name(model: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, module in model.named_modules(remove_duplicate=False):
        if module is target:
            return name
    raise UserError(f"{type(model).__name__}: embedding module not found among the model's modules")


def embedding_layout(model: torch.nn.Module) -> EmbeddingLayout:
    """Names and shape of the input embedding and output head; a tied head has no name of its own."""
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if inp is None or out is None or getattr(out, "weight", None) is None:
        raise UserError(f"{type(model).__name__}: no input embedding or no LM head; a causal LM is needed")
    rows, dim = inp.weight.shape
    if tuple(out.weight.shape) != (rows, dim):
        raise UserError(
            f"{type(model).__name__}: LM head shape {tuple(out.weight.shape)} differs from the input "
            f"embedding's {(rows, dim)}"
        )
    if getattr(out, "bias", None) is not None:
        raise UserError(f"{type(model).__name__}: LM heads with a bias are not supported")
    tied = out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr()
    return EmbeddingLayout(
        input_name=f"{_module_name(model, inp)}.weight",
        output_name=None if tied else f"{_module_name(model, out)}.weight",
        rows=rows,
        dim=dim,
    )


def embedding_matrices(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input matrix and, when untied, the output matrix (detached views, not copies)."""
    layout = embedding_layout(model)
    inp = model.get_input_embeddings().weight.detach()
    out = None if layout.tied else model.get_output_embeddings().weight.detach()
    return inp, out


@torch.no_grad()
def set_embedding_matrices(model: torch.nn.Module, input_matrix: torch.Tensor, output_matrix: torch.Tensor | None) -> None:
    """Copy new matrices into the model in place; shapes must not change, tied stays tied."""
    layout = embedding_layout(model)
    if tuple(input_matrix.shape) != (layout.rows, layout.dim):
        raise UserError(f"input embeddings of shape {tuple(input_matrix.shape)}; the model has {(layout.rows, layout.dim)}")
    if layout.tied != (output_matrix is None):
        have = "tied" if layout.tied else "untied"
        raise UserError(f"the model's LM head is {have}, the embeddings given are not")
    weight = model.get_input_embeddings().weight
    weight.copy_(input_matrix.to(weight.dtype))
    if output_matrix is not None:
        if tuple(output_matrix.shape) != (layout.rows, layout.dim):
            raise UserError(f"output embeddings of shape {tuple(output_matrix.shape)}; the model has {(layout.rows, layout.dim)}")
        head = model.get_output_embeddings().weight
        head.copy_(output_matrix.to(head.dtype))


def embedding_weights(model) -> list[torch.nn.Parameter]:
    """The input embedding matrix and, when not tied to it, the output head's."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    return [emb] if head is emb else [emb, head]


def load_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Load a state from full_state(); only the duplicate names of tied weights may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"state does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
