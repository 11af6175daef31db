"""Held rows: embedding rows that must not move during a stage, masked and proven unmoved, and the full
fp32 weights behind DeepSpeed and FSDP."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ivr.modeling import embedding_weights


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


def full_fp32(accelerator, param: torch.Tensor) -> torch.Tensor:
    """The whole fp32 value of a trainable parameter: DeepSpeed's master copy, a gathered FSDP shard,
    or the parameter itself. Collective under ZeRO-3 and FSDP: every process must call it."""
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    if hasattr(param, "full_tensor"):
        return param.detach().full_tensor()
    return param.detach()


class RowGuard:
    """Holds rows of the embedding (and of an untied head) fixed and proves they did not move.

    A gradient hook registered before accelerator.prepare zeroes the held rows' gradient; with tied
    weights the one matrix gets one hook that covers both uses. DeepSpeed and DDP keep the parameter
    objects, so the hook stays; FSDP replaces them by sharded ones, and then mask_grads() applies the
    same mask to the sharded gradients before clipping and the optimizer step.
    """

    def __init__(self, weights: list[torch.nn.Parameter], held_rows: np.ndarray, num_rows: int) -> None:
        keep = torch.ones(num_rows, 1)
        keep[torch.from_numpy(held_rows)] = 0
        self.keep = keep
        self.held = torch.from_numpy(held_rows)
        self.params = [w for w in weights if w.requires_grad]
        self.hooked = list(self.params)
        self._keep_cache: dict = {}
        for weight in self.params:
            weight.register_hook(self._mask)
        self.explicit = False
        self.reference: list[torch.Tensor] = []

    def _keep_like(self, grad: torch.Tensor) -> torch.Tensor:
        key = (grad.device, grad.dtype)
        if key not in self._keep_cache:
            self._keep_cache[key] = self.keep.to(grad.device, grad.dtype)
        return self._keep_cache[key]

    def _mask(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self._keep_like(grad)

    def after_prepare(self, accelerator, loss_model) -> None:
        current = [w for w in embedding_weights(accelerator.unwrap_model(loss_model).model) if w.requires_grad]
        if len(current) != len(self.hooked) or any(a is not b for a, b in zip(current, self.hooked)):
            self.explicit = True
            self.params = current
        self.reference = self.held_values(accelerator)

    def mask_grads(self) -> None:
        if not self.explicit:
            return
        for param in self.params:
            grad = param.grad
            if grad is None:
                continue
            if hasattr(grad, "to_local"):
                from torch.distributed.tensor import distribute_tensor

                key = ("dtensor", id(param))
                if key not in self._keep_cache:
                    keep = self.keep.to(grad.to_local().device, grad.dtype)
                    self._keep_cache[key] = distribute_tensor(keep, grad.device_mesh, grad.placements).to_local()
                grad.to_local().mul_(self._keep_cache[key])
            else:
                grad.mul_(self._keep_like(grad))

    def held_values(self, accelerator) -> list[torch.Tensor]:
        values = []
        for param in self.params:
            full = full_fp32(accelerator, param)
            values.append(full[self.held.to(full.device)].float().clone())
        return values

    def max_change(self, accelerator) -> float:
        changes = [(now - ref).abs().max() for now, ref in zip(self.held_values(accelerator), self.reference)
                   if ref.numel()]
        return float(torch.stack(changes).max()) if changes else 0.0

    def digest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for ref in self.reference:
            h.update(ref.cpu().numpy().tobytes())
        return h.hexdigest()


def full_state(accelerator, loss_model, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the (peft) model on CPU, on every process.

    Parameters that did not train are taken from `originals`, their values before prepare: DeepSpeed
    casts them to bf16 and keeps no fp32 copy of them.
    """
    model = accelerator.unwrap_model(loss_model).model
    state = {}
    for name, param in model.named_parameters():
        value = originals[name] if name in originals else full_fp32(accelerator, param)
        state[name] = value.detach().to("cpu", torch.float32, copy=True)
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[f"{module_name}.{name}" if module_name else name] = buffer.detach().cpu().clone()
    return state
