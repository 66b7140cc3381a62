"""Temporal information blocks (TIB, TFMQ-DM, docs/methods.md#temporal-information-blocks-tib): the part of an
exported UNet that depends on the timestep alone, found in the graph rather than from per-model lists of module
names.

Two sets are told apart on purpose:

* `timestep_only_nodes`: nodes whose value depends on the `timestep` input and constants only (the sinusoidal
  projection, the time MLP, every ResBlock's time projection). Only these can be precomputed for a finite set
  of timesteps (`passes.temporal_cache`).
* `analysis.time_embedding_nodes`: nodes that depend on the timestep but not on the sample. In a class- or
  text-conditioned model this also holds the conditioning term added to the time embedding and everything
  after it. `QuantConfig.quantize_time_embedding` (the scope switch of docs/methods.md#scopes) refers to this
  larger set: the time path as a whole, conditioning included.

Example:
    >>> blocks = find_temporal_blocks(export_unet(unet, sample_shape=(1, 1, 16, 16)))
    >>> blocks.module_paths[:3]
    ['time_embedding.linear_1', 'time_embedding.linear_2', 'down_blocks.0.resnets.0.time_emb_proj']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.denoisers import TIMESTEP
from diffusion_ao.passes.analysis import WEIGHTED_OPS, input_dependencies, module_path

aten = torch.ops.aten
# Ops that only reshape / retype their input: a temporal feature seen through them is still the same feature.
_VIEW_LIKE = {aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.to.dtype,
              aten._to_copy.default, aten.expand.default, aten.squeeze.dim, aten.flatten.using_ints}
_SIDE_EFFECT_ONLY = {aten._assert_tensor_metadata.default}


def timestep_only_nodes(gm: GraphModule, keys: Sequence[str] = (TIMESTEP,)) -> set[Node]:
    """The `call_function` nodes whose value depends on the `timestep` input and on constants only (with
    `keys=(TIMESTEP, CLASS_LABELS)`: on the timestep and / or the class label, and constants)."""
    deps = input_dependencies(gm)
    allowed = frozenset(keys)
    return {n for n, d in deps.items() if n.op == "call_function" and d and d <= allowed}


def _uses_outside(node: Node, inside: set[Node]) -> bool:
    return any(u not in inside for u in node.users if u.target not in _SIDE_EFFECT_ONLY)


def timestep_only_frontier(gm: GraphModule, t_only: Optional[set[Node]] = None) -> list[Node]:
    """The timestep-only nodes read by the rest of the graph: what the rest of the denoiser needs from the TIB."""
    t_only = timestep_only_nodes(gm) if t_only is None else t_only
    return [n for n in gm.graph.nodes if n in t_only and n.target not in _SIDE_EFFECT_ONLY
            and _uses_outside(n, t_only)]


def feature_source(node: Node) -> Node:
    """`node` seen back through reshapes and dtype casts: the op that computed the feature it carries."""
    while node.op == "call_function" and node.target in _VIEW_LIKE and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


@dataclass
class TemporalBlocks:
    """The TIB of an exported graph.

    Attributes:
        nodes: every timestep-only node.
        linears: the timestep-only conv/linear nodes (the TIB's weighted layers), in graph order.
        frontier: the timestep-only nodes the rest of the graph reads.
        features: the temporal features that can be cached one by one, in graph order: every frontier value
            (seen back through reshapes) and every TIB layer output shared by several consumers (the time
            embedding). In a diffusers UNet: the shared embedding and each ResBlock's time projection.
    """

    nodes: set[Node]
    linears: list[Node]
    frontier: list[Node]
    features: list[Node]

    @property
    def module_paths(self) -> list[str]:
        """Module paths of the TIB's weighted layers, e.g. `time_embedding.linear_1`, `...time_emb_proj`."""
        return [module_path(n) for n in self.linears]

    @property
    def all_module_paths(self) -> set[str]:
        """Module paths of every TIB node (including `time_proj`, the sinusoidal projection)."""
        return {p for p in (module_path(n) for n in self.nodes) if p}

    def feature_names(self) -> dict[Node, str]:
        """A readable, unique name per temporal feature: its module path (or node name)."""
        return {n: module_path(n) or n.name for n in self.features}


def find_temporal_blocks(gm: GraphModule, keys: Sequence[str] = (TIMESTEP,)) -> TemporalBlocks:
    """Finds the temporal information blocks of an exported denoiser (see the module docstring).

    Args:
        gm: a graph from `export_denoiser` (before or after `prepare_pt2e` / `convert_pt2e`).
        keys: the inputs the block may depend on: the timestep, or (for a class-conditional model whose
            modulation reads the label, e.g. DiT's adaLN-Zero) the timestep and `class_labels`.

    Returns:
        A `TemporalBlocks`. It is empty for a graph whose timestep path mixes with the sample at once.

    Example:
        >>> tib = find_temporal_blocks(graph)
        >>> [p for p in tib.module_paths if p.endswith("time_emb_proj")]
    """
    t_only = timestep_only_nodes(gm, keys)
    frontier = timestep_only_frontier(gm, t_only)
    linears = [n for n in gm.graph.nodes if n in t_only and n.target in WEIGHTED_OPS]
    sources = {feature_source(n) for n in frontier}
    shared = {n for n in linears if len([u for u in n.users if u.target not in _SIDE_EFFECT_ONLY]) > 1}
    features = [n for n in gm.graph.nodes if n in sources or n in shared]
    return TemporalBlocks(nodes=t_only, linears=linears, frontier=frontier, features=features)
