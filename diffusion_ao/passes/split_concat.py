"""Shortcut splitting (Q-Diffusion, docs/methods.md#shortcut-splitting): a conv on `cat([a, b, ...], dim=1)`
becomes a sum of convs, one per concatenated input, so that each input gets its own activation quantizer.

conv(cat([a, b]), W, bias) = conv(a, W[:, :Ca], bias) + conv(b, W[:, Ca:]) holds exactly for groups == 1 (a
conv is linear in its input channels, and zero padding pads each part alike). In the diffusers UpBlocks the
ResBlock's 1x1 `conv_shortcut` consumes the skip concat directly; the halves (upsampled features and the skip)
have very different ranges, and one per-tensor scale on the concat wastes most of the grid on one of them.
Every piece is an ordinary conv2d, so each lowers to its own oneDNN int8 qconv (the add may fuse into the
second as a binary post-op). Run by `DiffusionQuantizer.transform_for_annotation`, never on the eager model.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.graph import register_constant
from diffusion_ao.passes.analysis import (
    CONV_OPS,
    SCALE_META,
    SPLIT_META,
    conv_groups,
    get_attr_tensor,
    scale_chain,
    shortcut_convs,
)

aten = torch.ops.aten
CAT_OPS = {aten.cat.default, aten.concat.default}
_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _concat_parts(conv: Node) -> tuple[Node, list[Node], list[Node]] | None:
    """(cat node, its inputs, scale multiplies in between) if `conv` consumes a channel concat, else None."""
    cat, scales = scale_chain(conv.args[0])
    if not isinstance(cat, Node) or cat.op != "call_function" or cat.target not in CAT_OPS:
        return None
    parts = list(cat.args[0])
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    ndim = cat.meta["val"].dim()
    if dim % ndim != 1 or len(parts) < 2 or not all(isinstance(p, Node) and "val" in p.meta for p in parts):
        return None
    return cat, parts, scales


def _copy_meta(src: Node, dst: Node, val) -> None:
    dst.meta.update({k: v for k, v in src.meta.items() if k in _COPIED_META})
    dst.meta["val"] = val


def split_concat_convs(gm: GraphModule, only: set[str] | None = None) -> list[str]:
    """Rewrites every conv2d (groups == 1) on a channel concat into one conv per concatenated input plus adds.

    Weights (and channel-scale buffers) are sliced out of place; the eager model's parameters are untouched. The
    concat itself stays when something else (e.g. the ResBlock's norm1) still reads it. Each piece is marked with
    `SPLIT_META` so that scope analyses (`shortcut_convs`) give it the role of the conv it came from.

    Args:
        gm: an exported graph; modified in place.
        only: restrict to convs with these node names (default: every conv on a concat).

    Returns:
        The names of the convs that were split.

    Example:
        >>> split = split_concat_convs(graph)   # e.g. ['conv2d_16', 'conv2d_19', ...]
    """
    shortcuts = {n.name for n in shortcut_convs(gm)}
    graph, done = gm.graph, []
    for conv in list(graph.nodes):
        if conv.op != "call_function" or conv.target not in CONV_OPS or (only is not None and conv.name not in only):
            continue
        found = _concat_parts(conv)
        weight = get_attr_tensor(gm, conv.args[1])
        if found is None or weight is None or conv_groups(conv) != 1 or conv.kwargs:
            continue
        cat, parts, scales = found
        bias = conv.args[2] if len(conv.args) > 2 else None
        rest = tuple(conv.args[3:])
        pieces, start = [], 0
        for i, part in enumerate(parts):
            channels = part.meta["val"].shape[1]
            stop = start + channels
            w_node = register_constant(gm, f"{conv.name}_split{i}_weight", weight.detach()[:, start:stop].clone(),
                                       conv, parameter=isinstance(weight, torch.nn.Parameter))
            x = part
            for mul in reversed(scales):  # the same per-channel factors, restricted to this part's channels
                s = get_attr_tensor(gm, mul.args[1])
                s_node = register_constant(gm, f"{mul.name}_split{i}", s.detach()[start:stop].clone(), conv, False)
                with graph.inserting_before(conv):
                    new_mul = graph.call_function(aten.mul.Tensor, (x, s_node))
                _copy_meta(mul, new_mul, part.meta["val"])
                new_mul.meta[SCALE_META] = True
                x = new_mul
            with graph.inserting_before(conv):
                piece = graph.call_function(conv.target, (x, w_node, bias if i == 0 else None, *rest))
            _copy_meta(conv, piece, conv.meta["val"])
            piece.meta[SPLIT_META] = {"of": conv.name, "shortcut": conv.name in shortcuts, "part": i}
            pieces.append(piece)
            start = stop
        if start != weight.shape[1]:
            raise RuntimeError(f"split_concat_convs: the concat feeding {conv.name} has {start} channels but the "
                               f"weight has {weight.shape[1]}; the graph's shape metadata is stale.")
        total = pieces[0]
        for piece in pieces[1:]:
            with graph.inserting_before(conv):
                added = graph.call_function(aten.add.Tensor, (total, piece))
            _copy_meta(conv, added, conv.meta["val"])
            total = added
        old_weight = conv.args[1]
        conv.replace_all_uses_with(total)
        graph.erase_node(conv)
        for dead in [old_weight, *[a for m in scales for a in (m, m.args[1])], cat]:
            if not dead.users:
                graph.erase_node(dead)
        done.append(conv.name)
    if done:
        graph.lint()
        gm.recompile()
    return done
