"""TIAR: time-information-aware reconstruction of the quantized TIB (TFMQ-DM, docs/methods.md#tiar).

The TIB's linears are quantized and their rounding (AdaRound) and activation step sizes (LSQ) are learned to
minimise sum_i ||emb_i(t) - emb_i_hat(t)||^2 over the calibration timesteps, every temporal feature emb_i at once,
instead of folding the time path into the ResBlocks' losses. It is Q-Diffusion's block reconstruction
(`diffusion_ao.methods.qdiff`) run on one block: the whole TIB, whose outputs are the temporal features.
"""
from __future__ import annotations

import logging

import torch

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.method_configs import ReconstructionConfig
from diffusion_ao.passes.temporal import find_temporal_blocks

logger = logging.getLogger(__name__)


def reconstruct_temporal_features(prepared: torch.fx.GraphModule, data: CalibrationData, iterations: int = 500,
                                  seed: int = 0, progress: bool = False):
    """Reconstructs the quantized TIB of a calibrated graph jointly over `data.timesteps` (TIAR), in place.

    Args:
        prepared: a calibrated graph (after `prepare_pt2e` and `calibrate`, before `convert_pt2e`).
        data: the calibration data (its timesteps are the finite set).
        iterations: optimisation steps.
        seed: seed of the sample choice and minibatches.
        progress: show a progress bar.

    Returns:
        The `ReconstructionReport` of the one block (loss before / after, time), or None when the TIB has no
        quantized layer (time path kept FP or cached).

    Example:
        >>> report = reconstruct_temporal_features(prepared, data, iterations=500)
        >>> report.blocks[0].loss_after <= report.blocks[0].loss_before
    """
    from diffusion_ao.methods.qdiff import block_from_nodes, reconstruct_blocks

    tib = find_temporal_blocks(prepared)
    quantized = [n for n in tib.linears if isinstance(n.args[1], torch.fx.Node) and n.args[1].op == "call_module"]
    if not quantized:  # no weight observer on the TIB's layers
        logger.info("TIAR: the temporal information block has no quantized layer; nothing to reconstruct.")
        return None
    block = block_from_nodes(prepared, [n for n in prepared.graph.nodes if n in tib.nodes], "temporal features")
    # The features depend on t alone: two samples per timestep are plenty.
    budget = ReconstructionConfig(iterations=iterations, batch_size=min(16, 2 * len(data)),
                                  max_samples=2 * len(data), seed=seed, use_timestep_weights=False)
    report = reconstruct_blocks(prepared, data, budget, blocks=[block], progress=progress)
    for result in report.blocks:  # none when iterations == 0
        logger.info("TIAR: temporal-feature loss %.3e -> %.3e", result.loss_before, result.loss_after)
    return report
