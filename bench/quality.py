"""Sampling, image-quality metrics and per-timestep noise-prediction error for the benchmark (model size:
`diffusion_ao.serialization.size`).

Every model is called in batches of exactly `batch` samples (the last batch is padded), so that a model
compiled at its first call is never recompiled for another batch size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from diffusion_ao import CalibrationData
from diffusion_ao.metrics import (class_coverage, classifier_features, epsilon_gain, frechet_distance,
                                  label_agreement, psnr_paired, relative_mse, ssim_paired)
from diffusion_ao.calibration.sampling import run_sampler

# diffusers-like UNet: unet(x, t, return_dict=False)[0]
DiffusersUNet = Callable[..., tuple]
# plain forward: fn(x, t_vector) -> prediction
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_noise(num_samples: int, shape: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    """Initial noise for `num_samples` samples, padded up to a multiple of `batch`, from `seed`."""
    padded = math.ceil(num_samples / batch) * batch
    return torch.randn((padded,) + tuple(shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_images(unet: DiffusersUNet, scheduler, noise: torch.Tensor, num_samples: int, steps: int, batch: int,
                  seed: int, desc: str, progress: bool = True, labels: Optional[torch.Tensor] = None,
                  guidance_scale: float = 1.0, null_label: Optional[int] = None) -> torch.Tensor:
    """Runs the shared sampler loop over `noise` in batches of `batch` and returns the first `num_samples`.

    The global RNG is re-seeded per batch, so stochastic schedulers (DDPM) draw the same step noise for
    every model, and samples from the same seed stay paired.

    Args:
        unet: a diffusers UNet or `as_diffusers_unet(...)` of a quantized graph.
        scheduler: any diffusers scheduler (a fresh copy is used per batch).
        noise: from `make_noise`, a multiple of `batch` long.
        num_samples: how many samples to keep.
        steps: sampler steps.
        batch: samples per UNet call.
        seed: base seed of the per-batch step noise.
        desc: progress-bar label.
        progress: show a progress bar.
        labels: the class of each sample (as long as `noise`) for a class-conditional model, else None.
        guidance_scale: classifier-free guidance (the denoiser then sees 2 * `batch` rows per call).
        null_label: the unconditional label, with guidance.

    Returns:
        (num_samples, C, H, W) samples clamped to [-1, 1].
    """
    out = []
    for i, start in enumerate(tqdm(range(0, len(noise), batch), desc=desc, disable=not progress, leave=False)):
        torch.manual_seed(seed * 100_003 + i)
        kw = {}
        if labels is not None:
            y = labels[start:start + batch]
            kw = dict(conditioning={"class_labels": y}, guidance_scale=guidance_scale,
                      unconditional={"class_labels": torch.full_like(y, null_label)} if guidance_scale != 1 else None)
        out.append(run_sampler(unet, scheduler, noise[start:start + batch], steps, **kw))
    return torch.cat(out)[:num_samples].clamp(-1.0, 1.0)


@torch.no_grad()
def batched_forward(fn: ForwardFn, x: torch.Tensor, t: torch.Tensor, batch: int,
                    extra: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """fn(x, t, **extra) over `x` in batches of exactly `batch` rows (the last one padded by repeating its first
    row); `extra` holds other batched graph inputs (e.g. class_labels)."""
    outs = []
    for start in range(0, len(x), batch):
        parts = {"x": x[start:start + batch], "t": t[start:start + batch],
                 **{k: v[start:start + batch] for k, v in (extra or {}).items()}}
        n = len(parts["x"])
        if n < batch:
            parts = {k: torch.cat([v, v[:1].expand(batch - n, *v.shape[1:])]) for k, v in parts.items()}
        xb, tb = parts.pop("x"), parts.pop("t")
        outs.append(fn(xb, tb, **parts)[:n])
    return torch.cat(outs)


@torch.no_grad()
def noise_predictions(fn: ForwardFn, data: CalibrationData, batch: int,
                      mixed_timesteps: bool = True) -> list[torch.Tensor]:
    """The model's noise prediction at every recorded step of `data` (a held-out set of FP trajectories).

    Args:
        fn: the model (a graph taking one timestep per sample).
        data: the held-out steps.
        batch: rows per call.
        mixed_timesteps: run the steps together, `batch` rows per call whatever their timesteps; False for a
            graph with per-timestep activation ranges (finite-set calibration), which takes one timestep per call.
    """
    if not mixed_timesteps:
        return [batched_forward(fn, s.sample, torch.full((len(s.sample),), s.timestep), batch, s.conditioning)
                for s in data.steps]
    x = torch.cat([s.sample for s in data.steps])
    t = torch.cat([torch.full((len(s.sample),), s.timestep) for s in data.steps])
    extra = {k: torch.cat([s.conditioning[k] for s in data.steps]) for k in data.steps[0].conditioning}
    return list(batched_forward(fn, x, t, batch, extra).split([len(s.sample) for s in data.steps]))


def per_timestep_relative_mse(preds: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    """mean((pred - ref)^2) / mean(ref^2) at each timestep: the prediction error relative to FP's power."""
    return [relative_mse(p, r) for p, r in zip(preds, reference)]


def per_timestep_gain(preds: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    """The noise prediction's gain over FP at each timestep (`epsilon_gain`): a systematic over- (> 0) or
    under-prediction that relative MSE does not separate from noise, and that the sampler accumulates."""
    return [epsilon_gain(p, r) for p, r in zip(preds, reference)]


@dataclass
class QualityMetrics:
    """Sample-quality numbers of one row, against the real digits and the FP samples of the same seeds."""

    fd_real: float
    fd_fp: float
    psnr_fp: float
    ssim_fp: float
    coverage: float
    contrast_fp: float  # std of the samples / std of the FP samples (same seeds): 1 is FP's contrast
    label_agreement: Optional[float] = None  # class-conditional models: share of samples showing the asked class


def quality_metrics(images: torch.Tensor, fp_images: torch.Tensor, fp_features: torch.Tensor,
                    real_features: torch.Tensor, classifier: torch.nn.Module,
                    labels: Optional[torch.Tensor] = None) -> QualityMetrics:
    """FD to the real digits and to the FP samples, PSNR/SSIM paired with FP (same seeds), class coverage, and
    for class-conditional samples (`labels`) the classifier's agreement with the asked class."""
    feats = classifier_features(images, classifier)
    return QualityMetrics(fd_real=frechet_distance(feats, real_features),
                          fd_fp=frechet_distance(feats, fp_features),
                          psnr_fp=psnr_paired(images, fp_images),
                          ssim_fp=ssim_paired(images, fp_images),
                          coverage=class_coverage(images, classifier),
                          contrast_fp=float(images.std() / fp_images.std().clamp_min(1e-12)),
                          label_agreement=None if labels is None else label_agreement(images, labels[:len(images)],
                                                                                      classifier))
