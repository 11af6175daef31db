"""ivr.loss_kernel on a GPU: the Triton kernel that turns a chunk's logits into their gradient computes
what the PyTorch reference (ivr.loss._chunk_loss_and_grads) computes: the same summed loss and the same
gradients, with ignored targets, the vocabulary's alignment padding, bf16 and fp32. Needs CUDA (skipped
elsewhere); on the GPU machine: `python3 -m pytest tests/test_loss_kernel.py`."""

from __future__ import annotations

import pytest
import torch

from ivr import loss as ivr_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels need a CUDA device")


@pytest.mark.parametrize("dtype,vocab,columns", [(torch.bfloat16, 50257, 50304), (torch.bfloat16, 49152, 49152),
                                                 (torch.float32, 1000, 1024)])
def test_triton_chunk_equals_the_pytorch_reference(monkeypatch, dtype, vocab, columns):
    from ivr.loss_kernel import chunk_loss_and_grads

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    generator = torch.Generator(device="cuda").manual_seed(0)
    tokens, width = 300, 64
    h = torch.randn(tokens, width, device="cuda", generator=generator).to(dtype)
    w = (torch.randn(columns, width, device="cuda", generator=generator) * 0.3).to(dtype)
    w[vocab:] = 0  # alignment padding, as _LinearCrossEntropy pads
    y = torch.randint(0, vocab, (tokens,), device="cuda", generator=generator)
    y[::7] = -100
    y[1] = vocab - 1  # the last real column
    scale = 1.0 / (y != -100).sum().float()
    expected = ivr_loss._chunk_loss_and_grads(h, w, y, scale, vocab)
    got = chunk_loss_and_grads(h, w, y, scale, vocab)
    assert torch.allclose(got[0], expected[0], rtol=1e-5)
    assert got[1].dtype == dtype and got[2].dtype == torch.float32  # w's gradient summed in fp32
    for mine, reference in zip(got[1:], expected[1:]):
        assert torch.allclose(mine.float(), reference.float(), rtol=2e-2, atol=1e-5)
    assert not got[2][vocab:].any()  # padded rows: no probability, no gradient
    # the next chunk's gradient for w is added into the running sum, in place
    total = got[2].clone()
    again = chunk_loss_and_grads(h, w, y, scale, vocab, total)
    assert again[2] is total
    assert torch.allclose(total, 2 * got[2], rtol=1e-5, atol=1e-6)  # the sum's kernel may differ


def test_chunked_loss_on_cuda_uses_the_kernel_and_matches_full_cross_entropy(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    hidden = torch.randn(500, 48, device="cuda", requires_grad=True)
    weight = torch.randn(1001, 48, device="cuda", requires_grad=True)  # padded to 1024 on CUDA
    targets = torch.randint(0, 1001, (500,), device="cuda")
    targets[::5] = -100
    full = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    grads = torch.autograd.grad(full, (hidden, weight))
    assert ivr_loss.triton_on_cuda
    chunked = ivr_loss.linear_cross_entropy(hidden, weight, targets, chunk_tokens=128)
    mine = torch.autograd.grad(chunked, (hidden, weight))
    assert torch.allclose(chunked, full, rtol=1e-4)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(mine, grads))
