"""The shipped models (a DDPM UNet and a class-conditional DiT on 16x16 digits) and a loader for any diffusers UNet.

Example:
    >>> unet, scheduler = load_default_model()
    >>> dit, scheduler = load_model("dit")                              # the shipped class-conditional DiT
    >>> unet, scheduler = load_model("path/to/a/diffusers/pipeline")   # or a hub id, if it is cached
    >>> pipe = load_pipeline("path/to/a/diffusers/pipeline")           # the whole pipeline, for its own call
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

from diffusion_ao.models.unet_config import DEFAULT_SCHEDULE_KWARGS

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "digits_unet"
DIT_MODEL_DIR = Path(__file__).parent / "assets" / "digits_dit"


def load_default_model() -> tuple[UNet2DModel, DDIMScheduler]:
    """The shipped digits DDPM (EMA weights, eval mode) and a DDIM scheduler with its training schedule."""
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(f"The default model's weights are missing from {DEFAULT_MODEL_DIR}; retrain with "
                                "`python -m diffusion_ao.models.train`.")
    # low_cpu_mem_usage=False: the default asks the user to install `accelerate`, which a model this small does not need
    unet = UNet2DModel.from_pretrained(DEFAULT_MODEL_DIR, low_cpu_mem_usage=False).eval()
    return unet, DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)


def load_dit_model() -> tuple[DiTTransformer2DModel, DDIMScheduler]:
    """The shipped class-conditional DiT (EMA weights, eval mode; labels 0-9, null label 10 for guidance) and a
    DDIM scheduler with its training schedule."""
    if not (DIT_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(f"The DiT's weights are missing from {DIT_MODEL_DIR}; train them with "
                                "`python -m diffusion_ao.models.train --model dit` (see its TRAINING.txt).")
    dit = DiTTransformer2DModel.from_pretrained(DIT_MODEL_DIR, low_cpu_mem_usage=False).eval()
    return dit, DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)


def load_model(name_or_path: Union[str, Path]) -> tuple[torch.nn.Module, DDIMScheduler]:
    """A diffusers denoiser and a DDIM scheduler from "default" (the UNet), "dit", a local directory, or a hub id.

    A directory may hold a whole pipeline (with `unet/` and `scheduler/` subfolders) or just a UNet (then the
    default model's noise schedule is assumed). A hub id needs network access or a populated cache.
    """
    if str(name_or_path) == "default":
        return load_default_model()
    if str(name_or_path) == "dit":
        return load_dit_model()
    path = Path(name_or_path)
    root = path if path.exists() else None
    has_subfolders = root is not None and (root / "unet").is_dir()
    source = str(path) if root is not None else str(name_or_path)
    subfolder = "unet" if has_subfolders or root is None else None
    config = (UNet2DModel.load_config(source, subfolder=subfolder))
    cls = UNet2DConditionModel if config.get("_class_name") == "UNet2DConditionModel" else UNet2DModel
    unet = cls.from_pretrained(source, subfolder=subfolder, low_cpu_mem_usage=False).eval()
    if has_subfolders or root is None:
        try:
            scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
        except (OSError, ValueError):
            scheduler = DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)
    else:
        scheduler = DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)
    return unet, scheduler


def load_pipeline(path: Union[str, Path]):
    """A diffusers pipeline saved with `save_pretrained`, in eval mode on the CPU; components saved as None (a
    pipeline kept without its text encoders, safety checker, ...) load as None.

    Raises:
        FileNotFoundError: `path` has no model_index.json (it is not a saved pipeline).
    """
    from diffusers import DiffusionPipeline

    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved diffusers pipeline (no model_index.json): save one with "
                                "pipe.save_pretrained(path).")
    index = json.loads(index_file.read_text())
    missing = {name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None}
    pipe = DiffusionPipeline.from_pretrained(str(path), low_cpu_mem_usage=False, **missing)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe
