"""Rotate a linear's input by an orthogonal matrix Q and its weight by the same: y = (W Q)(Q^T x) = W x.

In the exported graph's row layout (x is [tokens, in], `linear(x, W) = x W^T`) that is `linear(x Q, W Q)`: the
pass inserts `mm(x, Q)` in front of the linear, which then reads it, and replaces W by W Q out of place (the eager
model is not touched). The floating-point output is unchanged; what changes is what the quantizers see.
"""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.graph import register_constant, replace_constant
from diffusion_ao.passes.analysis import LINEAR_OPS, get_attr_tensor

aten = torch.ops.aten
_COPIED_META = ("nn_module_stack", "stack_trace")


def hadamard(n: int) -> torch.Tensor:
    """The n x n Walsh-Hadamard matrix (entries +-1; n a power of two), by Sylvester's construction."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: n={n} is not a power of two.")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def random_rotation(n: int, seed: int) -> torch.Tensor:
    """An n x n orthogonal matrix (float64): random signs times the normalised Walsh-Hadamard matrix where n is a
    power of two (every entry +-1/sqrt(n): each output mixes every input equally), else the Q of the QR of a
    Gaussian matrix (signs fixed so that it is uniformly distributed)."""
    generator = torch.Generator().manual_seed(seed)
    if n >= 1 and not n & (n - 1):
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return signs[:, None] * hadamard(n) / math.sqrt(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation_blocker(gm: GraphModule, node: Node) -> str | None:
    """Why `node` cannot be rotated, or None if it can."""
    if node.op != "call_function" or node.target not in LINEAR_OPS:
        return f"{node.name} is not a linear"
    if get_attr_tensor(gm, node.args[1]) is None or len(node.args[1].users) != 1:
        return f"{node.name}'s weight is not a constant it reads alone"
    x = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        return f"{node.name}'s input is not a 2-D tensor (flatten the linears' inputs first)"
    return None


def rotate_linear_input(gm: GraphModule, node: Node, q: torch.Tensor) -> Node:
    """Rewrites the linear `node` to compute `linear(x Q, W Q)`; returns the inserted `mm(x, Q)` node.

    Args:
        gm: an exported graph (before `prepare_pt2e`), its linears' inputs flattened to 2-D.
        node: a linear whose weight is a constant read by it alone (`rotation_blocker` says why not).
        q: [in, in], orthogonal.

    Example:
        >>> rotate_linear_input(graph, linear_node, random_rotation(128, seed=0))
    """
    blocker = rotation_blocker(gm, node)
    if blocker is not None:
        raise ValueError(f"rotate_linear_input: {blocker}.")
    weight = get_attr_tensor(gm, node.args[1])
    if q.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"rotate_linear_input: {node.name} takes {weight.shape[1]} inputs; Q is {tuple(q.shape)}.")
    replace_constant(gm, node.args[1], lambda old: (old.double() @ q.double()).to(old.dtype))
    x = node.args[0]
    q_attr = register_constant(gm, f"{node.name}_rotation", q.to(weight.dtype).contiguous(), before=node)
    with gm.graph.inserting_before(node):
        rotated = gm.graph.call_function(aten.mm.default, (x, q_attr))
    rotated.meta.update({k: node.meta[k] for k in _COPIED_META if k in node.meta})
    rotated.meta["val"] = x.meta["val"].new_empty(x.meta["val"].shape)
    node.replace_input_with(x, rotated)
    gm.graph.lint()
    gm.recompile()
    return rotated
