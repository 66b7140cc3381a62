"""Hessian-aware rounding of quantized weights with error feedback (GPTQ / OBQ), on the inputs each layer sees
over the calibration timesteps.

Round-to-nearest rounds every weight on its own. GPTQ rounds the input columns of a layer one at a time and
moves each column's rounding error onto the columns not yet rounded, in the direction that the layer's inputs
make cheapest: it minimises the layer's output error ||W X - Q X||^2 rather than the weight error. The second
moment of the inputs, H = E[x x^T], is gathered over every calibration timestep, each timestep weighted (DMQ's
adaptive timestep weights when the config learns them, else equally), so that a layer whose inputs change with
t is rounded for all of them. Convs use their unfolded patches as inputs (one row per output pixel).

The grid is the weight observer's (its per-channel scale from min-max or the MSE search), so GPTQ only chooses
the integers; `apply_gptq` writes scale * (codes - zero point) back into the prepared graph and pins the
observer to that grid, so `convert_pt2e` produces the same q/dq ops and int8 kernels as round-to-nearest.

Example:
    >>> prepared = prepare_pt2e(graph, DiffusionQuantizer(config)); calibrate(prepared, data)
    >>> apply_gptq(prepared, data, GPTQConfig())
    >>> converted = convert_pt2e(prepared)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.calibration.distributed import all_reduce_sum, gather_dicts, share_by_work, world
from diffusion_ao.method_configs import GPTQConfig
from diffusion_ao.methods.state import RecipeState


def _nearest(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
             quant_max: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero_point, quant_min, quant_max)


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               quant_min: int, quant_max: int, damp: float = 0.01, block_size: int = 128,
               act_order: bool = True) -> torch.Tensor:
    """The integer codes of `weight` on a fixed per-output-channel grid, chosen by GPTQ for inputs whose second
    moment is `hessian`.

    Args:
        weight: [out, in] (a conv weight flattened to [out, in * kh * kw]).
        hessian: [in, in], symmetric positive semi-definite: E[x x^T] of the layer's (unfolded) inputs.
        scale, zero_point: the grid, shape [out] (or scalars for per-tensor).
        quant_min, quant_max: the integer range.
        damp, block_size, act_order: see `GPTQConfig`.

    Returns:
        float codes in [quant_min, quant_max], shaped like `weight`; the rounded weight is
        scale * (codes - zero_point). With a diagonal `hessian` (uncorrelated inputs) they are round-to-nearest.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq_codes needs a [out, in] weight and an [in, in] hessian; got {tuple(weight.shape)} "
                         f"and {tuple(hessian.shape)}.")
    out_features, n = weight.shape
    scale = scale.double().reshape(-1, 1).expand(out_features, 1)
    zero_point = zero_point.double().reshape(-1, 1).expand(out_features, 1)
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0  # inputs that are always 0: their weights do not matter, round them to nearest
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row i holds how the error of column i spreads onto the columns after it.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(w)
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        errors = torch.empty(out_features, end - start, dtype=w.dtype)
        for i in range(start, end):
            column = w[:, i:i + 1]
            q = _nearest(column, scale, zero_point, quant_min, quant_max)
            codes[:, i:i + 1] = q
            err = (column - scale * (q - zero_point)) / u[i, i]
            w[:, i:end] -= err * u[i:i + 1, i:end]
            errors[:, i - start:i - start + 1] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return codes[:, torch.argsort(order)].to(weight.dtype)


def layer_inputs_2d(node: Node, x: torch.Tensor, kernel_size: tuple[int, ...]) -> torch.Tensor:
    """A conv/linear node's input as rows of the flattened weight's input dimension: a linear's features, or a
    conv's unfolded patches (one row per output pixel, ordered as `weight.reshape(out, -1)`); `kernel_size` is
    the conv weight's spatial shape."""
    from diffusion_ao.passes.analysis import CONV_OPS

    if node.target not in CONV_OPS:
        return x.reshape(-1, x.shape[-1])
    stride, padding, dilation, groups = (list(node.args[3:7]) + [1, 0, 1, 1][len(node.args[3:7]):])
    if groups != 1:
        raise ValueError(f"GPTQ supports ungrouped convs only; {node.name} has groups={groups}.")
    if isinstance(padding, str):
        raise ValueError(f"GPTQ needs numeric conv padding; {node.name} has padding={padding!r}.")
    patches = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@dataclass
class GPTQResult:
    """One layer's rounding: the output error on the calibration inputs, E||(W - W_q) x||^2 / E||W x||^2,
    for round-to-nearest and for GPTQ's codes (same grid)."""

    nearest_error: float
    gptq_error: float


def _relative_output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    diff = (weight - rounded).double()
    ref = weight.double()
    return float(torch.einsum("oi,ij,oj->", diff, hessian, diff) / torch.einsum("oi,ij,oj->", ref, hessian, ref)
                 .clamp_min(1e-30))


