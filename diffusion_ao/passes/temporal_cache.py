"""Cache temporal features for a scheduler's finite set of timesteps (TFMQ-DM's cache-based maintenance,
docs/methods.md#temporal-cache).

A sampler only ever calls the UNet at a finite set of timestep values. `cache_temporal_features` computes the
chosen timestep-only features (by default: everything the rest of the UNet reads from the TIB) in floating point
for each of them, stores them as `[T, ...]` buffers and rewrites the graph to look them up:

    idx = sum((timestep[:, None] == cached_timesteps[None, :]) * arange(T), dim=1)   # [B]
    feature = index_select(cache, 0, idx)                                              # [B, C]

The time MLP and the ResBlock time projections whose outputs are cached are removed from the graph (with their
weights), so they are neither computed nor quantized. The rewrite is plain aten ops on buffers, so it survives
`prepare_pt2e` / `convert_pt2e`, channel-scaling folds and `compile_for_cpu`.

Unseen timesteps: the graph checks with `aten._assert_async` that every timestep of the batch is in the cached
set (a RuntimeError naming the problem, eager and compiled), and `QuantizedUNet` checks it in Python first with a
message that lists the cached values. There is no silent fallback: a cache is built for one scheduler and step
count; build it again (or quantize without `TFMQConfig.cache`) for another.

Exactness: the cached values are computed by the graph's own ops, one timestep at a time on a batch of 2. At that
batch size (one timestep per batch) the cached graph equals the uncached one bit for bit: same kernels, same
values. At other batch sizes the GEMM kernels (MKL / oneDNN) may block and round a different M differently, so
the uncached FP graph itself differs by a few ulps between batch sizes; whether it does depends on the CPU and
the library versions (on an AVX-512 machine the test UNets' time MLPs round batch 1 and 4 differently from 2),
and the cache matches it up to that rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.denoisers import CLASS_LABELS, TIMESTEP
from diffusion_ao.graph import GraphRunner, register_constant
from diffusion_ao.passes.analysis import WEIGHTED_OPS, input_dependencies, module_path
from diffusion_ao.passes.temporal import _SIDE_EFFECT_ONLY, feature_source, find_temporal_blocks

aten = torch.ops.aten
TIMESTEPS_BUFFER = "tfmq_timesteps"
POSITIONS_BUFFER = "tfmq_timestep_positions"
LABELS_BUFFER = "tfmq_class_labels"  # the label set of a (timestep, label) cache
LABEL_POSITIONS_BUFFER = "tfmq_class_label_positions"
CACHE_PREFIX = "tfmq_cache_"
INDEX_META = "diffusion_ao_timestep_index"
LABEL_INDEX_META = "diffusion_ao_class_label_index"
_KEEP = {aten._assert_async.msg}
CACHE_META = "diffusion_ao_cached_feature"


@dataclass
class TemporalCache:
    """What `cache_temporal_features` did.

    Attributes:
        timesteps: the cached timestep values, in the order of the buffers' first dimension.
        features: temporal feature name -> buffer shape, e.g. {"time_embedding.linear_2": (20, 128)}.
        labels: the cached class labels of a (timestep, label) cache (row `l * T + t`), else None.
        removed_layers: module paths of the TIB conv/linear layers removed from the graph.
        removed_nodes: how many graph nodes the rewrite removed.
        nbytes: total bytes of the `[T, ...]` cache buffers.
    """

    timesteps: list[float]
    features: dict[str, tuple[int, ...]] = field(default_factory=dict)
    labels: Optional[list[int]] = None
    removed_layers: list[str] = field(default_factory=list)
    removed_nodes: int = 0
    nbytes: int = 0


def normalise_timesteps(timesteps: Iterable[float]) -> list[float]:
    """The distinct float32 values of `timesteps`, in first-seen order (the key the graph compares with)."""
    values = torch.as_tensor(list(timesteps), dtype=torch.float32).reshape(-1)
    if values.numel() == 0:
        raise ValueError("timesteps is empty: pass the scheduler's timesteps (e.g. CalibrationData.timesteps).")
    if not torch.isfinite(values).all():
        raise ValueError("timesteps must be finite.")
    out: list[float] = []
    for v in values.tolist():
        if v not in out:
            out.append(v)
    return out


def normalise_labels(gm: GraphModule, labels: Iterable[int]) -> list[int]:
    """The distinct integer class labels, in first-seen order; a ValueError if `gm` has no `class_labels` input."""
    if CLASS_LABELS not in [n.name for n in gm.graph.nodes if n.op == "placeholder"]:
        raise ValueError(f"A (timestep, label) cache needs a graph with a '{CLASS_LABELS}' input (a class-conditional "
                         "denoiser such as DiT); this one has none.")
    values = torch.as_tensor(list(labels)).reshape(-1)
    if values.numel() == 0 or values.is_floating_point():
        raise ValueError(f"labels must be a non-empty set of integers, got {values.tolist()}.")
    return list(dict.fromkeys(int(v) for v in values.tolist()))


def dummy_inputs(gm: GraphModule, batch: int) -> dict[str, torch.Tensor]:
    """Zero tensors for every graph input, shaped like the exported example with the batch set to `batch`."""
    inputs = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta["val"]
        shape = [batch if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
        inputs[node.name] = torch.zeros(shape, dtype=val.dtype)
    return inputs


@torch.no_grad()
def evaluate_nodes(gm: GraphModule, nodes: Sequence[Node], timesteps: Sequence[float], batch: int = 2,
                   inputs: Optional[dict[str, torch.Tensor]] = None) -> list[torch.Tensor]:
    """The values of `nodes` at each timestep: runs only what they depend on, one timestep at a time.

    Args:
        gm: an exported (prepared or converted) graph.
        nodes: nodes of `gm` (timestep-only ones, unless `inputs` gives real samples).
        timesteps: timestep values.
        batch: batch size of each evaluation (rows of a timestep-only node are all equal).
        inputs: other graph inputs (default zeros); their batch must be `batch`.

    Returns:
        One tensor per node, `[T, ...]`: row i is the value at `timesteps[i]` (first sample of the batch).
    """
    base = dummy_inputs(gm, batch) if inputs is None else dict(inputs)
    rows: list[list[torch.Tensor]] = [[] for _ in nodes]
    runner = GraphRunner(gm)
    for t in timesteps:
        base[TIMESTEP] = torch.full((batch,), float(t), dtype=torch.float32)
        for i, value in enumerate(runner.values(base, list(nodes))):
            rows[i].append(value[0].clone())
    return [torch.stack(r) for r in rows]


def _insert_after_inputs(gm: GraphModule) -> Node:
    # After the last placeholder (converted graphs may put constants before the inputs).
    return [n for n in gm.graph.nodes if n.op == "placeholder"][-1].next


def _fake(val_like: Optional[torch.Tensor], fn):
    """Runs `fn` under the graph's fake mode (for node metadata); None if the graph has none."""
    mode = getattr(val_like, "fake_mode", None)
    if mode is None:
        return None
    with mode:
        return fn(mode)


