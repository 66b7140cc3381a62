"""`quantize_denoiser`: the whole PTQ recipe of a `QuantConfig` in one call: export; TFMQ-DM's temporal cache;
the mixed-precision plan; DMQ's graph passes (LES, PTS); the low-rank branch; prepare (with Q-Diffusion's shortcut splitting);
timestep-aware calibration; the QAT fine-tune (with `config.finetune` the graph is prepared by `prepare_qat_pt2e`);
DMQ's timestep weighting; GPTQ rounding; Q-Diffusion's block reconstruction; convert (one graph per group of
timesteps with time-grouped ranges); TFMQ-DM's finite-set calibration and temporal-feature selection; the
per-timestep output correction.
`quantize_pipeline` runs it on a diffusers pipeline's denoiser and puts the int8 result back in place.

The PT2E steps stay available one by one (see the README); this is the path the benchmark uses.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

from .annotation_context import check_module_name_overrides
from .calibration import CalibrationData, calibrate
from .config import QuantConfig
from .denoisers import CLASS_LABELS, denoiser_role
from .export import QuantizedDenoiser, as_diffusers_denoiser, export_denoiser
from .graph import require_exported
from .lowering import compile_for_cpu
from .passes.analysis import MODULE_NAMES_META, denoiser_family, module_names
from .quantizer import DiffusionQuantizer
from .size import size_mb
from .threads import calibration_threads

if TYPE_CHECKING:
    from .mixed_precision import MixedPrecisionPlan
    from .output_correction import OutputCorrection
    from .qat import FinetuneReport
    from .qdiff import ReconstructionReport
    from .tfmq import TFMQReport
    from .time_groups import TimeGroups

logger = logging.getLogger(__name__)


@dataclass
class QuantizationReport:
    """What the recipe did: the quantizer's per-layer decisions, each method's choices and the time taken."""

    quantizer: DiffusionQuantizer
    les: dict = field(default_factory=dict)
    pts: dict = field(default_factory=dict)
    timestep_weights: Optional[dict[float, float]] = None
    tfmq: Optional["TFMQReport"] = None
    reconstruction: Optional["ReconstructionReport"] = None
    gptq: dict = field(default_factory=dict)
    low_rank: dict = field(default_factory=dict)  # layer -> `LowRankResult`
    output_correction: Optional["OutputCorrection"] = None
    mixed_precision: Optional["MixedPrecisionPlan"] = None
    time_groups: Optional["TimeGroups"] = None
    finetune: Optional["FinetuneReport"] = None
    calib_s: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # step -> why the config's step did not run here

    def choices(self) -> dict[str, str]:
        """What the recipe chose from the model and its data, and why (e.g. {"modulation cache": "..."})."""
        label_cache = self.tfmq.label_cache if self.tfmq is not None else None
        return {**({"modulation cache": label_cache} if label_cache else {}), **self.skipped}


def _for_this_family(step: str, method, family: str, skipped: dict[str, str]):
    """`method` (a config with `denoisers`) if it runs on this denoiser `family`, else None, noted in `skipped`."""
    if method is None or family in method.denoisers:
        return method
    skipped[step] = f"not run: the config limits it to {', '.join(method.denoisers)} denoisers, this is a {family}"
    return None


def check_config_against_data(config: QuantConfig, data: CalibrationData) -> None:
    """Raises a ValueError, before any work, where `config` asks for what `data` cannot give."""
    if config.tfmq is not None and config.tfmq.cache_class_labels is True and \
            not any(CLASS_LABELS in step.conditioning for step in data.steps):
        raise ValueError("TFMQConfig(cache_class_labels=True) needs calibration data with class_labels (a "
                         "class-conditional denoiser, e.g. captured from a DiTPipeline call); use "
                         "cache_class_labels='auto' or False for this model.")
    if config.time_groups is not None and config.time_groups.groups > len(data.timesteps):
        raise ValueError(f"TimeGroupConfig(groups={config.time_groups.groups}) needs at least as many calibration "
                         f"timesteps; the data has {len(data.timesteps)}: use at most {len(data.timesteps)} groups "
                         "or calibrate over more sampler steps.")


def quantize_denoiser(model: torch.nn.Module, data: CalibrationData, config: Union[QuantConfig, str],
                      has_vnni: Optional[bool] = None,
                      progress: bool = True) -> tuple[torch.nn.Module, QuantizationReport]:
    """Exports `model` and quantizes it with `config`; returns the converted graph (a `TimeGroupedGraph` of one
    converted graph per group with `config.time_groups`) and a report.

    Args:
        model: a diffusers denoiser (UNet2DModel, UNet2DConditionModel, DiT, PixArt, SD3 or Flux transformer), or
            its `export_denoiser` graph (left unchanged: export once, quantize with several configs).
        data: calibration data of the same model (`capture_calibration_data` from its pipeline, or
            `collect_calibration_data` for a UNet); its first step is the export example. With `config.tfmq` the
            finite timestep set of the cache / finite-set calibration is `data.timesteps`.
        config: a `QuantConfig` or a preset name: what to quantize and which methods to use (`config.dmq`,
            `config.tfmq`, `config.qdiff`).
        has_vnni: override the CPU detection of `DiffusionQuantizer`.
        progress: show progress bars.

    Example:
        >>> quantized, report = quantize_denoiser(pipe.transformer, data, "dmq-w4a8")
        >>> fast = compile_for_cpu(quantized)
    """
    if isinstance(config, str):
        config = QuantConfig.preset(config)
    if not isinstance(data, CalibrationData):
        raise TypeError(f"quantize_denoiser needs CalibrationData, got {type(data).__name__}: capture it with "
                        "capture_calibration_data(pipe, ...) or collect_calibration_data(unet, scheduler, ...).")
    data.validate()
    check_config_against_data(config, data)
    # one thread when another process keeps a core busy: the learned steps are small (diffusion_ao.threads)
    with calibration_threads():
        start = time.perf_counter()
        if isinstance(model, torch.fx.GraphModule):  # exported already (e.g. once for several configs)
            pristine = require_exported(model, "quantize_denoiser")
        else:
            pristine = export_denoiser(model, data.steps[0])

        check_module_name_overrides(pristine, config)  # before any work, on the graph with all its modules
        pristine.meta.setdefault(MODULE_NAMES_META, module_names(pristine))  # passes below remove nodes

        def export():  # a fresh FP graph for each pass that changes one or needs an untouched reference
            return copy.deepcopy(pristine)

        graph = export()
        fp32_bytes = int(size_mb(graph) * 2**20)
        dmq, tfmq = config.dmq, config.tfmq
        tfmq_report = None
        if tfmq is not None:  # the cache needs the sampler's timesteps: those of the calibration data
            from .tfmq import apply as tfmq_steps
            tfmq_report = tfmq_steps.before_prepare(graph, data, tfmq)
        plan = None
        if config.mixed_precision is not None:  # on the graph left after the cache: the budget goes to layers that stay
            from .mixed_precision import plan_mixed_precision
            plan = plan_mixed_precision(graph, data, config, config.mixed_precision, has_vnni=has_vnni,
                                        fp32_bytes=fp32_bytes)
            config = config.replace(module_name_overrides={**plan.overrides, **config.module_name_overrides})
        quantizer = DiffusionQuantizer(config, has_vnni=has_vnni, qat=config.finetune is not None)
        report = QuantizationReport(quantizer, tfmq=tfmq_report, mixed_precision=plan)
        if dmq is not None and (dmq.les or dmq.pts):  # plan the channel scales on the convs prepare_pt2e quantizes
            quantizer.split_shortcuts(graph)
        if dmq is not None and dmq.les:
            from .dmq import apply_learned_scaling
            report.les = apply_learned_scaling(graph, data, config, progress=progress, has_vnni=has_vnni)
            logger.info("LES: %d of %d layers scaled", sum(r.fold is not None for r in report.les.values()),
                        len(report.les))
        if dmq is not None and dmq.pts:
            from .dmq import apply_power_of_two_scaling
            report.pts = apply_power_of_two_scaling(graph, data, config, progress=progress, has_vnni=has_vnni)
            logger.info("PTS: %d layers scaled: %s", len(report.pts), sorted(report.pts))
        family = denoiser_family(pristine)
        low_rank = _for_this_family("low-rank branch", config.low_rank, family, report.skipped)
        if low_rank is not None:  # after the passes that change weights: the branch splits the final ones
            from .low_rank import apply_low_rank
            report.low_rank = apply_low_rank(graph, data, quantizer, low_rank, progress=progress)
            logger.info("low-rank branch (rank %d) on %d linears", low_rank.rank, len(report.low_rank))
        prepared = (prepare_pt2e if config.finetune is None else prepare_qat_pt2e)(graph, quantizer)
        calibrate(prepared, data, progress=progress)
        if config.finetune is not None:
            from .qat import finetune
            report.finetune = finetune(prepared, export(), data, config.finetune, progress=progress)
        if dmq is not None and dmq.timestep_weighting and dmq.weighting_iterations > 0:
            if config.timestep_aggregation != "weighted":
                raise ValueError("DMQConfig(timestep_weighting=True) needs "
                                 "QuantConfig(timestep_aggregation='weighted').")
            from .dmq import adapt_timestep_weights
            reference = export()
            report.timestep_weights = adapt_timestep_weights(prepared, reference, data, r=dmq.weighting_r,
                                                             ema=dmq.weighting_ema, iterations=dmq.weighting_iterations)
        if config.gptq is not None:
            from .gptq import apply_gptq
            weights = report.timestep_weights if config.gptq.use_timestep_weights else None
            report.gptq = apply_gptq(prepared, data, config.gptq, timestep_weights=weights, progress=progress)
        recon = config.qdiff.reconstruction if config.qdiff is not None else None
        recon = _for_this_family("block reconstruction", recon, family, report.skipped)
        if recon is not None and recon.iterations > 0:
            from .qdiff import reconstruct_blocks
            weights = report.timestep_weights if recon.use_timestep_weights else None
            report.reconstruction = reconstruct_blocks(prepared, data, recon, timestep_weights=weights,
                                                       progress=progress)
        tables, reference = [], None
        if tfmq is not None:
            reference = export()
            tables = tfmq_steps.before_convert(prepared, data, tfmq, report.tfmq)
        if config.time_groups is not None:
            from .time_groups import convert_time_grouped
            converted, report.time_groups = convert_time_grouped(prepared, data.timesteps, config.time_groups)
            graphs = list(converted.groups)
        else:
            converted = convert_pt2e(prepared)
            graphs = [converted]
        if tfmq is not None:
            for graph in graphs:
                tfmq_steps.after_convert(graph, reference, tables, tfmq, report.tfmq, quantizer.decisions)
        correction = _for_this_family("output correction", config.output_correction, family, report.skipped)
        if correction is not None:
            from .output_correction import apply_output_correction, estimate_output_correction
            reference = reference if reference is not None else export()
            report.output_correction = estimate_output_correction(converted, reference, data, correction)
            for graph in graphs:
                apply_output_correction(graph, report.output_correction)
        report.calib_s = time.perf_counter() - start
        return converted, report


# The name of the UNet-only first version.
quantize_unet = quantize_denoiser


def quantize_pipeline(pipe, config: Union[QuantConfig, str], data: CalibrationData, compile: bool = True,
                      has_vnni: Optional[bool] = None, progress: bool = True) -> QuantizationReport:
    """Quantizes a diffusers pipeline's denoiser (`pipe.unet` or `pipe.transformer`) in place.

    Runs the whole recipe of `config` (`quantize_denoiser`), compiles the result onto the CPU's int8 kernels
    (`compile_for_cpu`, when `compile`), and puts back a drop-in `QuantizedDenoiser` with the original's
    signature, config, dtype, device and output type, so that `pipe(...)` runs quantized.

    Args:
        pipe: a diffusers pipeline with a `unet` or a `transformer`, in floating point.
        config: a `QuantConfig` or a preset name ("w8a8", "dmq-w4a8", "tfmq-w4a8", "qdiff-w4a8", ...).
        data: `capture_calibration_data(pipe, ...)` of this pipeline (call it the way you will call the pipeline:
            same guidance, prompt length and resolution; with TFMQ-DM's cache or finite-set calibration, the same
            scheduler and step count).
        compile: compile for the CPU's int8 kernels; False keeps the converted graph (q/dq in floating point).
        has_vnni: override the CPU detection of `DiffusionQuantizer`.
        progress: show progress bars.

    Returns:
        The `QuantizationReport` (per-layer decisions, each method's choices, time taken).

    Example:
        >>> data = capture_calibration_data(pipe, num_inference_steps=20, prompt=prompts, guidance_scale=4.5)
        >>> report = quantize_pipeline(pipe, "w8a8", data)
        >>> images = pipe(prompt=prompts, num_inference_steps=20, guidance_scale=4.5).images
    """
    role = denoiser_role(pipe)
    model = getattr(pipe, role)
    if isinstance(model, QuantizedDenoiser):
        raise ValueError(f"pipe.{role} is already quantized; quantize the floating-point pipeline.")
    if compile and next(model.parameters()).dtype != torch.float32:
        raise ValueError(f"quantize_pipeline(compile=True) lowers to the CPU's int8 kernels, which take a float32 "
                         f"graph, but pipe.{role} is {next(model.parameters()).dtype}: load the pipeline in float32 "
                         "(torch_dtype=torch.float32) and capture again, or pass compile=False.")
    if compile and next(model.parameters()).device.type != "cpu":
        raise ValueError(f"quantize_pipeline(compile=True) compiles for the CPU's int8 kernels, but pipe.{role} is on "
                         f"{next(model.parameters()).device}: move it to the CPU, or pass compile=False and lower the "
                         "graph for the GPU with diffusion_ao.gpu.")
    converted, report = quantize_denoiser(model, data, config, has_vnni=has_vnni, progress=progress)
    setattr(pipe, role, as_diffusers_denoiser(compile_for_cpu(converted) if compile else converted, like=model))
    return report
