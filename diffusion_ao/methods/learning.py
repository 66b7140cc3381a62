"""What the learned methods share: the FakeQuantize modules of a calibrated graph made learnable and fixed
again (block reconstruction, the QAT fine-tune), the per-timestep losses and DMQ's adaptive timestep weights.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.graph import replace_constant, require_exported
from diffusion_ao.observers import TimestepFakeQuantize, WeightFakeQuantize


def fake_quantizers(prepared: GraphModule) -> list[tuple[Node, torch.nn.Module]]:
    """(node, FakeQuantize) for every diffusion-ao FakeQuantize of a `prepare_qat_pt2e` graph, in graph order."""
    found = []
    for node in prepared.graph.nodes:
        if node.op == "call_module":
            module = prepared.get_submodule(node.target)
            if isinstance(module, (TimestepFakeQuantize, WeightFakeQuantize)):
                found.append((node, module))
    return found


def _set_submodule(gm: GraphModule, target: str, module: torch.nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def wrap_observers(prepared: GraphModule, owner: str) -> tuple[dict[str, torch.nn.Module], bool]:
    """The FakeQuantize module of every quantizer of a calibrated graph, ready to learn: fake quantization on at
    the statistics' qparams (the converted graph's forward), observing off.

    A `prepare_qat_pt2e` graph's own FakeQuantize modules are used as they are. In a `prepare_pt2e` graph each
    diffusion-ao observer is replaced, in place, by a FakeQuantize around it (`FakeQuantize.around`: the same
    statistics object), so the learned methods run on the modules of the QAT path in either case;
    `unwrap_observers` puts the observers back with what was learned.

    Args:
        prepared: a calibrated graph from `prepare_pt2e` or `prepare_qat_pt2e` with `DiffusionQuantizer`.
        owner: the method that asks, named in errors.

    Returns:
        (node target -> FakeQuantize in graph order, whether observers were wrapped).

    Raises:
        ValueError: if the graph has no diffusion-ao quantizer.
    """
    require_exported(prepared, owner)
    found = fake_quantizers(prepared)
    wrapped = not found
    if wrapped:
        from diffusion_ao.observers import diffusion_observers

        observed = diffusion_observers(prepared, owner)
        if not observed:
            raise ValueError(f"{owner} found no diffusion-ao observers: pass a graph prepared with "
                             "DiffusionQuantizer (prepare_pt2e or prepare_qat_pt2e) and calibrated, before "
                             "convert_pt2e.")
        for node, obs in observed:
            fq_type = WeightFakeQuantize if isinstance(obs, WeightFakeQuantize.observer_type) else TimestepFakeQuantize
            _set_submodule(prepared, node.target, fq_type.around(obs))
        found = fake_quantizers(prepared)
    for _, fq in found:
        fq.disable_observer()
        fq.enable_fake_quant()
    return {node.target: fq for node, fq in found}, wrapped


@torch.no_grad()
def unwrap_observers(prepared: GraphModule) -> int:
    """Undoes `wrap_observers` on a `prepare_pt2e` graph: every FakeQuantize gives way to its observer, pinned to
    what was learned (a learned step size; AdaRound's hardened rounding written into the weight constant, out of
    place, with the observer on the same grid), so `convert_pt2e` and the passes after it see observers whose
    qparams and weights give exactly the learned integers.

    Returns:
        How many quantizers had learned something.
    """
    learned = 0
    for node, fq in fake_quantizers(prepared):
        fq.disable_range_learning()
        obs = fq.activation_post_process
        if fq.learned_parameters():
            scale, zero_point = obs.calculate_qparams()  # the grid: the observer's, or a step learned on it
            if isinstance(fq, WeightFakeQuantize):
                if fq.step is not None:
                    raise ValueError(f"unwrap_observers: {fq.label} learned its weight step; an observer pins "
                                     "the grid of AdaRound only (convert the QAT graph instead).")
                _harden_weight(prepared, node, fq)
            else:
                scale = fq.calculate_qparams()[0].reshape(scale.shape).to(scale.dtype)
            obs.set_fixed_qparams(scale, zero_point)
            learned += 1
        _set_submodule(prepared, node.target, obs)
    return learned


@torch.no_grad()
def finish_training(prepared: GraphModule) -> int:
    """Fixes what the FakeQuantize modules learned so that `convert_pt2e` can read it: a low-rank correction is
    merged into its weight constant, AdaRound's rounding is hardened and written into the weight constants (out of
    place: the eager model is not touched), the steps stop learning, and the graph moves to eval mode.

    Returns:
        How many weights were rewritten with their hardened rounding.
    """
    _require_fake_quantizers(prepared, "finish_training")
    _merge_low_rank_corrections(prepared)  # W + A B becomes the weight constant the learned step quantizes
    found = fake_quantizers(prepared)  # their weight arguments are the constants again
    hardened = 0
    for node, fq in found:
        fq.disable_range_learning()
        if isinstance(fq, WeightFakeQuantize) and fq.adaround is not None:
            _harden_weight(prepared, node, fq)
            hardened += 1
    return hardened


def per_sample_relative_error(pred: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """||pred_i - ref_i||^2 / ||ref_i||^2 for every sample i (first dimension)."""
    dims = tuple(range(1, reference.dim()))
    return (pred - reference).pow(2).sum(dims) / reference.pow(2).sum(dims).clamp_min(1e-12)


def per_timestep_mean(errors: torch.Tensor, step_ids: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(num_steps,) mean of per-sample `errors` per timestep id."""
    sums = torch.zeros(num_steps, dtype=errors.dtype).index_add(0, step_ids, errors)
    return sums / torch.bincount(step_ids, minlength=num_steps).clamp_min(1)