def _key_index_node(gm: GraphModule, input_name: str, buffer: str, positions_buffer: str, meta: str,
                    values: Optional[list], dtype: torch.dtype, what: str) -> Node:
    """The node computing, per sample, the position of input `input_name`'s value in the set held by `buffer`
    (registered from `values` on the first call; inserted once). The graph asserts every value is in the set."""
    for node in gm.graph.nodes:
        if node.meta.get(meta):
            if values is not None and values != getattr(gm, buffer).tolist():
                raise ValueError(f"This graph already looks {what}s up in a different set; use the same {what}s "
                                 "for the cache and for finite-set calibration.")
            return node
    if not hasattr(gm, buffer):
        if values is None:
            raise ValueError(f"The graph has no {what} set yet: pass the {what}s the first time.")
        gm.register_buffer(buffer, torch.tensor(values, dtype=dtype))
        gm.register_buffer(positions_buffer, torch.arange(len(values)))
    elif values is not None and values != getattr(gm, buffer).tolist():
        raise ValueError(f"This graph already holds a different set of cached {what}s.")
    key = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == input_name)
    g = gm.graph
    with g.inserting_before(_insert_after_inputs(gm)):
        known = g.get_attr(buffer)
        positions = g.get_attr(positions_buffer)
        column = g.call_function(aten.unsqueeze.default, (key, 1))
        hits = g.call_function(aten.eq.Tensor, (column, known))
        found = g.call_function(aten.all.default, (g.call_function(aten.any.dim, (hits, 1)),))
        g.call_function(aten._assert_async.msg, (found, f"diffusion-ao: a {what} is not in the set this graph "
                                                         f"was cached/calibrated for ({buffer})."))
        index = g.call_function(aten.sum.dim_IntList, (g.call_function(aten.mul.Tensor, (hits, positions)), [1]))
    index.meta[meta] = True
    known.meta["val"] = _fake(key.meta.get("val"), lambda m: m.from_tensor(getattr(gm, buffer)))
    index.meta["val"] = _fake(key.meta.get("val"), lambda m: torch.zeros_like(key.meta["val"], dtype=torch.long))
    return index


