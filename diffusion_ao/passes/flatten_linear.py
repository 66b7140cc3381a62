"""Rewrite linears on N-D inputs (N > 2) as reshape -> 2-D linear -> reshape.

Inductor's int8 `qlinear` lowering only matches dequantize -> linear on 2-D activations; attention projections
in diffusers run on (batch, tokens, channels) and would otherwise stay on simulated q/dq in fp32. Annotating
after this rewrite puts the q/dq pair on the 2-D tensor, so every projection runs on the int8 kernel.
The rewrite is exact: a linear acts on the last dimension only.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

aten = torch.ops.aten


def _restore_shape(graph: torch.fx.Graph, x: torch.fx.Node, lead_shape) -> list:
    """The leading dims for the reshape back: ints, with -1 for the one dynamic dim (the batch).

    New `sym_size` nodes are avoided where possible: dynamo deduplicates them against the export's own in place,
    in this graph, without regenerating its code, and the next recompile (a new batch size) then fails.
    """
    dynamic = [i for i, size in enumerate(lead_shape) if isinstance(size, torch.SymInt)]
    if len(dynamic) <= 1:
        return [-1 if i in dynamic else int(size) for i, size in enumerate(lead_shape)]
    return [graph.call_function(aten.sym_size.int, (x, i)) if i in dynamic else int(size)
            for i, size in enumerate(lead_shape)]


def flatten_linear_inputs(gm: GraphModule) -> int:
    """Rewrites in place; returns how many linears were rewritten."""
    graph = gm.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if val is None or val.dim() <= 2:
            continue
        out_val = node.meta.get("val")
        in_features, out_features = val.shape[-1], out_val.shape[-1]
        with graph.inserting_before(node):
            flat = graph.call_function(aten.reshape.default, (x, [-1, in_features]))
            lead = _restore_shape(graph, x, val.shape[:-1])
        with graph.inserting_after(node):
            restored = graph.call_function(aten.reshape.default, (node, [*lead, out_features]))
        node.replace_all_uses_with(restored, delete_user_cb=lambda user: user is not restored)
        node.args = (flat,) + tuple(node.args[1:])
        for new, meta_val in ((flat, val.reshape(-1, in_features)), (restored, out_val)):
            new.meta["val"] = meta_val
            if "nn_module_stack" in node.meta:
                new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        for size_node, size in zip(lead, val.shape):
            if isinstance(size_node, torch.fx.Node):
                size_node.meta["val"] = size
        node.meta["val"] = out_val.reshape(-1, out_features)
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten
