"""DMQ's power-of-two channel scaling (PTS) with voting (METHODS.md §5).

For a layer input whose channels differ a lot in magnitude (the skip concats above all), channel c is quantized
with the per-tensor step divided by 2^k_c: equivalently x_c is multiplied by 2^k_c before quantization and the
consumer's weight column by 2^-k_c, which `scale_input_channels` folds exactly (powers of two are exact in
floating point). k_c is chosen per calibration sample and timestep by quantization MSE, then by a vote: the
most frequent k wins if its share reaches kappa, else k_c = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..primitives import fake_quantize, int_range


def channels_last_rows(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(N, ..., C, ...) -> (N, positions, C): each sample's values grouped by channel."""
    x = x.movedim(channel_dim, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def channel_spread(absmax: torch.Tensor) -> float:
    """max over channels of |x_c|max divided by their median: how unequal the channels are."""
    return float(absmax.max() / absmax.median().clamp_min(1e-12))


def per_sample_channel_errors(rows: torch.Tensor, bits: int, max_k: int) -> torch.Tensor:
    """Quantization MSE of every channel of every sample for each k in 0..max_k.

    Each sample uses its own per-tensor affine range (min/max of the sample, unsigned `bits`-bit codes); channel
    c is scaled by 2^k before quantization and back after.

    Args:
        rows: (N, positions, C) from `channels_last_rows`.
        bits: activation bits.
        max_k: largest exponent.

    Returns:
        (max_k + 1, N, C) mean squared errors.
    """
    qmin, qmax = int_range(bits, signed=False)
    lo = rows.amin(dim=(1, 2)).clamp(max=0.0)
    hi = rows.amax(dim=(1, 2)).clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12).view(-1, 1, 1)
    zero_point = (qmin - torch.round(lo.view(-1, 1, 1) / scale)).clamp(qmin, qmax)
    errors = []
    for k in range(max_k + 1):
        factor = 2.0 ** k
        recon = fake_quantize(rows * factor, scale, zero_point, qmin, qmax) / factor
        errors.append((recon - rows).pow(2).mean(dim=1))
    return torch.stack(errors)


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

    def add(self, errors: torch.Tensor) -> None:
        """errors: (max_k + 1, N, C) from `per_sample_channel_errors`."""
        best = errors.argmin(dim=0)  # (N, C); ties go to the smaller k
        self.votes += torch.nn.functional.one_hot(best, self.max_k + 1).sum(dim=0).T
        self.total_mse += errors.double().sum(dim=1)

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


def apply_power_of_two_scaling(graph: torch.fx.GraphModule, data, config, progress: bool = True) -> dict[str, dict]:
    """Chooses and folds PTS factors for every quantized layer input with a high channel spread.

    Args:
        graph: an exported graph (before `prepare_pt2e`); modified in place.
        data: calibration data.
        config: the `QuantConfig`; `config.dmq` holds the PTS settings, the layers are those it quantizes.
        progress: show a progress bar.

    Returns:
        {layer module path: {"spread", "k" (list per channel), "fold" ("producer" | "multiply")}} for every
        layer that got non-trivial factors.
    """
    from ..passes.analysis import CONV_OPS, module_path
    from ..passes.capture import run_with_input_callbacks
    from ..passes.channel_scaling import scale_input_channels
    from ..quantizer import DiffusionQuantizer

    settings = config.dmq
    planned = {n: p for n, p in DiffusionQuantizer(config).planned_layers(graph).items() if p.input_spec}
    channel_dim = {n.name: 1 if n.target in CONV_OPS else -1 for n in planned}
    absmax: dict[str, torch.Tensor] = {}

    def record_absmax(name):
        def callback(x, timestep):
            a = channels_last_rows(x, channel_dim[name]).abs().amax(dim=(0, 1))
            absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)
        return callback

    run_with_input_callbacks(graph, data, {n.name: record_absmax(n.name) for n in planned}, progress=progress,
                             desc="PTS: channel spread")
    chosen = {n: channel_spread(absmax[n.name]) for n in planned if n.name in absmax}
    chosen = {n: spread for n, spread in chosen.items() if spread >= settings.pts_min_spread}
    if not chosen:
        return {}
    votes = {n.name: PowerOfTwoVotes(len(absmax[n.name]), settings.pts_max_k) for n in chosen}

    def record_votes(node):
        def callback(x, timestep):
            rows = channels_last_rows(x, channel_dim[node.name]).float()
            votes[node.name].add(per_sample_channel_errors(rows, planned[node].layer.act_bits, settings.pts_max_k))
        return callback

    run_with_input_callbacks(graph, data, {n.name: record_votes(n) for n in chosen}, progress=progress,
                             desc="PTS: voting")
    report = {}
    for node, spread in chosen.items():
        tally = votes[node.name]
        k = tally.by_vote(settings.pts_kappa) if settings.pts_selection == "vote" else tally.by_mse()
        if int(k.max()) == 0:
            continue
        fold = scale_input_channels(graph, node, factors(k))
        report[module_path(node) or node.name] = {"spread": spread, "k": k.tolist(), "fold": fold}
    return report
