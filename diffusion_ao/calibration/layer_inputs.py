"""Run an exported graph over calibration data and hand the inputs of chosen layers to callbacks.

Methods that need more than an observer's running statistics (PTS voting per sample, LES's learned scales)
look at the actual input tensors of a layer at every timestep. The graph is not modified.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.fx import GraphModule
from tqdm.auto import tqdm

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.denoisers import SAMPLE
from diffusion_ao.graph import GraphRunner

# (layer input, timestep value) -> None
InputCallback = Callable[[torch.Tensor, float], None]


@torch.no_grad()
def run_with_input_callbacks(gm: GraphModule, data: CalibrationData, callbacks: dict[str, InputCallback],
                             batch_size: int = 64, progress: bool = True, desc: str = "capturing",
                             modules: Optional[dict[str, Callable]] = None) -> None:
    """Runs `gm` on every step of `data` (only as far as the named nodes need); before each named node runs,
    calls its callback with the node's first input (the activation of a conv/linear) and the current timestep.

    Args:
        gm: an exported graph.
        data: calibration data (`capture_calibration_data` / `collect_calibration_data`).
        callbacks: node name -> callback.
        batch_size: samples per forward.
        progress: show a progress bar.
        desc: progress-bar label.
        modules: `call_module` target -> stand-in, as for `GraphRunner` (e.g. identities that bypass the
            observers of a prepared graph, so that capturing does not feed them).
    """
    current = {"t": 0.0}
    hooks = {name: (lambda x, cb=cb: cb(x, current["t"])) for name, cb in callbacks.items()}
    runner = GraphRunner(gm, input_hooks=hooks, modules=modules)
    wanted = [n for n in gm.graph.nodes if n.name in callbacks]
    bar = tqdm(total=data.num_samples, desc=desc, disable=not progress, unit="sample")
    for step, inputs in data.batches(batch_size):
        current["t"] = step.timestep
        runner.values(inputs, wanted)
        bar.update(len(inputs[SAMPLE]))
    bar.close()
