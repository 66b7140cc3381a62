"""Merge the int8 linears that read the same quantized activation into one linear, on the converted graph.

An attention's Q, K and V projections (a cross-attention's K and V) read one activation, quantized once per
projection on the same grid. Three small `qlinear` kernels of N columns each cost more than one of 3N (each
call has a fixed cost, and a wider one uses the cores better: at 256 tokens, DiT-S/2's Q, K and V together
take about half the time of the three apart on a 2-core Xeon). A merged
linear reads the activation through the first projection's quantize, its int8 weight is the projections'
weights stacked along the output channels (each row keeps its own scale and zero point), its bias the biases
stacked; each projection's output is a slice of its output. Integer products and per-channel scales are
unchanged, so the result is the same up to float rounding in the accumulation of the bias.

Linears whose outputs are each quantized again (through shape-only ops: int8 attention's Q, K and V) stay apart:
each writes its uint8 operand from its own kernel, where a merged one writes float32 and quantizes its slices in
another pass over that memory. DiT-S/2 with int8 attention on the 2-core Xeon, same process: merged 18.33 ms
against 17.32 ms apart at batch 1 on oneDNN, 98.7 against 79.8 ms at batch 8 with `autotune=True`.

`compile_for_cpu` runs it on a copy of the graph (the user's converted graph keeps its layers), after the
other exact rewrites.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Hashable, Optional

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.graph import register_constant
from diffusion_ao.passes.analysis import SHAPE_OPS, get_attr_tensor, is_identity_cast

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed


def _activation_key(x: Node) -> Optional[tuple]:
    """What a linear's input dequantize reads, as a key equal for two linears on the same quantized values:
    the quantize's source (seen through a reshape of the same node to the same shape) and the grid."""
    if x.op != "call_function" or x.target != qd.dequantize_per_tensor.default or len(x.args) != 6:
        return None
    q = x.args[0]
    if (not isinstance(q, Node) or q.target != qd.quantize_per_tensor.default or len(q.args) != 6
            or tuple(q.args[1:]) != tuple(x.args[1:])):
        return None
    source = q.args[0]
    if isinstance(source, Node) and source.target in (aten.reshape.default, aten.view.default):
        source = (source.args[0], tuple(source.args[1]))
    return (source, *q.args[1:])


def _weight(gm: GraphModule, w: Node) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]]:
    """(int8 weight, scales, zero points, (quant_min, quant_max, dtype)) of a per-output-channel dequantized
    constant weight, else None."""
    if w.op != "call_function" or w.target != qd.dequantize_per_channel.default or len(w.args) != 7:
        return None
    q, scale, zero_point, axis, *grid = w.args
    tensors = [get_attr_tensor(gm, n) if isinstance(n, Node) else None for n in (q, scale, zero_point)]
    if axis != 0 or any(not isinstance(t, torch.Tensor) for t in tensors):
        return None
    q, scale, zero_point = tensors
    if q.dim() != 2 or scale.dim() != 1 or zero_point.dim() != 1:
        return None
    return q, scale, zero_point, tuple(grid)


def _bias(gm: GraphModule, linear: Node) -> Optional[torch.Tensor | bool]:
    """The constant bias of `linear`, False for none, None where it is not a constant."""
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    if bias is None:
        return False
    value = get_attr_tensor(gm, bias) if isinstance(bias, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _requantized(node: Node) -> bool:
    """Whether everything `node`'s output reaches through shape-only ops (and float32 -> float32 casts, as the
    int8 attention rewrite follows them; dtype assertions not counted) is a per-tensor quantize."""
    ends, frontier = [], [node]
    while frontier:
        for user in frontier.pop().users:
            if user.target == aten._assert_tensor_metadata.default:
                continue
            (frontier if user.target in SHAPE_OPS or is_identity_cast(user) else ends).append(user)
    return bool(ends) and all(user.target == qd.quantize_per_tensor.default for user in ends)


def _merge_key(gm: GraphModule, node: Node) -> Optional[Hashable]:
    if node.op != "call_function" or node.target != aten.linear.default or _requantized(node):
        return None
    activation = _activation_key(node.args[0])
    weight = _weight(gm, node.args[1])
    if activation is None or weight is None or _bias(gm, node) is None:
        return None
    q, scale, zero_point, grid = weight
    return activation, grid, q.dtype, q.shape[1], scale.dtype, zero_point.dtype


def _merge(gm: GraphModule, linears: list[Node]) -> None:
    """Replaces `linears` (same key) by one linear placed where the first one is, and slices of its output."""
    first = linears[0]
    weights = [_weight(gm, n.args[1]) for n in linears]
    biases = [_bias(gm, n) for n in linears]
    base = f"merged_{first.name}"
    stacked = [register_constant(gm, f"{base}_{part}", torch.cat([w[i].detach() for w in weights]).contiguous(),
                                 before=first) for i, part in enumerate(("weight", "scale", "zero_point"))]
    bias = None
    if any(isinstance(b, torch.Tensor) for b in biases):
        columns = [b.detach() if isinstance(b, torch.Tensor) else torch.zeros(w[0].shape[0])
                   for b, w in zip(biases, weights)]
        bias = register_constant(gm, f"{base}_bias", torch.cat(columns).contiguous(), before=first)
    graph = gm.graph
    with graph.inserting_before(first):
        weight = graph.call_function(qd.dequantize_per_channel.default, (*stacked, 0, *weights[0][3]))
        merged = graph.call_function(aten.linear.default, (first.args[0], weight, bias))
        start = 0
        for node, w in zip(linears, weights):
            width = w[0].shape[0]
            piece = graph.call_function(aten.slice.Tensor, (merged, -1, start, start + width))
            start += width
            piece.meta.update({k: v for k, v in node.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})
            node.replace_all_uses_with(piece)
    for node in linears:
        graph.erase_node(node)


def merge_shared_input_linears(gm: GraphModule) -> tuple[GraphModule, int]:
    """Merges, in a new graph module that shares `gm`'s constants, every group of int8 linears with the same
    quantized input (see the module docstring).

    Args:
        gm: a converted graph (`convert_pt2e`'s reference q/dq form); it is not changed.

    Returns:
        (the new graph module, how many linears were merged into another one: 2 per Q/K/V triple); `gm` itself
        and 0 when there is nothing to merge.

    Example:
        >>> merged, n = merge_shared_input_linears(converted)   # DiT-S/2: 24 of 111 linears merged away
    """
    groups: dict[Hashable, list[Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        key = _merge_key(gm, node)
        if key is not None:
            groups[key].append(node)
    if not any(len(nodes) > 1 for nodes in groups.values()):
        return gm, 0
    out = GraphModule(gm, copy.deepcopy(gm.graph))
    by_name = {n.name: n for n in out.graph.nodes}
    merged = 0
    for nodes in groups.values():
        if len(nodes) > 1:
            _merge(out, [by_name[n.name] for n in nodes])
            merged += len(nodes) - 1
    out.graph.eliminate_dead_code()
    return GraphModule(out, out.graph), merged  # keeps only the constants the merged graph reads

