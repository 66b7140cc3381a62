"""`TimeGroupedGraph`: K converted graphs of one model, one per group of timesteps, called as one.

The container of the time-group method (`methods.time_groups`); the backends, serialization and the wrapper
handle it without depending on the method.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.fx import GraphModule

from diffusion_ao.passes.temporal_cache import TIMESTEPS_BUFFER
from diffusion_ao.passes.timestep_guard import check_timesteps

GROUP_INDEX_BUFFER = "time_group_of_timestep"  # [T]: the group of each timestep of the set


class TimeGroupedGraph(torch.nn.Module):
    """K converted graphs with the same structure and weights, one per group of timesteps; a call runs, for each
    sample, the graph of its timestep's group. Called like the converted graph it replaces
    (`graph(sample, timestep, **other_inputs)`); `compile_for_cpu` compiles each group, `size_mb` counts the shared
    weights once, `as_diffusers_denoiser` wraps it for a pipeline.

    Args:
        groups: the per-group graphs (converted, or `compile_for_cpu` of them), in group order.
        timesteps: the finite set of timesteps.
        group_of: [T] the group of each timestep of `timesteps`.
        batch_inputs: names of the inputs whose first dimension is the batch (split with the samples).
    """

    def __init__(self, groups: Sequence[torch.nn.Module], timesteps: Sequence[float], group_of: torch.Tensor,
                 batch_inputs: Sequence[str]) -> None:
        super().__init__()
        self.groups = torch.nn.ModuleList(groups)
        self.register_buffer(TIMESTEPS_BUFFER, torch.tensor(list(timesteps), dtype=torch.float32))
        self.register_buffer(GROUP_INDEX_BUFFER, group_of.long().clone())
        self.batch_inputs = list(batch_inputs)

    @property
    def graph(self) -> torch.fx.Graph:
        """The first group's fx graph (every group has the same inputs and outputs), for code that reads them
        (`as_graph_module(self).graph`)."""
        return as_graph_module(self).graph

    def group_timesteps(self) -> list[list[float]]:
        """The timesteps of each group."""
        known, group_of = getattr(self, TIMESTEPS_BUFFER), getattr(self, GROUP_INDEX_BUFFER)
        return [known[group_of == k].tolist() for k in range(len(self.groups))]

    def map_groups(self, fn: Callable[[torch.nn.Module], torch.nn.Module]) -> "TimeGroupedGraph":
        """A new `TimeGroupedGraph` whose groups are `fn(group)` (e.g. `compile_for_cpu`)."""
        return TimeGroupedGraph([fn(g) for g in self.groups], getattr(self, TIMESTEPS_BUFFER).tolist(),
                                getattr(self, GROUP_INDEX_BUFFER), self.batch_inputs)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, **inputs: torch.Tensor):
        known = getattr(self, TIMESTEPS_BUFFER)
        t = timestep.reshape(-1).to(torch.float32)
        check_timesteps(known, t)
        group = getattr(self, GROUP_INDEX_BUFFER)[(t[:, None] == known[None, :]).float().argmax(1)]
        first = int(group[0])
        if bool((group == first).all()):
            return self.groups[first](sample, timestep, **inputs)
        out = None
        for k in group.unique().tolist():
            rows = (group == k).nonzero().reshape(-1)
            part = {name: (v.index_select(0, rows) if name in self.batch_inputs else v) for name, v in inputs.items()}
            y = self.groups[k](sample.index_select(0, rows), timestep.index_select(0, rows), **part)
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"TimeGroupedGraph splits a batch across groups only for graphs with one tensor "
                                f"output; this one returns {type(y).__name__}. Call it with one group per batch.")
            if out is None:
                out = y.new_empty((len(group), *y.shape[1:]))
            out.index_copy_(0, rows, y)
        return out


def as_graph_module(model: torch.nn.Module) -> Optional[GraphModule]:
    """The fx graph behind a converted, compiled or time-grouped model (a group's, for a `TimeGroupedGraph`), or
    None."""
    if isinstance(model, TimeGroupedGraph):
        model = model.groups[0]
    inner = getattr(model, "model", model)  # CompiledForCPU keeps the graph it compiled
    return inner if isinstance(inner, GraphModule) else None
