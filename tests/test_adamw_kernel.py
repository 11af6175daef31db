"""ivr.adamw_kernel on a GPU: the Triton AdamW step computes what torch's fused AdamW computes, with and
without clipping (`grad_scale`), decay in one group and not the other, rows whose gradient is held at
zero, sizes that end inside a program's block, gradients at new addresses each step, and a resume from
a saved state. Needs CUDA (skipped elsewhere); on the GPU machine: `python3 -m pytest tests/test_adamw_kernel.py`."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels need a CUDA device")

SHAPES = [(50304, 64), (3000,), (768,), (4, 4), (2048 * 3 + 4,)]


def make_params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, device="cuda", generator=generator)) for shape in SHAPES]


def groups(params):
    return [{"params": params[:1] + params[3:], "weight_decay": 0.0}, {"params": params[1:3], "weight_decay": 0.1}]


def set_grads(params, step: int) -> None:
    generator = torch.Generator(device="cuda").manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=generator) * (10.0 if step % 2 else 1e-3)
    params[0].grad[:100] = 0  # held rows: masked to zero before every step


def run(optimizer_class, params, steps: range, optimizer=None, clip_steps=(2, 3)):
    optimizer = optimizer or optimizer_class(groups(params), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for step in steps:
        set_grads(params, step)
        optimizer.grad_scale = torch.tensor(2.5, device="cuda") if step in clip_steps else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def assert_same(mine, reference, rtol=1e-5, atol=1e-6):
    # fp32 arithmetic where torch's kernel does parts in double: a few ulps of the O(1) starting values
    for got, expected in zip(mine, reference):
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def test_triton_adamw_equals_torch_fused_adamw():
    from ivr.adamw_kernel import TritonAdamW

    mine, reference = make_params(0), make_params(0)
    held = mine[0].detach()[:100].clone()
    ours = run(TritonAdamW, mine, range(6))
    torch_opt = run(torch.optim.AdamW, reference, range(6))
    assert_same(mine, reference)
    assert torch.equal(mine[0].detach()[:100], held)  # no gradient, no decay: not moved at all
    for p, q in zip(mine, reference):
        assert_same([ours.state[p]["exp_avg"], ours.state[p]["exp_avg_sq"]],
                    [torch_opt.state[q]["exp_avg"], torch_opt.state[q]["exp_avg_sq"]])
        assert ours.state[p]["step"].item() == torch_opt.state[q]["step"].item() == 6
        assert ours.state[p]["step"].dtype == torch_opt.state[q]["step"].dtype
    assert ours._tables, "the Triton kernel ran"


def test_resume_from_a_saved_state_continues_the_same_run():
    from ivr.adamw_kernel import TritonAdamW

    straight = make_params(1)
    run(TritonAdamW, straight, range(5))
    first, resumed = make_params(1), make_params(1)
    # a copy, as a checkpoint on disk is: load_state_dict keeps the very tensors it is given
    saved = copy.deepcopy(run(TritonAdamW, first, range(3)).state_dict())
    with torch.no_grad():
        for p, q in zip(resumed, first):
            p.copy_(q)
    optimizer = TritonAdamW(groups(resumed), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    optimizer.load_state_dict(copy.deepcopy(saved))
    run(TritonAdamW, resumed, range(3, 5), optimizer=optimizer)
    assert_same(resumed, straight, rtol=0, atol=0)
    # and torch's fused AdamW resumes from the same state alike (the checkpoint format is torch's)
    other = make_params(1)
    with torch.no_grad():
        for p, q in zip(other, first):
            p.copy_(q)
    torch_opt = torch.optim.AdamW(groups(other), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    torch_opt.load_state_dict(saved)
    run(torch.optim.AdamW, other, range(3, 5), optimizer=torch_opt)
    assert_same(other, straight)


def test_tensors_the_kernel_cannot_take_fall_back_to_torch():
    from ivr.adamw_kernel import TritonAdamW

    odd = [torch.nn.Parameter(torch.randn(7, device="cuda")), *make_params(2)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in odd]
    ours = TritonAdamW(odd, lr=1e-2, fused=True)
    torch_opt = torch.optim.AdamW(reference, lr=1e-2, fused=True)
    for step in range(3):
        for params, optimizer in ((odd, ours), (reference, torch_opt)):
            set_grads(params[1:], step)
            params[0].grad = torch.ones(7, device="cuda")
            optimizer.step()
    assert not ours._tables  # a size of 7: torch's step each time
    assert_same(odd, reference, rtol=0, atol=0)


def test_a_loaded_state_the_kernel_cannot_address_falls_back_to_torch():
    from ivr.adamw_kernel import TritonAdamW

    straight = make_params(3)
    run(TritonAdamW, straight, range(5))
    first, resumed = make_params(3), make_params(3)
    saved = copy.deepcopy(run(TritonAdamW, first, range(3)).state_dict())
    for state in saved["state"].values():  # the same values 4 bytes off 16-byte alignment
        moved = torch.empty(state["exp_avg"].numel() + 1, device="cuda")[1:].view_as(state["exp_avg"])
        state["exp_avg"] = moved.copy_(state["exp_avg"])
    with torch.no_grad():
        for p, q in zip(resumed, first):
            p.copy_(q)
    optimizer = TritonAdamW(groups(resumed), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    optimizer.load_state_dict(saved)
    run(TritonAdamW, resumed, range(3, 5), optimizer=optimizer)
    assert not optimizer._tables  # torch's step both times
    assert_same(resumed, straight)
