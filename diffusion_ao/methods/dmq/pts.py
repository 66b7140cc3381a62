"""DMQ's power-of-two channel scaling (PTS) with voting (docs/methods.md#power-of-two-channel-scaling-pts).

For a layer input whose channels differ a lot in magnitude (the skip concats above all), channel c is quantized
with the per-tensor step divided by 2^k_c: equivalently x_c is multiplied by 2^k_c before quantization and the
consumer's weight column by 2^-k_c, which `scale_input_channels` folds exactly (powers of two are exact in
floating point). k_c is chosen per calibration sample and timestep by quantization MSE, then by a vote: the
most frequent k wins if its share reaches kappa, else k_c = 0.

On integer kernels the factor has a price DMQ's fake-quantized simulation does not pay: 2^-k_c is folded into
weight column c before the weights are quantized, so that column's weight rounding error reaches the output
2^k_c times larger (the row's weight step is unchanged, the column's values shrink). At 4-bit weights that can
outweigh the finer activation step. So a sample's choice of k_c minimises its estimated share of the layer's
output error, activation and weight terms together (`output_errors`), not the activation MSE alone.

Two choices keep the simulation honest to the deployed per-tensor quantizer, whose one range is chosen by the
layer's own activation observer over every calibration timestep (MSE-clipped, timestep-weighted):
- every sample is quantized with that deployed range, not its own min/max (a single sample's range is far
  narrower at most timesteps, so per-sample ranges understate the step and misjudge clipping);
- k_c is capped so that 2^k_c times channel c's calibrated range stays inside the deployed range. Scaling a
  channel past it is clipped, or widens the range the observer picks after folding and so coarsens every
  other channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion_ao.calibration.distributed import all_reduce_max, all_reduce_sum, merge_observers, world
from diffusion_ao.primitives import fake_quantize, int_range


def channels_last_rows(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(N, ..., C, ...) -> (N, positions, C): each sample's values grouped by channel."""
    x = x.movedim(channel_dim, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def channel_spread(absmax: torch.Tensor) -> float:
    """max over channels of |x_c|max divided by their median: how unequal the channels are."""
    return float(absmax.max() / absmax.median().clamp_min(1e-12))


def range_preserving_max_k(channel_min: torch.Tensor, channel_max: torch.Tensor, lo: float, hi: float,
                           max_k: int) -> torch.Tensor:
    """Per channel, the largest k <= max_k with 2^k * [channel_min, channel_max] inside [lo, hi].

    Args:
        channel_min, channel_max: (C,) calibrated per-channel extremes.
        lo, hi: the deployed range of the tensor (lo <= 0 <= hi).
        max_k: largest exponent allowed at all.

    Returns:
        (C,) long tensor in 0..max_k; the channels that set the range get 0.
    """
    inf = torch.full_like(channel_max, float("inf"))
    headroom = torch.minimum(torch.where(channel_max > 0, hi / channel_max, inf),
                             torch.where(channel_min < 0, lo / channel_min, inf))
    return torch.floor(torch.log2(headroom)).clamp(0, max_k).long()


def deployed_range(observer) -> tuple[float, float]:
    """The real interval [lo, hi] a calibrated affine observer's qparams represent."""
    scale, zero_point = observer.calculate_qparams()
    scale, zero_point = float(scale.reshape(())), float(zero_point.reshape(()))
    return (observer.quant_min - zero_point) * scale, (observer.quant_max - zero_point) * scale


def per_sample_channel_errors(rows: torch.Tensor, bits: int, max_k: int, lo: float | None = None,
                              hi: float | None = None) -> torch.Tensor:
    """Quantization MSE of every channel of every sample for each k in 0..max_k.

    Channel c is scaled by 2^k, quantized with one affine per-tensor range (unsigned `bits`-bit codes) and scaled
    back.

    Args:
        rows: (N, positions, C) from `channels_last_rows`.
        bits: activation bits.
        max_k: largest exponent.
        lo, hi: the deployed range (from `deployed_range` of the layer's observer). If omitted, each sample
            uses its own min/max.

    Returns:
        (max_k + 1, N, C) mean squared errors.
    """
    qmin, qmax = int_range(bits, signed=False)
    if lo is None or hi is None:
        lo_t, hi_t = rows.amin(dim=(1, 2)), rows.amax(dim=(1, 2))
    else:
        lo_t, hi_t = torch.full((len(rows),), float(lo)), torch.full((len(rows),), float(hi))
    lo_t, hi_t = lo_t.clamp(max=0.0), hi_t.clamp(min=0.0)
    scale = ((hi_t - lo_t) / (qmax - qmin)).clamp_min(1e-12).view(-1, 1, 1)
    zero_point = (qmin - torch.round(lo_t.view(-1, 1, 1) / scale)).clamp(qmin, qmax)
    errors = []
    for k in range(max_k + 1):
        factor = 2.0 ** k
        recon = fake_quantize(rows * factor, scale, zero_point, qmin, qmax) / factor
        errors.append((recon - rows).pow(2).mean(dim=1))
    return torch.stack(errors)


def weight_error_per_k(weight: torch.Tensor, weight_spec, max_k: int) -> torch.Tensor:
    """(max_k + 1, C): squared rounding error of input column c after folding 2^-k into it, summed over output
    channels and kernel positions and expressed at the column's original scale (times 4^k).

    The rows' quantization scales are those of the unscaled weight: scaling a column down never raises a row's
    max, so this slightly overstates the error where the scaled column held the row's max.
    """
    if weight_spec is None:
        return torch.zeros(max_k + 1, weight.shape[1])
    observer = weight_spec.observer_or_fake_quant_ctr()
    observer(weight)
    scale, zero_point = observer.broadcast_qparams()
    dims = [d for d in range(weight.dim()) if d != 1]
    errors = []
    for k in range(max_k + 1):
        folded = weight * 2.0 ** -k
        err = fake_quantize(folded, scale, zero_point, observer.quant_min, observer.quant_max) - folded
        errors.append(err.pow(2).sum(dim=dims) * 4.0 ** k)
    return torch.stack(errors)


def output_errors(rows: torch.Tensor, activation_errors: torch.Tensor, weight: torch.Tensor,
                  weight_errors: torch.Tensor) -> torch.Tensor:
    """Each channel's share of the layer's output error for each k, per sample: its activation MSE times the
    energy of its weight column, plus its (2^k-amplified) weight error times its mean square input.

    Args:
        rows: (N, positions, C) layer input.
        activation_errors: (K + 1, N, C) from `per_sample_channel_errors`.
        weight: the layer's FP weight, input channels on dim 1.
        weight_errors: (K + 1, C) from `weight_error_per_k`.
    """
    column_energy = weight.pow(2).sum(dim=[d for d in range(weight.dim()) if d != 1])  # (C,)
    mean_square = rows.pow(2).mean(dim=1)  # (N, C)
    return activation_errors * column_energy + weight_errors.unsqueeze(1) * mean_square


@dataclass
class PTSResult:
    """What PTS did to one layer (`QuantizationReport.pts`).

    Attributes:
        spread: the input's channel spread that made the layer a candidate (`channel_spread`).
        k: the chosen exponent of each input channel: its scale is s = 2^-k (`factors`), applied as
            W diag(s) on diag(1/s) x.
        fold: where the factors went: "producer" (folded into the layer that makes the input) or "multiply".
    """

    spread: float
    k: list[int]
    fold: str


@dataclass
class PowerOfTwoVotes:
    """Accumulates, per channel, how often each k was the per-sample MSE-optimal choice (and the summed MSE
    of each k, for selection by total MSE instead of by vote)."""

    num_channels: int
    max_k: int = 3

    def __post_init__(self) -> None:
        if self.max_k < 0:
            raise ValueError(f"max_k={self.max_k} is not supported: use max_k >= 0.")
        self.votes = torch.zeros(self.max_k + 1, self.num_channels, dtype=torch.long)
        self.total_mse = torch.zeros(self.max_k + 1, self.num_channels, dtype=torch.float64)

    def add(self, errors: torch.Tensor, k_cap: torch.Tensor | None = None) -> None:
        """errors: (max_k + 1, N, C) from `per_sample_channel_errors` or `output_errors`; k_cap: (C,) largest k
        a channel may take (from `range_preserving_max_k`), or None for no cap."""
        if k_cap is not None:
            allowed = torch.arange(self.max_k + 1).view(-1, 1) <= k_cap.view(1, -1)  # (K + 1, C)
            errors = errors.masked_fill(~allowed.unsqueeze(1), float("inf"))
        best = errors.argmin(dim=0)  # (N, C); ties go to the smaller k
        self.votes += torch.nn.functional.one_hot(best, self.max_k + 1).sum(dim=0).T
        self.total_mse += errors.double().sum(dim=1)  # inf where capped, so by_mse respects the cap too

    def by_vote(self, kappa: float = 0.85) -> torch.Tensor:
        """Each channel's most voted k if its share is at least kappa, else 0."""
        if not 0 < kappa <= 1:
            raise ValueError(f"kappa={kappa} is not supported: use 0 < kappa <= 1.")
        return vote(self.votes, kappa)

    def by_mse(self) -> torch.Tensor:
        """Each channel's k with the lowest MSE summed over all samples (no vote)."""
        return self.total_mse.argmin(dim=0)


def vote(votes: torch.Tensor, kappa: float) -> torch.Tensor:
    """votes: (K + 1, C) counts. The winning k per channel, or 0 where its share is below kappa."""
    total = votes.sum(dim=0).clamp_min(1)
    count, winner = votes.max(dim=0)
    return torch.where(count.double() / total.double() >= kappa, winner, torch.zeros_like(winner))


def factors(k: torch.Tensor) -> torch.Tensor:
    """The scale s = 2^-k per channel, in the y = (W diag(s)) (diag(1/s) x) convention of channel scaling."""
    return torch.pow(2.0, -k.double()).float()


def apply_power_of_two_scaling(graph: torch.fx.GraphModule, data, config, progress: bool = True,
                               has_vnni: bool | None = None) -> dict[str, PTSResult]:
    """Chooses and folds PTS factors for every quantized layer input with a high channel spread.

    Args:
        graph: an exported graph (before `prepare_pt2e`); modified in place.
        data: calibration data.
        config: the `QuantConfig`; `config.dmq` holds the PTS settings, the layers are those it quantizes.
        progress: show a progress bar.
        has_vnni: as for `DiffusionQuantizer`, so that the simulated ranges are the ones `prepare_pt2e` gets.

    Returns:
        {layer module path: `PTSResult`} for every
        layer that got non-trivial factors.

    With a `torch.distributed` process group of several ranks, each rank observes its share of the samples and
    the channel extremes, the activation observers and the votes are merged across ranks: one process's factors
    (the MSE observers' random subsample aside, as in `calibrate`).
    """
    from diffusion_ao.calibration.layer_inputs import run_with_input_callbacks
    from diffusion_ao.observers import timestep_context
    from diffusion_ao.passes.analysis import CONV_OPS, get_attr_tensor, layer_name
    from diffusion_ao.passes.channel_scaling import scale_input_channels, scaling_blocker
    from diffusion_ao.quantizer.quantizer import DiffusionQuantizer

    settings = config.dmq
    quantizer = DiffusionQuantizer(config, has_vnni=has_vnni)
    planned = {n: p for n, p in quantizer.planned_layers(graph).items() if p.input_spec}
    channel_dim = {n.name: 1 if n.target in CONV_OPS else -1 for n in planned}
    channel_min: dict[str, torch.Tensor] = {}
    channel_max: dict[str, torch.Tensor] = {}
    observers = {n.name: p.input_spec.observer_or_fake_quant_ctr() for n, p in planned.items()}

    def record_extremes(name):
        def callback(x, timestep):
            rows = channels_last_rows(x, channel_dim[name]).float()
            lo, hi = rows.amin(dim=(0, 1)), rows.amax(dim=(0, 1))
            channel_min[name] = torch.minimum(channel_min.get(name, lo), lo)
            channel_max[name] = torch.maximum(channel_max.get(name, hi), hi)
            with timestep_context(timestep):
                observers[name](x)
        return callback

    rank, world_size = world()
    mine = data.share(rank, world_size)  # all of it in one process
    run_with_input_callbacks(graph, mine, {n.name: record_extremes(n.name) for n in planned}, progress=progress,
                             desc="PTS: channel spread")
    for name in channel_max if world_size > 1 else ():  # every rank: the extremes and ranges of all the data
        all_reduce_max(channel_max[name], "PTS's channel maxima")
        channel_min[name] = -all_reduce_max(-channel_min[name], "PTS's channel minima")
    merge_observers(observers, "PTS's activation observers")
    absmax = {name: torch.maximum(channel_min[name].abs(), channel_max[name].abs()) for name in channel_max}
    chosen = {n: channel_spread(absmax[n.name]) for n in planned if n.name in absmax}
    chosen = {n: spread for n, spread in chosen.items()
              if spread >= settings.pts_min_spread and scaling_blocker(graph, n) is None}
    if not chosen:
        return {}
    votes = {n.name: PowerOfTwoVotes(len(absmax[n.name]), settings.pts_max_k) for n in chosen}
    tensor_range = {n.name: deployed_range(observers[n.name]) for n in chosen}
    # the observer's own code range: 7 bits for 8-bit activations where reduce_range is on (no VNNI)
    code_bits = {n.name: (observers[n.name].quant_max - observers[n.name].quant_min).bit_length() for n in chosen}
    k_cap = {n.name: range_preserving_max_k(channel_min[n.name], channel_max[n.name], *tensor_range[n.name],
                                            settings.pts_max_k) for n in chosen}
    weights = {n.name: get_attr_tensor(graph, n.args[1]).detach().float() for n in chosen}
    weight_errors = {n.name: weight_error_per_k(weights[n.name], planned[n].weight_spec, settings.pts_max_k)
                     for n in chosen}

    def record_votes(node):
        def callback(x, timestep):
            rows = channels_last_rows(x, channel_dim[node.name]).float()
            activation = per_sample_channel_errors(rows, code_bits[node.name], settings.pts_max_k,
                                                   *tensor_range[node.name])
            errors = output_errors(rows, activation, weights[node.name], weight_errors[node.name])
            votes[node.name].add(errors, k_cap[node.name])
        return callback

    run_with_input_callbacks(graph, mine, {n.name: record_votes(n) for n in chosen}, progress=progress,
                             desc="PTS: voting")
    for tally in votes.values() if world_size > 1 else ():
        all_reduce_sum(tally.votes, "PTS's votes")
        all_reduce_sum(tally.total_mse, "PTS's summed errors")
    report = {}
    for node, spread in chosen.items():
        tally = votes[node.name]
        k = tally.by_vote(settings.pts_kappa) if settings.pts_selection == "vote" else tally.by_mse()
        if int(k.max()) == 0:
            continue
        fold = scale_input_channels(graph, node, factors(k))
        report[layer_name(node)] = PTSResult(spread, k.tolist(), fold)
    return report
