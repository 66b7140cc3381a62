"""Sensitivity-driven mixed precision: keep the few layers whose low-bit weights hurt the prediction most at a
higher width, within a size budget.

Not in the three seed papers. Each quantized layer's sensitivity is measured directly: only its weights are
rounded (with the config's weight observer, at the config's width), every other layer stays FP, and the error of
the denoiser's prediction is averaged over the calibration timesteps (relative MSE per timestep, so that quiet and
loud timesteps count alike). The layers are then promoted to `MixedPrecisionConfig.weight_bits` greedily, most
error per added byte first, while the estimated packed size stays within `size_budget` x the FP32 size. The plan
becomes ordinary `module_name_overrides`, so the quantizer's decisions (and `save_quantized`) carry the widths.

Example:
    >>> plan = plan_mixed_precision(export_denoiser(model, data.steps[0]), data, QuantConfig.preset("w4a8"),
    ...                             MixedPrecisionConfig(size_budget=0.17))
    >>> config = QuantConfig.preset("w4a8").replace(module_name_overrides=plan.overrides)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.calibration.distributed import gather_dicts, share_by_work, world
from diffusion_ao.config import LayerQuant, MixedPrecisionConfig, QuantConfig
from diffusion_ao.graph import call_graph, graph_input_names
from diffusion_ao.methods.state import RecipeState
from diffusion_ao.passes.analysis import get_attr_tensor, module_path
from diffusion_ao.serialization.packing import packed_nbytes
from diffusion_ao.serialization.size import size_mb

logger = logging.getLogger(__name__)
QPARAM_BYTES = 4 + 8  # per output channel of a converted weight: float32 scale and int64 zero point


@dataclass
class LayerSensitivity:
    """One layer's entry in the plan.

    Attributes:
        path: module path (the key of the override).
        numel: weight elements.
        error: mean over timesteps of the prediction's relative MSE when only this layer's weights are rounded.
        weight_bits: the width the plan gives it.
    """

    path: str
    numel: int
    error: float
    weight_bits: int


@dataclass
class MixedPrecisionPlan:
    """What `plan_mixed_precision` chose (`QuantizationReport.mixed_precision`).

    Attributes:
        layers: every candidate layer, most sensitive first.
        overrides: module path -> `LayerQuant` for the promoted layers.
        fp32_bytes: bytes of the FP32 graph's tensors.
        planned_bytes: estimated packed bytes of the quantized graph under the plan.
    """

    layers: list[LayerSensitivity] = field(default_factory=list)
    overrides: dict[str, LayerQuant] = field(default_factory=dict)
    fp32_bytes: int = 0
    planned_bytes: int = 0

    @property
    def size_ratio(self) -> float:
        return self.planned_bytes / max(1, self.fp32_bytes)


def _prediction(out) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


@torch.no_grad()
def layer_sensitivities(graph: GraphModule, data: CalibrationData, config: QuantConfig, below_bits: int = 8,
                        has_vnni: Optional[bool] = None) -> dict[str, tuple[int, int, float, Optional[int]]]:
    """{module path: (weight numel, output channels, error, activation bits)} for every layer `config` quantizes
    with fewer than `below_bits` weight bits.

    Args:
        graph: the FP export of the denoiser (its weights are swapped one layer at a time and restored).
        data: the probe data (a few samples per timestep).
        config: gives the layers, their widths and the weight observer.
        below_bits: the candidates' weight width is below this.
        has_vnni: as for `DiffusionQuantizer`.

    With a `torch.distributed` process group of several ranks, the ranks share out the layers and gather the
    errors: every rank gets one process's result.
    """
    from diffusion_ao.quantizer.quantizer import DiffusionQuantizer

    planned = DiffusionQuantizer(config, has_vnni=has_vnni).planned_layers(graph)
    by_path: dict[str, list] = {}
    for node, plan in planned.items():
        if plan.layer.weight_bits < below_bits:
            by_path.setdefault(module_path(node) or node.name, []).append((node, plan))
    names = graph_input_names(graph)
    steps = [(step.graph_inputs(), _prediction(call_graph(graph, step.graph_inputs(), names))) for step in data.steps]
    rank, world_size = world()
    mine = share_by_work(list(by_path), lambda path: 1, world_size)[rank]  # every layer costs a forward per step
    result = {}
    for path in mine:
        entries = by_path[path]
        saved = []
        for node, plan in entries:
            weight = get_attr_tensor(graph, node.args[1])
            saved.append((weight, weight.detach().clone()))
            weight.data.copy_(plan.weight_spec.observer_or_fake_quant_ctr().fake_quantized(weight.detach()))
        try:
            errors = [((_prediction(call_graph(graph, inputs, names)) - fp).pow(2).mean()
                       / fp.pow(2).mean().clamp_min(1e-12)).item() for inputs, fp in steps]
        finally:
            for weight, original in reversed(saved):  # reversed: a weight shared by two nodes ends as it began
                weight.data.copy_(original)
        numel = sum(w.numel() for w, _ in saved)
        channels = sum(w.shape[0] for w, _ in saved)
        result[path] = (numel, channels, sum(errors) / len(errors), entries[0][1].layer.act_bits)
    gathered = gather_dicts(result, "the layers' sensitivities")
    return {path: gathered[path] for path in by_path}  # in graph order, as one process


def plan_mixed_precision(graph: GraphModule, data: CalibrationData, config: QuantConfig,
                         settings: Optional[MixedPrecisionConfig] = None, has_vnni: Optional[bool] = None,
                         fp32_bytes: Optional[int] = None) -> MixedPrecisionPlan:
    """Measures every low-bit layer's sensitivity and promotes the worst ones within the size budget.

    Args:
        graph: the FP graph that will be quantized (left as it was): the export, or the export after the passes
            that remove layers (the TFMQ cache), so that the budget goes to layers that stay.
        data: calibration data; `settings.samples_per_step` of each step are the probe.
        config: the config to plan for (its `module_name_overrides` are kept and win over the plan).
        settings: the budget and the promoted width (default `MixedPrecisionConfig()`).
        has_vnni: as for `DiffusionQuantizer`.
        fp32_bytes: the FP32 model's size the budget is a fraction of (default: the tensors of `graph`).

    Returns:
        A `MixedPrecisionPlan`; `plan.overrides` go into `QuantConfig.module_name_overrides`.
    """
    settings = settings or MixedPrecisionConfig()
    found = layer_sensitivities(graph, data.subset(settings.samples_per_step), config, settings.weight_bits, has_vnni)
    graph_bytes = int(size_mb(graph) * 2**20)
    fp32_bytes = graph_bytes if fp32_bytes is None else fp32_bytes
    low = config.weight_bits
    planned = graph_bytes - sum(n * 4 - packed_nbytes(n, low) - c * QPARAM_BYTES for n, c, _, _ in found.values())
    budget = settings.size_budget * fp32_bytes
    chosen: dict[str, LayerQuant] = {}
    by_value = sorted(found.items(), key=lambda kv: kv[1][2] / max(1, packed_nbytes(kv[1][0], settings.weight_bits)
                                                                      - packed_nbytes(kv[1][0], low)), reverse=True)
    for path, (numel, _, _, act_bits) in by_value:
        extra = packed_nbytes(numel, settings.weight_bits) - packed_nbytes(numel, low)
        if path in config.module_name_overrides or planned + extra > budget:
            continue
        planned += extra
        chosen[path] = LayerQuant(settings.weight_bits, act_bits)
    layers = [LayerSensitivity(path, n, err, settings.weight_bits if path in chosen else low)
              for path, (n, _, err, _) in sorted(found.items(), key=lambda kv: kv[1][2], reverse=True)]
    plan = MixedPrecisionPlan(layers, chosen, fp32_bytes, int(planned))
    if planned > budget:
        logger.warning("Mixed precision: the all-%d-bit model (%.3f of FP32) is already over the size budget %.3f; "
                       "no layer promoted.", low, plan.size_ratio, settings.size_budget)
    logger.info("Mixed precision: %d of %d layers at %d-bit weights, estimated %.3f of FP32", len(chosen),
                len(found), settings.weight_bits, plan.size_ratio)
    return plan


def before_prepare(state: RecipeState) -> None:
    """The recipe's step: the plan on the graph left after the cache (the budget goes to layers that stay); its
    overrides narrow the config before the quantizer is made."""
    plan = plan_mixed_precision(state.graph, state.data, state.config, state.config.mixed_precision,
                                has_vnni=state.has_vnni, fp32_bytes=state.fp32_bytes)
    state.report.mixed_precision = plan
    state.config = state.config.replace(module_name_overrides={**plan.overrides, **state.config.module_name_overrides})
