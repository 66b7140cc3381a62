"""Rewrite linears on N-D inputs (N > 2) as reshape -> 2-D linear -> reshape.

Inductor's int8 `qlinear` lowering only matches dequantize -> linear on 2-D activations; attention projections
in diffusers run on (batch, tokens, channels) and would otherwise stay on simulated q/dq in fp32. Annotating
after this rewrite puts the q/dq pair on the 2-D tensor, so every projection runs on the int8 kernel.
The rewrite is exact: a linear acts on the last dimension only.

`drop_reshapes_around_activations`, run on the converted graph by `compile_for_cpu`: where a flattened linear
feeds an element-wise activation that feeds only flattened linears (the MLP's fc1 -> GELU -> fc2, possibly through
LES's per-channel scale), the reshape back and forth around the activation is dropped, so the activation runs on
the 2-D tensor and inductor fuses it into the first `qlinear` (as a post-op with a uint8 output, or with the
scale and the quantize in one kernel). With the reshapes in between, the GELU and the next
linear's quantize stay a separate fp32 kernel. It runs after calibration because
the methods' block analyses (block reconstruction) expect the activations in their exported shape.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

aten = torch.ops.aten
# element-wise activations that commute with a reshape (one input, output shape = input shape)
ELEMENTWISE_ACTIVATIONS = {aten.gelu.default, aten.silu.default, aten.relu.default, aten.sigmoid.default,
                           aten.tanh.default, aten.hardswish.default, aten.mish.default}


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


def _is_reshape(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target == aten.reshape.default


def _is_identity_dropout(node: torch.fx.Node) -> bool:
    """An exported dropout in eval mode (train=False) or with p=0: the identity."""
    if node.op != "call_function" or node.target != aten.dropout.default:
        return False
    p, train = (list(node.args[1:3]) + [node.kwargs.get("p", 0.5), node.kwargs.get("train", True)])[:2]
    return p == 0 or train is False


def _is_channel_scale(gm: GraphModule, node: torch.fx.Node, value: torch.fx.Node, channels: int) -> bool:
    """`value * c` with c a constant of `channels` values along the last dimension (LES's folded 1/s in front of
    a linear whose input has no producer to fold into): it commutes with flattening the leading dimensions."""
    from diffusion_ao.passes.analysis import get_attr_tensor

    if node.op != "call_function" or node.target != aten.mul.Tensor or value not in node.args[:2]:
        return False
    other = node.args[1] if node.args[0] is value else node.args[0]
    c = get_attr_tensor(gm, other) if isinstance(other, torch.fx.Node) else None
    return c is not None and c.dim() <= 2 and c.numel() == channels and c.shape[-1] == channels


def drop_reshapes_around_activations(gm: GraphModule) -> int:
    """`reshape(act(reshape(y, nd)), 2d)` -> `act(y)` for a 2-D linear output y whose activation only feeds
    reshapes back to y's shape (the flattened inputs of the next linears; in a converted graph their quantize
    follows the reshape), through identity dropouts (diffusers' FeedForward has one after its activation) and
    per-channel constant scales (LES). In place and exact (the same element-wise ops on the same values);
    returns how many activations were moved.

    Example:
        >>> drop_reshapes_around_activations(convert_pt2e(prepared))  # the shipped DiT: one GELU per block
        4
    """
    graph = gm.graph
    dropped = 0
    for act in list(graph.nodes):
        if act.op != "call_function" or act.target not in ELEMENTWISE_ACTIVATIONS:
            continue
        restored = act.args[0]
        if not (isinstance(restored, torch.fx.Node) and _is_reshape(restored) and len(restored.users) == 1):
            continue
        flat = restored.args[0]
        flat_val, act_val = flat.meta.get("val"), act.meta.get("val")
        if flat.target != aten.linear.default or flat_val is None or act_val is None:
            continue
        channels = flat_val.shape[-1]
        dropouts, scales, readers = [], [], []
        frontier, matched, seen = [(u, act) for u in act.users], True, set()
        while frontier and matched:
            node, value = frontier.pop()
            if node in seen:
                matched = False  # reached twice (a node reading two of these values): leave the graph alone
            seen.add(node)
            if not matched:
                break
            if _is_reshape(node) and node.meta.get("val") is not None and node.meta["val"].dim() == 2 \
                    and node.meta["val"].shape[-1] == channels:
                readers.append(node)
            elif _is_identity_dropout(node) and node.args[0] is value:
                dropouts.append(node)
                frontier += [(u, node) for u in node.users]
            elif _is_channel_scale(gm, node, value, channels):
                scales.append(node)
                frontier += [(u, node) for u in node.users]
            else:
                matched = False
        if not matched or not readers:
            continue
        act.args = (flat,) + tuple(act.args[1:])
        act.meta["val"] = act_val.reshape(flat_val.shape)
        for scale in scales:
            scale.meta["val"] = scale.meta["val"].reshape(flat_val.shape)
        for reshape in readers:
            reshape.replace_all_uses_with(reshape.args[0])
            graph.erase_node(reshape)
        for dropout in dropouts:
            dropout.replace_all_uses_with(dropout.args[0])
            graph.erase_node(dropout)
        sizes = [n for n in restored.args[1] if isinstance(n, torch.fx.Node)]
        graph.erase_node(restored)
        for size in sizes:  # sym_size nodes made for the reshape back (more than one dynamic dim)
            if not size.users:
                graph.erase_node(size)
        dropped += 1
    if dropped:
        graph.lint()
        gm.recompile()
    return dropped
