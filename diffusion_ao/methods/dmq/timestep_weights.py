"""DMQ's adaptive timestep weights (docs/methods.md#adaptive-timestep-weights).

lambda_t = (1 - L_t / sum_s L_s)^r, with L_t an EMA (factor xi) of the per-timestep loss. Steps whose loss is
a large share of the total get less weight, so the range choice is not dominated by the steps that are hard
anyway; r = 0 gives uniform weights. The weights are normalised to sum to 1 and keyed by the scheduler's real
timestep values, so any step count and scheduler works.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.calibration.distributed import gather_dicts, shard, world
from diffusion_ao.graph import call_graph, graph_input_names
from diffusion_ao.methods.learning import AdaptiveTimestepWeights
from diffusion_ao.metrics import relative_mse
from diffusion_ao.observers import TimestepActivationObserver


def activation_observers(prepared: torch.fx.GraphModule) -> list[TimestepActivationObserver]:
    return [m for m in prepared.modules() if isinstance(m, TimestepActivationObserver)]


@torch.no_grad()
def per_timestep_loss(reference: torch.fx.GraphModule, quantized: torch.fx.GraphModule, data: CalibrationData,
                      batch_size: int = 64) -> dict[float, float]:
    """Relative MSE of `quantized` vs `reference` output at each timestep of `data` (the first `batch_size`
    samples of each step). With a `torch.distributed` process group of several ranks, each rank measures a
    contiguous share of the timesteps and the losses are gathered: every rank gets one process's losses."""
    rank, world_size = world()
    names = graph_input_names(reference)
    mine = {}
    for i in shard(len(data.steps), rank, world_size):
        step = data.steps[i]
        inputs = step.graph_inputs(0, batch_size)
        ref = call_graph(reference, inputs, names)
        mine[step.timestep] = relative_mse(call_graph(quantized, inputs, names), ref)
    losses = gather_dicts(mine, "the per-timestep losses")
    return {step.timestep: losses[step.timestep] for step in data.steps}  # in step order, as one process


def adapt_timestep_weights(prepared: torch.fx.GraphModule, reference: torch.fx.GraphModule, data: CalibrationData,
                           r: float = 20.0, ema: float = 0.95, iterations: int = 3,
                           batch_size: int = 32) -> Optional[dict[float, float]]:
    """Sets DMQ's adaptive timestep weights on every activation observer of a calibrated graph.

    Each iteration converts a copy of `prepared` with the current weights, measures the per-timestep output
    loss against the FP `reference` on (the first `batch_size` samples of) `data`, updates the loss EMA and
    hands the new weights to the observers. `convert_pt2e(prepared)` afterwards uses the final weights.

    Args:
        prepared: a calibrated graph from `prepare_pt2e(graph, DiffusionQuantizer(config))`; the observers must
            use the "weighted" timestep aggregation for the weights to matter.
        reference: the FP exported graph.
        data: the calibration data (its timesteps are the keys of the weights).
        r, ema: see `AdaptiveTimestepWeights`.
        iterations: convert / measure / reweight rounds.
        batch_size: samples per timestep used to measure the loss.

    Returns:
        The final weights (None when `iterations` is 0).
    """
    observers = activation_observers(prepared)
    if not observers:
        raise ValueError("adapt_timestep_weights found no TimestepActivationObserver: prepare the graph with "
                         "DiffusionQuantizer and calibrate it first.")
    adaptive, weights = AdaptiveTimestepWeights(r, ema), None
    for _ in range(iterations):
        quantized = convert_pt2e(copy.deepcopy(prepared))
        weights = adaptive.update(per_timestep_loss(reference, quantized, data, batch_size))
        for obs in observers:
            obs.set_timestep_weights(weights)
    return weights
