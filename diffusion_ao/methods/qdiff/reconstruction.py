"""Q-Diffusion's block reconstruction (BRECQ with AdaRound + LSQ, docs/methods.md#block-reconstruction), budgeted.

For each block in graph order: cache, over a capped subset of the timestep-aware calibration data, the block's
inputs as the quantized-so-far model computes them (earlier blocks already learned, as in BRECQ) and the block's
floating-point outputs; then learn the AdaRound rounding of its weights and the LSQ step sizes of its activation
quantizers to minimise the timestep-weighted relative output error. Only one block's cache is held at a time.
What learns is the graph's FakeQuantize modules (`observers.fake_quantize`, AdaRound on the weights, LSQ on the
activations): those of a `prepare_qat_pt2e` graph, or, for a `prepare_pt2e` graph, FakeQuantize modules put
around its calibrated observers for the duration (`qat.wrap_observers`). At the end a `prepare_pt2e` graph gets
its observers back, pinned to the learned integers and steps (`qat.unwrap_observers`), and a QAT graph is finished
(`qat.finish_training`); either way `convert_pt2e` gives ordinary q/dq ops, the learned integer weights and the
same int8 kernels.

The FP targets come from the same graph run with its FakeQuantize modules bypassed, which is the FP exported
graph (same nodes, same weights); this avoids matching nodes across two graphs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.calibration.distributed import all_reduce_sum, shard, world
from diffusion_ao.calibration.threads import ThreadChoice
from diffusion_ao.denoisers import SAMPLE, TIMESTEP
from diffusion_ao.graph import GraphRunner, require_exported
from diffusion_ao.method_configs import ReconstructionConfig
from diffusion_ao.methods.learning import finish_training, unwrap_observers, wrap_observers
from diffusion_ao.methods.qdiff.blocks import Block, build_block_module, find_blocks
from diffusion_ao.observers import WeightFakeQuantize
from diffusion_ao.observers.adaround import annealed_beta
from diffusion_ao.passes.analysis import get_attr_tensor, input_dependencies

logger = logging.getLogger(__name__)
CAPTURE_BATCH = 128


@dataclass
class BlockResult:
    """What reconstruction did to one block. Losses are the timestep-weighted relative output error on the
    block's cached calibration samples: with round-to-nearest and the observers' ranges, and after learning."""

    name: str
    iterations: int
    loss_before: float
    loss_after: float
    seconds: float


@dataclass
class ReconstructionReport:
    """Per-block results and the total time."""

    blocks: list[BlockResult] = field(default_factory=list)
    seconds: float = 0.0


class ReconstructionGraph:
    """A calibrated graph during reconstruction: its FakeQuantize modules (`qat.wrap_observers`), the ones
    already learned, and the graph run fake-quantized or in floating point (every FakeQuantize bypassed).

    Args:
        prepared: a calibrated graph from `prepare_pt2e` or `prepare_qat_pt2e` with `DiffusionQuantizer`.

    Attributes:
        quantizers: node target -> FakeQuantize, in graph order.
        learned: targets of the FakeQuantize modules whose block was reconstructed.

    Example:
        >>> graph = ReconstructionGraph(prepared)
        >>> reconstruct_block(graph, find_blocks(prepared)[3], data, ReconstructionConfig(iterations=100))
        >>> graph.finish()                      # then convert_pt2e(prepared)
    """

    def __init__(self, prepared: GraphModule) -> None:
        self.gm = prepared
        self.quantizers, self.wrapped = wrap_observers(prepared, "reconstruct_blocks")
        self.learned: set[str] = set()
        self._runners = {True: GraphRunner(prepared),
                         False: GraphRunner(prepared, modules={t: (lambda x: x) for t in self.quantizers})}

    @torch.no_grad()
    def run(self, inputs: dict[str, torch.Tensor], wanted: Sequence[Node], quantized: bool) -> dict[Node, torch.Tensor]:
        """Runs the graph (fake-quantized or floating point) on named inputs, only as far as `wanted` needs."""
        wanted = list(wanted)
        return dict(zip(wanted, self._runners[quantized].values(inputs, wanted)))

    def finish(self) -> int:
        """Fixes what was learned for `convert_pt2e`: a `prepare_pt2e` graph gets its observers back, pinned to
        it; a QAT graph is finished (`qat.finish_training`). Returns how many quantizers learned."""
        if self.wrapped:
            return unwrap_observers(self.gm)
        finish_training(self.gm)
        return len(self.learned)


def select_samples(data: CalibrationData, max_samples: int, seed: int) -> CalibrationData:
    """At most `max_samples` samples, spread evenly over the timesteps, chosen at random within each step."""
    if data.num_samples <= max_samples and all(len(s) for s in data.steps):
        return data  # everything fits: keeping all samples in order is what the selection would return
    generator = torch.Generator().manual_seed(seed)
    steps = [s for s in data.steps if len(s)]
    per_step = [0] * len(steps)
    for i in range(min(max_samples, sum(len(s) for s in steps))):  # round-robin over the timesteps
        j = i % len(steps)
        while per_step[j] >= len(steps[j]):
            j = (j + 1) % len(steps)
        per_step[j] += 1
    chosen = []
    for step, n in zip(steps, per_step):
        if n:
            keep = torch.randperm(len(step), generator=generator)[:n].sort().values
            chosen.append(step.select(keep))
    return CalibrationData(chosen)


def _flat_inputs(data: CalibrationData) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """All samples of `data` as one batch of graph inputs, split into (batched, shared): the graph takes a
    timestep per sample, so batches can mix timesteps."""
    per_step = [s.graph_inputs() for s in data.steps]
    shared = dict(data.steps[0].shared)
    batched = {k: torch.cat([inputs[k] for inputs in per_step]) for k in per_step[0] if k not in shared}
    return batched, shared


def _batched_nodes(gm: GraphModule) -> set[Node]:
    """Nodes whose values have the batch dimension first. Export marks it: the only symbolic size of an exported
    graph is the batch (or the batch times the tokens, after `passes.flatten_linear`). A node without shape
    metadata (inserted by a pass) has one if it depends on a batched graph input. Shared inputs (Flux's ids) and
    constants have none."""
    def symbolic_batch(n: Node) -> Optional[bool]:
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        return val.dim() > 0 and isinstance(val.shape[0], torch.SymInt)

    batched_inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder" and symbolic_batch(n)}
    found = set()
    for n, deps in input_dependencies(gm).items():
        marked = symbolic_batch(n)
        if marked or (marked is None and deps & batched_inputs):
            found.add(n)
    return found


def _per_sample(value: torch.Tensor, n: int, where: str) -> torch.Tensor:
    """`value` with the samples first: a token-flattened (n * tokens, ...) value (a linear on 2-D rows, see
    `passes.flatten_linear`) becomes (n, tokens, ...)."""
    if value.dim() == 0 or value.shape[0] % n:
        raise ValueError(f"{where} has shape {tuple(value.shape)}, which does not split into {n} samples; it cannot be "
                         "reconstructed per sample (leave it out of the block).")
    k = value.shape[0] // n
    return value if k == 1 else value.reshape(n, k, *value.shape[1:])


def capture_block_data(graph: ReconstructionGraph, block: Block, data: CalibrationData,
                       rows: Optional[range] = None) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(block inputs from the quantized-so-far model, FP block outputs, timestep of each sample), samples first,
    for the samples `rows` of `data` flattened step by step (default: all).

    An input without the batch dimension (a constant the graph computes, e.g. the sinusoidal frequencies) is
    returned once, as computed, and marked by `Block.batch_free`. A token-flattened value (n * tokens rows) is
    stored as (n, tokens, ...); inputs stored so are marked by `Block.token_flat` and flattened back when fed.
    """
    tensor_inputs = block.tensor_inputs
    ins: list[list[torch.Tensor]] = [[] for _ in tensor_inputs]
    outs: list[list[torch.Tensor]] = [[] for _ in block.outputs]
    batched, shared = _flat_inputs(data)
    has_batch = _batched_nodes(graph.gm)
    batch_free = {i for i, node in enumerate(tensor_inputs) if node not in has_batch}
    token_flat = set()
    rows = range(len(batched[SAMPLE])) if rows is None else rows
    for start in range(rows.start, rows.stop, CAPTURE_BATCH):
        stop = min(start + CAPTURE_BATCH, rows.stop)
        args = {**{k: v[start:stop] for k, v in batched.items()}, **shared}
        n = len(args[SAMPLE])
        q = graph.run(args, tensor_inputs, quantized=True)
        fp = graph.run(args, block.outputs, quantized=False)
        # contiguous: conv outputs come channels-last, and this torch build's CPU conv backward crashes on
        # small channels-last inputs
        for i, (acc, node) in enumerate(zip(ins, tensor_inputs)):
            value = q[node].detach().contiguous()
            if i not in batch_free:
                per_sample = _per_sample(value, n, f"block {block.name!r}: input {node.name}")
                if per_sample.dim() > value.dim():
                    token_flat.add(i)
                value = per_sample
            acc.append(value)
        for acc, node in zip(outs, block.outputs):
            if node not in has_batch:
                raise ValueError(f"block {block.name!r}: output {node.name} has no batch dimension; it cannot be "
                                 "reconstructed per sample (leave it out of the block).")
            acc.append(_per_sample(fp[node].detach().contiguous(), n, f"block {block.name!r}: output {node.name}"))
    block.batch_free = frozenset(batch_free)
    block.token_flat = frozenset(token_flat)
    return ([a[0] if i in batch_free else torch.cat(a) for i, a in enumerate(ins)],
            [torch.cat(a) for a in outs], batched[TIMESTEP][rows.start:rows.stop])


def _take(values: Sequence[torch.Tensor], idx, block: Block) -> list[torch.Tensor]:
    out = []
    for i, v in enumerate(values):
        if i in block.batch_free:
            out.append(v)
        else:
            out.append(v[idx].flatten(0, 1) if i in block.token_flat else v[idx])
    return out


def _sample_weights(timesteps: torch.Tensor, weights: Optional[Mapping[float, float]]) -> torch.Tensor:
    if weights is None:
        return torch.ones(len(timesteps))
    missing = sorted({float(t) for t in timesteps.tolist()} - {float(k) for k in weights})
    if missing:
        raise ValueError(f"timestep_weights has no weight for timesteps {missing[:5]}: give one for every "
                         "calibrated timestep (e.g. QuantizationReport.timestep_weights).")
    w = torch.tensor([float(weights[float(t)]) for t in timesteps.tolist()])
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("timestep_weights must be finite, non-negative and not all zero.")
    return w * (len(w) / w.sum())


def _loss(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], norms: Sequence[torch.Tensor],
          w: torch.Tensor, total_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over outputs of the weighted mean per-sample squared error, relative to the output's mean square. With
    `total_weight` (the weight of the whole minibatch, when this rank holds only part of it) the part's share of
    that mean."""
    total = 0.0
    for out, ref, norm in zip(outputs, targets, norms):
        per_sample = (out.reshape(ref.shape) - ref).pow(2).reshape(len(ref), -1).mean(dim=1)
        total = total + (w * per_sample).sum() / (w.sum() if total_weight is None else total_weight) / norm
    return total


def _output_norms(outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each output's mean square over all samples (over every rank's share)."""
    if world()[1] == 1:
        return [o.pow(2).mean().clamp_min(1e-12) for o in outs]
    sums = all_reduce_sum(torch.tensor([[float(o.double().pow(2).sum()), o.numel()] for o in outs],
                                       dtype=torch.float64), "the block outputs' mean squares")
    return [(total / count).float().clamp_min(1e-12) for total, count in sums]


@torch.no_grad()
def _evaluate(module: GraphModule, ins, outs, norms, w, block: Block, batch: int = CAPTURE_BATCH) -> float:
    total, n = 0.0, len(w)
    for start in range(0, n, batch):
        sl = slice(start, start + batch)
        res = module(*_take(ins, sl, block))
        total += float(_loss(res, [o[sl] for o in outs], norms, w[sl])) * float(w[sl].sum())
    if world()[1] > 1:  # the weighted mean over every rank's samples
        total, weight = all_reduce_sum(torch.tensor([total, float(w.sum())], dtype=torch.float64),
                                       "the block loss").tolist()
        return total / weight
    return total / float(w.sum())


def _summed_gradients(params: Sequence[torch.nn.Parameter], rec: torch.Tensor) -> torch.Tensor:
    """Sums the parameters' gradients (and the reconstruction loss) over the ranks; returns the summed loss."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                     + [rec.detach().reshape(1).to(torch.float32)])
    all_reduce_sum(flat, "the reconstruction gradients")
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return flat[-1]


def reconstruct_block(graph: ReconstructionGraph, block: Block, data: CalibrationData, config: ReconstructionConfig,
                      timestep_weights: Optional[Mapping[float, float]] = None,
                      bar: Optional[tqdm] = None) -> BlockResult:
    """Learns the rounding of the block's weights (AdaRound) and the step sizes of its activation quantizers
    (LSQ) in their FakeQuantize modules.

    Args:
        graph: the `ReconstructionGraph` of the calibrated graph (it remembers which quantizers earlier blocks
            learned).
        block: from `find_blocks` or `block_from_nodes`.
        data: calibration data; at most `config.max_samples` samples are cached.
        config: the budget and learning settings.
        timestep_weights: timestep -> loss weight, or None for uniform.
        bar: a progress bar to advance by one per iteration.

    Returns:
        The block's `BlockResult` (loss with the initial and with the learned quantizers, iterations run, time).

    Example:
        >>> graph = ReconstructionGraph(prepared)
        >>> result = reconstruct_block(graph, find_blocks(prepared)[3], data, ReconstructionConfig(iterations=100))
        >>> graph.finish()
    """
    start_time = time.perf_counter()
    data = select_samples(data, config.max_samples, config.seed)
    owned = [n for n in block.nodes if n.op == "call_module" and n.target in graph.quantizers
             and n.target not in graph.learned]
    weights = [graph.quantizers[n.target] for n in owned if isinstance(graph.quantizers[n.target], WeightFakeQuantize)]
    acts = [graph.quantizers[n.target] for n in owned if config.learn_act_scales
            and not isinstance(graph.quantizers[n.target], WeightFakeQuantize)]
    module = build_block_module(graph.gm, block, graph.quantizers)
    rank, world_size = world()
    total = data.num_samples
    if total < world_size:
        raise ValueError(f"reconstruct_block: {total} samples cannot be shared by {world_size} ranks; use more "
                         "calibration samples (ReconstructionConfig.max_samples) or fewer ranks.")
    rows = shard(total, rank, world_size)  # every sample in one process
    ins, outs, _ = capture_block_data(graph, block, data, rows)
    w_all = _sample_weights(torch.cat([torch.full((len(s),), s.timestep) for s in data.steps]), timestep_weights)
    w = w_all[rows.start:rows.stop]
    norms = _output_norms(outs)
    before = _evaluate(module, ins, outs, norms, w, block)  # round-to-nearest, the observers' ranges
    generator = torch.Generator().manual_seed(config.seed + len(graph.learned))
    for node in owned:
        fq = graph.quantizers[node.target]
        if fq in weights:  # the rounding of the weight constant as it is now (GPTQ may have replaced it)
            fq.enable_range_learning(adaround=True, weight=get_attr_tensor(graph.gm, node.args[0]))
        elif fq in acts:
            fq.enable_range_learning()
    learning = weights + acts
    params_w = [p for fq in weights for p in fq.parameters_to_learn()]
    params_a = [p for fq in acts for p in fq.parameters_to_learn()]
    optimizers = ([torch.optim.Adam(params_w, lr=config.weight_lr)] if params_w else []) + \
                 ([torch.optim.Adam(params_a, lr=config.act_lr)] if params_a else [])
    check_every = max(1, config.iterations // 10)
    best, stale, window, done = float("inf"), 0, [], 0
    try:
        with torch.enable_grad():
            threads = ThreadChoice()  # small steps: one thread beats two on a busy machine
            for it in range(config.iterations if optimizers else 0):
                with threads.step(it):
                    idx = torch.randint(0, total, (min(config.batch_size, total),), generator=generator)
                    if world_size == 1:
                        res = module(*_take(ins, idx, block))
                        rec = _loss(res, [o[idx] for o in outs], norms, w[idx])
                    else:  # this rank's part of the minibatch, as a share of the whole minibatch's loss
                        mine = idx[(idx >= rows.start) & (idx < rows.stop)] - rows.start
                        rec = torch.zeros(())
                        if len(mine):
                            res = module(*_take(ins, mine, block))
                            rec = _loss(res, [o[mine] for o in outs], norms, w[mine], total_weight=w_all[idx].sum())
                    loss = rec
                    beta = annealed_beta(it, config.iterations, config.warmup, config.beta_start, config.beta_end)
                    if beta is not None and weights and config.round_weight > 0 and rank == 0:  # counted once
                        loss = loss + config.round_weight * sum(fq.rounding_regularizer(beta) for fq in weights) / len(
                            weights)
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    if loss.requires_grad:
                        loss.backward()
                    if world_size > 1:
                        rec = _summed_gradients(params_w + params_a, rec)
                    for opt in optimizers:
                        opt.step()
                    done = it + 1
                    window.append(float(rec.detach()))
                    if bar is not None:
                        bar.update(1)
                    if config.early_stop_patience and beta is not None and done % check_every == 0:
                        avg = sum(window) / len(window)
                        window.clear()
                        if avg < 0.99 * best:
                            best, stale = avg, 0
                        else:
                            stale += 1
                            if stale >= config.early_stop_patience:
                                break
    finally:
        for fq in learning:
            fq.disable_range_learning()
    if bar is not None and done < config.iterations:
        bar.update(config.iterations - done)
    after = _evaluate(module, ins, outs, norms, w, block)
    graph.learned.update(n.target for n in owned)
    return BlockResult(block.name, done, before, after, time.perf_counter() - start_time)


def reconstruct_blocks(prepared: GraphModule, data: CalibrationData, config: ReconstructionConfig,
                       blocks: Optional[Sequence[Block]] = None,
                       timestep_weights: Optional[Mapping[float, float]] = None,
                       progress: bool = True) -> ReconstructionReport:
    """Block reconstruction of a calibrated graph, baked into it for `convert_pt2e`.

    Args:
        prepared: a graph from `prepare_pt2e(graph, DiffusionQuantizer(config))` or `prepare_qat_pt2e(graph,
            DiffusionQuantizer(config, qat=True))`, calibrated with `calibrate`.
        data: the (timestep-aware) calibration data; at most `config.max_samples` samples are used.
        config: the budget and learning settings (`ReconstructionConfig`). `iterations=0` leaves `prepared`
            untouched (the plain path).
        blocks: the blocks, in the order to reconstruct them (default: `find_blocks(prepared)`). Any node set
            works as one block with several outputs: `block_from_nodes(prepared, nodes, name)`; an observer
            already learned in an earlier block stays fixed.
        timestep_weights: timestep -> weight of the loss (e.g. `QuantizationReport.timestep_weights`); None is
            uniform.
        progress: show a progress bar.

    Returns:
        A `ReconstructionReport` with per-block losses (before / after) and the time taken.

    Example:
        >>> prepared = prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset("qdiff-w4a8")))
        >>> calibrate(prepared, data)
        >>> report = reconstruct_blocks(prepared, data, ReconstructionConfig(iterations=200))
        >>> quantized = convert_pt2e(prepared)
    """
    require_exported(prepared, "reconstruct_blocks")
    if not isinstance(config, ReconstructionConfig):
        raise TypeError(f"reconstruct_blocks needs a ReconstructionConfig, got {type(config).__name__}.")
    if not isinstance(data, CalibrationData):
        raise TypeError(f"reconstruct_blocks needs CalibrationData, got {type(data).__name__}.")
    data.validate()
    report = ReconstructionReport()
    if config.iterations == 0:
        return report
    start = time.perf_counter()
    graph = ReconstructionGraph(prepared)
    blocks = list(blocks) if blocks is not None else find_blocks(prepared)
    subset = select_samples(data, config.max_samples, config.seed)
    bar = tqdm(total=config.iterations * len(blocks), desc="reconstruction", disable=not progress, unit="it")
    for block in blocks:
        bar.set_postfix_str(block.name)
        result = reconstruct_block(graph, block, subset, config, timestep_weights, bar)
        logger.info("reconstruction %s: %d it, loss %.3g -> %.3g (%.1fs)", result.name, result.iterations,
                    result.loss_before, result.loss_after, result.seconds)
        report.blocks.append(result)
    bar.close()
    graph.finish()
    report.seconds = time.perf_counter() - start
    return report
