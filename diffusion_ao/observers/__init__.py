"""Observers that plug into torchao's PT2E flow (`prepare_pt2e` / `convert_pt2e`)."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.observers.activation import TimestepActivationObserver
from diffusion_ao.observers.context import current_timestep, timestep_context
from diffusion_ao.observers.fake_quantize import TimestepFakeQuantize, WeightFakeQuantize
from diffusion_ao.observers.weight import WeightObserver

__all__ = ["TimestepActivationObserver", "TimestepFakeQuantize", "WeightFakeQuantize", "WeightObserver",
           "current_timestep", "diffusion_observers", "timestep_context"]


def diffusion_observers(prepared: GraphModule, owner: str) -> list[tuple[Node, torch.nn.Module]]:
    """(node, observer) for every diffusion-ao observer (weight or timestep activation) of a prepared graph, in
    graph order.

    Args:
        prepared: a graph after `prepare_pt2e`.
        owner: the pass that asks, named in the error.

    Raises:
        ValueError: if the graph holds another quantizer's observer or fake-quantize module (its qparams would
            be ignored silently).
    """
    found = []
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        obs = prepared.get_submodule(node.target)
        if isinstance(obs, (WeightObserver, TimestepActivationObserver)):
            found.append((node, obs))
        elif isinstance(obs, (WeightFakeQuantize, TimestepFakeQuantize)):
            raise ValueError(f"{owner} runs on a graph from `prepare_pt2e`; this one is from `prepare_qat_pt2e` "
                             f"({node.target} is a {type(obs).__name__}). Prepare with "
                             "`prepare_pt2e(graph, DiffusionQuantizer(config))`, or train the QAT graph with "
                             "`diffusion_ao.methods.qat.finetune`.")
        elif "observer" in type(obs).__name__.lower() or "fake_quant" in type(obs).__name__.lower():
            raise ValueError(f"{owner} supports diffusion-ao observers only; {node.target} is a "
                             f"{type(obs).__name__}. Prepare the graph with DiffusionQuantizer.")
    return found
