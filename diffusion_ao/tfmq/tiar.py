"""TIAR hook: time-information-aware reconstruction of the quantized TIB (TFMQ-DM, METHODS.md §8b).

TIAR quantizes the TIB linears and learns their rounding / step sizes to minimise
sum_i ||emb_i(t) - emb_i_hat(t)||^2 over the calibration timesteps, every temporal feature emb_i at once (one
block with several outputs), instead of folding them into ResBlock losses. It is to be built on the block
reconstruction API of `diffusion_ao.qdiff` (AdaRound + LSQ on an arbitrary node set with several outputs), not
re-implemented here. Until then `TFMQConfig(tiar=True)` raises NotImplementedError before any work is done.

Where it plugs in (`diffusion_ao.tfmq.apply.before_convert`): after `calibrate`, before `convert_pt2e`, with
    block nodes = `find_temporal_blocks(prepared).nodes` (plus their observers),
    outputs     = `find_temporal_blocks(prepared).features` not cached,
    targets     = the same features evaluated on the FP graph (`passes.temporal_cache.evaluate_nodes`) over
                  `data.timesteps`.
"""
from __future__ import annotations

import torch

from ..calibration import CalibrationData

TIAR_AVAILABLE = False  # set to True when reconstruct_temporal_features is implemented


def require_tiar() -> None:
    """Raises NotImplementedError while TIAR is not available (called early by `quantize_unet`)."""
    if not TIAR_AVAILABLE:
        raise NotImplementedError(
            "TFMQConfig(tiar=True): TIAR (joint reconstruction of the temporal features) is not implemented yet; "
            "it will be built on diffusion_ao.qdiff's block reconstruction. Use tiar=False: cache='all' keeps the "
            "TIB exactly FP, cache='select' caches the temporal features that quantize badly.")


def reconstruct_temporal_features(prepared: torch.fx.GraphModule, reference: torch.fx.GraphModule,
                                  data: CalibrationData) -> dict:
    """Reconstructs the quantized TIB of `prepared` against the FP `reference` over `data.timesteps` (TIAR).

    Args:
        prepared: a calibrated graph (after `prepare_pt2e` and `calibrate`), modified in place.
        reference: the FP export of the same UNet.
        data: the calibration data (its timesteps are the finite set).

    Returns:
        Per-feature losses before/after, for the report.
    """
    require_tiar()
    raise NotImplementedError("reconstruct_temporal_features: see require_tiar.")
