"""AdamW's CUDA step as one Triton launch per parameter group (CUDA only; imported there).

torch's fused AdamW launches one kernel per list of a few dozen tensors, each with at most 320 blocks,
so a model's ~150 parameters take ~20 launches that end in partial waves, and when it clips (`grad_scale`)
it writes every gradient back divided. Here each program updates BLOCK elements of one parameter, which
it finds through tables of where the tensors lie, so one launch covers a whole group, and the gradients
are only read. The arithmetic is torch's: decoupled decay, the two moments, then the bias-corrected step,
in fp32, with the bias corrections computed on the host in double as torch computes them. The state
(`step`, `exp_avg`, `exp_avg_sq`) is torch's, so checkpoints load either way. A step whose tensors
(parameters, gradients, moments) do not fit the kernel (not fp32, not contiguous, not 16-byte aligned, a
size not a multiple of 4) or that uses an option it lacks (amsgrad, maximize, found_inf, a tensor lr) is
torch's fused step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 512  # elements per program (bench/adamw_speed.py measures the choices)
WARPS = 4


@triton.jit
def _adamw_blocks(block_tensor, block_start, numels, offsets, base, grad_scale, tensors, lr_decay, beta1,
                  one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
                  SCALED: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    tensor = tl.load(block_tensor + block)
    start = tl.multiple_of(tl.load(block_start + block), BLOCK)
    elements = start + tl.arange(0, BLOCK)
    inside = elements < tl.multiple_of(tl.load(numels + tensor), 4)
    # offsets holds four rows of `tensors` entries, in elements from `base` (multiples of 4, so that the
    # loads below stay 16-byte vectors): parameters, gradients, exp_avg, exp_avg_sq
    param_ptr = base + tl.multiple_of(tl.load(offsets + tensor), 4) + elements
    grad_ptr = base + tl.multiple_of(tl.load(offsets + tensors + tensor), 4) + elements
    avg_ptr = base + tl.multiple_of(tl.load(offsets + 2 * tensors + tensor), 4) + elements
    sq_ptr = base + tl.multiple_of(tl.load(offsets + 3 * tensors + tensor), 4) + elements
    param = tl.load(param_ptr, mask=inside)
    grad = tl.load(grad_ptr, mask=inside)
    exp_avg = tl.load(avg_ptr, mask=inside)
    exp_avg_sq = tl.load(sq_ptr, mask=inside)
    if SCALED:
        grad = tl.div_rn(grad, tl.load(grad_scale))
    param = param - lr_decay * param
    exp_avg = beta1 * exp_avg + one_minus_beta1 * grad
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * grad * grad
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    param = param - tl.div_rn(step_size * exp_avg, denom)
    tl.store(param_ptr, param, mask=inside)
    tl.store(avg_ptr, exp_avg, mask=inside)
    tl.store(sq_ptr, exp_avg_sq, mask=inside)


def _fits(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_cuda and t.is_contiguous() and t.data_ptr() % 16 == 0 \
        and t.numel() % 4 == 0


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (fused) whose step is one Triton launch per parameter group and step count."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{**kwargs, "fused": True})
        self._tables: dict[tuple, tuple] = {}  # the tensors' addresses and sizes -> their device tables
        self._host_steps: dict[int, tuple[torch.Tensor, int]] = {}  # id(param) -> (state["step"], its value)

    def _kernel_fits(self) -> bool:
        if getattr(self, "found_inf", None) is not None:
            return False
        scale = getattr(self, "grad_scale", None)
        if scale is not None and not (scale.dtype == torch.float32 and scale.is_cuda and scale.numel() == 1):
            return False
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or torch.is_tensor(group["lr"]):
                return False
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not (_fits(p) and _fits(p.grad) and p.device == p.grad.device):
                    return False
                state = self.state.get(p)  # a loaded state keeps the layout it was given
                if state and not (_fits(state["exp_avg"]) and _fits(state["exp_avg_sq"])):
                    return False
        return True

    def _state(self, p: torch.Tensor) -> tuple[dict, int]:
        """p's AdamW state (made as torch's fused AdamW makes it) and its step count, known on the host."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._host_steps[id(p)] = (state["step"], 0)
        known = self._host_steps.get(id(p))
        if known is None or known[0] is not state["step"]:  # loaded from a checkpoint: read it once
            known = (state["step"], int(state["step"].item()))
            self._host_steps[id(p)] = known
        return state, known[1]

    @torch.no_grad()
    def step(self, closure=None):
        if not self._kernel_fits():
            self._host_steps.clear()  # torch's step advances the counts on the device
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = getattr(self, "grad_scale", None)
        steps = []
        for group in self.param_groups:
            by_count: dict[int, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, count = self._state(p)
                by_count.setdefault(count + 1, []).append((p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
                steps.append(state["step"])
                self._host_steps[id(p)] = (state["step"], count + 1)
            for count, tensors in by_count.items():
                self._launch(group, count, tensors, scale)
        if steps:
            torch._foreach_add_(steps, 1)
        return loss

    def _launch(self, group: dict, count: int, tensors: list, scale: torch.Tensor | None) -> None:
        key = tuple(t.data_ptr() for quad in tensors for t in quad) + tuple(quad[0].numel() for quad in tensors)
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) >= 8:  # addresses that changed: forget the oldest
                self._tables.pop(next(iter(self._tables)))
            tables = self._tables[key] = _device_tables(tensors)
        block_tensor, block_start, numels, offsets = tables
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        bias_correction1 = 1 - beta1 ** count
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** count)
        _adamw_blocks[(block_tensor.numel(),)](
            block_tensor, block_start, numels, offsets, tensors[0][0], scale if scale is not None else numels,
            len(tensors), lr * group["weight_decay"], beta1, 1 - beta1, beta2, 1 - beta2, group["eps"],
            lr / bias_correction1, bias_correction2_sqrt, SCALED=scale is not None, BLOCK=BLOCK, num_warps=WARPS)


def _device_tables(tensors: list) -> tuple[torch.Tensor, ...]:
    """Which tensor and which offset each program updates, the tensors' sizes, and where they lie in
    elements from the first parameter's address."""
    device = tensors[0][0].device
    numels = np.array([quad[0].numel() for quad in tensors], dtype=np.int64)
    blocks = (numels + BLOCK - 1) // BLOCK
    block_tensor = np.repeat(np.arange(len(tensors), dtype=np.int32), blocks)
    first_block = np.repeat(np.cumsum(blocks) - blocks, blocks)
    block_start = (np.arange(int(blocks.sum()), dtype=np.int64) - first_block) * BLOCK
    base = tensors[0][0].data_ptr()
    offsets = np.array([[(quad[row].data_ptr() - base) // 4 for quad in tensors] for row in range(4)], dtype=np.int64)
    # pinned and not waited for: a blocking copy would wait for the GPU whenever the addresses change
    return tuple(torch.from_numpy(a).pin_memory().to(device, non_blocking=True)
                 for a in (block_tensor, block_start, numels, offsets))