class AdaptiveTimestepWeights:
    """Keeps the EMA of per-timestep losses and turns it into weights.

    Args:
        r: sharpness of `timestep_weights` (DMQ uses 20; 0 is uniform).
        ema: EMA factor xi of the losses (DMQ: 0.95); the first update sets the EMA to the loss.
    """

    def __init__(self, r: float = 20.0, ema: float = 0.95) -> None:
        if not 0 <= ema < 1:
            raise ValueError(f"ema={ema} is not supported: use 0 <= ema < 1.")
        timestep_weights({0.0: 1.0}, r)  # validates r
        self.r, self.ema = r, ema
        self.losses: dict[float, float] = {}

    def update(self, losses: Mapping[float, float]) -> dict[float, float]:
        for t, value in losses.items():
            old = self.losses.get(t)
            self.losses[t] = float(value) if old is None else self.ema * old + (1 - self.ema) * float(value)
        return self.weights()

    def weights(self) -> dict[float, float]:
        return timestep_weights(self.losses, self.r)


def _harden_weight(prepared: GraphModule, node: Node, fq: "WeightFakeQuantize") -> None:
    if not isinstance(node.args[0], Node) or node.args[0].op != "get_attr":
        raise ValueError(f"the weight of {fq.label} is computed in the graph, not a constant, so its hardened "
                         "rounding has nowhere to go; learn its steps instead (enable_learning(prepared, "
                         "adaround=False)).")
    weight = fq.hardened_weight()
    replace_constant(prepared, node.args[0], lambda old: weight.to(old.dtype), requires_grad=False)


def _require_fake_quantizers(prepared: GraphModule, what: str) -> list[tuple[Node, torch.nn.Module]]:
    require_exported(prepared, what)
    found = fake_quantizers(prepared)
    if not found:
        raise ValueError(f"{what} found no diffusion-ao FakeQuantize modules: prepare the graph with "
                         "`prepare_qat_pt2e(graph, DiffusionQuantizer(config, qat=True))`.")
    return found


class LowRankCorrection(torch.nn.Module):
    """A learned low-rank correction of one weight (EfficientDM): forward(W) = W + A B, with A B reshaped like W
    (A: out channels x rank, B: rank x the rest). A starts at zero, so the correction starts at nothing.

    Args:
        weight: the weight it corrects (its shape and dtype).
        rank: the rank of A B.
        generator: draws B's initial values (scaled by 1 / sqrt(fan-in)).
    """

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        fan_in = weight[0].numel()
        self.shape = tuple(weight.shape)
        self.a = torch.nn.Parameter(torch.zeros(weight.shape[0], rank))
        self.b = torch.nn.Parameter(torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in))

    def delta(self) -> torch.Tensor:
        return (self.a @ self.b).reshape(self.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


@torch.no_grad()
def _merge_low_rank_corrections(prepared: GraphModule) -> int:
    merged = 0
    for node in list(prepared.graph.nodes):
        if node.op != "call_module" or not isinstance(prepared.get_submodule(node.target), LowRankCorrection):
            continue
        correction, weight_node = prepared.get_submodule(node.target), node.args[0]
        delta = correction.delta()
        replace_constant(prepared, weight_node, lambda old: old + delta.to(old.dtype), requires_grad=False)
        node.replace_all_uses_with(node.args[0])
        prepared.graph.erase_node(node)
        prepared.delete_submodule(node.target)
        merged += 1
    if merged:
        prepared.recompile()
    return merged


def timestep_weights(losses: Mapping[float, float], r: float) -> dict[float, float]:
    """lambda_t = (1 - L_t / sum L)^r, normalised to sum to 1.

    Args:
        losses: timestep -> non-negative loss.
        r: sharpness; 0 gives uniform weights.

    Example:
        >>> timestep_weights({901.0: 3.0, 1.0: 1.0}, r=1)
        {901.0: 0.333..., 1.0: 0.666...}
    """
    if not losses:
        raise ValueError("timestep_weights needs at least one timestep's loss.")
    if r < 0:
        raise ValueError(f"r={r} is not supported: use r >= 0 (0 is uniform).")
    values = torch.tensor([float(v) for v in losses.values()], dtype=torch.float64)
    if (values < 0).any() or not torch.isfinite(values).all():
        raise ValueError("timestep losses must be finite and non-negative.")
    total = values.sum()
    share = values / total if total > 0 else torch.zeros_like(values)
    raw = (1 - share).clamp_min(0) ** r
    if raw.sum() <= 0:  # a single timestep holds all the loss (or only one timestep): fall back to uniform
        raw = torch.ones_like(raw)
    weights = raw / raw.sum()
    return {t: float(w) for t, w in zip(losses, weights)}
