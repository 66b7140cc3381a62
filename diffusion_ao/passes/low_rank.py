"""Put a low-rank branch beside a linear: y = R x + b + up (down x), with W = up @ down + R.

The rewrite keeps the linear's node (it now reads the residual R) and adds two linears on the same input, whose
sum with the linear's output replaces it for every user. The branch's linears carry `LOW_RANK_META`, so that the
quantizer gives them the branch's bit widths (`LowRankConfig.down_bits`) instead of the layer's, and the
module path of the layer they belong to, so that reports and block-wise methods see them as part of it.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.graph import register_constant, replace_constant
from diffusion_ao.passes.analysis import LINEAR_OPS, LOW_RANK_META, get_attr_tensor

aten = torch.ops.aten
_COPIED_META = ("nn_module_stack", "stack_trace")


def low_rank_blocker(gm: GraphModule, node: Node) -> str | None:
    """Why `node` cannot take a low-rank branch, or None if it can."""
    if node.op != "call_function" or node.target not in LINEAR_OPS:
        return f"{node.name} is not a linear"
    weight = node.args[1]
    if get_attr_tensor(gm, weight) is None:
        return f"{node.name}'s weight is not a constant"
    if len(weight.users) != 1:
        return f"{node.name}'s weight is shared with other layers"
    if node.meta.get(LOW_RANK_META):
        return f"{node.name} is itself a low-rank branch"
    return None


def _linear_after(gm: GraphModule, after: Node, x: Node, weight: Node, like: Node, role: str) -> Node:
    with gm.graph.inserting_after(after):
        node = gm.graph.call_function(aten.linear.default, (x, weight))
    x_val = x.meta["val"]
    node.meta.update({k: like.meta[k] for k in _COPIED_META if k in like.meta})
    node.meta["val"] = x_val.new_empty((*x_val.shape[:-1], weight.meta["val"].shape[0]))
    node.meta[LOW_RANK_META] = role
    return node


def add_low_rank_branch(gm: GraphModule, node: Node, up: torch.Tensor, down: torch.Tensor,
                        residual: torch.Tensor) -> Node:
    """Rewrites the linear `node` in place to read `residual` as its weight and adds `up @ (down @ x)` to its
    output. The eager model's parameters are not touched (the weight is replaced out of place).

    Args:
        gm: an exported graph (before `prepare_pt2e`).
        node: a linear whose weight is a constant read by it alone (`low_rank_blocker` says why not).
        up, down: the branch, [out, rank] and [rank, in].
        residual: [out, in], the weight left to quantize.

    Returns:
        The node that now carries the layer's output (the sum).

    Example:
        >>> up, down, residual = low_rank_split(weight, input_rms, rank=16)
        >>> add_low_rank_branch(graph, linear_node, up, down, residual)
    """
    blocker = low_rank_blocker(gm, node)
    if blocker is not None:
        raise ValueError(f"add_low_rank_branch: {blocker}.")
    weight = get_attr_tensor(gm, node.args[1])
    rank = up.shape[1]
    if up.shape != (weight.shape[0], rank) or down.shape != (rank, weight.shape[1]) or residual.shape != weight.shape:
        raise ValueError(f"add_low_rank_branch: {node.name}'s weight is {tuple(weight.shape)}; got up "
                         f"{tuple(up.shape)}, down {tuple(down.shape)}, residual {tuple(residual.shape)}.")
    replace_constant(gm, node.args[1], lambda old: residual.detach().clone())
    x = node.args[0]
    base = node.name
    down_attr = register_constant(gm, f"{base}_low_rank_down", down.detach().to(weight.dtype).clone(), before=node,
                                  parameter=True)
    up_attr = register_constant(gm, f"{base}_low_rank_up", up.detach().to(weight.dtype).clone(), before=node,
                                parameter=True)
    projected = _linear_after(gm, node, x, down_attr, node, "down")
    lifted = _linear_after(gm, projected, projected, up_attr, node, "up")
    with gm.graph.inserting_after(lifted):
        total = gm.graph.call_function(aten.add.Tensor, (node, lifted))
    total.meta.update({k: node.meta[k] for k in _COPIED_META if k in node.meta})
    total.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    gm.graph.lint()
    gm.recompile()
    return total
