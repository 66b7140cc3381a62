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

import importlib
import logging
import time
from typing import Optional, Union

import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

from diffusion_ao.backends.x86 import compile_for_cpu
from diffusion_ao.backends.x86_attention import (attention_probability_ranges, int8_attention_op,
                                                 int8_attention_unavailable, lower_attention_to_int8)
from diffusion_ao.calibration.loop import calibrate
from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.calibration.threads import calibration_threads
from diffusion_ao.config import QuantConfig
from diffusion_ao.denoisers import CLASS_LABELS, denoiser_role
from diffusion_ao.export import export_denoiser
from diffusion_ao.graph import call_graph, graph_input_names, require_exported
from diffusion_ao.methods.state import QuantizationReport, RecipeState
from diffusion_ao.passes.analysis import MODULE_NAMES_META, denoiser_family, module_names
from diffusion_ao.quantizer.context import check_module_name_overrides
from diffusion_ao.serialization.size import size_mb
from diffusion_ao.wrapper import QuantizedDenoiser, as_diffusers_denoiser

logger = logging.getLogger(__name__)


# The methods' steps in the order they run, phase by phase: (QuantConfig field, module). A step runs when its
# field is set; the module's function named after the phase gets the `RecipeState` (`methods.state`).
STEPS = {
    "before_prepare": (("tfmq", "methods.tfmq.apply"),  # the cache, then the plan on the layers that stay
                       ("mixed_precision", "methods.mixed_precision"),
                       ("dmq", "methods.dmq.apply"),  # LES, PTS
                       ("low_rank", "methods.low_rank")),  # splits the weights the passes above left
    "before_convert": (("finetune", "methods.qat"),
                       ("dmq", "methods.dmq.apply"),  # the timestep weights GPTQ and reconstruction may use
                       ("gptq", "methods.gptq"),
                       ("qdiff", "methods.qdiff.apply"),
                       ("tfmq", "methods.tfmq.apply")),  # TIAR and finite-set tables on the final graph
    "after_convert": (("tfmq", "methods.tfmq.apply"),
                      ("output_correction", "methods.output_correction")),
}


def run_steps(phase: str, state: RecipeState) -> None:
    """Runs every method step of `phase` whose config field is set, in `STEPS` order."""
    for name, module in STEPS[phase]:
        if getattr(state.config, name) is not None:
            getattr(importlib.import_module(f"diffusion_ao.{module}"), phase)(state)


def lower_attention(state: RecipeState, samples_per_step: int = 8) -> None:
    """Rewrites each quantized SDPA of the converted graph(s) as int8 attention (`backends.x86_attention`), its
    probabilities' grid from `samples_per_step` calibration samples per timestep."""
    if int8_attention_op() is None:  # the quantizer has warned: attention stays simulated q/dq
        state.report.skipped["int8 attention"] = f"not run: {int8_attention_unavailable()}"
        return
    data = state.data.subset(samples_per_step)
    for graph in state.converted_graphs:
        names = graph_input_names(graph)

        def run() -> None:
            with torch.no_grad():
                for step in data.steps:
                    call_graph(graph, step.graph_inputs(), names)

        peaks = attention_probability_ranges(graph, run)
        lower_attention_to_int8(graph, peaks)
        state.report.attention.update(peaks)
    logger.info("int8 attention: %d SDPA ops rewritten", len(state.report.attention))


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
    # one thread when another process keeps a core busy: the learned steps are small (diffusion_ao.calibration.threads)
    with calibration_threads():
        start = time.perf_counter()
        if isinstance(model, torch.fx.GraphModule):  # exported already (e.g. once for several configs)
            pristine = require_exported(model, "quantize_denoiser")
        else:
            pristine = export_denoiser(model, data.steps[0])
        check_module_name_overrides(pristine, config)  # before any work, on the graph with all its modules
        pristine.meta.setdefault(MODULE_NAMES_META, module_names(pristine))  # passes below remove nodes

        state = RecipeState(config, data, pristine, denoiser_family(pristine), int(size_mb(pristine) * 2**20),
                            has_vnni=has_vnni, progress=progress)
        state.graph = state.fresh_graph()
        run_steps("before_prepare", state)
        prepare = prepare_pt2e if state.config.finetune is None else prepare_qat_pt2e
        state.prepared = prepare(state.graph, state.quantizer)
        calibrate(state.prepared, data, progress=progress)
        run_steps("before_convert", state)
        if state.config.time_groups is not None:
            from diffusion_ao.methods import time_groups
            state.converted = time_groups.convert(state)
        else:
            state.converted = convert_pt2e(state.prepared)
        if state.config.quantize_attention_matmuls:
            lower_attention(state)
        run_steps("after_convert", state)
        state.report.calib_s = time.perf_counter() - start
        return state.converted, state.report


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
                         "graph for the GPU with diffusion_ao.backends.cuda.")
    converted, report = quantize_denoiser(model, data, config, has_vnni=has_vnni, progress=progress)
    setattr(pipe, role, as_diffusers_denoiser(compile_for_cpu(converted) if compile else converted, like=model))
    return report
