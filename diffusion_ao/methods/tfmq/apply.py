"""The recipe's TFMQ-DM steps (a `TFMQConfig`), at their three places in the PT2E flow (`methods.state`):

* `before_prepare`: cache="all" caches every temporal feature (the TIB leaves the graph before it is annotated).
* `before_convert`: TIAR (joint reconstruction of the quantized TIB) and the per-timestep qparams of
  finite-set calibration.
* `after_convert`: finite-set calibration's graph rewrite; cache="select" measures every temporal feature's error
  and caches the worst ones (FP values from the reference export) in the converted graph.

The finite set of timesteps is `CalibrationData.timesteps`: the quantized UNet then accepts exactly the timesteps
of the scheduler and step count the calibration data was collected with.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.denoisers import CLASS_LABELS
from diffusion_ao.method_configs import AUTO_LABEL_CACHE_BYTES, TFMQConfig
from diffusion_ao.methods.state import RecipeState
from diffusion_ao.methods.tfmq.selection import FeatureChoice, select_cached_features, temporal_feature_errors
from diffusion_ao.methods.tfmq.tiar import reconstruct_temporal_features
from diffusion_ao.passes.finite_set import FSCTable, apply_finite_set_calibration, finite_set_tables
from diffusion_ao.passes.temporal_cache import (
    TemporalCache,
    cache_temporal_features,
    label_cache_bytes,
    label_table_sizes,
    normalise_timesteps,
)

logger = logging.getLogger(__name__)


@dataclass
class TFMQReport:
    """What the TFMQ-DM steps did (`QuantizationReport.tfmq`).

    Attributes:
        timesteps: the finite set.
        cache: the cache pass's report (None if nothing was cached).
        fsc_pairs: {"int8": n, "simulated": m}: quantize/dequantize pairs with per-timestep qparams left to the
            int8 kernels / rewritten as simulated fake quantization (counted before selection caches any).
        selection: disturbance-aware selection's decisions (cache="select").
        tiar: TIAR's reconstruction report (loss of the temporal features before / after), if it ran.
        label_cache: with `cache_class_labels="auto"`, whether the modulation was cached per timestep or per
            (timestep, label), and why.
    """

    timesteps: list[float]
    cache: Optional[TemporalCache] = None
    fsc_pairs: dict[str, int] = field(default_factory=dict)
    selection: list[FeatureChoice] = field(default_factory=list)
    tiar: Optional[object] = None  # TIAR's ReconstructionReport (diffusion_ao.methods.qdiff)
    label_cache: Optional[str] = None  # cache_class_labels="auto": per timestep or per (timestep, label), and why


def before_prepare(state: RecipeState) -> None:
    """The temporal cache on the FP graph; the cache needs the sampler's timesteps: those of the data."""
    state.report.tfmq = cache_before_prepare(state.graph, state.data, state.config.tfmq)


def cache_before_prepare(graph: GraphModule, data: CalibrationData, tfmq: TFMQConfig) -> TFMQReport:
    report = TFMQReport(timesteps=normalise_timesteps(data.timesteps))
    if tfmq.cache == "all":
        labels, report.label_cache = label_cache_choice(graph, data, report.timesteps, tfmq)
        budget = tfmq.cache_budget_bytes if labels is not None else None
        report.cache = cache_temporal_features(graph, report.timesteps, labels=labels, budget_bytes=budget)
        logger.info("TFMQ cache: %d features (%d B), removed %s", len(report.cache.features), report.cache.nbytes,
                    report.cache.removed_layers)
    return report


