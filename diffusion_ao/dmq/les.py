"""DMQ's learned equivalent scaling, LES (METHODS.md §4).

For a quantized conv/linear y = W x with input channels c, LES learns s_c > 0 and computes
y = (W diag(s)) (diag(1/s) x): exact in floating point, but it moves quantization difficulty between the
activation x/s and the weight W s. s is learned per layer by minimising the layer's output error under fake
quantization of both, weighted per timestep with DMQ's adaptive weights (§3), starting from s = 1 (DMQ) or
SmoothQuant's closed form. Unlike DMQ's code, which divides by s at run time, the learned scales are folded
into the graph (`scale_input_channels`): W s into the weight before it is quantized, 1/s into the producer
of x or a per-channel multiply that inductor fuses into the quantize op.

The simulated quantizers are the ones `prepare_pt2e` will insert: the weight observer, and the activation
observer with its per-timestep statistics, fed x/s of every calibration timestep and refreshed while s is
learned, so that LES optimises the ranges the deployed model will use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from ..calibration import CalibrationData
from ..observers import timestep_context
from ..primitives import fake_quantize_ste
from .timestep_weights import AdaptiveTimestepWeights

WEIGHT_SEARCH_GRID = 21  # candidate weight ranges per step (the final weight observer searches finer)
EPS = 1e-8


def smoothquant_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_c = max|x_c|^alpha / max|W_:,c|^(1-alpha), normalised to a geometric mean of 1.

    The normalisation changes nothing after quantization (per-tensor activation and per-channel weight scales
    absorb a common factor) but keeps x/s and W s near their original magnitudes.

    Args:
        x_absmax: (C,) per-input-channel max |x| over the calibration data.
        w_absmax: (C,) per-input-channel max |W| over output channels (and kernel positions).
        alpha: migration strength in [0, 1]: how much of the activation's channel range moves to the weight.

    Example:
        >>> smoothquant_scales(torch.tensor([4.0, 1.0]), torch.tensor([1.0, 1.0]), alpha=0.5)
        tensor([2.0000, 0.5000])
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is not supported: use a value in [0, 1].")
    s = x_absmax.clamp_min(EPS).pow(alpha) / w_absmax.clamp_min(EPS).pow(1.0 - alpha)
    return s / s.log().mean().exp()


class LayerQuantSim(torch.nn.Module):
    """One conv/linear node of an exported graph with its planned quantizers, differentiable in log(s).

    Args:
        gm: the exported graph holding the node's weight and bias.
        node: an aten conv2d / linear node.
        planned: the node's `PlannedLayer` (bits and specs) from `DiffusionQuantizer.planned_layers`.
    """

    def __init__(self, gm: GraphModule, node: Node, planned) -> None:
        super().__init__()
        from ..passes.analysis import CONV_OPS, get_attr_tensor

        if planned.input_spec is None:
            raise ValueError(f"{node.name} is weight-only: LES needs a quantized input activation.")
        self.op = node.target
        self.is_conv = node.target in CONV_OPS
        self.register_buffer("weight", get_attr_tensor(gm, node.args[1]).detach().float().clone())
        bias = get_attr_tensor(gm, node.args[2]) if len(node.args) > 2 else None
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.rest = tuple(node.args[3:])
        self.input_spec, self.weight_spec = planned.input_spec, planned.weight_spec
        self.act_qparams: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # set by refresh_activation_range
        self.log_s = torch.nn.Parameter(torch.zeros(self.weight.shape[1]))

    def _x_view(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(1, -1, 1, 1) if self.is_conv else s

    def _w_view(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(1, -1, *([1] * (self.weight.dim() - 2)))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The FP output."""
        return self.op(x, self.weight, self.bias, *self.rest)

    def _quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        obs = self.weight_spec.observer_or_fake_quant_ctr(grid=WEIGHT_SEARCH_GRID)
        obs(w.detach())
        scale, zp = obs.broadcast_qparams()
        return fake_quantize_ste(w, scale, zp, obs.quant_min, obs.quant_max)

    @torch.no_grad()
    def refresh_activation_range(self, inputs: dict[float, torch.Tensor]) -> None:
        """Chooses the activation qparams of x/s as the deployed observer would, from `inputs` (timestep -> x)."""
        observer = self.input_spec.observer_or_fake_quant_ctr()
        s = self._x_view(self.log_s.exp())
        for t, x in inputs.items():
            with timestep_context(t):
                observer(x / s)
        scale, zp = observer.calculate_qparams()
        self.act_qparams = (scale.reshape(()), zp.reshape(()).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output with x/s and W s fake-quantized (gradients reach log_s straight through the rounding)."""
        if self.act_qparams is None:
            raise RuntimeError("LayerQuantSim: call refresh_activation_range(inputs) before running the layer.")
        s = self.log_s.exp()
        scale, zp = self.act_qparams
        xq = fake_quantize_ste(x / self._x_view(s), scale, zp, self.input_spec.quant_min, self.input_spec.quant_max)
        return self.op(xq, self._quantize_weight(self.weight * self._w_view(s)), self.bias, *self.rest)


def per_sample_relative_error(pred: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """||pred_i - ref_i||^2 / ||ref_i||^2 for every sample i (first dimension)."""
    dims = tuple(range(1, reference.dim()))
    return (pred - reference).pow(2).sum(dims) / reference.pow(2).sum(dims).clamp_min(1e-12)


@dataclass
class LESResult:
    """What LES did to one layer. Losses are the mean over timesteps of the relative output error."""

    loss_unscaled: float  # s = 1: plain quantization
    loss_init: float  # the initial s (1 or SmoothQuant)
    loss_learned: float  # the best s found
    iterations: int
    scales: torch.Tensor
    history: list[float] = field(default_factory=list)  # evaluation loss at every evaluation point
    fold: Optional[str] = None  # "producer" / "multiply" once folded; None when s stayed at 1


def _timestep_losses(sim: LayerQuantSim, x: torch.Tensor, reference: torch.Tensor, step_ids: torch.Tensor,
                     num_steps: int) -> torch.Tensor:
    """(num_steps,) mean relative error per timestep; one forward over samples of every timestep, so that the
    activation range is shared across timesteps as in the deployed per-tensor quantizer."""
    errors = per_sample_relative_error(sim(x), reference)
    sums = torch.zeros(num_steps, dtype=errors.dtype).index_add(0, step_ids, errors)
    counts = torch.bincount(step_ids, minlength=num_steps).clamp_min(1)
    return sums / counts


def learn_scales(sim: LayerQuantSim, inputs: dict[float, torch.Tensor], init: torch.Tensor, iterations: int,
                 lr: float = 1e-2, batch_per_step: int = 2, weighting_r: float = 0.0, weighting_ema: float = 0.95,
                 eval_every: int = 20, patience: int = 5, seed: int = 0) -> LESResult:
    """Learns the scales of one layer; returns the best s seen on the evaluation data (all of `inputs`).

    Each iteration draws `batch_per_step` samples from every timestep, weights the per-timestep losses with
    DMQ's adaptive weights (uniform when `weighting_r` is 0), and takes an Adam step on log(s) with a cosine
    learning rate. Every `eval_every` iterations the activation range is chosen again by the deployed observer
    for the current s, and the uniform mean over timesteps of the loss on all of `inputs` is evaluated with it;
    the best s so far is kept, and training stops after `patience` evaluations without
    improvement. The returned loss therefore never exceeds the initial one.

    Args:
        sim: the layer (its `log_s` is overwritten).
        inputs: timestep -> (N, C, ...) FP inputs of the layer at that timestep.
        init: (C,) positive initial scales.
        iterations: optimisation budget (0 returns `init`).
        lr: Adam learning rate on log(s).
        batch_per_step: samples per timestep in each iteration.
        weighting_r, weighting_ema: DMQ's adaptive timestep weights (r = 0: uniform).
        eval_every, patience: evaluation interval and early-stopping patience (in evaluations).
        seed: seed of the batch draws.

    Example:
        >>> result = learn_scales(LayerQuantSim(graph, node, planned[node]), {951.0: x1, 1.0: x2},
        ...                       torch.ones(c), iterations=200)
        >>> result.loss_learned <= result.loss_init
        True
    """
    if iterations < 0 or lr <= 0 or batch_per_step < 1 or eval_every < 1 or patience < 1:
        raise ValueError("learn_scales needs iterations >= 0, lr > 0, batch_per_step, eval_every, patience >= 1.")
    if not inputs:
        raise ValueError("learn_scales got no inputs: capture the layer's inputs over the calibration data first.")
    timesteps = list(inputs)
    x_all = torch.cat([inputs[t] for t in timesteps])
    ids_all = torch.cat([torch.full((len(inputs[t]),), i) for i, t in enumerate(timesteps)])
    starts = torch.tensor([0] + [len(inputs[t]) for t in timesteps]).cumsum(0)
    sizes = torch.tensor([len(inputs[t]) for t in timesteps])
    with torch.no_grad():
        reference = sim.reference(x_all)

        def evaluate() -> float:
            sim.refresh_activation_range(inputs)
            return float(_timestep_losses(sim, x_all, reference, ids_all, len(timesteps)).mean())

        sim.log_s.zero_()
        loss_unscaled = evaluate()
        sim.log_s.copy_(init.clamp_min(EPS).log())
        loss_init = best = loss_unscaled if bool((init == 1).all()) else evaluate()  # s = 1 was just evaluated
    best_log_s, history, stale = sim.log_s.detach().clone(), [best], 0
    optimizer = torch.optim.Adam([sim.log_s], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(iterations, 1))
    weights = AdaptiveTimestepWeights(weighting_r, weighting_ema)
    generator = torch.Generator().manual_seed(seed)
    batch_ids = torch.arange(len(timesteps)).repeat_interleave(batch_per_step)
    done = 0
    for done in range(1, iterations + 1):
        rows = starts[batch_ids] + (torch.rand(len(batch_ids), generator=generator) * sizes[batch_ids]).long()
        losses = _timestep_losses(sim, x_all[rows], reference[rows], batch_ids, len(timesteps))
        lam = weights.update({t: float(v) for t, v in zip(timesteps, losses.detach())})
        loss = (losses * torch.tensor([lam[t] for t in timesteps], dtype=losses.dtype)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if done % eval_every == 0 or done == iterations:
            with torch.no_grad():
                value = evaluate()
            history.append(value)
            if value < best:
                best, best_log_s, stale = value, sim.log_s.detach().clone(), 0
            else:
                stale += 1
                if stale >= patience:
                    break
    with torch.no_grad():
        sim.log_s.copy_(best_log_s)
    return LESResult(loss_unscaled, loss_init, best, done, best_log_s.exp(), history)


def _input_absmax(x: torch.Tensor, is_conv: bool) -> torch.Tensor:
    x = x.movedim(1, -1) if is_conv else x
    return x.reshape(-1, x.shape[-1]).abs().amax(dim=0)


def _chunks(nodes: list[Node], bytes_per_node: dict[Node, int], budget: int) -> list[list[Node]]:
    """Consecutive groups of layers whose captured inputs fit in `budget` bytes together."""
    groups, current, used = [], [], 0
    for node in nodes:
        if current and used + bytes_per_node[node] > budget:
            groups.append(current)
            current, used = [], 0
        current.append(node)
        used += bytes_per_node[node]
    return groups + ([current] if current else [])


def apply_learned_scaling(graph: GraphModule, data: CalibrationData, config, progress: bool = True,
                          has_vnni: Optional[bool] = None) -> dict[str, LESResult]:
    """Learns LES scales for every layer `config` quantizes with an activation, and folds them into `graph`.

    Layers are learned on their FP inputs (so the order does not matter), captured over `dmq.les_samples_per_step`
    trajectories per timestep, in groups that fit `dmq.les_max_capture_mib`. A layer keeps s = 1 when the learned
    scales do not lower its loss by at least `dmq.les_min_gain` (relative).

    Args:
        graph: an exported graph (before `prepare_pt2e`); modified in place (constants out of place).
        data: calibration data.
        config: the `QuantConfig`; `config.dmq` holds the LES settings.
        progress: show progress bars.
        has_vnni: as for `DiffusionQuantizer` (decides the simulated activation range).

    Returns:
        {layer module path: `LESResult`} for every layer LES looked at.
    """
    from ..passes.analysis import get_attr_tensor, module_path
    from ..passes.capture import run_with_input_callbacks
    from ..passes.channel_scaling import scale_input_channels, scaling_blocker
    from ..quantizer import DiffusionQuantizer

    dmq = config.dmq
    planned = DiffusionQuantizer(config, has_vnni=has_vnni).planned_layers(graph)
    targets = [n for n, p in planned.items() if p.input_spec is not None and scaling_blocker(graph, n) is None]
    subset = data.subset(dmq.les_samples_per_step)
    per_sample = {n: math.prod(n.args[0].meta["val"].shape[1:]) * 4 for n in targets}
    nbytes = {n: per_sample[n] * subset.num_samples for n in targets}
    results: dict[str, LESResult] = {}
    learned: dict[Node, torch.Tensor] = {}
    bar = tqdm(total=len(targets), desc="LES", disable=not progress, unit="layer")
    for group in _chunks(targets, nbytes, dmq.les_max_capture_mib * 2**20):
        captured: dict[str, dict[float, list]] = {n.name: {} for n in group}

        def recorder(name):
            def callback(x, timestep):
                captured[name].setdefault(timestep, []).append(x.float().clone())
            return callback

        run_with_input_callbacks(graph, subset, {n.name: recorder(n.name) for n in group}, progress=False)
        for node in group:
            inputs = {t: torch.cat(chunks) for t, chunks in captured.pop(node.name).items()}
            sim = LayerQuantSim(graph, node, planned[node])
            if dmq.les_init == "smoothquant":
                x_absmax = torch.stack([_input_absmax(x, sim.is_conv) for x in inputs.values()]).amax(dim=0)
                w = get_attr_tensor(graph, node.args[1]).detach()
                w_absmax = w.movedim(1, 0).reshape(w.shape[1], -1).abs().amax(dim=1)
                init = smoothquant_scales(x_absmax, w_absmax, dmq.les_alpha)
            else:
                init = torch.ones(sim.weight.shape[1])
            r = dmq.weighting_r if dmq.timestep_weighting else 0.0
            result = learn_scales(sim, inputs, init, dmq.les_iterations, lr=dmq.les_lr, weighting_r=r,
                                  weighting_ema=dmq.weighting_ema, seed=dmq.seed)
            if result.loss_learned < result.loss_unscaled * (1 - dmq.les_min_gain):
                learned[node] = result.scales
            results[module_path(node) or node.name] = result
            bar.set_postfix_str(f"{node.name}: {result.loss_unscaled:.2e} -> {result.loss_learned:.2e}")
            bar.update(1)
    bar.close()
    for node, s in learned.items():
        results[module_path(node) or node.name].fold = scale_input_channels(graph, node, s)
    return results
