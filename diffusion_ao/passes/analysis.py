"""Read-only facts about an exported UNet graph: which layer a node came from, what it depends on, and the
roles that the scope choices of `QuantConfig` refer to (first/last layer, time-embedding path, shortcut convs).

Everything is derived from the graph itself, never from per-model lists of module names.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.denoisers import SAMPLE, TIMESTEP
from diffusion_ao.graph import resolve_attr

aten = torch.ops.aten
CONV_OPS = {aten.conv2d.default}
LINEAR_OPS = {aten.linear.default}
WEIGHTED_OPS = CONV_OPS | LINEAR_OPS
# Ops that move or reshape a tensor's values without changing them.
SHAPE_OPS = {aten.transpose.int, aten.permute.default, aten.view.default, aten.reshape.default,
             aten._unsafe_view.default, aten.clone.default, aten.contiguous.default}
# Weighted ops that DiffusionQuantizer cannot quantize; a model containing them must keep them in FP explicitly.
UNSUPPORTED_WEIGHTED_OPS = {aten.conv1d.default, aten.conv3d.default, aten.conv_transpose1d.default,
                            aten.conv_transpose2d.input, aten.conv_transpose3d.input}
SCALE_META = "diffusion_ao_input_scale"  # marks a channel-scale multiply inserted in front of a layer
# Set by `split_concat_convs` on each piece of a split conv: {"of": original node name, "shortcut": bool}.
SPLIT_META = "diffusion_ao_split_of"
# Set by `add_low_rank_branch` on the two linears of a low-rank branch: "down" (in -> rank) or "up" (rank -> out).
LOW_RANK_META = "diffusion_ao_low_rank"
EXPORT_PREFIX = "denoiser."  # export_denoiser wraps the model in a module whose attribute is `denoiser`


def is_identity_cast(node: Node) -> bool:
    """A cast of a float32 tensor to float32 (the exported graph keeps diffusers' `.to(dtype)`)."""
    return node.target == aten.to.dtype and node.args[1] == torch.float32 and \
        node.args[0].meta.get("val", None) is not None and node.args[0].meta["val"].dtype == torch.float32


def module_path(node: Node) -> str:
    """The dotted path of the innermost module that produced `node`, as in `unet.named_modules()`."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len(EXPORT_PREFIX):] if path.startswith(EXPORT_PREFIX) else path


# graph.meta key under which `export_denoiser` records every module path of the exported model
MODULE_NAMES_META = "diffusion_ao_module_names"


# graph.meta key under which `export_denoiser` records the exported model's class name
DENOISER_CLASS_META = "diffusion_ao_denoiser_class"


def denoiser_family(graph: GraphModule) -> str:
    """"unet" for a graph exported from a diffusers UNet, else "transformer" (DiT, PixArt, SD3, Flux): from the
    class `export_denoiser` recorded, or, for a graph exported otherwise, the modules its nodes come from."""
    name = graph.meta.get(DENOISER_CLASS_META)
    if name is not None:
        return "unet" if "UNet" in name else "transformer"
    classes = {str(cls) for node in graph.graph.nodes for _, cls in (node.meta.get("nn_module_stack") or {}).values()}
    return "unet" if any("UNet" in c for c in classes) else "transformer"


def module_names(graph: GraphModule) -> frozenset[str]:
    """Every module path of the model `graph` was exported from, as in `model.named_modules()` (recorded by
    `export_denoiser`, so passes that remove nodes do not change it); for a graph exported otherwise, the paths
    of its nodes' modules and their parents."""
    recorded = graph.meta.get(MODULE_NAMES_META)
    if recorded is not None:
        return recorded
    names = set()
    for node in graph.graph.nodes:
        parts = module_path(node).split(".") if module_path(node) else []
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(names)


def layer_name(node: Node) -> str:
    """A report key for a conv/linear node: its module path (the node name if it has none), with the part index
    for a piece of a split concat conv (the pieces share the original's module path)."""
    name = module_path(node) or node.name
    split = node.meta.get(SPLIT_META)
    return f"{name}[part {split['part']}]" if split is not None and "part" in split else name


def module_type_name(node: Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    t = list(stack.values())[-1][1]
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


@lru_cache(maxsize=None)
def resolve_type(qualified_name: str) -> Optional[type]:
    """The class named `package.module.Class`, or None if it cannot be imported."""
    module, _, name = qualified_name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def scale_chain(x: Node) -> tuple[Node, list[Node]]:
    """(the value under them, the multiplies) for `x` behind channel-scale multiplies that
    `scale_input_channels` inserted; `x` itself and [] when there are none."""
    scales = []
    while isinstance(x, Node) and x.meta.get(SCALE_META):
        scales.append(x)
        x = x.args[0]
    return x, scales


def unscaled_input(node: Node) -> Node:
    """The input of a layer node, looking through channel-scale multiplies inserted by `scale_input_channels`."""
    return scale_chain(node.args[0])[0]


def conv_groups(node: Node) -> int:
    """The `groups` argument of an aten conv2d node (positional in exported graphs; 1 when omitted)."""
    return node.args[6] if len(node.args) > 6 else 1


def get_attr_tensor(gm: GraphModule, node) -> Optional[torch.Tensor]:
    """The parameter or buffer a `get_attr` node reads, or None for any other node."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    return resolve_attr(gm, node.target)


def is_shape_value(node: Node) -> bool:
    # sym_size & co. read a tensor's shape, not its values: `timestep * ones(sample.shape[0])` must not make the
    # time embedding depend on the sample.
    val = node.meta.get("val")
    return isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool)


def input_dependencies(gm: GraphModule) -> dict[Node, frozenset[str]]:
    """For every node, the names of the graph inputs (placeholders) whose values it depends on."""
    deps: dict[Node, frozenset[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            deps[node] = frozenset([node.name])
        elif is_shape_value(node):
            deps[node] = frozenset()
        else:
            acc: set[str] = set()
            for inp in node.all_input_nodes:
                acc |= deps[inp]
            deps[node] = frozenset(acc)
    return deps


def time_embedding_nodes(gm: GraphModule) -> set[Node]:
    """Nodes that depend on the timestep but not on the sample: the time MLP and the ResBlock time projections
    (in a conditional model, also what a class term added to the time embedding feeds)."""
    deps = input_dependencies(gm)
    return {n for n, d in deps.items() if n.op == "call_function" and TIMESTEP in d and SAMPLE not in d}


def _is_weighted(node: Node) -> bool:
    return node.op == "call_function" and node.target in WEIGHTED_OPS


def first_and_last_layers(gm: GraphModule) -> tuple[set[Node], set[Node]]:
    """Weighted layers that see the raw sample (no weighted layer before them on the sample path), and those
    whose output reaches the graph output without passing another weighted layer."""
    deps = input_dependencies(gm)
    behind_weighted: dict[Node, bool] = {}
    first: set[Node] = set()
    for node in gm.graph.nodes:
        ins = [i for i in node.all_input_nodes if SAMPLE in deps[i]]
        behind_weighted[node] = any(_is_weighted(i) or behind_weighted[i] for i in ins)
        if _is_weighted(node) and SAMPLE in deps[node] and not behind_weighted[node]:
            first.add(node)
    reaches_output: dict[Node, bool] = {}
    last: set[Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        direct = any(u.op == "output" for u in node.users)
        through = any(not _is_weighted(u) and reaches_output.get(u, False) for u in node.users)
        reaches_output[node] = direct or through
        if _is_weighted(node) and reaches_output[node] and SAMPLE in deps[node]:
            last.add(node)
    return first, last


def shortcut_convs(gm: GraphModule) -> set[Node]:
    """1x1 convs on a residual branch: their input also feeds another op (the block's main path), e.g. the
    `conv_shortcut` of a ResBlock whose channel count changes. The pieces of a shortcut conv split by
    `split_concat_convs` keep that role."""
    found = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in CONV_OPS:
            continue
        if SPLIT_META in node.meta:  # its input is now one part of the concat: judge by the original conv
            if node.meta[SPLIT_META]["shortcut"]:
                found.add(node)
            continue
        weight = get_attr_tensor(gm, node.args[1])
        if weight is None or tuple(weight.shape[2:]) != (1, 1):
            continue
        if len(unscaled_input(node).users) > 1:
            found.add(node)
    return found
