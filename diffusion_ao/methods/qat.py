"""Quantization-aware training on the PT2E QAT path, and a short fine-tune of the quantization parameters.

The flow is torchao's, with diffusion-ao's FakeQuantize modules (`observers.fake_quantize`):

    prepared = prepare_qat_pt2e(graph, DiffusionQuantizer(config, qat=True))
    calibrate(prepared, data)                 # per-timestep statistics; the forward is already fake-quantized
    params = enable_learning(prepared)        # steps (and AdaRound's rounding) become parameters
    ...train on `params`...                   # or: finetune(prepared, reference, data, FinetuneConfig())
    finish_training(prepared)                 # fixes them, hardens the rounding into the weights
    quantized = convert_pt2e(prepared)        # q/dq with the learned qparams; compile_for_cpu as usual

`finetune` is the training most users want: distillation of the FP denoiser's noise prediction on the
calibration trajectories (no training data), only quantization parameters trained, each timestep's loss weighted
by DMQ's adaptive weights, AdaRound's regulariser annealed as in BRECQ / Q-Diffusion.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.calibration.threads import ThreadChoice
from diffusion_ao.graph import call_graph, graph_input_names
from diffusion_ao.method_configs import FinetuneConfig
from diffusion_ao.methods.learning import (
    AdaptiveTimestepWeights,
    LowRankCorrection,
    _require_fake_quantizers,
    fake_quantizers,
    finish_training,
    per_sample_relative_error,
    per_timestep_mean,
)
from diffusion_ao.methods.state import RecipeState
from diffusion_ao.observers import WeightFakeQuantize
from diffusion_ao.observers.adaround import annealed_beta
from diffusion_ao.passes.analysis import get_attr_tensor

logger = logging.getLogger(__name__)


def enable_learning(prepared: GraphModule, adaround: bool = True) -> tuple[list[torch.nn.Parameter],
                                                                           list[torch.nn.Parameter]]:
    """Turns a calibrated QAT graph's quantization parameters into trainable parameters and freezes the rest.

    Args:
        prepared: a graph from `prepare_qat_pt2e(graph, DiffusionQuantizer(config, qat=True))`, calibrated.
        adaround: learn the weights' rounding (AdaRound) rather than their per-channel steps.

    Returns:
        (weight parameters, activation step sizes), for the optimiser's two parameter groups.

    Raises:
        RuntimeError: naming the layer, if a FakeQuantize never saw data (calibrate first).
    """
    found = _require_fake_quantizers(prepared, "enable_learning")
    for _, fq in found:
        stats = fq.activation_post_process
        seen = stats.weight is not None if isinstance(fq, WeightFakeQuantize) else bool(stats.stats)
        if not seen:
            raise RuntimeError(f"The FakeQuantize of {fq.label} saw no data: run `calibrate(prepared, data)` before "
                               "enable_learning.")
    for p in prepared.parameters():
        p.requires_grad_(False)
    # The graph stays in eval mode: distillation of an inference model, and torchao's
    # `move_exported_model_to_train` rewrites diffusers' dropout(p=0.0) into dropout(p=0.5, train=True).
    weights, activations = [], []
    for _, fq in found:
        if isinstance(fq, WeightFakeQuantize):
            fq.enable_range_learning(adaround=adaround)
            weights += fq.parameters_to_learn()
        else:
            fq.enable_range_learning()
            activations += fq.parameters_to_learn()
    return weights, activations


def add_low_rank_corrections(prepared: GraphModule, rank: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """Puts a trainable `LowRankCorrection` between every constant weight and its FakeQuantize, so the weight the
    FakeQuantize sees (and learns the step of) is W + A B; `finish_training` merges A B into the constant.

    Call it after `enable_learning(prepared, adaround=False)` (AdaRound learns the rounding of fixed weights).

    Returns:
        The correction's parameters (A and B of every weight), for their own optimiser group.
    """
    found = _require_fake_quantizers(prepared, "add_low_rank_corrections")
    if rank < 1:
        raise ValueError(f"add_low_rank_corrections: rank={rank}; use a rank >= 1.")
    generator = torch.Generator().manual_seed(seed)
    params = []
    for node, fq in found:
        if not isinstance(fq, WeightFakeQuantize):
            continue
        if fq.adaround is not None:
            raise ValueError(f"add_low_rank_corrections: {fq.label} learns AdaRound's rounding of a fixed weight; "
                             "call enable_learning(prepared, adaround=False) to learn weight steps instead.")
        weight_node = node.args[0]
        if not isinstance(weight_node, Node) or weight_node.op != "get_attr":
            continue  # a computed weight (e.g. an LES fold kept in the graph) has no constant to merge into
        correction = LowRankCorrection(get_attr_tensor(prepared, weight_node), rank, generator)
        name = f"low_rank_correction_{len(params) // 2}"
        prepared.add_submodule(name, correction)
        with prepared.graph.inserting_before(node):
            corrected = prepared.graph.call_module(name, (weight_node,))
        node.args = (corrected, *node.args[1:])
        params += [correction.a, correction.b]
    prepared.recompile()
    return params


@dataclass
class FinetuneReport:
    """What `finetune` did: the timestep-weighted loss at the start and end (mean of the first / last tenth of the
    steps), the final timestep weights, how many weights were hardened, and the wall time."""

    iterations: int
    loss_start: float
    loss_end: float
    hardened_weights: int
    seconds: float
    timestep_weights: dict[float, float] = field(default_factory=dict)


def finetune(prepared: GraphModule, reference: torch.nn.Module, data: CalibrationData, config: FinetuneConfig,
             progress: bool = True) -> FinetuneReport:
    """Trains a calibrated QAT graph's quantization parameters to reproduce the FP denoiser, then
    `finish_training`; `convert_pt2e(prepared)` afterwards gives the integer graph.

    Each step draws `config.batch_per_step` calibration samples from every timestep (one mixed batch), runs the
    FP `reference` and the fake-quantized graph, and takes an Adam step on the sum over timesteps of the relative
    noise-prediction error, weighted with DMQ's adaptive timestep weights, plus AdaRound's regulariser after the
    warm-up. The weights themselves stay fixed.

    Args:
        prepared: `prepare_qat_pt2e(graph, DiffusionQuantizer(config, qat=True))`, calibrated.
        reference: the FP exported graph (or any module with the same inputs).
        data: the calibration data (its trajectories are the training inputs).
        config: the budget and learning rates (`FinetuneConfig`).
        progress: show a progress bar.

    Example:
        >>> prepared = prepare_qat_pt2e(export_denoiser(unet, data.steps[0]), DiffusionQuantizer(cfg, qat=True))
        >>> calibrate(prepared, data)
        >>> report = finetune(prepared, export_denoiser(unet, data.steps[0]), data, FinetuneConfig())
        >>> quantized = convert_pt2e(prepared)
    """
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"finetune needs a FinetuneConfig, got {type(config).__name__}.")
    data.validate()
    start = time.perf_counter()
    weight_params, act_params = enable_learning(prepared, adaround=config.adaround)
    weight_fqs = [fq for _, fq in fake_quantizers(prepared) if isinstance(fq, WeightFakeQuantize)]
    low_rank = add_low_rank_corrections(prepared, config.lora_rank, config.seed) if config.lora_rank else []
    weight_lr = config.weight_lr if config.adaround else config.weight_step_lr
    groups = [g for g in ({"params": weight_params, "lr": weight_lr},
                          {"params": act_params, "lr": config.act_lr},
                          {"params": low_rank, "lr": config.lora_lr}) if g["params"]]
    optimizer = torch.optim.Adam(groups)
    adaptive = AdaptiveTimestepWeights(config.weighting_r, config.weighting_ema)
    generator = torch.Generator().manual_seed(config.seed)
    names = graph_input_names(prepared)
    timesteps = data.timesteps
    step_ids = torch.arange(len(timesteps)).repeat_interleave(config.batch_per_step)
    weights: dict[float, float] = {}
    losses = []
    threads = ThreadChoice()  # small steps: one thread beats two on a busy machine
    for iteration in tqdm(range(config.iterations), desc="QAT fine-tune", disable=not progress, unit="step"):
        with threads.step(iteration):
            rows = [torch.randint(0, len(step), (config.batch_per_step,), generator=generator) for step in data.steps]
            inputs = data.mixed_batch(rows)
            with torch.no_grad():
                target = call_graph(reference, inputs, names)
            errors = per_timestep_mean(per_sample_relative_error(call_graph(prepared, inputs, names), target),
                                       step_ids, len(timesteps))
            weights = adaptive.update({t: float(e) for t, e in zip(timesteps, errors.detach())})
            loss = (errors * torch.tensor([weights[t] for t in timesteps], dtype=errors.dtype)).sum()
            losses.append(float(loss.detach()))
            beta = annealed_beta(iteration, config.iterations, config.warmup, config.beta_start, config.beta_end)
            if beta is not None and config.adaround and config.round_weight > 0:
                regularizer = torch.stack([fq.rounding_regularizer(beta) for fq in weight_fqs]).mean()
                loss = loss + config.round_weight * regularizer
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    hardened = finish_training(prepared)
    tenth = max(1, len(losses) // 10)
    report = FinetuneReport(config.iterations, sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth, hardened,
                            time.perf_counter() - start, dict(weights))
    logger.info("QAT fine-tune: loss %.4g -> %.4g in %d steps (%.0f s)", report.loss_start, report.loss_end,
                config.iterations, report.seconds)
    return report


def before_convert(state: RecipeState) -> None:
    """The recipe's step, first after calibration (the graph was prepared with `prepare_qat_pt2e`)."""
    state.report.finetune = finetune(state.prepared, state.fresh_graph(), state.data, state.config.finetune,
                                     progress=state.progress)
