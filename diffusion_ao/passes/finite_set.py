"""Finite-set calibration (FSC, TFMQ-DM, docs/methods.md#finite-set-calibration-fsc): activation qparams per
timestep, selected at run time.

A sampler visits a finite set of timesteps, so an activation quantizer can keep one (scale, zero point) per
timestep instead of one compromise over all of them. `TimestepActivationObserver` already keeps per-timestep
statistics; `finite_set_tables` turns them into `[T]` tables before `convert_pt2e`, and
`apply_finite_set_calibration` rewrites the converted graph's quantize/dequantize pairs to read their scale and
zero point from those tables, indexed by the position of the batch's timestep in the cached set (the same index
as the temporal-feature cache, `temporal_cache.timestep_index_node`).

Which nodes (`TFMQConfig.fsc`):
* "temporal": activations that depend on the timestep and not on the sample (the inputs of quantized TIB
  linears: the sinusoidal embedding, silu(temb) in every ResBlock). These are the temporal features' inputs;
  per timestep they are exact constants, so FSC removes the range drift entirely.
* "all": every activation quantizer (what TFMQ-DM's released code does, one state dict per step).

Learned step sizes: when block reconstruction or TIAR has learned an observer's step (`set_fixed_qparams`), the
per-timestep steps keep that correction (`TimestepActivationObserver.qparams_over`): each is the timestep's own
step times learned / statistics step. Without this, FSC would silently undo what TIAR learned.

Kernels: the rewritten pairs use the `.tensor` overloads of `quantize_per_tensor` / `dequantize_per_tensor`,
which inductor's x86 patterns also lower to oneDNN `qconv`/`qlinear` with a run-time activation scale
(`count_int8_kernels` measures it; see tests/passes/test_finite_set.py). A whole batch uses the qparams of its
first sample's timestep: per-tensor int8 kernels take one scale per call. Pipelines call the UNet with one
timestep per batch; `QuantizedUNet` rejects a batch with mixed timesteps for an FSC graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.denoisers import SAMPLE, TIMESTEP
from diffusion_ao.graph import register_constant
from diffusion_ao.observers import TimestepActivationObserver, diffusion_observers
from diffusion_ao.passes.analysis import LINEAR_OPS, input_dependencies, module_path
from diffusion_ao.passes.temporal_cache import normalise_timesteps, timestep_index_node

FSC_SCALE_PREFIX = "fsc_scale_"  # the per-timestep scale tables (`has_per_timestep_qparams` looks for them)


def has_per_timestep_qparams(graph: torch.nn.Module) -> bool:
    """Whether a converted graph looks its activation qparams up per timestep (finite-set calibration): such a
    graph takes one timestep per batch."""
    return any(name.startswith(FSC_SCALE_PREFIX) for name, _ in graph.named_buffers())

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
FSC_META = "diffusion_ao_fsc"


@dataclass
class FSCTable:
    """Per-timestep qparams of one activation quantizer, and the consumer edges it feeds."""

    observer: str
    consumers: list[tuple[str, int]]  # (consumer node name, argument position)
    scales: torch.Tensor  # [T] float32
    zero_points: torch.Tensor  # [T] int64
    label: str = ""


def finite_set_tables(prepared: GraphModule, timesteps: Sequence[float],
                      scope: Literal["temporal", "all"] = "temporal") -> list[FSCTable]:
    """Per-timestep qparams of the chosen activation observers of a calibrated graph (before `convert_pt2e`).

    Args:
        prepared: a graph after `prepare_pt2e` and `calibrate`.
        timesteps: the finite set (the calibration data's timesteps).
        scope: "temporal" (activations that depend on the timestep and not on the sample) or "all".

    Returns:
        One `FSCTable` per observer in scope.

    Example:
        >>> tables = finite_set_tables(prepared, data.timesteps, scope="all")
        >>> quantized = apply_finite_set_calibration(convert_pt2e(prepared), tables, data.timesteps)
    """
    if scope not in ("temporal", "all"):
        raise ValueError(f"scope={scope!r} is not supported: choose 'temporal' or 'all'.")
    values = normalise_timesteps(timesteps)
    deps = input_dependencies(prepared) if scope == "temporal" else {}
    tables = []
    for node, obs in diffusion_observers(prepared, "finite_set_tables"):
        if not isinstance(obs, TimestepActivationObserver):
            continue
        observed = node.args[0]
        if scope == "temporal" and not (TIMESTEP in deps[observed] and SAMPLE not in deps[observed]):
            continue
        keys = obs.keys_for(values, "Finite-set calibration")
        qparams = [obs.timestep_qparams(k) for k in keys]  # a learned step's correction kept
        consumers = [(u.name, list(u.args).index(node)) for u in node.users if node in u.args]
        tables.append(FSCTable(observer=node.name, consumers=consumers,
                               scales=torch.stack([s.reshape(()) for s, _ in qparams]).float(),
                               zero_points=torch.stack([z.reshape(()) for _, z in qparams]).long(),
                               label=obs.label))
    return tables


def _qdq_pair(consumer: Node, position: int) -> Optional[tuple[Node, Node]]:
    dq = consumer.args[position] if position < len(consumer.args) else None
    if not isinstance(dq, Node) or dq.target != qd.dequantize_per_tensor.default:
        return None
    q = dq.args[0]
    if not isinstance(q, Node) or q.target != qd.quantize_per_tensor.default:
        return None
    return q, dq


def _simulated_fake_quant(g, x: Node, scale: Node, zero_point: Node, qmin: int, qmax: int) -> Node:
    """clamp(round(x / s) + zp) - zp) * s in plain aten ops (the arithmetic of quantize/dequantize_per_tensor)."""
    call = g.call_function
    zp = call(aten._to_copy.default, (zero_point,), {"dtype": torch.float32})
    q = call(aten.clamp.default, (call(aten.add.Tensor, (call(aten.round.default, (
        call(aten.mul.Tensor, (x, call(aten.reciprocal.default, (scale,)))),)), zp)), qmin, qmax))
    return call(aten.mul.Tensor, (call(aten.sub.Tensor, (q, zp)), scale))


def apply_finite_set_calibration(converted: GraphModule, tables: list[FSCTable],
                                 timesteps: Sequence[float]) -> dict[str, int]:
    """Rewrites the q/dq pairs of `tables` to per-timestep qparams. Modifies `converted` in place.

    A pair whose consumers are all linears becomes `quantize/dequantize_per_tensor.tensor` with the looked-up
    qparams: inductor lowers it to oneDNN `qlinear` with a run-time scale. Any other pair (conv inputs) becomes
    the same arithmetic in plain aten ops, a simulated fake quantization in front of an FP conv: inductor's
    `qconv` patterns do not match a run-time activation scale, and with `.tensor` pairs around convs its
    output-quant fusion miscompiled (compiled output != eager) in our tests, so convs are not offered to it.

    Args:
        converted: the output of `convert_pt2e` for the graph `tables` came from.
        tables: from `finite_set_tables`.
        timesteps: the same finite set.

    Returns:
        {"int8": pairs left to the int8 kernels, "simulated": pairs rewritten as fake quantization}.
    """
    counts = {"int8": 0, "simulated": 0}
    if not tables:
        return counts
    by_name = {n.name: n for n in converted.graph.nodes}
    index = timestep_index_node(converted, timesteps)
    g = converted.graph
    with g.inserting_after(index):
        first = g.call_function(aten.slice.Tensor, (index, 0, 0, 1))  # [1]: the first sample's position
    for k, table in enumerate(tables):
        pairs = []
        for consumer_name, position in table.consumers:
            consumer = by_name.get(consumer_name)
            pair = _qdq_pair(consumer, position) if consumer is not None else None
            if pair is None:
                raise ValueError(f"apply_finite_set_calibration: no quantize/dequantize pair in front of "
                                 f"'{consumer_name}'; pass the graph that convert_pt2e made from the prepared "
                                 "graph the tables came from.")
            pairs.append((consumer, *pair))
        q = pairs[0][1]
        if any(p[1] is not q for p in pairs):
            raise ValueError(f"apply_finite_set_calibration: the consumers of {table.observer} do not share one "
                             "quantize node.")
        scale_table = register_constant(converted, f"{FSC_SCALE_PREFIX}{k}", table.scales.clone(), before=q)
        zp_table = register_constant(converted, f"fsc_zero_point_{k}", table.zero_points.clone(), before=q)
        with g.inserting_before(q):
            scale = g.call_function(aten.index_select.default, (scale_table, 0, first))
            zp = g.call_function(aten.index_select.default, (zp_table, 0, first))
        label = module_path(pairs[0][0]) or pairs[0][0].name
        dqs = list(q.users)
        on_kernel = all(dq.target == qd.dequantize_per_tensor.default and
                        all(c.target in LINEAR_OPS for c in dq.users) for dq in dqs)
        if on_kernel:
            q.target = qd.quantize_per_tensor.tensor
            q.args = (q.args[0], scale, zp, *q.args[3:])
            for dq in dqs:
                dq.target = qd.dequantize_per_tensor.tensor
                dq.args = (q, scale, zp, *dq.args[3:])
                dq.meta[FSC_META] = label
            q.meta[FSC_META] = label
            counts["int8"] += 1
        else:
            x, qmin, qmax = q.args[0], q.args[3], q.args[4]
            with g.inserting_before(q):
                fq = _simulated_fake_quant(g, x, scale, zp, qmin, qmax)
            fq.meta[FSC_META] = label
            for dq in dqs:
                dq.replace_all_uses_with(fq)
                g.erase_node(dq)
            g.erase_node(q)
            counts["simulated"] += 1
    g.lint()
    converted.recompile()
    return counts