def label_cache_choice(graph: GraphModule, data: CalibrationData, timesteps: list[float],
                       tfmq: TFMQConfig) -> tuple[Optional[list[int]], Optional[str]]:
    """The class labels to cache the modulation for (None: per timestep only) and, where `cache_class_labels`
    is "auto", why (`TFMQReport.label_cache`)."""
    found = [s.conditioning[CLASS_LABELS] for s in data.steps if CLASS_LABELS in s.conditioning]
    labels = sorted(set(torch.cat(found).reshape(-1).tolist())) if found else []
    if tfmq.cache_class_labels is True:
        if not labels:
            raise ValueError("TFMQConfig(cache_class_labels=True) needs calibration data with class_labels (a "
                             "class-conditional denoiser, e.g. captured from a DiTPipeline call).")
        return labels, None  # as configured: nothing was chosen
    if not tfmq.cache_class_labels:
        return None, None
    if not labels:
        return None, "timestep cache: the calibration data has no class labels"
    tables = sorted(set(label_table_sizes(graph)))
    if len(tables) != 1:
        return None, ("timestep cache: the class labels do not index one label embedding table"
                      f" (table sizes {tables})")
    missing = sorted(set(range(tables[0])) - set(labels))
    if missing:
        return None, (f"timestep cache: the calibration labels cover {tables[0] - len(missing)} of the "
                      f"{tables[0]} label embeddings (missing {missing[:8]}{' ...' if len(missing) > 8 else ''}); "
                      "a (timestep, label) cache would make the others ungeneratable")
    budget = tfmq.cache_budget_bytes if tfmq.cache_budget_bytes is not None else AUTO_LABEL_CACHE_BYTES
    nbytes = label_cache_bytes(graph, timesteps, labels)
    if nbytes > budget:
        return None, f"timestep cache: the (timestep, label) tables would take {nbytes} B, over the {budget} B budget"
    return labels, (f"(timestep, label) cache: the calibration labels cover all {tables[0]} label embeddings and "
                    f"the tables take {nbytes} B (budget {budget} B)")


def before_convert(state: RecipeState) -> None:
    """TIAR and finite-set calibration's tables, on the calibrated graph; the FP reference of `after_convert`'s
    selection is made here, as the graph to convert is final."""
    state.carry["tfmq"] = (tables_before_convert(state.prepared, state.data, state.config.tfmq, state.report.tfmq),
                           state.fresh_graph())


def after_convert(state: RecipeState) -> None:
    tables, reference = state.carry.pop("tfmq")
    for graph in state.converted_graphs:
        rewrite_after_convert(graph, reference, tables, state.config.tfmq, state.report.tfmq,
                              state.quantizer.decisions)


def tables_before_convert(prepared: GraphModule, data: CalibrationData, tfmq: TFMQConfig,
                          report: TFMQReport) -> list[FSCTable]:
    if tfmq.tiar:
        report.tiar = reconstruct_temporal_features(prepared, data, tfmq.tiar_iterations, seed=tfmq.seed)
    if tfmq.fsc == "none":
        return []
    return finite_set_tables(prepared, data.timesteps, scope=tfmq.fsc)


def rewrite_after_convert(converted: GraphModule, reference: GraphModule, tables: list[FSCTable], tfmq: TFMQConfig,
                          report: TFMQReport, decisions: Optional[list] = None) -> None:
    """FSC rewrite, then (cache="select") selection and caching; marks cached layers FP in `decisions`."""
    without_fsc = None
    if tfmq.cache == "select" and tables:
        without_fsc = temporal_feature_errors(converted, reference, report.timesteps)  # reads only
    report.fsc_pairs = apply_finite_set_calibration(converted, tables, report.timesteps)
    if tables:
        logger.info("TFMQ FSC: %s", report.fsc_pairs)
    if tfmq.cache != "select":
        return
    errors = temporal_feature_errors(converted, reference, report.timesteps)
    report.selection = select_cached_features(errors, tfmq.max_feature_error, tfmq.cache_budget_bytes, without_fsc)
    chosen = [c.name for c in report.selection if c.cached]
    if chosen:
        report.cache = cache_temporal_features(converted, report.timesteps, features=chosen, reference=reference)
        removed = set(report.cache.removed_layers)
        for d in decisions or []:  # the quantizer planned them; they are now lookups
            if d.module in removed:
                d.layer, d.reason = None, "cached temporal feature (TFMQ selection)"
