"""Disturbance-aware selection (TFMQ-DM, docs/methods.md#disturbance-aware-selection): per temporal feature,
measure its error under quantization and decide whether to cache it (exact, costs a `[T, C]` buffer) or leave it
quantized.

A temporal feature is each ResBlock's time projection output and the shared time embedding
(`find_temporal_blocks(...).features`). Its error is the relative MSE against the FP graph over the finite set
of timesteps, sum_t ||f_q(t) - f(t)||^2 / sum_t ||f(t)||^2, measured in the quantized graph as it will run (with
finite-set calibration if configured), so a feature downstream of a quantized embedding includes that error.
Features above `max_error` are cached worst first while the buffers fit `budget_bytes`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

from torch.fx import GraphModule

from diffusion_ao.metrics import relative_mse
from diffusion_ao.passes.temporal import find_temporal_blocks
from diffusion_ao.passes.temporal_cache import evaluate_nodes

logger = logging.getLogger(__name__)


@dataclass
class FeatureChoice:
    """The decision for one temporal feature.

    Attributes:
        name: module path of the feature (e.g. "down_blocks.0.resnets.0.time_emb_proj").
        nbytes: size of its `[T, C]` cache buffer in bytes.
        error: relative MSE vs FP over the finite set, in the configuration used (with FSC if enabled).
        error_without_fsc: the same without finite-set calibration (None when FSC is off).
        cached: whether it is cached.
        reason: why.
    """

    name: str
    nbytes: int
    error: float
    error_without_fsc: Optional[float]
    cached: bool
    reason: str


def temporal_feature_errors(quantized: GraphModule, reference: GraphModule,
                            timesteps: Sequence[float]) -> dict[str, tuple[float, int]]:
    """{feature name: (relative MSE vs FP over `timesteps`, cache bytes)} for every temporal feature.

    Args:
        quantized: a converted (or prepared) graph.
        reference: the FP export of the same UNet (nodes matched by name).
        timesteps: the finite set.
    """
    tib = find_temporal_blocks(quantized)
    names = tib.feature_names()
    ref_nodes = {n.name: n for n in reference.graph.nodes}
    feats = [n for n in tib.features if n.name in ref_nodes]
    if not feats:
        return {}
    q_vals = evaluate_nodes(quantized, feats, timesteps)
    fp_vals = evaluate_nodes(reference, [ref_nodes[n.name] for n in feats], timesteps)
    return {names[n]: (relative_mse(q, fp), fp.numel() * fp.element_size())
            for n, q, fp in zip(feats, q_vals, fp_vals)}


def select_cached_features(errors: dict[str, tuple[float, int]], max_error: float,
                           budget_bytes: Optional[int] = None,
                           errors_without_fsc: Optional[dict[str, tuple[float, int]]] = None) -> list[FeatureChoice]:
    """Chooses cache vs quantize per feature: worst error first, cached if above `max_error` and within budget.

    Args:
        errors: from `temporal_feature_errors` (the configuration that will run).
        max_error: relative MSE up to which a feature stays quantized.
        budget_bytes: the most bytes of cache buffers (None: no limit).
        errors_without_fsc: the same measurement without finite-set calibration, for the report.

    Returns:
        One `FeatureChoice` per feature, worst error first.

    Example:
        >>> select_cached_features({"a": (0.1, 800), "b": (1e-5, 800)}, max_error=1e-3, budget_bytes=1000)[0].cached
        True
    """
    used = 0
    choices = []
    for name, (err, nbytes) in sorted(errors.items(), key=lambda kv: -kv[1][0]):
        no_fsc = errors_without_fsc[name][0] if errors_without_fsc and name in errors_without_fsc else None
        if err <= max_error:
            cached, reason = False, f"error {err:.2e} <= {max_error:.0e}: stays quantized"
        elif budget_bytes is not None and used + nbytes > budget_bytes:
            cached, reason = False, f"error {err:.2e} but over the budget ({used}+{nbytes} > {budget_bytes} B)"
        else:
            used += nbytes
            cached, reason = True, f"error {err:.2e} > {max_error:.0e}: cached"
        choices.append(FeatureChoice(name, nbytes, err, no_fsc, cached, reason))
        logger.info("TFMQ selection: %s -> %s (%s)", name, "cache" if cached else "quantize", reason)
    return choices
