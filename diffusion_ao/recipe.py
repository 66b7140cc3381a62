"""`quantize_unet`: the whole PTQ recipe of a `QuantConfig` in one call: export; TFMQ-DM's and DMQ's graph
passes (temporal cache, LES, PTS); prepare (with Q-Diffusion's shortcut splitting); timestep-aware
calibration; DMQ's timestep weighting; Q-Diffusion's block reconstruction; convert; TFMQ-DM's finite-set
calibration and temporal-feature selection.

The PT2E steps stay available one by one (see the README); this is the path the benchmark uses.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from .calibration import CalibrationData, calibrate
from .config import QuantConfig
from .export import export_unet
from .quantizer import DiffusionQuantizer
from .sampling import sample_shape

if TYPE_CHECKING:
    from .tfmq import TFMQReport

logger = logging.getLogger(__name__)


@dataclass
class QuantizationReport:
    """What the recipe did: the quantizer's per-layer decisions, each method's choices and the time taken."""

    quantizer: DiffusionQuantizer
    les: dict = field(default_factory=dict)
    pts: dict = field(default_factory=dict)
    timestep_weights: Optional[dict[float, float]] = None
    tfmq: Optional["TFMQReport"] = None
    reconstruction: Optional["ReconstructionReport"] = None  # noqa: F821 (diffusion_ao.qdiff)
    calib_s: float = 0.0


def quantize_unet(unet: torch.nn.Module, data: CalibrationData, config: QuantConfig,
                  has_vnni: Optional[bool] = None, progress: bool = True,
                  **export_kwargs) -> tuple[torch.fx.GraphModule, QuantizationReport]:
    """Exports `unet` and quantizes it with `config`; returns the converted graph and a report.

    Args:
        unet: a diffusers UNet2DModel / UNet2DConditionModel.
        data: calibration data from `collect_calibration_data` on the same UNet.
        config: what to quantize and which methods to use (`config.dmq`, `config.tfmq`, `config.qdiff`).
            With `config.tfmq` the finite timestep set of the cache / finite-set calibration is
            `data.timesteps`.
        has_vnni: override the CPU detection of `DiffusionQuantizer`.
        progress: show progress bars.
        **export_kwargs: passed to `export_unet` (e.g. `encoder_hidden_states_shape`).

    Example:
        >>> quantized, report = quantize_unet(unet, data, QuantConfig.preset("dmq-w4a8"))
        >>> fast = compile_for_cpu(quantized)
    """
    start = time.perf_counter()
    graph = export_unet(unet, sample_shape=(1, *sample_shape(unet)), **export_kwargs)
    quantizer = DiffusionQuantizer(config, has_vnni=has_vnni)
    report = QuantizationReport(quantizer)
    dmq, tfmq = config.dmq, config.tfmq
    if tfmq is not None:  # the cache needs the sampler's timesteps: those of the calibration data
        from .tfmq import apply as tfmq_steps
        report.tfmq = tfmq_steps.before_prepare(graph, data, tfmq)
    if dmq is not None and dmq.les:
        from .dmq import apply_learned_scaling
        report.les = apply_learned_scaling(graph, data, config, progress=progress, has_vnni=has_vnni)
        logger.info("LES: %d of %d layers scaled", sum(r.fold is not None for r in report.les.values()),
                    len(report.les))
    if dmq is not None and dmq.pts:
        from .dmq import apply_power_of_two_scaling
        report.pts = apply_power_of_two_scaling(graph, data, config, progress=progress, has_vnni=has_vnni)
        logger.info("PTS: %d layers scaled: %s", len(report.pts), sorted(report.pts))
    prepared = prepare_pt2e(graph, quantizer)
    calibrate(prepared, data, progress=progress)
    if dmq is not None and dmq.timestep_weighting and dmq.weighting_iterations > 0:
        if config.timestep_aggregation != "weighted":
            raise ValueError("DMQConfig(timestep_weighting=True) needs QuantConfig(timestep_aggregation='weighted').")
        from .dmq import adapt_timestep_weights
        reference = export_unet(unet, sample_shape=(1, *sample_shape(unet)), **export_kwargs)
        report.timestep_weights = adapt_timestep_weights(prepared, reference, data, r=dmq.weighting_r,
                                                         ema=dmq.weighting_ema, iterations=dmq.weighting_iterations)
    recon = config.qdiff.reconstruction if config.qdiff is not None else None
    if recon is not None and recon.iterations > 0:
        from .qdiff import reconstruct_blocks
        weights = report.timestep_weights if recon.use_timestep_weights else None
        report.reconstruction = reconstruct_blocks(prepared, data, recon, timestep_weights=weights,
                                                   progress=progress)
    tables, reference = [], None
    if tfmq is not None:
        reference = export_unet(unet, sample_shape=(1, *sample_shape(unet)), **export_kwargs)
        tables = tfmq_steps.before_convert(prepared, data, tfmq, report.tfmq)
    converted = convert_pt2e(prepared)
    if tfmq is not None:
        tfmq_steps.after_convert(converted, reference, tables, tfmq, report.tfmq, quantizer.decisions)
    report.calib_s = time.perf_counter() - start
    return converted, report
