"""The recipe's Q-Diffusion step (a `QDiffConfig`, `methods.state`): block reconstruction of the calibrated graph
(the shortcut split runs in `DiffusionQuantizer.transform_for_annotation`)."""
from __future__ import annotations

from diffusion_ao.methods.qdiff.reconstruction import reconstruct_blocks
from diffusion_ao.methods.state import RecipeState


def before_convert(state: RecipeState) -> None:
    config = state.for_this_family("block reconstruction", state.config.qdiff.reconstruction)
    if config is not None and config.iterations > 0:
        weights = state.report.timestep_weights if config.use_timestep_weights else None
        state.report.reconstruction = reconstruct_blocks(state.prepared, state.data, config,
                                                         timestep_weights=weights, progress=state.progress)
