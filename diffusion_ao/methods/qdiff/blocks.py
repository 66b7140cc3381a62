"""Reconstruction blocks of a prepared (observed) PT2E graph, and their extraction as small trainable graphs.

A block is a set of graph nodes with its inputs (values from outside that it reads) and outputs (its values read
outside, or by the graph output). `find_blocks` uses `nn_module_stack`: the nodes of one diffusers ResBlock,
attention or transformer block (the outermost such module) form one block; every other quantized layer is a block
of its own. `block_from_nodes` turns any node set into a block, e.g. all temporal features of the time path as one
block with several outputs (TFMQ-DM's TIAR).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch.fx import Graph, GraphModule, Node

from diffusion_ao.observers import TimestepActivationObserver, TimestepFakeQuantize, WeightFakeQuantize, WeightObserver
from diffusion_ao.passes.analysis import EXPORT_PREFIX, get_attr_tensor, is_shape_value, module_path

# Module classes (by name) whose nodes are reconstructed together (Q-Diffusion / BRECQ's block granularity).
BLOCK_TYPES = ("ResnetBlock2D", "Attention", "Transformer2DModel", "BasicTransformerBlock", "JointTransformerBlock",
               "FluxTransformerBlock", "FluxSingleTransformerBlock")
OBSERVER_TYPES = (TimestepActivationObserver, WeightObserver, TimestepFakeQuantize, WeightFakeQuantize)


@dataclass
class Block:
    """A contiguous piece of the graph, reconstructed as one unit.

    Attributes:
        name: a label (the module path of a block module or layer).
        nodes: its nodes in graph order (call_function nodes, their observers, no get_attr / placeholders).
        inputs: nodes outside the block whose values it reads, in graph order.
        outputs: its tensor nodes whose values are read outside it (observers excepted), in graph order.
    """

    name: str
    nodes: list[Node]
    inputs: list[Node]
    outputs: list[Node]
    batch_free: frozenset = frozenset()  # positions in `tensor_inputs` without a batch dimension (set on capture)
    token_flat: frozenset = frozenset()  # positions in `tensor_inputs` stored as (samples, tokens, ...) (set on capture)

    @property
    def tensor_inputs(self) -> list[Node]:
        """The inputs fed to the block's module: all but sizes (recomputed inside, see `build_block_module`)."""
        return [n for n in self.inputs if not is_shape_value(n)]

    def observers(self, gm: GraphModule) -> list[str]:
        """Targets of the diffusion-ao observer (or FakeQuantize) modules inside the block."""
        return [n.target for n in self.nodes if is_observer(gm, n)]


def is_observer(gm: GraphModule, node: Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), OBSERVER_TYPES)


def _block_module(node: Node) -> Optional[str]:
    """The path of the outermost module of a BLOCK_TYPES class that produced `node`, or None."""
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        name = cls if isinstance(cls, str) else cls.__qualname__
        if name.rsplit(".", 1)[-1] in BLOCK_TYPES:
            return path
    return None


def _value_nodes(nodes: Iterable[Node]) -> list[Node]:
    return [n for n in nodes if n.op in ("call_function", "call_module")]


