"""The Python check in front of a graph whose temporal features are cached or whose activation ranges are per
timestep (finite-set calibration): `QuantizedUNet` calls it before every forward.

The graph itself asserts that every timestep is in its set (`aten._assert_async`); this check comes first and
says which values are missing, and it rejects what the graph cannot see: a batch mixing timesteps when the
qparams are chosen per timestep (one scale per int8 kernel call, taken from the first sample).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from diffusion_ao.passes.finite_set import has_per_timestep_qparams
from diffusion_ao.passes.temporal_cache import LABELS_BUFFER, TIMESTEPS_BUFFER


def check_timesteps(known: torch.Tensor, timestep: torch.Tensor) -> None:
    """Raises a ValueError naming the unseen values if `timestep` has values outside `known`."""
    t = timestep.detach().reshape(-1).to(known.device, torch.float32)
    unseen = t[~torch.isin(t, known)]
    if unseen.numel():
        shown = ", ".join(f"{v:g}" for v in unseen.unique()[:5].tolist())
        raise ValueError(f"Timestep(s) {shown} are not in the finite set this quantized UNet was cached/"
                         f"calibrated for ({len(known)} values: {', '.join(f'{v:g}' for v in known[:8].tolist())}"
                         f"{', ...' if len(known) > 8 else ''}). Sample with the same scheduler and step count as "
                         "the calibration data, or quantize again without TFMQConfig.cache / fsc.")


def check_labels(known: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
    """Raises a ValueError naming the class labels outside the set a (timestep, label) cache holds."""
    if labels is None:
        raise ValueError("This quantized denoiser caches its modulation per (timestep, class label): pass class_labels.")
    unseen = labels.detach().reshape(-1).to(known.device)
    unseen = unseen[~torch.isin(unseen, known)]
    if unseen.numel():
        raise ValueError(f"Class label(s) {unseen.unique()[:5].tolist()} are not in the set this quantized denoiser "
                         f"caches its modulation for ({known.tolist()[:16]}{', ...' if len(known) > 16 else ''}). "
                         "Capture calibration data with every label you will generate, or quantize without "
                         "TFMQConfig.cache_class_labels.")


def _graph_of(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    for candidate in (model, getattr(model, "model", None), getattr(model, "graph", None)):
        if isinstance(candidate, torch.nn.Module) and isinstance(getattr(candidate, TIMESTEPS_BUFFER, None),
                                                                 torch.Tensor):
            return candidate
    return None


def timestep_guard(model: torch.nn.Module) -> Optional[Callable[[torch.Tensor], None]]:
    """A check of the timestep vector (and, for a (timestep, label) cache, the class labels) for `model` (a
    converted graph or `compile_for_cpu` of one), or None when the graph has no finite timestep set.

    Example:
        >>> guard = timestep_guard(quantized)
        >>> guard(torch.full((4,), 951.0))   # raises ValueError if 951 was not calibrated
    """
    graph = _graph_of(model)
    if graph is None:
        return None
    known = getattr(graph, TIMESTEPS_BUFFER)
    known_labels = getattr(graph, LABELS_BUFFER, None)
    per_timestep_qparams = has_per_timestep_qparams(graph)

    def guard(timestep: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> None:
        check_timesteps(known, timestep)
        if known_labels is not None:
            check_labels(known_labels, class_labels)
        if per_timestep_qparams and timestep.numel() > 1 and not bool((timestep == timestep.reshape(-1)[0]).all()):
            raise ValueError("This quantized UNet uses per-timestep activation ranges (finite-set calibration): "
                             "call it with one timestep per batch (diffusers pipelines do), not a mix.")

    return guard
