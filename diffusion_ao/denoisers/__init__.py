"""One adapter per diffusers denoiser family; adding a family is adding a file here and a line below.

Example:
    >>> adapter = adapter_for(pipe.transformer)      # e.g. the PixArt adapter
    >>> adapter.sample_arg
    'hidden_states'
"""
from __future__ import annotations

import torch

from diffusion_ao.denoisers import dit, flux, pixart, sd3, unet2d, unet2d_condition
from diffusion_ao.denoisers.base import CLASS_LABELS, SAMPLE, SEPARATOR, TIMESTEP, DenoiserAdapter, timestep_batch

ADAPTERS: list[DenoiserAdapter] = [m.ADAPTER for m in (unet2d, unet2d_condition, dit, pixart, sd3, flux)]
DENOISER_ROLES = ("unet", "transformer")  # the attribute a diffusers pipeline keeps its denoiser under


def register_adapter(adapter: DenoiserAdapter) -> None:
    """Adds a denoiser family (checked before the built-in ones, so a subclass can get its own adapter)."""
    ADAPTERS.insert(0, adapter)


def adapter_for(model: torch.nn.Module) -> DenoiserAdapter:
    """The adapter of `model`'s family; a TypeError naming the supported families otherwise."""
    for adapter in ADAPTERS:
        if isinstance(model, adapter.model_class):
            return adapter
    names = ", ".join(a.name for a in ADAPTERS)
    raise TypeError(f"diffusion-ao has no denoiser adapter for {type(model).__name__}; supported: {names}. Add one "
                    "with diffusion_ao.denoisers.register_adapter(DenoiserAdapter(...)).")


def require_loaded_weights(model: torch.nn.Module, what: str) -> None:
    """Raises a clear error where `model` has weights on the meta device (created without loading them)."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"{what}: {len(meta)} weights of this {type(model).__name__} are on the meta device (e.g. "
                         f"'{meta[0]}'): they were never loaded. Load the model with its weights (from_pretrained "
                         "without device_map='meta' / init_empty_weights) before quantizing it.")


def denoiser_role(pipe) -> str:
    """'unet' or 'transformer': the pipeline attribute holding its denoiser; a ValueError if it has neither."""
    for role in DENOISER_ROLES:
        if isinstance(getattr(pipe, role, None), torch.nn.Module):
            return role
    components = sorted(getattr(pipe, "components", {}) or {})
    raise ValueError(f"{type(pipe).__name__} has no denoiser: diffusion-ao quantizes a pipeline's `unet` or "
                     f"`transformer`, and this one has neither (components: {components}).")


__all__ = ["ADAPTERS", "CLASS_LABELS", "DENOISER_ROLES", "DenoiserAdapter", "SAMPLE", "SEPARATOR", "TIMESTEP", "adapter_for",
           "denoiser_role", "register_adapter", "require_loaded_weights", "timestep_batch"]
