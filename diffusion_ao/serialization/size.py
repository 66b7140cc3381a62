"""What a model weighs: the tensors a graph reads, the bit width of its weight codes, and its packed size.

After `convert_pt2e` a graph module still holds the original floating-point parameters of the quantized layers
although its graph reads only the folded integer constants; sizes here count what the graph reads, with
low-bit weight codes at their packed size (4-bit codes two per byte), which is what `save_quantized` writes.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from diffusion_ao.graph import DEQUANTIZE_OPS, graph_tensor_targets, qd, resolve_attr
from diffusion_ao.serialization.packing import packed_nbytes

# Position of quant_min / quant_max in the args of each dequantize op.
_QRANGE_ARGS = {qd.dequantize_per_channel.default: (4, 5), qd.dequantize_per_tensor.default: (3, 4),
                qd.dequantize_per_tensor.tensor: (3, 4)}


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and plain tensor attributes of `module` and all its submodules."""
    found = []
    for sub in module.modules():
        found.extend(sub._parameters.values())
        found.extend(sub._buffers.values())
        # Tensor constants that graph passes (e.g. convert_pt2e's weight folding) set as plain attributes.
        found.extend(v for v in vars(sub).values() if isinstance(v, torch.Tensor))
    return [t for t in found if t is not None]


def graph_tensors(graph: GraphModule) -> list[torch.Tensor]:
    """The tensors a graph module's graph uses: its `get_attr` constants and the tensors of called submodules."""
    found = []
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            obj = resolve_attr(graph, node.target)
            found.extend([obj] if isinstance(obj, torch.Tensor) else module_tensors(obj))
        elif node.op == "call_module":
            found.extend(module_tensors(graph.get_submodule(node.target)))
    return found


def signed_bits_for(qmin: int, qmax: int) -> int:
    """The fewest bits b whose signed range [-2^(b-1), 2^(b-1)-1] holds [qmin, qmax] (e.g. -8..7 -> 4)."""
    return next(b for b in range(1, 65) if -(2 ** (b - 1)) <= qmin and qmax <= 2 ** (b - 1) - 1)


def weight_code_bits(graph: GraphModule) -> dict[str, int]:
    """get_attr target -> bit width, for integer constants that only feed dequantize ops (weight codes).

    The width comes from the dequantize ops' quant_min / quant_max (e.g. -8..7 is 4 bits), never from the dtype.

    Raises:
        ValueError: if two dequantize ops read the same codes with different ranges.
    """
    bits: dict[str, int] = {}
    for node in graph.graph.nodes:
        if node.op != "get_attr":
            continue
        tensor = resolve_attr(graph, node.target)
        if not isinstance(tensor, torch.Tensor) or tensor.is_floating_point() or not node.users:
            continue
        users = list(node.users)
        if not all(u.target in DEQUANTIZE_OPS and u.args[0] is node for u in users):
            continue
        for u in users:
            lo_i, hi_i = _QRANGE_ARGS[u.target]
            qmin, qmax = int(u.args[lo_i]), int(u.args[hi_i])
            # never wider than the codes' storage: an unsigned range (e.g. uint8 0..255) needs no sign bit
            width = min(signed_bits_for(qmin, qmax), 8 * tensor.element_size())
            if node.target in bits and bits[node.target] != width:
                raise ValueError(f"'{node.target}' is dequantized with two different ranges.")
            bits[node.target] = width
    return bits


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (tensors sharing storage are counted once)."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def packed_graph_bytes(*graphs: GraphModule) -> int:
    """Bytes of the tensors the graphs read (a tensor several of them share counted once), with weight codes at
    their packed bit width."""
    packed: dict[tuple[int, int], int] = {}  # storage -> packed bytes of the codes stored there
    for graph in graphs:
        targets = graph_tensor_targets(graph)
        for name, b in weight_code_bits(graph).items():
            t = targets[name]
            packed[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = packed_nbytes(t.numel(), b)
    rest = [t for graph in graphs for t in graph_tensors(graph)
            if (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) not in packed]
    return tensor_bytes(rest) + sum(packed.values())


def size_mb(module: torch.nn.Module) -> float:
    """MiB (2**20 bytes) a model needs: a graph's used tensors (weight codes packed), or all of an eager module's.
    A `TimeGroupedGraph` counts the weights its groups share once.

    Example:
        >>> size_mb(converted)   # 4-bit weights count half a byte each
    """
    from diffusion_ao.grouped_graph import TimeGroupedGraph  # it reads get_attr targets with this module's helpers

    if isinstance(module, GraphModule):
        return packed_graph_bytes(module) / 2**20
    if isinstance(module, TimeGroupedGraph) and all(isinstance(g, GraphModule) for g in module.groups):
        return packed_graph_bytes(*module.groups) / 2**20
    return tensor_bytes(module_tensors(module)) / 2**20


def held_size_mb(module: torch.nn.Module) -> float:
    """MiB of every tensor the module object holds, used by its graph or not."""
    return tensor_bytes(module_tensors(module)) / 2**20
