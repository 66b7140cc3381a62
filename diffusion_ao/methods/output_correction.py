"""Per-timestep output correction: divide out the systematic gain and offset of the quantized prediction.

Not in the three seed papers; PTQD's correlated-noise correction is the anchor idea. The quantized denoiser's
output at timestep t, per output channel c, is modelled as

    eps_q = g[t, c] * eps + b[t, c] + noise

where eps is the floating-point model's output on the same input. The gain g comes from error that scales with
the prediction (clipped ranges, scales that LES left), the offset b from biased rounding; a sampler integrates
both over the trajectory (a gain below 1 becomes a loss of contrast). `estimate_output_correction` fits g and b
by least squares of eps_q on eps over the calibration data, and `apply_output_correction` rewrites the converted
graph's output to

    (eps_q - b[t, c]) / g[t, c]

with [T, C] tables looked up by the position of the batch's timestep in the calibration set (the index that the
temporal cache and finite-set calibration use; unseen timesteps are rejected the same way). Regressing eps_q on
eps (not eps on eps_q) removes the correlated error without shrinking the prediction towards its mean for the
uncorrelated noise: the shrinking fit would lower the mean squared error and flatten the samples.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.calibration.distributed import all_gather_objects, shard, world
from diffusion_ao.graph import call_graph, graph_input_names, register_constant
from diffusion_ao.method_configs import OutputCorrectionConfig
from diffusion_ao.methods.state import RecipeState
from diffusion_ao.passes.temporal_cache import normalise_timesteps, timestep_index_node

logger = logging.getLogger(__name__)
aten = torch.ops.aten
CORRECTION_BATCH = 64  # rows per forward while estimating
MIN_GAIN = 0.1  # below this the quantized prediction has lost the signal; dividing by g would amplify noise


@dataclass
class OutputCorrection:
    """The fitted correction (`QuantizationReport.output_correction`).

    Attributes:
        timesteps: the finite set, in the order of the tables' rows.
        gain: [T, C] fitted gain g of the quantized prediction (1 where not corrected).
        bias: [T, C] fitted offset b (0 where not corrected).
        error_before: per timestep, mean squared error of the quantized output relative to the FP output's
            mean square, on the calibration data.
        error_after: the same after the correction (in-sample).
    """

    timesteps: list[float]
    gain: torch.Tensor
    bias: torch.Tensor
    error_before: dict[float, float] = field(default_factory=dict)
    error_after: dict[float, float] = field(default_factory=dict)


def _output_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _channel_dim(x: torch.Tensor) -> int:
    """Channels of a denoiser's prediction: dim 1 of an image-shaped [B, C, H, W] output, the last dim of a
    token-shaped [B, N, C] one (Flux packs its latents into tokens)."""
    if x.dim() == 4:
        return 1
    if x.dim() == 3:
        return 2
    raise ValueError(f"Output correction supports [B, C, H, W] and [B, N, C] predictions, got shape "
                     f"{tuple(x.shape)}.")


class _Moments:
    """Per-channel sums of eps, eps_q and their products for one timestep (float64)."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.x, self.y, self.xx, self.xy, self.yy = (torch.zeros(channels, dtype=torch.float64) for _ in range(5))

    def add(self, fp: torch.Tensor, q: torch.Tensor, dim: int) -> None:
        x = fp.double().movedim(dim, 0).reshape(fp.shape[dim], -1)
        y = q.double().movedim(dim, 0).reshape(q.shape[dim], -1)
        self.n += x.shape[1]
        self.x += x.sum(1)
        self.y += y.sum(1)
        self.xx += (x * x).sum(1)
        self.xy += (x * y).sum(1)
        self.yy += (y * y).sum(1)

    def merge(self, other: "_Moments") -> "_Moments":
        """Adds `other`'s sums (the same timestep's moments of other samples) to these."""
        self.n += other.n
        for name in ("x", "y", "xx", "xy", "yy"):
            getattr(self, name).add_(getattr(other, name))
        return self

    def fit(self, config: OutputCorrectionConfig) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n
        if config.gain and config.bias:
            var = self.xx / n - (self.x / n) ** 2
            cov = self.xy / n - self.x * self.y / n ** 2
            gain = torch.where(var > 1e-12 * self.xx.clamp_min(1e-30) / n, cov / var.clamp_min(1e-30),
                               torch.ones_like(var))
            bias = self.y / n - gain * self.x / n
        elif config.gain:  # through the origin
            gain = torch.where(self.xx > 0, self.xy / self.xx.clamp_min(1e-30), torch.ones_like(self.xx))
            bias = torch.zeros_like(gain)
        else:
            gain = torch.ones_like(self.x)
            bias = (self.y - self.x) / n
        return gain, bias

    def relative_error(self, gain: torch.Tensor, bias: torch.Tensor) -> float:
        """mean((eps_q - b) / g - eps)^2 / mean(eps^2), over every channel, from the sums."""
        n = self.n
        # (y - b - g x)^2 summed, divided by g^2
        sq = (self.yy - 2 * bias * self.y - 2 * gain * self.xy + bias ** 2 * n + 2 * gain * bias * self.x
              + gain ** 2 * self.xx)
        return float((sq / gain ** 2).sum() / self.xx.sum().clamp_min(1e-30))


