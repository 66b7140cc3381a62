"""Time-grouped activation ranges on real int8 kernels (TQ-DiT's time grouping, docs/methods.md#time-groups), an
alternative to finite-set calibration.

Activation ranges drift with the timestep. Finite-set calibration gives every timestep its own qparams, but a
run-time activation scale sends the convs to simulated q/dq (inductor's `qconv` patterns need a constant one).
Here the sampler's timesteps are split into K runs of consecutive steps; each group gets constant activation
qparams from its own timesteps' statistics (`TimestepActivationObserver.qparams_over`), and its own converted
graph, which compiles onto the same oneDNN `qconv` / `qlinear` kernels as the plain one. `TimeGroupedGraph`
holds the K graphs (their weight constants shared: one copy of the integer weights) and picks one per sample
by timestep; a batch whose timesteps fall in several groups is split and put back together.

Where to cut: "uniform" makes groups of equal size (TQ-DiT). "ranges" picks the boundaries that lose the least
activation resolution: a timestep t quantized with its group G's range instead of its own loses
log2(range_G / range_t) bits in that quantizer, and the split minimises that sum over every activation
observer and timestep (exact dynamic programming over contiguous splits, on the observed min/max ranges).

Cost: K compiled graphs. Inductor's freezing packs each graph's weights for oneDNN separately, so the compiled
model holds K copies of the packed weights at run time (the converted and saved model holds one), and compiling
takes K times as long; a call runs one graph, so latency is unchanged (see the bench's `--ablation timegroups`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.fx import GraphModule
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from diffusion_ao.graph import resolve_attr
from diffusion_ao.grouped_graph import TimeGroupedGraph
from diffusion_ao.method_configs import TimeGroupConfig
from diffusion_ao.methods.state import RecipeState
from diffusion_ao.observers import TimestepActivationObserver, diffusion_observers
from diffusion_ao.passes.temporal_cache import normalise_timesteps


@dataclass
class TimeGroups:
    """How the timesteps were grouped (`QuantizationReport.time_groups`).

    Attributes:
        groups: the timesteps of each group, in sampling order.
        lost_bits: the activation resolution lost to sharing ranges, in bits summed over observers and
            timesteps (0 when every timestep has its own range), for this split.
        lost_bits_single: the same for one range over all timesteps (the plain static ranges).
    """

    groups: list[list[float]]
    lost_bits: float
    lost_bits_single: float


def _observer_ranges(prepared: GraphModule, timesteps: list[float]) -> torch.Tensor:
    """[T, O, 2]: every activation observer's (min, max) at each timestep (0 included, as the qparams hold 0)."""
    rows = []
    for _, obs in diffusion_observers(prepared, "time groups"):
        if not isinstance(obs, TimestepActivationObserver):
            continue
        keys = obs.keys_for(timesteps, "Time-grouped ranges")
        rows.append([(min(obs.stats[k].lo, 0.0), max(obs.stats[k].hi, 0.0)) for k in keys])
    if not rows:
        raise ValueError("Time-grouped ranges need activation observers (TimestepActivationObserver): prepare the "
                         "graph with DiffusionQuantizer and a config with act_bits.")
    return torch.tensor(rows, dtype=torch.float64).permute(1, 0, 2)


def _split_costs(ranges: torch.Tensor) -> torch.Tensor:
    """[T + 1, T + 1]: cost[i, j] = bits lost when timesteps i..j-1 share one range (inf where j <= i)."""
    T = ranges.shape[0]
    width = (ranges[..., 1] - ranges[..., 0]).clamp(min=1e-12)  # [T, O]
    own = width.log2().sum(1)  # [T]
    cost = torch.full((T + 1, T + 1), float("inf"), dtype=torch.float64)
    for i in range(T):
        lo = torch.cummin(ranges[i:, :, 0], 0).values
        hi = torch.cummax(ranges[i:, :, 1], 0).values
        shared = (hi - lo).clamp(min=1e-12).log2().sum(1)  # [T - i]: log2 of the shared width, summed over observers
        size = torch.arange(1, T - i + 1, dtype=torch.float64)
        cost[i, i + 1:] = size * shared - torch.cumsum(own[i:], 0)
    return cost


