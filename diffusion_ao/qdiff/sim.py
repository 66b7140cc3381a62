"""`QuantSim`: the fake-quantized view of a calibrated PT2E graph that block reconstruction learns in.

Every diffusion-ao observer of the prepared graph gets a stand-in: an `AdaRoundWeightQuantizer` for a weight
observer, an `LSQActivationQuantizer` for an activation observer, both initialised from the observer's qparams
(so before learning the simulation is the converted graph: round-to-nearest weights, the observers' ranges).
`run` evaluates the prepared graph (with `diffusion_ao.graph.GraphRunner`) with the observers bypassed (floating
point) or replaced by the stand-ins (quantized), and returns the values of chosen nodes, computing only what they
need. `bake` writes the learned result back so that `convert_pt2e` produces ordinary q/dq ops with the learned
integers and step sizes.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.fx import GraphModule, Node

from ..graph import GraphRunner
from ..observers import WeightObserver, diffusion_observers
from ..passes.analysis import get_attr_tensor
from ..passes.channel_scaling import replace_constant
from ..observers.adaround import AdaRoundWeightQuantizer
from ..observers.lsq import LSQActivationQuantizer


class QuantSim:
    """Learnable fake-quantizers for the observers of a calibrated graph.

    Args:
        prepared: a calibrated graph from `prepare_pt2e(graph, DiffusionQuantizer(config))` + `calibrate`.

    Attributes:
        weights: observer target -> `AdaRoundWeightQuantizer`.
        activations: observer target -> `LSQActivationQuantizer`.
        weight_nodes: observer target -> the get_attr node of its weight.
    """

    def __init__(self, prepared: GraphModule) -> None:
        self.gm = prepared
        self.weights: dict[str, AdaRoundWeightQuantizer] = {}
        self.activations: dict[str, LSQActivationQuantizer] = {}
        self.weight_nodes: dict[str, Node] = {}
        self.qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the observers' qparams at the start
        self.learned: set[str] = set()
        self._runners: dict[str, GraphRunner] = {}
        for node, obs in diffusion_observers(prepared, "QuantSim"):
            if isinstance(obs, WeightObserver):
                weight = get_attr_tensor(prepared, node.args[0])
                if weight is None:
                    raise ValueError(f"QuantSim: the weight observer {node.target} does not read a constant.")
                scale, zp = self.qparams[node.target] = obs.calculate_qparams()
                q = AdaRoundWeightQuantizer(weight, scale, zp, obs.quant_min, obs.quant_max, obs.ch_axis)
                q.soft = False
                self.weights[node.target] = q
                self.weight_nodes[node.target] = node.args[0]
            else:
                scale, zp = self.qparams[node.target] = obs.calculate_qparams()
                self.activations[node.target] = LSQActivationQuantizer(scale, zp, obs.quant_min, obs.quant_max,
                                                                       learn=False)
        if not self.weights and not self.activations:
            raise ValueError("QuantSim found no diffusion-ao observers: pass a graph prepared with "
                             "DiffusionQuantizer and calibrated, before convert_pt2e.")

    @property
    def quantizers(self) -> dict[str, torch.nn.Module]:
        return {**self.weights, **self.activations}

    def _runner(self, quantized: bool) -> GraphRunner:
        key = "quantized" if quantized else "fp"
        if key not in self._runners:  # FP: observers are identities
            modules = self.quantizers if quantized else {t: (lambda x: x) for t in self.quantizers}
            self._runners[key] = GraphRunner(self.gm, modules=modules)
        return self._runners[key]

    @torch.no_grad()
    def run(self, inputs: dict[str, torch.Tensor], wanted: Iterable[Node], quantized: bool) -> dict[Node, torch.Tensor]:
        """Runs the graph (floating point or fake-quantized) on named inputs, only as far as `wanted` needs."""
        wanted = list(wanted)
        return dict(zip(wanted, self._runner(quantized).values(inputs, wanted)))

    @torch.no_grad()
    def bake(self) -> int:
        """Writes the learned rounding and step sizes into the prepared graph; returns how many quantizers.

        Each learned weight is replaced (out of place: the eager model's parameters are not touched) by
        scale * (hard codes - zero point), and its observer is pinned to that grid, so `convert_pt2e` quantizes it
        back to exactly the learned integers. Each learned activation observer returns the learned step size.
        """
        for target in sorted(self.learned):
            obs = self.gm.get_submodule(target)
            scale, zp = self.qparams[target]
            if target in self.weights:
                q = self.weights[target]
                replace_constant(self.gm, self.weight_nodes[target], lambda old: q.baked_weight(), requires_grad=False)
                obs.set_fixed_qparams(scale, zp)
            else:
                q = self.activations[target]
                learned = q.scale.detach().abs().clamp_min(1e-8).reshape(scale.shape).to(scale.dtype)
                obs.set_fixed_qparams(learned, zp)
        return len(self.learned)
