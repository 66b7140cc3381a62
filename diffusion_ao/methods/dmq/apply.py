"""The recipe's DMQ steps (a `DMQConfig`, `methods.state`): LES and PTS on the floating-point graph before it is
annotated, the adaptive timestep weights on the calibrated graph."""
from __future__ import annotations

import logging

from diffusion_ao.methods.dmq.les import apply_learned_scaling
from diffusion_ao.methods.dmq.pts import apply_power_of_two_scaling
from diffusion_ao.methods.dmq.timestep_weights import adapt_timestep_weights
from diffusion_ao.methods.state import RecipeState

logger = logging.getLogger(__name__)


def before_prepare(state: RecipeState) -> None:
    dmq = state.for_this_family("DMQ", state.config.dmq)
    if dmq is None:
        return
    if dmq.les or dmq.pts:  # plan the channel scales on the convs prepare_pt2e quantizes
        state.quantizer.split_shortcuts(state.graph)
    if dmq.les:
        state.report.les = apply_learned_scaling(state.graph, state.data, state.config, progress=state.progress,
                                                 has_vnni=state.has_vnni)
        logger.info("LES: %d of %d layers scaled", sum(r.fold is not None for r in state.report.les.values()),
                    len(state.report.les))
    if dmq.pts:
        state.report.pts = apply_power_of_two_scaling(state.graph, state.data, state.config,
                                                      progress=state.progress, has_vnni=state.has_vnni)
        logger.info("PTS: %d layers scaled: %s", len(state.report.pts), sorted(state.report.pts))


def before_convert(state: RecipeState) -> None:
    dmq = state.for_this_family("DMQ", state.config.dmq)
    if dmq is not None and dmq.timestep_weighting and dmq.weighting_iterations > 0:
        state.report.timestep_weights = adapt_timestep_weights(
            state.prepared, state.fresh_graph(), state.data, r=dmq.weighting_r, ema=dmq.weighting_ema,
            iterations=dmq.weighting_iterations)
