"""Keeps narrow activation grids narrow once inductor fuses a quantize into the int8 kernel before it.

A per-tensor quantize onto fewer levels than its dtype holds (7-bit activations in uint8 on CPUs without VNNI,
6-bit ones of a W4A6 recipe) clamps to its own `quant_max`. When inductor fuses such a quantize into the oneDNN
`qlinear` / `qconv` that produces its input (an int8 output, with a ReLU or GELU before it, say), the kernel
saturates at the dtype's limit instead: values above the calibrated range reach 255 rather than 127, so the
compiled graph differs from the converted one, and on CPUs without VNNI the next int8 kernel can overflow its
int16 pair sums on exactly the values the 7-bit grid was chosen to keep out. An integer clamp after each such
quantize restores the grid (exact in eager, where the quantize already clamped; inductor fuses it into the
quantize where the quantize is its own kernel, and runs it as a pass over the int8 tensor where it is not).
"""
from __future__ import annotations

import copy

import torch
from torch.fx import GraphModule, Node

qd = torch.ops.quantized_decomposed
PER_TENSOR_QUANTIZE = {qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor}


def _is_narrow_quantize(node: Node) -> bool:
    if node.op != "call_function" or node.target not in PER_TENSOR_QUANTIZE:
        return False
    info = torch.iinfo(node.args[5])
    return (node.args[3], node.args[4]) != (info.min, info.max)


def clamp_narrow_grids(gm: GraphModule) -> tuple[GraphModule, int]:
    """A copy of `gm` with `clamp(q, quant_min, quant_max)` after every per-tensor quantize whose range is
    narrower than its integer dtype's (see the module docstring), and how many it clamped; `gm` itself, unchanged,
    and 0 when there are none.

    Args:
        gm: a converted graph (its quantize ops as `quantized_decomposed`). The copy shares its constants.

    Example:
        >>> clamped, n = clamp_narrow_grids(converted)   # 7-bit activations: every quantize of the graph
    """
    if not any(_is_narrow_quantize(n) for n in gm.graph.nodes):
        return gm, 0
    out = GraphModule(gm, copy.deepcopy(gm.graph))
    clamped = 0
    for node in [n for n in out.graph.nodes if _is_narrow_quantize(n)]:
        users = list(node.users)
        with out.graph.inserting_after(node):
            clamp = out.graph.call_function(torch.ops.aten.clamp.default, (node, node.args[3], node.args[4]))
        clamp.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
        for user in users:
            user.replace_input_with(node, clamp)
        clamped += 1
    out.recompile()
    return out, clamped