def block_from_nodes(gm: GraphModule, nodes: Iterable[Node], name: str = "block") -> Block:
    """Makes a block of an arbitrary node set, closed so that it can run on its own.

    Nodes outside the set that depend on the set and feed it again are added (otherwise the block would read
    values computed from its own outputs). Observers that feed the set and whose first user is in it are added
    too (they quantize the block's inputs, so they are learned with it). get_attr constants are read in place.

    Args:
        gm: a prepared graph (from `prepare_pt2e`).
        nodes: the nodes to reconstruct together (e.g. every node of the time-embedding path).
        name: a label for progress bars and reports.

    Returns:
        The `Block`, whose `outputs` are all its values read outside it: several for e.g. the temporal features.

    Example:
        >>> temb = block_from_nodes(prepared, [n for n in prepared.graph.nodes if n in time_path], "time path")
        >>> reconstruct_blocks(prepared, data, [temb], ReconstructionConfig(iterations=500))
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    members = set(_value_nodes(nodes))
    if not members:
        raise ValueError(f"block {name!r} has no call_function / call_module nodes.")
    for n in list(gm.graph.nodes):  # observers quantizing the block's inputs belong to it
        if is_observer(gm, n) and n not in members:
            users = sorted(n.users, key=order.get)
            if users and users[0] in members:
                members.add(n)
    while True:  # close: anything between the block's nodes on a dependency path joins it
        reaches: dict[Node, bool] = {}
        added = False
        for n in gm.graph.nodes:
            reaches[n] = n in members or any(reaches[a] for a in n.all_input_nodes)
            if n not in members and reaches[n] and n.op in ("call_function", "call_module") and \
                    any(u in members for u in n.users):
                members.add(n)
                added = True
        if not added:
            break
    ordered = sorted(members, key=order.get)
    inputs = sorted({a for n in ordered for a in n.all_input_nodes if a not in members and a.op != "get_attr"},
                    key=order.get)
    # an observer's output read outside (one observer shared by two consumers) is a quantized copy, not a
    # result of the block: later blocks read it as an input, the loss ignores it
    # sizes (e.g. a sequence length times 2) are recomputed wherever they are read: not outputs to learn
    outputs = [n for n in ordered if any(u not in members for u in n.users) and not is_observer(gm, n)
               and not is_shape_value(n)]
    if not outputs:
        raise ValueError(f"block {name!r} has no outputs: none of its values is read outside it.")
    return Block(name, ordered, inputs, outputs)


def find_blocks(gm: GraphModule) -> list[Block]:
    """The reconstruction blocks of a prepared graph, in graph order: one per ResBlock / attention / transformer
    block module with a quantized op, and one per other quantized layer (conv, linear, attention matmul).

    Args:
        gm: a prepared graph (from `prepare_pt2e(graph, DiffusionQuantizer(config))`).

    Example:
        >>> [b.name for b in find_blocks(prepared)][:3]
        ['conv_in', 'time_embedding.linear_1', 'time_embedding.linear_2']
    """
    groups: dict[str, list[Node]] = {}
    observed: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        key = _block_module(node)
        quantized = any(is_observer(gm, a) for a in node.all_input_nodes)
        if key is None:
            key = module_path(node) if quantized else None
            if key is None:
                continue
            key = "layer:" + key
        groups.setdefault(key, []).append(node)
        if quantized:
            observed.add(key)
    blocks = []
    claimed: set[Node] = set()
    for key, nodes in groups.items():
        if key not in observed:
            continue
        label = key[len("layer:"):] if key.startswith("layer:") else key
        label = label[len(EXPORT_PREFIX):] if label.startswith(EXPORT_PREFIX) else label
        block = block_from_nodes(gm, nodes, label)
        overlap = claimed.intersection(block.nodes)
        if overlap:
            raise ValueError(f"blocks overlap at {sorted(n.name for n in overlap)[:5]} (block {label!r}); pass "
                             "explicit node sets to reconstruct_blocks instead.")
        claimed.update(block.nodes)
        blocks.append(block)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(blocks, key=lambda b: min(order[n] for n in b.outputs))  # dependency order


def _same_size(a, b) -> bool:
    return str(a) == str(b)


def build_block_module(gm: GraphModule, block: Block, quantizers: dict[str, torch.nn.Module]) -> GraphModule:
    """A GraphModule computing `block.outputs` from its tensor inputs, with every observer replaced by the
    quantizer of the same target in `quantizers` (weights are read from `gm`'s constants).

    Integer inputs (sizes read with `sym_size`, and arithmetic on them) are recomputed from a tensor input of the
    same symbolic size, so the module runs at any batch size.
    """
    graph, env, root = Graph(), {}, {}
    tensor_inputs = block.tensor_inputs
    for n in tensor_inputs:
        env[n] = graph.placeholder(n.name)
    def size(n: Node) -> Node:
        """A size input: read from a tensor input with the same symbolic size, or recomputed from sizes
        (e.g. 2 * tokens)."""
        if n in env:
            return env[n]
        val = n.meta.get("val")
        source = next(((t, d) for t in tensor_inputs if isinstance(t.meta.get("val"), torch.Tensor)
                       for d, s in enumerate(t.meta["val"].shape) if _same_size(s, val)), None)
        if source is not None:
            env[n] = graph.call_function(torch.ops.aten.sym_size.int, (env[source[0]], source[1]))
        elif n.op == "call_function" and is_shape_value(n) and n.all_input_nodes:
            env[n] = graph.node_copy(n, size)
        else:
            raise ValueError(f"block {block.name!r} reads {n.name} ({val!r}), which is neither a tensor nor a "
                             "size of one of its tensor inputs; add its producer to the block.")
        return env[n]

    for n in block.inputs:
        if n not in env:
            size(n)

    def arg(a: Node) -> Node:
        if a not in env:
            if a.op != "get_attr":
                raise ValueError(f"block {block.name!r}: {a.name} is read before it is computed.")
            env[a] = graph.get_attr(a.target)
            root[a.target] = get_attr_tensor(gm, a).detach()  # constants: only quantizers learn
        return env[a]

    for n in block.nodes:
        if n.op == "call_module":
            if n.target not in quantizers:
                raise ValueError(f"block {block.name!r}: no quantizer for observer {n.target}.")
            root[n.target] = quantizers[n.target]
            env[n] = graph.call_module(n.target, tuple(arg(a) for a in n.args))
        else:
            env[n] = graph.node_copy(n, arg)
    graph.output(tuple(env[n] for n in block.outputs))
    return GraphModule(root, graph, class_name="ReconstructionBlock")
