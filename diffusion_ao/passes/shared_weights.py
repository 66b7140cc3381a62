"""Give every conv/linear its own weight and bias.

A module called twice (DiT's final layer recomputes block 0's timestep embedding) gives one `get_attr` node with
two weighted users. PT2E then puts one observer and one dequantize on the shared weight, and inductor's int8
`qlinear` / `qconv` patterns, which need a dequantized weight with a single user, leave both calls in floating
point; a per-layer fold (LES, PTS) would also scale the weight once per use. Each extra use gets its own copy
(the layers involved are small: a time MLP computed twice), with its own q/dq pair, so every call lowers.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from diffusion_ao.graph import register_constant
from diffusion_ao.passes.analysis import WEIGHTED_OPS, get_attr_tensor


def unshare_weights(gm: GraphModule) -> int:
    """Rewrites in place; returns how many copies were added."""
    added = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        uses = [u for u in node.users if u.op == "call_function" and u.target in WEIGHTED_OPS]
        if len(uses) < 2:
            continue
        value = get_attr_tensor(gm, node)
        for user in uses[1:]:
            copy = register_constant(gm, node.target.replace(".", "_") + "_use", value.detach().clone(), before=user,
                                     parameter=isinstance(value, torch.nn.Parameter))
            user.replace_input_with(node, copy)
            added += 1
    if added:
        gm.graph.lint()
        gm.recompile()
    return added