def timestep_index_node(gm: GraphModule, timesteps: Optional[Sequence[float]] = None) -> Node:
    """The node computing, per sample, the position of its timestep in the cached set (inserted if missing).

    The set is the `tfmq_timesteps` buffer of `gm`, registered from `timesteps` on the first call. The graph
    asserts that every timestep of the batch is in the set.
    """
    values = normalise_timesteps(timesteps) if timesteps is not None else None
    return _key_index_node(gm, TIMESTEP, TIMESTEPS_BUFFER, POSITIONS_BUFFER, INDEX_META, values, torch.float32,
                           "timestep")


def _cache_index_node(gm: GraphModule, timesteps: list[float], labels: Optional[list[int]]) -> Node:
    """Per sample, the row of the cache tables: the timestep's position, or with labels
    `label position * T + timestep position`."""
    index = timestep_index_node(gm, timesteps)
    if labels is None:
        return index
    label_index = _key_index_node(gm, CLASS_LABELS, LABELS_BUFFER, LABEL_POSITIONS_BUFFER, LABEL_INDEX_META, labels,
                                  torch.long, "class label")
    g = gm.graph
    with g.inserting_after(max(index, label_index, key=_position(gm))):
        scaled = g.call_function(aten.mul.Tensor, (label_index, len(timesteps)))
        with g.inserting_after(scaled):
            row = g.call_function(aten.add.Tensor, (scaled, index))
    row.meta["val"] = scaled.meta["val"] = index.meta.get("val")
    return row


def _position(gm: GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__


def _remove_dead_timestep_nodes(gm: GraphModule, keys: Sequence[str] = (TIMESTEP,)) -> tuple[int, list[str]]:
    """Erases the nodes that depend on the keys (timestep, and class label for a label cache) and constants only
    (or on constants only: dequantized weights) and that nothing reads any more; keeps the graph's asserts.
    Returns (count, layers)."""
    deps = input_dependencies(gm)
    allowed = frozenset(keys)
    removed, layers = 0, []
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function" or not deps[node] <= allowed or node.target in _KEEP:
            continue
        if any(u.target not in _SIDE_EFFECT_ONLY for u in node.users):
            continue
        for u in list(node.users):
            gm.graph.erase_node(u)
            removed += 1
        if node.target in WEIGHTED_OPS:
            layers.append(module_path(node))
        gm.graph.erase_node(node)
        removed += 1
    for node in list(gm.graph.nodes):  # the weights of the removed layers
        if node.op == "get_attr" and not node.users:
            target = node.target
            gm.graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                _drop_attr(gm, target)
    return removed, layers[::-1]


def _drop_attr(gm: GraphModule, target: str) -> None:
    # The exported graph's module tree is its own (plain nn.Module containers); only the tensors are shared with
    # the eager UNet, so removing a reference here leaves the eager model intact.
    *path, leaf = target.split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    if hasattr(owner, leaf) and type(owner) in (torch.nn.Module, type(gm)):
        delattr(owner, leaf)


@torch.no_grad()
def _table_bytes(features: list[Node], rows: int) -> int:
    """Bytes of the `[rows, ...]` cache tables of `features`."""
    return sum(rows * math.prod(int(d) for d in node.meta["val"].shape[1:]) * node.meta["val"].element_size()
               for node in features)


def _every_feature(tib) -> list[Node]:
    """The default cache: every temporal value the rest of the graph reads (the whole TIB leaves the graph)."""
    return list(dict.fromkeys(feature_source(n) for n in tib.frontier))


def label_table_sizes(gm: GraphModule) -> list[int]:
    """Rows of every embedding table the `class_labels` input indexes directly (DiT: num_classes + 1, the last
    row the null label of classifier-free guidance); empty when the graph has no such input or table."""
    labels = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == CLASS_LABELS), None)
    if labels is None:
        return []
    return [int(user.args[0].meta["val"].shape[0]) for user in labels.users
            if user.op == "call_function" and user.target == aten.embedding.default and "val" in user.args[0].meta]


def label_cache_bytes(gm: GraphModule, timesteps: Iterable[float], labels: Iterable[int]) -> int:
    """Bytes a (timestep, label) cache of every temporal feature would take (`cache_temporal_features` with
    `labels` and no `features`), computed from the graph's shapes without evaluating anything."""
    values, label_set = normalise_timesteps(timesteps), normalise_labels(gm, labels)
    tib = find_temporal_blocks(gm, (TIMESTEP, CLASS_LABELS))
    return _table_bytes(_every_feature(tib), len(values) * len(label_set))