def split_timesteps(ranges: torch.Tensor, groups: int, split: str = "ranges") -> list[tuple[int, int]]:
    """Contiguous groups [(start, end), ...] of the T timesteps whose per-observer ranges are `ranges` ([T, O, 2]).

    Args:
        ranges: (min, max) of each observer at each timestep, in sampling order.
        groups: how many groups (at most T).
        split: "ranges" (fewest bits of resolution lost, exact DP) or "uniform" (equal sizes).

    Example:
        >>> split_timesteps(torch.tensor([[[0., 1.]], [[0., 1.]], [[0., 8.]]]), 2)
        [(0, 2), (2, 3)]
    """
    T = ranges.shape[0]
    if not 1 <= groups <= T:
        raise ValueError(f"Cannot make {groups} time groups of {T} timesteps: use at most {T} groups.")
    if split == "uniform":
        bounds = [round(k * T / groups) for k in range(groups + 1)]
        return list(zip(bounds[:-1], bounds[1:]))
    if split != "ranges":
        raise ValueError(f"split={split!r} is not supported: choose 'ranges' or 'uniform'.")
    cost = _split_costs(ranges)
    best = cost[0].clone()  # best[j]: the cheapest split of timesteps 0..j-1 into k groups (k = 1 here)
    choice = []
    for _ in range(1, groups):
        total = best[:, None] + cost  # [i, j]: k groups up to i, then one group i..j-1
        best, arg = total.min(0)
        choice.append(arg)
    bounds, end = [T], T
    for arg in reversed(choice):
        end = int(arg[end])
        bounds.append(end)
    bounds.append(0)
    bounds = bounds[::-1]
    return list(zip(bounds[:-1], bounds[1:]))


def lost_bits(ranges: torch.Tensor, spans: Sequence[tuple[int, int]]) -> float:
    """Bits of activation resolution lost by a split (summed over observers and timesteps)."""
    cost = _split_costs(ranges)
    return float(sum(cost[i, j] for i, j in spans))


def _share_constants(graphs: list[GraphModule]) -> None:
    """Makes every graph read the first graph's tensor where both read an equal constant under the same name
    (the weights, identical in every group), so the groups hold one copy of them."""
    first = graphs[0]
    shared = {n.target: resolve_attr(first, n.target) for n in first.graph.nodes if n.op == "get_attr"}
    for gm in graphs[1:]:
        for node in gm.graph.nodes:
            if node.op != "get_attr" or node.target not in shared:
                continue
            mine, theirs = resolve_attr(gm, node.target), shared[node.target]
            if (isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) and mine is not theirs
                    and mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(mine, theirs)):
                *path, leaf = node.target.split(".")
                owner = resolve_attr(gm, ".".join(path)) if path else gm
                if leaf in owner._parameters:
                    owner._parameters[leaf] = theirs
                elif leaf in owner._buffers:
                    owner._buffers[leaf] = theirs
                else:
                    setattr(owner, leaf, theirs)


def _batch_inputs(gm: GraphModule) -> list[str]:
    names = []
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], torch.SymInt):
            names.append(node.name)
    return names


def convert_time_grouped(prepared: GraphModule, timesteps: Sequence[float], config: TimeGroupConfig,
                         ) -> tuple[TimeGroupedGraph, TimeGroups]:
    """Converts a calibrated graph into one graph per group of timesteps (`convert_pt2e` of each); consumes
    `prepared` as `convert_pt2e` does.

    Args:
        prepared: a graph after `prepare_pt2e(graph, DiffusionQuantizer(...))` and `calibrate` (and any learned
            method: a learned activation step keeps its correction in every group).
        timesteps: the finite set, in sampling order (`CalibrationData.timesteps`).
        config: how many groups and where to cut.

    Returns:
        The `TimeGroupedGraph` and the `TimeGroups` report.

    Example:
        >>> grouped, groups = convert_time_grouped(prepared, data.timesteps, TimeGroupConfig(groups=4))
        >>> fast = compile_for_cpu(grouped)   # one int8 graph per group
    """
    values = normalise_timesteps(timesteps)
    ranges = _observer_ranges(prepared, values)
    spans = split_timesteps(ranges, config.groups, config.split)
    report = TimeGroups(groups=[values[i:j] for i, j in spans], lost_bits=lost_bits(ranges, spans),
                        lost_bits_single=lost_bits(ranges, [(0, len(values))]))
    observers = [(node.target, obs) for node, obs in diffusion_observers(prepared, "time groups")
                 if isinstance(obs, TimestepActivationObserver)]
    per_group = [{target: obs.qparams_over(obs.keys_for(group, "Time-grouped ranges")) for target, obs in observers}
                 for group in report.groups]
    graphs = []
    for k, qparams in enumerate(per_group):
        copy_k = prepared if k == len(per_group) - 1 else copy.deepcopy(prepared)  # the last one converts in place
        for target, (scale, zero_point) in qparams.items():
            copy_k.get_submodule(target).set_fixed_qparams(scale, zero_point)
        graphs.append(convert_pt2e(copy_k))
    _share_constants(graphs)
    group_of = torch.tensor([k for k, (i, j) in enumerate(spans) for _ in range(i, j)])
    return TimeGroupedGraph(graphs, values, group_of, _batch_inputs(graphs[0])), report


def convert(state: RecipeState) -> TimeGroupedGraph:
    """The recipe's convert step with time-grouped ranges (instead of `convert_pt2e`)."""
    grouped, state.report.time_groups = convert_time_grouped(state.prepared, state.data.timesteps,
                                                             state.config.time_groups)
    return grouped
