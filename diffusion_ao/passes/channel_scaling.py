"""Per-input-channel scaling of a conv/linear that leaves the floating-point output unchanged.

y = W x = (W diag(s)) (diag(1/s) x). LES (learned s) and PTS (s = 2^-k) both move quantization difficulty
between a layer's input activation and its weight this way. The pass folds `s` into the weight and applies
`1/s` to the input: folded into the producer's output channels when the producer is a conv/linear or an
affine group norm used only here, otherwise as an explicit per-channel multiply that inductor fuses into the
quantize op in front of the int8 kernel.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.graph import register_constant, replace_constant
from diffusion_ao.passes.analysis import CONV_OPS, LINEAR_OPS, SCALE_META, conv_groups, get_attr_tensor

aten = torch.ops.aten
GROUP_NORM_OPS = {aten.group_norm.default}


def _input_channel_view(node: Node, s: torch.Tensor, ndim: int) -> torch.Tensor:
    # conv activations are (N, C, H, W): channels on dim 1; linear activations carry channels last.
    return s.view(-1, *([1] * (ndim - 2))) if node.target in CONV_OPS else s


def _rescale_constant(gm: GraphModule, attr_node: Node, factor: torch.Tensor) -> None:
    """Replaces the constant behind a `get_attr` node by `constant * factor`, out of place."""
    replace_constant(gm, attr_node, lambda old: old.detach() * factor)


def _fold_into_producer(gm: GraphModule, producer: Node, inv_s: torch.Tensor) -> bool:
    """Scales the producer's output channels by `inv_s` in place, if it is a conv/linear/affine group norm
    with this single consumer and its own (unshared) parameters."""
    if producer.op != "call_function" or len(producer.users) != 1:
        return False
    if producer.target in CONV_OPS or producer.target in LINEAR_OPS:
        weight, bias = get_attr_tensor(gm, producer.args[1]), (
            get_attr_tensor(gm, producer.args[2]) if len(producer.args) > 2 else None)
        if weight is None or len(producer.args[1].users) != 1 or (producer.target in CONV_OPS and
                                                                  conv_groups(producer) != 1):
            return False
        _rescale_constant(gm, producer.args[1], inv_s.view(-1, *([1] * (weight.dim() - 1))))
        if bias is not None:
            _rescale_constant(gm, producer.args[2], inv_s)
        return True
    if producer.target in GROUP_NORM_OPS:
        gamma, beta = (get_attr_tensor(gm, producer.args[i]) if len(producer.args) > i else None for i in (1, 2))
        if gamma is None or beta is None or any(len(producer.args[i].users) != 1 for i in (1, 2)):
            return False
        _rescale_constant(gm, producer.args[1], inv_s)
        _rescale_constant(gm, producer.args[2], inv_s)
        return True
    return False


def scaling_blocker(gm: GraphModule, node: Node) -> str | None:
    """Why `scale_input_channels` cannot scale `node`'s input channels, or None if it can."""
    if node.target not in CONV_OPS and node.target not in LINEAR_OPS:
        return f"scale_input_channels supports conv2d and linear nodes, got {node.target}."
    if get_attr_tensor(gm, node.args[1]) is None or len(node.args[1].users) != 1:
        return f"The weight of {node.name} is not a constant used only by it; cannot fold a scale."
    if node.target in CONV_OPS and conv_groups(node) != 1:
        return f"{node.name} is a grouped conv; per-input-channel scales need groups=1."
    return None


def scale_input_channels(gm: GraphModule, node: Node, s: torch.Tensor, fold_producer: bool = True) -> str:
    """Rewrites `node` (conv2d or linear) to compute W diag(s) on diag(1/s) x. Modifies `gm` in place.

    Args:
        gm: an exported graph (before `prepare_pt2e`).
        node: the conv/linear node; its weight must be used by this node only.
        s: positive per-input-channel scales, shape (C_in,).
        fold_producer: fold 1/s into the producer where possible (else always insert a multiply).

    Returns:
        "producer" if 1/s was folded into the producer, "multiply" if a multiply was inserted.

    Example:
        >>> scale_input_channels(graph, conv_node, torch.tensor([1.0, 0.5, 0.25]))
    """
    blocker = scaling_blocker(gm, node)
    if blocker is not None:
        raise ValueError(blocker)
    weight = get_attr_tensor(gm, node.args[1])
    s = s.detach().to(weight.dtype).flatten()
    if s.numel() != weight.shape[1] or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError(f"scales for {node.name} must be {weight.shape[1]} finite positive values.")
    _rescale_constant(gm, node.args[1], s.view(1, -1, *([1] * (weight.dim() - 2))))
    x = node.args[0]
    if isinstance(x, Node) and x.meta.get(SCALE_META) and len(x.users) == 1:
        # A scale multiply from an earlier pass (LES, then PTS): compose into it rather than chain a second one.
        _rescale_constant(gm, x.args[1], _input_channel_view(node, 1.0 / s, x.meta["val"].dim()))
        return "multiply"
    if fold_producer and _fold_into_producer(gm, x, 1.0 / s):
        return "producer"
    attr = register_constant(gm, f"{node.name}_input_scale",
                             _input_channel_view(node, 1.0 / s, x.meta["val"].dim()).clone(), before=node)
    with gm.graph.inserting_before(node):
        mul = gm.graph.call_function(aten.mul.Tensor, (x, attr))
    mul.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    mul.meta["val"] = x.meta["val"]
    mul.meta[SCALE_META] = True
    node.replace_input_with(x, mul)
    gm.recompile()
    return "multiply"