def cache_temporal_features(gm: GraphModule, timesteps: Iterable[float],
                            features: Optional[Iterable[str | Node]] = None,
                            reference: Optional[GraphModule] = None,
                            labels: Optional[Iterable[int]] = None,
                            budget_bytes: Optional[int] = None) -> TemporalCache:
    """Replaces timestep-only features by lookups into `[T, ...]` buffers computed in FP. Modifies `gm` in place.

    Args:
        gm: a graph from `export_unet` (before `prepare_pt2e`: cached layers are then never quantized).
        timesteps: the finite set of timestep values the sampler will use (e.g. `CalibrationData.timesteps`).
        features: which temporal features to cache, by module path (see `find_temporal_blocks(gm).features`)
            or node; default: every timestep-only value the rest of the graph reads, which removes the whole
            time-embedding computation.
        reference: the floating-point graph to compute the cached values with, when `gm` is already
            quantized (its nodes are matched by name, which `prepare_pt2e` / `convert_pt2e` keep). Default: `gm`.
        labels: the finite set of class labels of a class-conditional graph whose modulation reads the label
            (DiT's adaLN-Zero): the features that depend on the timestep and / or the label are cached for every
            (timestep, label) pair, `[L * T, ...]` buffers, and any other label is an error. Default: timestep only.
        budget_bytes: raise a ValueError, before computing anything, if the buffers would exceed this size.

    Returns:
        A `TemporalCache` describing the buffers and the removed layers.

    Example:
        >>> graph = export_unet(unet, sample_shape=(1, 1, 16, 16))
        >>> info = cache_temporal_features(graph, data.timesteps)
        >>> info.removed_layers[:2]
        ['time_embedding.linear_1', 'time_embedding.linear_2']
    """
    values = normalise_timesteps(timesteps)
    label_set = normalise_labels(gm, labels) if labels is not None else None
    keys = (TIMESTEP,) if label_set is None else (TIMESTEP, CLASS_LABELS)
    tib = find_temporal_blocks(gm, keys)
    if not tib.frontier:
        raise ValueError("This graph has no timestep-only values to cache (its timestep input mixes with the "
                         "sample at once).")
    if features is None:
        chosen = _every_feature(tib)
    else:
        names = tib.feature_names()
        by_name = {v: k for k, v in names.items()}
        chosen = []
        for f in features:
            node = f if isinstance(f, Node) else by_name.get(f)
            if node is None or node not in tib.nodes:
                raise ValueError(f"{f!r} is not a temporal feature of this graph; choose from "
                                 f"{sorted(names.values())}.")
            chosen.append(node)
    nbytes = _table_bytes(chosen, len(values) * (len(label_set) if label_set is not None else 1))
    if budget_bytes is not None and nbytes > budget_bytes:
        raise ValueError(f"The cache would take {nbytes} bytes ({len(values)} timesteps"
                         f"{f' x {len(label_set)} labels' if label_set is not None else ''}), over the budget of "
                         f"{budget_bytes}: calibrate with fewer labels or timesteps, or raise cache_budget_bytes.")
    source, source_nodes = gm, chosen
    if reference is not None:
        ref_nodes = {n.name: n for n in reference.graph.nodes}
        missing = [n.name for n in chosen if n.name not in ref_nodes]
        if missing:
            raise ValueError(f"The reference graph has no nodes named {missing}: pass the FP export of the same "
                             "denoiser (export_denoiser with the same example).")
        source, source_nodes = reference, [ref_nodes[n.name] for n in chosen]
    if label_set is None:
        tables = evaluate_nodes(source, source_nodes, values)
    else:  # rows l * T + t
        per_label = []
        for label in label_set:
            inputs = dummy_inputs(source, 2)
            inputs[CLASS_LABELS] = torch.full((2,), label, dtype=inputs[CLASS_LABELS].dtype)
            per_label.append(evaluate_nodes(source, source_nodes, values, inputs=inputs))
        tables = [torch.cat([tables_l[i] for tables_l in per_label]) for i in range(len(chosen))]
    index = _cache_index_node(gm, values, label_set)
    info = TemporalCache(timesteps=values, labels=label_set)
    names = tib.feature_names()
    for k, (node, table) in enumerate(zip(chosen, tables)):
        attr = register_constant(gm, f"{CACHE_PREFIX}{k}", table.contiguous(), before=index.next)
        with gm.graph.inserting_after(attr):
            lookup = gm.graph.call_function(aten.index_select.default, (attr, 0, index))
        lookup.meta.update({k2: v for k2, v in node.meta.items() if k2 in ("val", "nn_module_stack", "stack_trace")})
        lookup.meta[CACHE_META] = names.get(node, node.name)
        node.replace_all_uses_with(lookup)
        info.features[lookup.meta[CACHE_META]] = tuple(table.shape)
        info.nbytes += table.numel() * table.element_size()
    info.removed_nodes, info.removed_layers = _remove_dead_timestep_nodes(gm, keys)
    gm.graph.lint()
    gm.recompile()
    return info

