"""Calibration data recorded from the user's own diffusers pipeline call (METHODS.md §11, "Pipelines").

`capture_calibration_data(pipe, ...)` runs `pipe(**call_kwargs)` once with the denoiser's forward wrapped: every
call's inputs are flattened into graph inputs (`diffusion_ao.denoisers`) and copied to the CPU, keyed by the real
timestep value the pipeline passed. With classifier-free guidance the pipeline's doubled batch (unconditional and
conditional halves) is recorded as it is, so both halves' activation statistics reach the observers.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from .calibration import CalibrationData, CalibrationStep
from .denoisers import SAMPLE, TIMESTEP, adapter_for, denoiser_role
from .export import QuantizedDenoiser


def _kept_rows(batch: int, samples_per_step: Optional[int]) -> torch.Tensor:
    """Evenly spaced rows, so that a guidance batch (unconditional half, then conditional half) keeps both."""
    if samples_per_step is None or samples_per_step >= batch:
        return torch.arange(batch)
    return torch.linspace(0, batch - 1, samples_per_step).round().long().unique()


@torch.no_grad()
def capture_calibration_data(pipe, num_inference_steps: int = 20, samples_per_step: Optional[int] = None,
                             **call_kwargs) -> CalibrationData:
    """Runs the pipeline once and records every denoiser call's inputs, with its real timestep.

    Args:
        pipe: a diffusers pipeline with a floating-point `unet` or `transformer` (StableDiffusion(XL),
            DiT, PixArt, SD3, Flux, DDPM/DDIM, ...).
        num_inference_steps: passed to the pipeline.
        samples_per_step: keep at most this many rows of each call (evenly spaced over the batch, so both
            guidance halves stay); default all. Recorded tensors live on the CPU either way.
        **call_kwargs: the pipeline call, as you will make it after quantization: prompts (or `prompt_embeds`),
            class labels, `guidance_scale`, `height`/`width`, `num_images_per_prompt`, `generator`, ... The
            output type defaults to "latent" (the VAE's decode is not needed).

    Returns:
        `CalibrationData` with one step per distinct timestep value, in call order.

    Raises:
        ValueError: the pipeline has no `unet`/`transformer`, or it is already quantized.
        TypeError: a denoiser call carries an input the export cannot trace, a batch mixing timesteps, or inputs
            whose names or shapes change between calls.

    Example:
        >>> data = capture_calibration_data(pipe, num_inference_steps=20, prompt=["a cat", "a dog"],
        ...                                 guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
        >>> data.timesteps[:2], data.steps[0].sample.shape     # guidance doubles the batch
        ([951.0, 901.0], torch.Size([4, 4, 64, 64]))
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    if samples_per_step is not None and samples_per_step < 1:
        raise ValueError(f"samples_per_step must be >= 1, got {samples_per_step}.")
    role = denoiser_role(pipe)
    denoiser = getattr(pipe, role)
    if isinstance(denoiser, QuantizedDenoiser):
        raise ValueError(f"pipe.{role} is already quantized: capture calibration data from the floating-point pipeline.")
    adapter = adapter_for(denoiser)
    signature = inspect.signature(denoiser.forward)
    original = denoiser.forward
    recorded: dict[float, list[dict[str, torch.Tensor]]] = {}
    layout: dict[str, tuple] = {}  # input name -> (non-batch shape, dtype) of the first call

    def recording_forward(*args, **kwargs):
        inputs, _ = adapter.flatten_call(signature, args, kwargs)
        _check_layout(layout, inputs, adapter.shared_args)
        values = inputs[TIMESTEP].unique()
        if values.numel() != 1:
            raise TypeError(f"A {adapter.name} call mixes timesteps {values.tolist()}: calibration keys every batch by "
                            "one timestep value.")
        rows = _kept_rows(len(inputs[SAMPLE]), samples_per_step)
        kept = {k: (v if k in adapter.shared_args else v[rows.to(v.device)]).detach().to("cpu", copy=True)
                for k, v in inputs.items() if k != TIMESTEP}
        recorded.setdefault(float(values.item()), []).append(kept)
        return original(*args, **kwargs)

    call_kwargs.setdefault("output_type", "latent")
    denoiser.forward = recording_forward
    try:
        pipe(num_inference_steps=num_inference_steps, **call_kwargs)
    finally:
        del denoiser.forward
    if not recorded:
        raise ValueError(f"{type(pipe).__name__} never called its {role} during capture.")
    steps = []
    for t, calls in recorded.items():
        shared = {k: calls[0][k] for k in adapter.shared_args if k in calls[0]}
        for name, value in shared.items():
            if any(not torch.equal(c[name], value) for c in calls):
                raise TypeError(f"The shared input '{name}' changes between calls at timestep {t}.")
        batched = {k: torch.cat([c[k] for c in calls]) for k in calls[0] if k not in shared}
        sample = batched.pop(SAMPLE)
        steps.append(CalibrationStep(t, sample, batched, shared))
    data = CalibrationData(steps)
    data.validate()
    return data


def _check_layout(layout: dict[str, tuple], inputs: dict[str, torch.Tensor], shared: tuple[str, ...]) -> None:
    now = {k: ((tuple(v.shape) if k in shared else tuple(v.shape[1:])), v.dtype) for k, v in inputs.items()}
    if not layout:
        layout.update(now)
    elif now != layout:
        changed = sorted(k for k in set(now) | set(layout) if now.get(k) != layout.get(k))
        raise TypeError(f"The denoiser's inputs changed between calls of one pipeline run ({changed}): calibration "
                        "needs one graph signature. Capture calls that share their inputs' names and shapes.")
