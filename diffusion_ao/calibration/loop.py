"""`calibrate`: the prepared graph over the calibration data, telling the observers which timestep they see
(timestep-aware calibration, Q-Diffusion, docs/methods.md#calibration-data).

The data (`data.CalibrationData`) holds what a denoiser sees at every sampler step, keyed by the real timestep
value, so any scheduler and step count work; `capture.capture_calibration_data` records it from the user's own
diffusers pipeline call, `collect.collect_calibration_data` with this project's sampler.
"""
from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.calibration.distributed import reduce_observers, shard, world
from diffusion_ao.denoisers import SAMPLE
from diffusion_ao.graph import call_graph, check_graph_inputs, graph_input_names, input_specs, require_exported
from diffusion_ao.observers import TimestepActivationObserver, WeightObserver, timestep_context
from diffusion_ao.observers.fake_quantize import TimestepFakeQuantize, WeightFakeQuantize


def label_observers(prepared: torch.fx.GraphModule) -> list[torch.nn.Module]:
    """Names every diffusion-ao observer after the layer that consumes it (for error messages); returns them."""
    from diffusion_ao.passes.analysis import module_path

    found = []
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        obs = prepared.get_submodule(node.target)
        if isinstance(obs, (TimestepFakeQuantize, WeightFakeQuantize)):  # a QAT graph: label its statistics
            obs = obs.activation_post_process
        if not isinstance(obs, (TimestepActivationObserver, WeightObserver)):
            continue
        users = [u for u in node.users if u.op == "call_function"]
        layer = module_path(users[0]) if users else ""
        kind = "weight" if isinstance(obs, WeightObserver) else "input"
        obs.label = f"the {kind} of '{layer or node.name}'"
        found.append(obs)
    return found


@torch.no_grad()
def calibrate(prepared: torch.fx.GraphModule, data: CalibrationData, batch_size: int = 256,
              progress: bool = True, reset: bool = False) -> None:
    """Runs the prepared graph over the calibration data, telling observers which timestep they are at.

    Statistics accumulate: a second `calibrate` on the same graph adds its data to what the observers hold
    (calibration in parts, e.g. one call per stored batch), and warns that it does, since a retry of the same
    data would count it twice and move MSE-chosen ranges. `reset=True` forgets the earlier statistics first.

    With a `torch.distributed` process group of several ranks, each rank runs its contiguous share of every
    step's samples and the observers' statistics are then merged across ranks (`distributed.reduce_observers`).

    Args:
        prepared: the result of `prepare_pt2e(graph, DiffusionQuantizer(...))`.
        data: from `collect_calibration_data`.
        batch_size: samples per forward.
        progress: show a progress bar.
        reset: forget the activation statistics of earlier `calibrate` calls first (default: add to them).
    """
    require_exported(prepared, "calibrate")
    observers = label_observers(prepared)
    if not observers:
        raise ValueError("calibrate found no diffusion-ao observers in this graph: prepare it first with "
                         "`prepare_pt2e(graph, DiffusionQuantizer(config))` (and do not convert it before).")
    if not isinstance(data, CalibrationData):
        raise TypeError(f"calibrate needs CalibrationData from collect_calibration_data, got {type(data).__name__}.")
    data.validate()
    specs = input_specs(prepared)
    max_batch = min((s.max_batch for s in specs.values() if s.max_batch is not None), default=None)
    if batch_size < 1 or (max_batch is not None and batch_size > max_batch):
        raise ValueError(f"calibrate: batch_size must be in 1..{max_batch or 'inf'} (the largest batch the graph was "
                         f"exported for), got {batch_size}.")
    seen = [obs for obs in observers if isinstance(obs, TimestepActivationObserver) and obs.stats]
    if seen and reset:
        for obs in seen:
            obs.reset_statistics()
    elif seen:
        warnings.warn(f"calibrate: {len(seen)} observers already hold statistics of an earlier calibrate call; "
                      "this data is added to them. To calibrate again from scratch (e.g. after an interrupted "
                      "run), pass reset=True.", UserWarning, stacklevel=2)
    rank, world_size = world()
    shares = [shard(len(step), rank, world_size) for step in data.steps]  # all of it in one process
    if not any(shares):
        raise ValueError(f"calibrate: rank {rank} of {world_size} gets no calibration samples; every rank needs "
                         "at least one (use more samples per step, or fewer ranks).")
    bar = tqdm(total=sum(len(r) for r in shares), desc="calibrating", disable=not progress, unit="sample")
    names = graph_input_names(prepared)
    for step, share in zip(data.steps, shares):
        for start in range(share.start, share.stop, batch_size):
            stop = min(start + batch_size, share.stop)
            inputs = step.graph_inputs(start, stop)
            check_graph_inputs(specs, inputs, "calibrate")  # a clear error where torch's guards would assert
            with timestep_context(step.timestep, rows=(start, stop)):  # rows: the observers' subsample
                call_graph(prepared, inputs, names)
            bar.update(len(inputs[SAMPLE]))
    bar.close()
    reduce_observers(prepared)  # all ranks end with the statistics of all the data (nothing with one process)
