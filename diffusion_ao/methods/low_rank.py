"""A low-rank branch that absorbs what 4-bit weights cannot hold (SVDQuant's decomposition, on int8 kernels).

A linear's weight is split as W = up @ down + R. The branch up @ down is the best rank-r approximation of W in
the norm that the layer's inputs induce, approximated per channel: the SVD of W diag(s), s the input's
per-channel RMS over the calibration timesteps, so the branch keeps the directions that carry the most output
on real inputs (an outlier input channel makes its weight column large in W diag(s)). Only the residual R is
quantized, with the layer's grid and GPTQ's rounding when the recipe uses it; the branch stays in floating point,
or its down-projection runs as an 8-bit linear on an int8 kernel (`LowRankConfig.down_bits`).

Example:
    >>> graph = export_denoiser(model, data.steps[0])
    >>> quantizer = DiffusionQuantizer(config)
    >>> apply_low_rank(graph, data, quantizer, LowRankConfig(rank=16))
    >>> prepared = prepare_pt2e(graph, quantizer)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.calibration.layer_inputs import run_with_input_callbacks
from diffusion_ao.method_configs import LowRankConfig
from diffusion_ao.methods.state import RecipeState
from diffusion_ao.passes.analysis import LINEAR_OPS, get_attr_tensor, module_path
from diffusion_ao.passes.flatten_linear import flatten_linear_inputs
from diffusion_ao.passes.low_rank import add_low_rank_branch, low_rank_blocker

logger = logging.getLogger(__name__)


@torch.no_grad()
def low_rank_split(weight: torch.Tensor, input_rms: torch.Tensor,
                   rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Splits `weight` into a rank-`rank` branch and a residual: weight = up @ down + residual.

    Args:
        weight: [out, in].
        input_rms: [in], the RMS of each input channel (>= 0; channels that are always 0 get a tiny weight).
        rank: 1..min(out, in).

    Returns:
        (up [out, rank], down [rank, in], residual [out, in]), in `weight`'s dtype. up @ down diag(s) is the best
        rank-`rank` approximation of weight diag(s) in the Frobenius norm (Eckart-Young), s = input_rms.

    Example:
        >>> up, down, residual = low_rank_split(torch.randn(8, 6), torch.ones(6), rank=2)
    """
    if weight.dim() != 2 or input_rms.shape != (weight.shape[1],):
        raise ValueError(f"low_rank_split needs a [out, in] weight and an [in] input RMS; got {tuple(weight.shape)} "
                         f"and {tuple(input_rms.shape)}.")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"low_rank_split: rank {rank} must be in 1..{min(weight.shape)} for a "
                         f"{tuple(weight.shape)} weight.")
    if not bool(torch.isfinite(input_rms).all()) or bool((input_rms < 0).any()):
        raise ValueError("low_rank_split: input_rms must be finite and >= 0.")
    w = weight.double()
    s = input_rms.double()
    top = float(s.max())
    s = s.clamp_min(top * 1e-6) if top > 0 else torch.ones_like(s)
    u, sv, vh = torch.linalg.svd(w * s, full_matrices=False)
    up = u[:, :rank] * sv[:rank]
    down = vh[:rank] / s
    residual = w - up @ down
    return up.to(weight.dtype), down.to(weight.dtype), residual.to(weight.dtype)


@dataclass
class LowRankResult:
    """One layer's branch: its rank and the share of the input-scaled weight's energy (sum of squared singular
    values) it holds, which the residual no longer has to."""

    rank: int
    energy: float


def low_rank_targets(graph: GraphModule, quantizer, config: LowRankConfig) -> list:
    """The linears of `graph` that get a branch: those `quantizer` will quantize below 8-bit weights, whose
    min(in, out) exceeds 2 x rank and whose weight is a constant of their own."""
    targets = []
    for node, planned in quantizer.planned_layers(graph).items():
        if node.target not in LINEAR_OPS or planned.layer.weight_bits >= 8 or low_rank_blocker(graph, node):
            continue
        if min(get_attr_tensor(graph, node.args[1]).shape) > 2 * config.rank:
            targets.append(node)
    return targets


@torch.no_grad()
def apply_low_rank(graph: GraphModule, data: CalibrationData, quantizer, config: LowRankConfig,
                   progress: bool = True) -> dict[str, LowRankResult]:
    """Gives every low-bit linear that `quantizer` will quantize a low-rank branch (`low_rank_targets`), from the
    RMS of its inputs over `config.samples_per_step` trajectories per calibration timestep (every timestep
    weighted the same). Changes `graph` in place; run it before `prepare_pt2e(graph, quantizer)`.

    Args:
        graph: an exported graph (after the passes that change weights: the temporal cache, LES, PTS).
        data: the calibration data.
        quantizer: the `DiffusionQuantizer` that will prepare `graph` (it says which linears are low-bit).
        config: a `LowRankConfig`.
        progress: show a progress bar.

    Returns:
        {layer module path: `LowRankResult`} (a module that runs twice, e.g. a timestep embedder shared by two
        conditionings, is listed again as "path (node name)").
    """
    flatten_linear_inputs(graph)  # as the quantizer will: the branch then adds onto the 2-D output of the linear
    targets = low_rank_targets(graph, quantizer, config)
    if not targets:
        return {}
    subset = data.subset(config.samples_per_step)
    rows_at: dict[float, int] = {}
    for step in subset.steps:
        rows_at[float(step.timestep)] = rows_at.get(float(step.timestep), 0) + len(step)
    squares = {node.name: torch.zeros(node.args[0].meta["val"].shape[-1], dtype=torch.float64) for node in targets}

    def accumulate(name: str):
        def callback(x: torch.Tensor, timestep: float) -> None:
            rows = x.reshape(-1, x.shape[-1]).double()
            # E_t[x^2] per channel, each timestep weighted the same
            squares[name] += rows.square().sum(0) / (rows.shape[0] / len(x) * rows_at[float(timestep)])
        return callback

    run_with_input_callbacks(graph, subset, {n.name: accumulate(n.name) for n in targets}, progress=progress,
                             desc="low-rank inputs")
    results = {}
    for node in targets:
        weight = get_attr_tensor(graph, node.args[1]).detach().float()
        rms = (squares[node.name] / len(rows_at)).sqrt().float()
        up, down, residual = low_rank_split(weight, rms, config.rank)
        left = float((residual.double() * rms.double()).square().sum())
        energy = 1.0 - left / max(float((weight.double() * rms.double()).square().sum()), 1e-30)
        key = module_path(node) or node.name
        results[f"{key} ({node.name})" if key in results else key] = LowRankResult(config.rank, energy)
        add_low_rank_branch(graph, node, up, down, residual)
    return results


def before_prepare(state: RecipeState) -> None:
    """The recipe's step, after the passes that change weights: the branch splits the final ones."""
    config = state.for_this_family("low-rank branch", state.config.low_rank)
    if config is not None:
        state.report.low_rank = apply_low_rank(state.graph, state.data, state.quantizer, config,
                                               progress=state.progress)
        logger.info("low-rank branch (rank %d) on %d linears", config.rank, len(state.report.low_rank))
