"""DMQ's learned equivalent scaling, LES (docs/methods.md#learned-equivalent-scaling-les).

For a quantized conv/linear y = W x with input channels c, LES learns s_c > 0 and computes
y = (W diag(s)) (diag(1/s) x): exact in floating point, but it moves quantization difficulty between the
activation x/s and the weight W s. s is learned per layer by minimising the layer's output error under
quantization of both, weighted per timestep with DMQ's adaptive weights
(docs/methods.md#adaptive-timestep-weights), starting from s = 1 (DMQ) or SmoothQuant's closed form. Unlike
DMQ's code, which divides by s at run time, the learned scales are folded into the graph
(`scale_input_channels`): W s into the weight before it is quantized, 1/s into the producer of x or a
per-channel multiply that inductor fuses into the quantize op.

Unlike DMQ, the loss is the *expected* quantization error (each rounding replaced by seeded uniform noise of
one step, the steps following s), not the error through a straight-through rounding: the latter is a
staircase in s, and learning on it made the scales, and the model's quality, depend on the last bits of the FP
inputs, i.e. on the CPU. The ranges are the deployed observers': the weight observer, and the activation
observer with its per-timestep statistics fed x/s of every calibration timestep, so that LES optimises the
ranges the deployed model will use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.calibration.distributed import gather_dicts, share_by_work, world
from diffusion_ao.calibration.threads import ThreadChoice
from diffusion_ao.methods.learning import AdaptiveTimestepWeights, per_sample_relative_error, per_timestep_mean
from diffusion_ao.observers import timestep_context
from diffusion_ao.primitives import fake_quantize

WEIGHT_SEARCH_GRID = 21  # candidate weight ranges per step (the final weight observer searches finer)
EPS = 1e-8
SMOOTH_MAX_TEMPERATURE = 0.05  # of the max: values within a few % of it share the range's gradient


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


def smooth_max(values: torch.Tensor, temperature: float = SMOOTH_MAX_TEMPERATURE) -> torch.Tensor:
    """Per row, the softmax-weighted mean of the values, with a temperature of `temperature` times the row's
    |max|: the max itself when one value stands out, the mean of the top values when several are within a few
    percent of it. Unlike the max, its gradient does not jump from one entry to another as the values move,
    which made the learned scales depend on the inputs' last bits.

    Args:
        values: (rows, n).
        temperature: relative temperature (0 would be the max).

    Returns:
        (rows,) smooth maxima, never above the max.

    Example:
        >>> smooth_max(torch.tensor([[1.0, 4.0]]))
        tensor([4.])
    """
    top = values.amax(dim=1, keepdim=True).detach()
    weights = torch.softmax((values - top) / (temperature * top.abs()).clamp_min(EPS), dim=1)
    return (weights * values).sum(dim=1)


class LayerQuantSim(torch.nn.Module):
    """One conv/linear node of an exported graph with its planned quantizers, differentiable in log(s).

    Two forwards: `forward` quantizes x/s and W s exactly as the deployed graph will (the activation observer's
    per-timestep range choice, the weight observer's per-channel range); `noisy` replaces each rounding by a
    given uniform noise of one step (pseudo-quantization noise) on a grid whose step sizes follow s, which makes
    the layer error a smooth function of s (see `learn_scales`).

    Args:
        gm: the exported graph holding the node's weight and bias.
        node: an aten conv2d / linear node.
        planned: the node's `PlannedLayer` (bits and specs) from `DiffusionQuantizer.planned_layers`.
    """

    def __init__(self, gm: GraphModule, node: Node, planned) -> None:
        super().__init__()
        from diffusion_ao.passes.analysis import CONV_OPS, get_attr_tensor

        if planned.input_spec is None:
            raise ValueError(f"{node.name} is weight-only: LES needs a quantized input activation.")
        self.op = node.target
        self.is_conv = node.target in CONV_OPS
        self.register_buffer("weight", get_attr_tensor(gm, node.args[1]).detach().float().clone())
        bias = get_attr_tensor(gm, node.args[2]) if len(node.args) > 2 else None
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.rest = tuple(node.args[3:])
        self.input_spec, self.weight_spec = planned.input_spec, planned.weight_spec
        self.act_qparams: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # set by refresh_ranges
        self.act_clip: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (low, high) ratio to x/s's min/max
        self.weight_clip: Optional[torch.Tensor] = None  # per output channel: range / max |W s|
        self.x_min: Optional[torch.Tensor] = None  # per input channel, over all inputs
        self.x_max: Optional[torch.Tensor] = None
        self.log_s = torch.nn.Parameter(torch.zeros(self.weight.shape[1]))

    def _x_view(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(1, -1, 1, 1) if self.is_conv else s

    def _w_view(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(1, -1, *([1] * (self.weight.dim() - 2)))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The FP output."""
        return self.op(x, self.weight, self.bias, *self.rest)

    def _weight_observer(self, w: torch.Tensor):
        obs = self.weight_spec.observer_or_fake_quant_ctr(grid=WEIGHT_SEARCH_GRID)
        obs(w.detach())
        return obs

    def _quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.weight_spec.observer_or_fake_quant_ctr(grid=WEIGHT_SEARCH_GRID).fake_quantized(w)

    def _channel_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """The dimensions of x other than its channels (dim 1 of a conv input, the last of a linear's)."""
        return (0, *range(2, x.dim())) if self.is_conv else tuple(range(x.dim() - 1))

    def _weight_absmax(self, w: torch.Tensor) -> torch.Tensor:
        """Per output channel smooth max |w|, shaped to broadcast against w."""
        return smooth_max(w.abs().reshape(len(w), -1)).view(-1, *([1] * (w.dim() - 1)))

    def _act_minmax(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Smooth min and max of x/s over all inputs (0 included, as the affine grid includes it)."""
        lo = -smooth_max(-(self.x_min / s).reshape(1, -1))
        hi = smooth_max((self.x_max / s).reshape(1, -1))
        return lo.reshape(()).clamp_max(0.0), hi.reshape(()).clamp_min(0.0)

    @torch.no_grad()
    def refresh_ranges(self, inputs: dict[float, torch.Tensor]) -> None:
        """Chooses the qparams of x/s and W s as the deployed observers would, from `inputs` (timestep -> x), and
        records how far each range clips relative to the min/max (what `noisy` keeps while s moves)."""
        if self.x_min is None:
            self.x_min = torch.stack([x.amin(dim=self._channel_dims(x)) for x in inputs.values()]).amin(dim=0)
            self.x_max = torch.stack([x.amax(dim=self._channel_dims(x)) for x in inputs.values()]).amax(dim=0)
        observer = self.input_spec.observer_or_fake_quant_ctr()
        s = self.log_s.exp()
        for t, x in inputs.items():
            with timestep_context(t):
                observer(x / self._x_view(s))
        scale, zp = observer.calculate_qparams()
        scale, zp = scale.reshape(()), zp.reshape(()).float()
        self.act_qparams = (scale, zp)
        lo, hi = self._act_minmax(s)
        q_lo, q_hi = (observer.quant_min - zp) * scale, (observer.quant_max - zp) * scale
        self.act_clip = (q_lo / lo if lo < 0 else torch.ones(()), q_hi / hi if hi > 0 else torch.ones(()))
        w = self.weight * self._w_view(s)
        w_scale, _ = self._weight_observer(w).broadcast_qparams()
        half_levels = (self.weight_spec.quant_max - self.weight_spec.quant_min) / 2
        self.weight_clip = w_scale * half_levels / self._weight_absmax(w).clamp_min(EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output with x/s and W s fake-quantized as deployed."""
        if self.act_qparams is None:
            raise RuntimeError("LayerQuantSim: call refresh_ranges(inputs) before running the layer.")
        s = self.log_s.exp()
        scale, zp = self.act_qparams
        xq = fake_quantize(x / self._x_view(s), scale, zp, self.input_spec.quant_min, self.input_spec.quant_max)
        return self.op(xq, self._quantize_weight(self.weight * self._w_view(s)), self.bias, *self.rest)

    def noisy(self, x: torch.Tensor, noise_x: torch.Tensor, noise_w: torch.Tensor) -> torch.Tensor:
        """The output with each rounding replaced by `noise * step` (noise uniform in [-1/2, 1/2], shaped like x
        and the weight), every step and clipping bound a smooth function of s: the activation range is the clip
        ratios of the last refresh times the smooth min/max of x/s, the weight range likewise per output channel.
        """
        if self.act_clip is None:
            raise RuntimeError("LayerQuantSim: call refresh_ranges(inputs) before running the layer.")
        s = self.log_s.exp()
        lo, hi = self._act_minmax(s)
        lo, hi = lo * self.act_clip[0], hi * self.act_clip[1]
        step = (hi - lo) / (self.input_spec.quant_max - self.input_spec.quant_min)
        xq = torch.minimum(torch.maximum(x / self._x_view(s), lo), hi) + step * noise_x
        w = self.weight * self._w_view(s)
        qmin, qmax = self.weight_spec.quant_min, self.weight_spec.quant_max
        w_step = self.weight_clip * self._weight_absmax(w) / ((qmax - qmin) / 2)
        wq = torch.minimum(torch.maximum(w, w_step * qmin), w_step * qmax)
        return self.op(xq, wq + w_step * noise_w, self.bias, *self.rest)


@dataclass
class LESResult:
    """What LES did to one layer. Losses are the mean over timesteps of the layer's relative output error:
    `loss_*` the expected error under quantization noise (what LES minimises and decides by, smooth in s),
    `deployed_*` the error with the deployed round-to-nearest quantizers (for reports)."""

    loss_unscaled: float  # s = 1: plain quantization
    loss_init: float  # the initial s (1 or SmoothQuant)
    loss_learned: float  # the returned s (the learned one, or the initial one if learning did not beat it)
    iterations: int
    scales: torch.Tensor
    deployed_unscaled: float = float("nan")
    deployed_learned: float = float("nan")
    fold: Optional[str] = None  # "producer" / "multiply" once folded; None when s stayed at 1


def _optimizer(params, lr):
    return torch.optim.Adam(params, lr=lr)


def _uniform(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator) - 0.5


def learn_scales(sim: LayerQuantSim, inputs: dict[float, torch.Tensor], init: torch.Tensor, iterations: int,
                 lr: float = 1e-2, batch_per_step: int = 2, weighting_r: float = 0.0, weighting_ema: float = 0.95,
                 seed: int = 0) -> LESResult:
    """Learns the scales of one layer by minimising its expected quantization error, a smooth function of s.

    DMQ learns s through the rounding with a straight-through gradient. That loss is a staircase in s: with
    4-bit weights, which weights round up or down changes with every small move of s, so the loss has a rough
    component that no gradient predicts, and Adam on the straight-through guess wanders over it: a 1-ulp change
    of the inputs (another CPU's FP rounding) moved such scales, and the model's quality with them. Here each
    rounding is replaced by uniform noise of one quantization step (drawn from `seed`, the same on every
    machine), and the steps and clipping bounds follow s: the activation range is the exact min/max of x/s
    times the clip ratios the deployed observer chooses at the initial s, the weight range per output channel
    likewise. The loss is then smooth in s and in the data, so the learned s moves with the rounding only as
    much as the rounding itself, and its gradient sees what s trades: a wider activation step against wider weight
    steps.

    Each iteration draws `batch_per_step` samples from every timestep, weights the per-timestep losses with DMQ's
    adaptive weights (uniform when `weighting_r` is 0) and takes an Adam step on log(s) with a cosine learning
    rate. The learned s is returned if its expected loss on all of `inputs` (one fixed noise draw) is below
    the initial s's, else the initial s: the returned loss never exceeds the initial one.

    Args:
        sim: the layer (its `log_s` is overwritten).
        inputs: timestep -> (N, C, ...) FP inputs of the layer at that timestep.
        init: (C,) positive initial scales.
        iterations: optimisation budget (0 returns `init`).
        lr: Adam learning rate on log(s).
        batch_per_step: samples per timestep in each iteration.
        weighting_r, weighting_ema: DMQ's adaptive timestep weights (r = 0: uniform).
        seed: seed of the batch and noise draws.

    Example:
        >>> result = learn_scales(LayerQuantSim(graph, node, planned[node]), {951.0: x1, 1.0: x2},
        ...                       torch.ones(c), iterations=200)
        >>> result.loss_learned <= result.loss_init
        True
    """
    if iterations < 0 or lr <= 0 or batch_per_step < 1:
        raise ValueError("learn_scales needs iterations >= 0, lr > 0 and batch_per_step >= 1.")
    if not inputs:
        raise ValueError("learn_scales got no inputs: capture the layer's inputs over the calibration data first.")
    timesteps = list(inputs)
    x_all = torch.cat([inputs[t] for t in timesteps])
    ids_all = torch.cat([torch.full((len(inputs[t]),), i) for i, t in enumerate(timesteps)])
    starts = torch.tensor([0] + [len(inputs[t]) for t in timesteps]).cumsum(0)
    sizes = torch.tensor([len(inputs[t]) for t in timesteps])
    generator = torch.Generator().manual_seed(seed)
    eval_noise = (_uniform(x_all.shape, generator), _uniform(sim.weight.shape, generator))

    def per_timestep_loss(pred: torch.Tensor, reference: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return per_timestep_mean(per_sample_relative_error(pred, reference), ids, len(timesteps))

    with torch.no_grad():
        reference = sim.reference(x_all)
        sim.log_s.zero_()
        sim.refresh_ranges(inputs)
        deployed_unscaled = float(per_timestep_loss(sim(x_all), reference, ids_all).mean())
        loss_unscaled = float(per_timestep_loss(sim.noisy(x_all, *eval_noise), reference, ids_all).mean())
        init_log_s = init.clamp_min(EPS).log()
        if torch.equal(init_log_s, sim.log_s):  # DMQ's start, s = 1: the ranges and the loss are those above
            loss_init = loss_unscaled
        else:
            sim.log_s.copy_(init_log_s)
            sim.refresh_ranges(inputs)  # the clip ratios the noisy loss keeps while s is learned
            loss_init = float(per_timestep_loss(sim.noisy(x_all, *eval_noise), reference, ids_all).mean())
    optimizer = _optimizer([sim.log_s], lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(iterations, 1))
    weights = AdaptiveTimestepWeights(weighting_r, weighting_ema)
    batch_ids = torch.arange(len(timesteps)).repeat_interleave(batch_per_step)
    threads = ThreadChoice()  # small steps: one thread beats two on a busy machine
    for i in range(iterations):
        with threads.step(i):
            rows = starts[batch_ids] + (torch.rand(len(batch_ids), generator=generator) * sizes[batch_ids]).long()
            x = x_all[rows]
            pred = sim.noisy(x, _uniform(x.shape, generator), _uniform(sim.weight.shape, generator))
            losses = per_timestep_loss(pred, reference[rows], batch_ids)
            lam = weights.update({t: float(v) for t, v in zip(timesteps, losses.detach())})
            loss = (losses * torch.tensor([lam[t] for t in timesteps], dtype=losses.dtype)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        learned_log_s = sim.log_s.detach().clone()
        loss_learned = float(per_timestep_loss(sim.noisy(x_all, *eval_noise), reference, ids_all).mean())
        if iterations == 0 or loss_learned >= loss_init:
            learned_log_s, loss_learned = init_log_s, loss_init
        sim.log_s.copy_(learned_log_s)
        sim.refresh_ranges(inputs)
        deployed_learned = float(per_timestep_loss(sim(x_all), reference, ids_all).mean())
    return LESResult(loss_unscaled, loss_init, loss_learned, iterations, learned_log_s.exp(),
                     deployed_unscaled=deployed_unscaled, deployed_learned=deployed_learned)


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

    With a `torch.distributed` process group of several ranks, the ranks share out the layers by their work
    (`layer_work`): every layer's learning is independent and needs all of its inputs at every iteration, so
    splitting layers needs no collective per step. The ranks gather the results, so every rank folds the same
    scales, those one process learns.

    Args:
        graph: an exported graph (before `prepare_pt2e`); modified in place (constants out of place).
        data: calibration data (the same on every rank).
        config: the `QuantConfig`; `config.dmq` holds the LES settings.
        progress: show progress bars.
        has_vnni: as for `DiffusionQuantizer` (decides the simulated activation range).

    Returns:
        {layer module path: `LESResult`} for every layer LES looked at.
    """
    from diffusion_ao.passes.analysis import layer_name
    from diffusion_ao.passes.channel_scaling import scale_input_channels, scaling_blocker
    from diffusion_ao.quantizer.quantizer import DiffusionQuantizer

    planned = DiffusionQuantizer(config, has_vnni=has_vnni).planned_layers(graph)
    targets = [n for n, p in planned.items() if p.input_spec is not None and scaling_blocker(graph, n) is None]
    rank, world_size = world()
    mine = _learn_layers(graph, data.subset(config.dmq.les_samples_per_step), config.dmq, planned,
                         share_by_work(targets, lambda n: layer_work(graph, n), world_size)[rank], progress)
    learned = gather_dicts(mine, "the LES scales")
    dmq = config.dmq
    results: dict[str, LESResult] = {}
    for node in targets:  # in graph order on every rank
        result = learned[node.name]
        if result.loss_learned < result.loss_unscaled * (1 - dmq.les_min_gain):
            result.fold = scale_input_channels(graph, node, result.scales)
        results[layer_name(node)] = result
    return results


def layer_work(graph: GraphModule, node: Node) -> int:
    """A conv/linear node's multiply-adds per sample: its weight's size times the positions of its input."""
    from diffusion_ao.passes.analysis import CONV_OPS, get_attr_tensor

    x = node.args[0].meta["val"]
    channels = x.shape[1] if node.target in CONV_OPS else x.shape[-1]
    return get_attr_tensor(graph, node.args[1]).numel() * math.prod(x.shape[1:]) // channels


def _learn_layers(graph: GraphModule, subset: CalibrationData, dmq, planned: dict, nodes: list[Node],
                  progress: bool) -> dict[str, LESResult]:
    """LES for `nodes` on their FP inputs over `subset`, captured in groups that fit `dmq.les_max_capture_mib`:
    {node name: result}. The graph is not modified."""
    from diffusion_ao.calibration.layer_inputs import run_with_input_callbacks
    from diffusion_ao.passes.analysis import get_attr_tensor

    per_sample = {n: math.prod(n.args[0].meta["val"].shape[1:]) * 4 for n in nodes}
    nbytes = {n: per_sample[n] * subset.num_samples for n in nodes}
    results: dict[str, LESResult] = {}
    bar = tqdm(total=len(nodes), desc="LES", disable=not progress, unit="layer")
    for group in _chunks(nodes, nbytes, dmq.les_max_capture_mib * 2**20):
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
                x_absmax = torch.stack([x.abs().amax(dim=sim._channel_dims(x)) for x in inputs.values()]).amax(dim=0)
                w = get_attr_tensor(graph, node.args[1]).detach()
                w_absmax = w.movedim(1, 0).reshape(w.shape[1], -1).abs().amax(dim=1)
                init = smoothquant_scales(x_absmax, w_absmax, dmq.les_alpha)
            else:
                init = torch.ones(sim.weight.shape[1])
            r = dmq.weighting_r if dmq.timestep_weighting else 0.0
            result = learn_scales(sim, inputs, init, dmq.les_iterations, lr=dmq.les_lr, weighting_r=r,
                                  weighting_ema=dmq.weighting_ema, seed=dmq.seed)
            results[node.name] = result
            bar.set_postfix_str(f"{node.name}: {result.deployed_unscaled:.2e} -> {result.deployed_learned:.2e}")
            bar.update(1)
    bar.close()
    return results
