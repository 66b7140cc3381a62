"""Calibration data from this project's FP sampler: `collect_calibration_data` runs a scheduler on a denoiser
and records its inputs at every step (`capture.capture_calibration_data` records a diffusers pipeline's own call).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from tqdm.auto import tqdm

from diffusion_ao.calibration.data import ENCODER_HIDDEN_STATES, CalibrationData, CalibrationStep
from diffusion_ao.calibration.distributed import gather_lists, shard, world
from diffusion_ao.calibration.sampling import run_sampler, sample_shape
from diffusion_ao.denoisers import CLASS_LABELS, require_loaded_weights


@torch.no_grad()
def collect_calibration_data(unet: torch.nn.Module, scheduler, num_samples: int = 64,
                             num_inference_steps: int = 20, every_k_steps: int = 1,
                             samples_per_step: Optional[int] = None, batch_size: int = 64, seed: int = 0,
                             encoder_hidden_states: Optional[torch.Tensor] = None,
                             class_labels: Optional[torch.Tensor] = None,
                             guidance_scale: float = 1.0, null_class_label: Optional[int] = None,
                             progress: bool = True) -> CalibrationData:
    """Runs this project's FP sampler on a denoiser and records its inputs at every step (with a diffusers
    pipeline, `capture_calibration_data` records what its own call feeds the denoiser).

    Args:
        unet: the floating-point diffusers UNet.
        scheduler: any diffusers scheduler (a fresh copy is used; yours is not modified).
        num_samples: number of trajectories (seeds).
        num_inference_steps: sampler steps per trajectory.
        every_k_steps: keep every k-th step (Q-Diffusion's sampling rule); 1 keeps all.
        samples_per_step: keep this many trajectories' inputs at each kept step (default: all), chosen at
            random per step so that the steps do not all see the same trajectories.
        batch_size: trajectories sampled at once.
        seed: seed of the initial noise and of the per-step subsets.
        encoder_hidden_states: (num_samples, seq, dim) text conditioning for UNet2DConditionModel.
        class_labels: (num_samples,) labels for class-conditional denoisers (UNet2DModel, DiT).
        guidance_scale: classifier-free guidance of the sampler (see `run_sampler`); with guidance the recorded
            steps hold the doubled batch the denoiser sees (unconditional half with `null_class_label`).
        null_class_label: the unconditional label, required with guidance.
        progress: show a progress bar.

    With a `torch.distributed` process group of several ranks, every rank draws all the noise (the same seeds
    whatever the world size), samples its contiguous share of the trajectories and gets the whole data back
    (gathered), in the order one process records it.

    Example:
        >>> data = collect_calibration_data(unet, DDIMScheduler.from_config(cfg), num_samples=64,
        ...                                 num_inference_steps=20)
        >>> data.timesteps[:3]
        [951.0, 901.0, 851.0]
    """
    if num_samples < 1 or num_inference_steps < 1 or every_k_steps < 1 or batch_size < 1:
        raise ValueError("num_samples, num_inference_steps, every_k_steps and batch_size must be >= 1.")
    if samples_per_step is not None and not 1 <= samples_per_step <= num_samples:
        raise ValueError(f"samples_per_step must be in 1..num_samples ({num_samples}), got {samples_per_step}.")
    conditioning = {}
    for name, t in ((ENCODER_HIDDEN_STATES, encoder_hidden_states), (CLASS_LABELS, class_labels)):
        if t is not None:
            if len(t) != num_samples:
                raise ValueError(f"{name} has {len(t)} rows; it needs one per sample ({num_samples}).")
            conditioning[name] = t
    require_loaded_weights(unet, "collect_calibration_data")
    required = [p.name for p in list(inspect.signature(unet.forward).parameters.values())[2:]
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [name for name in required if name not in conditioning]
    if missing:
        raise ValueError(f"collect_calibration_data: {type(unet).__name__} needs {missing} at every call, which this "
                         f"sampler is not given (pass {missing[0]}=... with one row per sample), or record the "
                         "pipeline's own call with capture_calibration_data(pipe, prompt=...).")
    guided = guidance_scale != 1.0
    if guided and (class_labels is None or null_class_label is None):
        raise ValueError("collect_calibration_data with guidance needs class_labels and null_class_label (the "
                         "unconditional label); for text-conditioned pipelines use capture_calibration_data.")
    param = next(unet.parameters())
    shape = sample_shape(unet)
    generator = torch.Generator().manual_seed(seed)
    unet.eval()
    rank, world_size = world()
    if num_samples < world_size:
        raise ValueError(f"collect_calibration_data: {num_samples} trajectories cannot be shared by {world_size} "
                         "ranks; ask for at least one per rank.")
    mine = shard(num_samples, rank, world_size)  # every rank draws all the noise, samples its own trajectories
    # step index -> [(batch start, denoiser input, its other inputs)]: this rank's rows of each batch
    recorded: dict[int, list] = {}
    timesteps: dict[int, float] = {}
    bar = tqdm(total=len(mine) * num_inference_steps, desc="calibration trajectories", disable=not progress,
               unit="unet call")
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        noise = torch.randn((n,) + shape, generator=generator).to(param.device, param.dtype)
        rows = [i - start for i in range(start, start + n) if i in mine]
        if not rows:
            continue
        lo, hi = rows[0], rows[-1] + 1  # contiguous
        cond = {k: v[start + lo:start + hi].to(param.device) for k, v in conditioning.items()}
        uncond = {CLASS_LABELS: torch.full_like(cond[CLASS_LABELS], null_class_label)} if guided else None
        seen = {k: torch.cat([uncond[k], v]) for k, v in cond.items()} if guided else cond  # what the denoiser gets

        def record(i: int, t: float, model_input: torch.Tensor, start=start, seen=seen, m=hi - lo) -> None:
            timesteps[i] = t
            if i % every_k_steps == 0:
                recorded.setdefault(i, []).append((start, model_input.cpu(), {k: v.cpu() for k, v in seen.items()}))
            bar.update(m)

        run_sampler(unet, scheduler, noise[lo:hi], num_inference_steps, cond, on_step=record,
                    guidance_scale=guidance_scale, unconditional=uncond)
    bar.close()
    recorded = gather_lists(recorded, "the calibration trajectories")  # every rank ran every step: same timesteps
    steps = []
    for i, chunks in sorted(recorded.items()):
        sample, cond = _assemble(chunks, list(conditioning), guided)
        if samples_per_step is not None:
            keep = torch.randperm(len(sample), generator=generator)[:samples_per_step]
            sample, cond = sample[keep], {k: v[keep] for k, v in cond.items()}
        steps.append(CalibrationStep(timesteps[i], sample, cond))
    data = CalibrationData(steps)
    data.validate()
    return data


def _assemble(chunks: list, names: list[str], guided: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's denoiser inputs from the recorded chunks, in the order one process records them: batch by
    batch, and within a guided batch the unconditional half of all its samples before the conditional half."""
    by_batch: dict[int, list] = {}
    for start, x, cond in chunks:  # chunks of one batch come from several ranks, in rank order
        by_batch.setdefault(start, []).append((x, cond))
    samples, conds = [], {k: [] for k in names}
    for start in sorted(by_batch):
        parts = by_batch[start]
        if guided:  # each part is (its unconditional rows, its conditional rows)
            halves = [x.chunk(2) for x, _ in parts]
            samples += [h[0] for h in halves] + [h[1] for h in halves]
            for k in names:
                halves = [c[k].chunk(2) for _, c in parts]
                conds[k] += [h[0] for h in halves] + [h[1] for h in halves]
        else:
            samples += [x for x, _ in parts]
            for k in names:
                conds[k] += [c[k] for _, c in parts]
    return torch.cat(samples), {k: torch.cat(v) for k, v in conds.items()}
