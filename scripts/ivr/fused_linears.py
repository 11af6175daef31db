"""One matrix product for the linear layers that read the same input: a Llama-style block's query, key
and value projections, its gate and up projections. Run by torch.compile on the traced graph before
autograd (inductor's pre-grad custom pass), so the backward is one product too. The parameters stay as
they are (checkpoints, optimizer state and hooks see no difference); each step multiplies by their
concatenation and splits the result, which computes the same sums. Thin layers gain most: SmolLM2's key
and value projections are 576 -> 192 each, too narrow to keep an H200's matrix units busy on their own."""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def _linear_args(node: torch.fx.Node):
    names = ("input", "weight", "bias")
    values = dict(zip(names, node.args)) | {k: v for k, v in node.kwargs.items() if k in names}
    return values.get("input"), values.get("weight"), values.get("bias")


def _example(node) -> torch.Tensor | None:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _mutates(user: torch.fx.Node) -> bool:
    name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or name.startswith("__i")


def _safe_on_a_slice(node: torch.fx.Node) -> bool:
    """The fused output's pieces are column slices of one tensor: fine for anything but a mutation
    (autograd forbids writing into a view made by split) and a view that regroups more than the last
    dimension (a slice's rows are not contiguous)."""
    shape = _example(node).shape
    for user in node.users:
        if _mutates(user):
            return False
        if user.op == "call_method" and user.target == "view":
            out = _example(user)
            if out is None or tuple(out.shape[:len(shape) - 1]) != tuple(shape[:-1]):
                return False
    return True


class FuseSharedInputLinears(CustomGraphPass):
    """Groups the linears of a graph by (input, with or without bias, trainable or not, dtype) and gives
    each group of two or more one product. A frozen weight is never joined to a trainable one: the
    fused product's weight gradient would then be computed for both."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        position = {node: i for i, node in enumerate(graph.nodes)}
        groups = defaultdict(list)
        for node in graph.nodes:
            if node.op != "call_function" or node.target not in LINEAR:
                continue
            x, w, b = _linear_args(node)
            examples = [_example(n) for n in (node, x, w) + ((b,) if b is not None else ())]
            if any(e is None for e in examples) or examples[2].dim() != 2 or not _safe_on_a_slice(node):
                continue
            if b is not None and _example(b).requires_grad != examples[2].requires_grad:
                continue
            groups[(x, b is None, examples[2].requires_grad, examples[2].dtype)].append(node)
        for nodes in groups.values():
            params = [p for n in nodes for p in _linear_args(n)[1:] if p is not None]
            if len(nodes) > 1 and all(position[p] < position[nodes[0]] for p in params):
                self._fuse(graph, nodes)

    @staticmethod
    def _fuse(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
        x = _linear_args(nodes[0])[0]
        weights = [_linear_args(n)[1] for n in nodes]
        biases = [_linear_args(n)[2] for n in nodes]
        sizes = [_example(w).shape[0] for w in weights]
        with graph.inserting_before(nodes[0]):
            weight = graph.call_function(torch.cat, (weights,), {"dim": 0})
            weight.meta["example_value"] = torch.cat([_example(w) for w in weights])
            bias = None
            if biases[0] is not None:
                bias = graph.call_function(torch.cat, (biases,), {"dim": 0})
                bias.meta["example_value"] = torch.cat([_example(b) for b in biases])
            product = graph.call_function(torch._C._nn.linear, (x, weight, bias))
            product.meta["example_value"] = torch._C._nn.linear(_example(x), weight.meta["example_value"],
                                                                 bias.meta["example_value"] if bias else None)
            pieces = graph.call_function(torch.split, (product, sizes), {"dim": -1})
            for i, node in enumerate(nodes):
                piece = graph.call_function(operator.getitem, (pieces, i))
                piece.meta.update(node.meta)
                node.replace_all_uses_with(piece)
        for node in nodes:
            graph.erase_node(node)
        torch._dynamo.utils.counters["ivr"]["fused_linear_groups"] += 1
        torch._dynamo.utils.counters["ivr"]["fused_linears"] += len(nodes)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


fuse_shared_input_linears = FuseSharedInputLinears()