@torch.no_grad()
def estimate_output_correction(quantized: torch.nn.Module, reference: torch.nn.Module, data: CalibrationData,
                               config: Optional[OutputCorrectionConfig] = None) -> OutputCorrection:
    """Fits the per-(timestep, channel) gain and offset of `quantized`'s prediction against `reference`'s.

    With a `torch.distributed` process group of several ranks, each rank measures a contiguous share of the steps
    and the per-timestep moments are gathered: one process's tables.

    Args:
        quantized: the converted graph (eager q/dq), or any graph with the same inputs.
        reference: the floating-point export of the same denoiser.
        data: calibration data; its timesteps are the finite set of the tables.
        config: what to fit (gain and / or bias) and on how many samples per timestep.

    Returns:
        An `OutputCorrection` with [T, C] tables and the in-sample error before / after.

    Raises:
        ValueError: if a fitted gain is below 0.1 (the quantized prediction has lost the signal there).

    Example:
        >>> correction = estimate_output_correction(converted, export_denoiser(model, data.steps[0]), data)
        >>> apply_output_correction(converted, correction)
    """
    config = config or OutputCorrectionConfig()
    data.validate()
    if config.samples_per_step is not None:
        data = data.subset(config.samples_per_step)
    timesteps = normalise_timesteps(data.timesteps)
    names_q, names_r = graph_input_names(quantized), graph_input_names(reference)
    moments: dict[float, _Moments] = {}
    rank, world_size = world()
    for i in shard(len(data.steps), rank, world_size):  # this rank's share of the steps (all in one process)
        step = data.steps[i]
        key = torch.tensor(step.timestep, dtype=torch.float32).item()
        for start in range(0, len(step), CORRECTION_BATCH):
            inputs = step.graph_inputs(start, start + CORRECTION_BATCH)
            fp = _output_tensor(call_graph(reference, inputs, names_r)).float()
            q = _output_tensor(call_graph(quantized, inputs, names_q)).float()
            dim = _channel_dim(fp)
            moments.setdefault(key, _Moments(fp.shape[dim])).add(fp, q, dim)
    if world_size > 1:  # every rank gets every timestep's moments, summed in step order
        merged: dict[float, _Moments] = {}
        for part in all_gather_objects(moments, "the output correction's moments"):
            for key, m in part.items():
                merged[key] = merged[key].merge(m) if key in merged else m
        moments = merged
    gains, biases, before, after = [], [], {}, {}
    for t in timesteps:
        m = moments[t]
        gain, bias = m.fit(config)
        low = gain < MIN_GAIN
        if bool(low.any()):
            raise ValueError(f"Output correction: the quantized prediction's gain at timestep {t:g} is "
                             f"{gain.min().item():.3g} in channel {int(low.nonzero()[0])} (the FP prediction is "
                             "nearly lost there); dividing it out would amplify noise. Quantize that model with more "
                             "bits, or without output_correction.")
        before[t] = m.relative_error(torch.ones_like(gain), torch.zeros_like(bias))
        after[t] = m.relative_error(gain, bias)
        gains.append(gain.float())
        biases.append(bias.float())
    return OutputCorrection(timesteps, torch.stack(gains), torch.stack(biases), before, after)


def _unsqueeze(g, node: Node, dims: list[int]) -> Node:
    for d in dims:
        node = g.call_function(aten.unsqueeze.default, (node, d))
    return node


def apply_output_correction(converted: GraphModule, correction: OutputCorrection) -> None:
    """Rewrites `converted`'s prediction to (eps_q - b[t]) / g[t], looked up per sample. Modifies it in place.

    Args:
        converted: the graph the correction was estimated on (its first output is the prediction).
        correction: from `estimate_output_correction`.
    """
    output = next(n for n in converted.graph.nodes if n.op == "output")
    outs = output.args[0]
    first = outs[0] if isinstance(outs, (tuple, list)) else outs
    val = first.meta.get("val")
    if val is None:
        raise ValueError("apply_output_correction: the prediction node has no shape metadata; pass a graph from "
                         "convert_pt2e of an exported denoiser.")
    dim = _channel_dim(val)
    channels = val.shape[dim]
    if correction.gain.shape != (len(correction.timesteps), channels):
        raise ValueError(f"apply_output_correction: tables of shape {tuple(correction.gain.shape)} do not fit "
                         f"{len(correction.timesteps)} timesteps x {channels} output channels.")
    index = timestep_index_node(converted, correction.timesteps)
    scale_table = register_constant(converted, "output_correction_scale", (1.0 / correction.gain).clone(),
                                    before=output)
    shift_table = register_constant(converted, "output_correction_shift",
                                    (-correction.bias / correction.gain).clone(), before=output)
    g = converted.graph
    with g.inserting_before(output):
        scale = g.call_function(aten.index_select.default, (scale_table, 0, index))  # [B, C]
        shift = g.call_function(aten.index_select.default, (shift_table, 0, index))
        expand = [2, 3] if dim == 1 else [1]  # [B, C, 1, 1] or [B, 1, C]
        corrected = g.call_function(aten.add.Tensor, (
            g.call_function(aten.mul.Tensor, (first, _unsqueeze(g, scale, expand))), _unsqueeze(g, shift, expand)))
    corrected.meta["val"] = val
    if isinstance(outs, (tuple, list)):
        output.args = (type(outs)([corrected, *outs[1:]]),)
    else:
        output.args = (corrected,)
    g.lint()
    converted.recompile()


def after_convert(state: RecipeState) -> None:
    """The recipe's last step: the correction measured on the converted model against a fresh FP graph."""
    config = state.for_this_family("output correction", state.config.output_correction)
    if config is None:
        return
    state.report.output_correction = estimate_output_correction(state.converted, state.fresh_graph(), state.data,
                                                                config)
    for graph in state.converted_graphs:
        apply_output_correction(graph, state.report.output_correction)