@torch.no_grad()
def apply_gptq(prepared: GraphModule, data: CalibrationData, config: GPTQConfig,
               timestep_weights: Optional[Mapping[float, float]] = None,
               progress: bool = True) -> dict[str, GPTQResult]:
    """Re-rounds every observed conv/linear weight of a calibrated PT2E graph with GPTQ and pins its grid.

    Layer inputs are the floating-point ones (the observers bypassed, `passes.capture`), so every layer's H comes
    from one pass. With a `torch.distributed` process group of several ranks, each rank accumulates H over its
    share of every step's samples, the H are summed across ranks, each rank solves its share of the layers
    (`distributed.share_by_work`) and all ranks bake every layer's codes: one process's H up to float64
    summation order, so the same codes but for exact ties.

    Args:
        prepared: `prepare_pt2e(graph, DiffusionQuantizer(config))`, calibrated; changed in place (weights out of
            place: the eager model's parameters are not touched).
        data: the calibration data.
        config: a `GPTQConfig`.
        timestep_weights: {timestep: weight} for H (e.g. `QuantizationReport.timestep_weights`); None weights
            every timestep equally.
        progress: show progress bars.

    Returns:
        {layer module path: `GPTQResult`} for every re-rounded layer.
    """
    from diffusion_ao.calibration.layer_inputs import run_with_input_callbacks
    from diffusion_ao.graph import replace_constant
    from diffusion_ao.observers import WeightObserver, diffusion_observers
    from diffusion_ao.passes.analysis import WEIGHTED_OPS, get_attr_tensor, module_path

    users: dict[str, list[Node]] = {}  # weight observer target -> the conv/linear nodes that read its output
    weight_nodes: dict[str, Node] = {}  # weight observer target -> the get_attr node of its weight
    found = diffusion_observers(prepared, "apply_gptq")
    observers = [node.target for node, _ in found]
    for node, obs in found:
        if not isinstance(obs, WeightObserver):
            continue
        readers = [u for u in node.users if u.op == "call_function" and u.target in WEIGHTED_OPS and u.args[1] is node]
        if readers:
            if get_attr_tensor(prepared, node.args[0]) is None:
                raise ValueError(f"apply_gptq: the weight observer {node.target} does not read a constant.")
            users[node.target], weight_nodes[node.target] = readers, node.args[0]
    if not users:
        raise ValueError("apply_gptq found no observed conv/linear weights: pass a graph prepared with "
                         "DiffusionQuantizer and calibrated, before convert_pt2e.")
    subset = data.subset(config.samples_per_step)
    weights = {float(t): 1.0 for t in subset.timesteps}
    if timestep_weights is not None:
        weights = {t: float(timestep_weights.get(t, 0.0)) for t in weights}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("apply_gptq: the timestep weights of the calibration timesteps sum to 0.")
    samples_at: dict[float, int] = {}
    for step in subset.steps:
        samples_at[float(step.timestep)] = samples_at.get(float(step.timestep), 0) + len(step)
    # H = sum_t w_t E_t[x x^T], up to a constant factor per layer (its rows per sample), which GPTQ ignores
    hessians: dict[str, torch.Tensor] = {}  # by weight observer: a weight read by several layers sums their H
    for target in users:
        columns = get_attr_tensor(prepared, weight_nodes[target])[0].numel()
        hessians[target] = torch.zeros(columns, columns, dtype=torch.float64)

    def accumulate(target: str, node: Node):
        kernel_size = tuple(get_attr_tensor(prepared, weight_nodes[target]).shape[2:])

        def callback(x: torch.Tensor, timestep: float) -> None:
            rows = layer_inputs_2d(node, x.float(), kernel_size).double()
            t = float(timestep)
            hessians[target] += rows.T @ rows * (weights[t] / (total * samples_at[t]))
        return callback

    rank, world_size = world()
    callbacks = {node.name: accumulate(target, node) for target, nodes in users.items() for node in nodes}
    run_with_input_callbacks(prepared, subset.share(rank, world_size), callbacks, progress=progress,
                             desc="GPTQ inputs", modules={t: (lambda x: x) for t in observers})
    for target in users if world_size > 1 else ():
        all_reduce_sum(hessians[target], f"GPTQ's H of {target}")

    def solve(target: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, GPTQResult]:
        obs = prepared.get_submodule(target)
        weight = get_attr_tensor(prepared, weight_nodes[target]).detach().float()
        scale, zero_point = obs.calculate_qparams()
        flat = weight.reshape(len(weight), -1)
        codes = gptq_codes(flat, hessians[target], scale, zero_point, obs.quant_min, obs.quant_max,
                           damp=config.damp, block_size=config.block_size, act_order=config.act_order)
        grid = scale.reshape(-1, 1).float()
        zp = zero_point.reshape(-1, 1).float()
        nearest = grid * (_nearest(flat, grid, zp, obs.quant_min, obs.quant_max) - zp)
        rounded = grid * (codes - zp)
        return rounded, scale, zero_point, GPTQResult(_relative_output_error(flat, nearest, hessians[target]),
                                                      _relative_output_error(flat, rounded, hessians[target]))

    for target in users:
        obs = prepared.get_submodule(target)
        if obs.per_channel and obs.ch_axis != 0:
            raise ValueError(f"apply_gptq: {target} quantizes along axis {obs.ch_axis}; only output channels "
                             "(axis 0) are supported.")
    # every rank solves its share of the layers (one process: all of them), then all ranks bake every result
    share = share_by_work(list(users), lambda t: hessians[t].shape[0] ** 2 * len(get_attr_tensor(
        prepared, weight_nodes[t])), world_size)[rank]
    solved = {t: solve(t) for t in tqdm(share, desc="GPTQ", disable=not progress, unit="layer")}
    solved = gather_dicts(solved, "GPTQ's codes")
    results: dict[str, GPTQResult] = {}
    for target in users:
        rounded, scale, zero_point, result = solved[target]
        results[module_path(users[target][0]) or users[target][0].name] = result
        replace_constant(prepared, weight_nodes[target], lambda old, r=rounded: r.reshape(old.shape).to(old.dtype),
                         requires_grad=False)
        prepared.get_submodule(target).set_fixed_qparams(scale, zero_point)
    return results


def before_convert(state: RecipeState) -> None:
    """The recipe's step, after DMQ's timestep weights (which GPTQ may use) and before block reconstruction."""
    config = state.config.gptq
    weights = state.report.timestep_weights if config.use_timestep_weights else None
    state.report.gptq = apply_gptq(state.prepared, state.data, config, timestep_weights=weights,
                                   progress=state.progress)
