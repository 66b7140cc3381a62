"""Rotated linear inputs (`RotationConfig`, docs/methods.md#rotation): every linear the quantizer will quantize
below 8-bit weights computes `linear(x Q, W Q)` with an orthogonal Q of its own (`passes.rotation`), so that the
weight and activation quantizers see the outlier channels spread over all channels.

Example:
    >>> graph = export_denoiser(model, data.steps[0])
    >>> apply_rotation(graph, DiffusionQuantizer(config), RotationConfig(seed=0))
    >>> prepared = prepare_pt2e(graph, quantizer)
"""
from __future__ import annotations

import logging
import zlib

from torch.fx import GraphModule

from diffusion_ao.method_configs import RotationConfig
from diffusion_ao.methods.state import RecipeState
from diffusion_ao.passes.analysis import LINEAR_OPS, get_attr_tensor, module_path
from diffusion_ao.passes.flatten_linear import flatten_linear_inputs
from diffusion_ao.passes.rotation import random_rotation, rotate_linear_input, rotation_blocker

logger = logging.getLogger(__name__)


def rotation_targets(graph: GraphModule, quantizer) -> list:
    """The linears `quantizer` plans below 8-bit weights that can be rotated, in graph order."""
    planned = quantizer.planned_layers(graph)
    return [n for n, p in planned.items() if n.target in LINEAR_OPS and p.layer.weight_bits < 8
            and rotation_blocker(graph, n) is None]


def apply_rotation(graph: GraphModule, quantizer, config: RotationConfig) -> dict[str, int]:
    """Rotates the input of every target linear of `graph` in place, each with its own Q (drawn from `config.seed`
    and the layer's name, so that a layer gets the same Q whatever else is rotated).

    Returns:
        {layer: input width} of the rotated linears.
    """
    flatten_linear_inputs(graph)
    rotated = {}
    for node in rotation_targets(graph, quantizer):
        width = get_attr_tensor(graph, node.args[1]).shape[1]
        name = module_path(node) or node.name
        seed = (config.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        rotate_linear_input(graph, node, random_rotation(width, seed))
        # A module called twice (DiT's final modulation calls block 0's embedding again) is two linears.
        rotated[name if name not in rotated else f"{name} ({node.name})"] = width
    return rotated


def before_prepare(state: RecipeState) -> None:
    """The recipe's step, after LES / PTS (which scale the same inputs) and before the low-rank branch (which then
    splits the rotated weights)."""
    config = state.for_this_family("rotation", state.config.rotation)
    if config is not None:
        state.report.rotation = apply_rotation(state.graph, state.quantizer, config)
        logger.info("rotation: %d linears' inputs rotated", len(state.report.rotation))
