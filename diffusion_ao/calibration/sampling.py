"""One sampler loop for every diffusers scheduler, shared by calibration and the benchmark."""
from __future__ import annotations

from typing import Callable, Optional

import torch

# (step index, timestep value, the UNet input at that step) -> None
StepCallback = Callable[[int, float, torch.Tensor], None]


def fresh_scheduler(scheduler):
    """A new scheduler with the same config: schedulers keep per-run state (step index, solver history)."""
    return scheduler.__class__.from_config(scheduler.config)


def sample_shape(unet: torch.nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of one sample, from a diffusers UNet's or DiT's config."""
    cfg = unet.config
    size = cfg.sample_size
    return (cfg.in_channels, size, size) if isinstance(size, int) else (cfg.in_channels, *size)


@torch.no_grad()
def run_sampler(unet: Callable, scheduler, noise: torch.Tensor, num_inference_steps: int,
                conditioning: Optional[dict[str, torch.Tensor]] = None,
                on_step: Optional[StepCallback] = None, guidance_scale: float = 1.0,
                unconditional: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Denoises `noise` with `scheduler` and returns the final sample.

    Args:
        unet: called as `unet(model_input, t, return_dict=False, **conditioning)[0]` — a diffusers denoiser or
            `as_diffusers_denoiser(...)` of a quantized graph.
        scheduler: any diffusers scheduler; a fresh copy is used.
        noise: initial Gaussian noise, (batch, channels, height, width).
        num_inference_steps: sampler steps.
        conditioning: extra denoiser inputs (encoder_hidden_states, class_labels), batched like `noise`.
        on_step: called before each denoiser call with (step index, timestep value, denoiser input); with
            guidance the input is the doubled batch the denoiser sees (unconditional half first).
        guidance_scale: classifier-free guidance: eps_u + scale * (eps_c - eps_u) from one call on the doubled
            batch (unconditional, conditional), as diffusers pipelines run it; 1 calls the denoiser once.
        unconditional: the conditioning of the unconditional half (e.g. the null class label), batched like
            `noise`; required when `guidance_scale != 1`.
    """
    guided = guidance_scale != 1.0
    cond = dict(conditioning or {})
    if guided:
        if unconditional is None or set(unconditional) != set(cond):
            raise ValueError("Classifier-free guidance needs `unconditional` inputs for the same names as "
                             f"`conditioning` ({sorted(cond)}), e.g. the null class label.")
        cond = {k: torch.cat([unconditional[k], v]) for k, v in cond.items()}
    sched = fresh_scheduler(scheduler)
    sched.set_timesteps(num_inference_steps)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        model_input = sched.scale_model_input(x, t)
        if guided:
            model_input = torch.cat([model_input, model_input])
        if on_step is not None:
            on_step(i, float(t), model_input)
        # one timestep per sample: some denoisers (DiT) only take a 1-d timestep
        eps = unet(model_input, t.reshape(-1).expand(len(model_input)), return_dict=False, **cond)[0]
        if eps.shape[1] == 2 * x.shape[1]:  # learned variance (DiT): the first half is epsilon, as DiTPipeline uses
            eps = eps[:, :x.shape[1]]
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = sched.step(eps, t, x).prev_sample
    return x
