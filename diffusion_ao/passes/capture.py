"""Run an exported graph over calibration data and hand the inputs of chosen layers to callbacks.

Methods that need more than an observer's running statistics (PTS voting per sample, LES's learned scales)
look at the actual input tensors of a layer at every timestep. The graph is not modified.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx import GraphModule, Interpreter, Node
from tqdm.auto import tqdm

from ..calibration import CalibrationData
from ..export import graph_input_names

# (layer input, timestep value) -> None
InputCallback = Callable[[torch.Tensor, float], None]


class _InputTap(Interpreter):
    def __init__(self, gm: GraphModule, callbacks: dict[str, InputCallback]) -> None:
        super().__init__(gm)
        self.callbacks = callbacks
        self.timestep = 0.0

    def run_node(self, n: Node):
        if n.name in self.callbacks:
            x = self.env[n.args[0]]
            self.callbacks[n.name](x.detach(), self.timestep)
        return super().run_node(n)


@torch.no_grad()
def run_with_input_callbacks(gm: GraphModule, data: CalibrationData, callbacks: dict[str, InputCallback],
                             batch_size: int = 64, progress: bool = True, desc: str = "capturing") -> None:
    """Runs `gm` on every step of `data`; before each named node runs, calls its callback with the node's
    first input (the activation of a conv/linear) and the current timestep.

    Args:
        gm: an exported graph.
        data: calibration data from `collect_calibration_data`.
        callbacks: node name -> callback.
        batch_size: samples per forward.
        progress: show a progress bar.
        desc: progress-bar label.
    """
    missing = sorted(set(callbacks) - {n.name for n in gm.graph.nodes})
    if missing:
        raise ValueError(f"run_with_input_callbacks: no nodes named {missing} in this graph.")
    extra_inputs = [name for name in graph_input_names(gm)[2:]]  # conditioning, in graph order
    tap = _InputTap(gm, callbacks)
    bar = tqdm(total=data.num_samples, desc=desc, disable=not progress, unit="sample")
    for step in data.steps:
        tap.timestep = step.timestep
        for start in range(0, len(step.sample), batch_size):
            x = step.sample[start:start + batch_size]
            cond = {k: v[start:start + batch_size] for k, v in step.conditioning.items()}
            tap.run(x, torch.full((len(x),), step.timestep), *(cond[name] for name in extra_inputs))
            bar.update(len(x))
    bar.close()
