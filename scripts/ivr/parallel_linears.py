"""Linear layers that read the same input, computed as one matrix product: an inductor pass over the
graph torch.compile captures, before autograd (so the backward is derived from the fused product too).

A Llama-style block projects one normed input three times for attention (q, k, v) and twice for its MLP
(gate, up). SmolLM2-135M's k and v are 576 -> 192: products too thin to fill an H100 or H200, each with
its own launches in the forward and the backward. Concatenated, the weights give one product per group;
its output is split back into the layers' outputs. Every output element is the same dot product as before,
so what is computed does not change; the parameters stay separate tensors (names, state dict, optimizer
state, LoRA targets). Layers are grouped only when their weights agree in input width, dtype, device and
whether they learn, and they all have a bias or none has."""

from __future__ import annotations

import hashlib
import operator
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def _value(node) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _group_key(node: torch.fx.Node):
    """What a linear must share with the others of its group, or None if it cannot join one."""
    if node.kwargs or len(node.args) not in (2, 3):
        return None
    weight, bias = _value(node.args[1]), _value(node.args[2]) if len(node.args) == 3 else None
    has_bias = len(node.args) == 3 and node.args[2] is not None
    if weight is None or weight.dim() != 2 or (has_bias and (bias is None or bias.dim() != 1)):
        return None
    bias_kind = (bias.dtype, bias.requires_grad) if has_bias else None
    return weight.shape[1], weight.dtype, weight.device, weight.requires_grad, bias_kind


def fuse_parallel_linears(graph: torch.fx.Graph) -> int:
    """Rewrites each group of linears with one input into cat(weights), one linear, split. Returns how
    many linears were folded into groups."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _LINEAR:
            key = _group_key(node)
            if key is not None:
                groups.setdefault((node.args[0], key), []).append(node)
    folded = 0
    for (x, _), linears in groups.items():
        first = linears[0]
        # the weights and biases must exist where the fused product goes (parameters always do)
        operands = [arg for node in linears for arg in node.args[1:] if isinstance(arg, torch.fx.Node)]
        if len(linears) < 2 or any(order[arg] > order[first] for arg in operands):
            continue
        sizes = [_value(node.args[1]).shape[0] for node in linears]
        with graph.inserting_before(first):
            weight = graph.call_function(torch.cat, ([node.args[1] for node in linears], 0))
            args = (x, weight)
            if len(first.args) == 3 and first.args[2] is not None:
                args += (graph.call_function(torch.cat, ([node.args[2] for node in linears], 0)),)
            parts = graph.call_function(torch.split, (graph.call_function(torch._C._nn.linear, args), sizes, -1))
            for i, node in enumerate(linears):
                node.replace_all_uses_with(graph.call_function(operator.getitem, (parts, i)))
        for node in linears:
            graph.erase_node(node)
        folded += len(linears)
    return folded


class FuseParallelLinears(CustomGraphPass):
    """fuse_parallel_linears as inductor's pre_grad_custom_pass; its uuid (this file's hash) keys the
    compile cache, so an edit here recompiles."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        fuse_parallel_linears(graph)

    def uuid(self) -> str:
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
