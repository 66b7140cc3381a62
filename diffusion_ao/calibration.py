"""Timestep-aware calibration data (Q-Diffusion, docs/methods.md#calibration-data) and the calibration loop.

`CalibrationData` holds what a denoiser sees at every sampler step, keyed by the real timestep value, so any
scheduler and step count work. `capture_calibration_data` (in `pipeline_calibration`) records it from the user's
own diffusers pipeline call, guidance halves included; `collect_calibration_data` runs this project's sampler on
a UNet without a pipeline.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from .denoisers import CLASS_LABELS, SAMPLE, TIMESTEP, require_loaded_weights
from .distributed import gather_lists, reduce_observers, shard, world
from .graph import call_graph, check_graph_inputs, graph_input_names, input_specs, require_exported
from .observers import TimestepActivationObserver, WeightObserver, timestep_context
from .observers.fake_quantize import TimestepFakeQuantize, WeightFakeQuantize
from .sampling import run_sampler, sample_shape


ENCODER_HIDDEN_STATES = "encoder_hidden_states"


def evenly_spaced_rows(batch: int, keep: Optional[int]) -> torch.Tensor:
    """`keep` row indices spread evenly over a batch of `batch` rows, first and last included (all rows when
    `keep` is None or at least `batch`). A guided batch (its unconditional half, then its conditional half) thus
    keeps rows of both halves whenever `keep` >= 2.

    Example:
        >>> evenly_spaced_rows(8, 3)
        tensor([0, 4, 7])
    """
    if keep is None or keep >= batch:
        return torch.arange(batch)
    if keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}.")
    return torch.linspace(0, batch - 1, keep).round().long()


@dataclass
class CalibrationStep:
    """The denoiser inputs recorded at one sampler step, by graph input name (see `diffusion_ao.denoisers`).

    Attributes:
        timestep: the timestep value the denoiser received (the same for every sample of the step).
        sample: the noisy latents, (batch, ...).
        conditioning: the other batched inputs (text embeddings, class labels, guidance, ...), batch first.
        shared: inputs without a batch dimension (Flux's `img_ids`), the same for every sample.
    """

    timestep: float
    sample: torch.Tensor
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample)

    def graph_inputs(self, start: int = 0, stop: Optional[int] = None) -> dict[str, torch.Tensor]:
        """The exported graph's inputs for samples `start:stop`, by input name."""
        index = slice(start, stop)
        x = self.sample[index]
        return {SAMPLE: x, TIMESTEP: torch.full((len(x),), self.timestep),
                **{k: v[index] for k, v in self.conditioning.items()}, **self.shared}

    def select(self, rows: torch.Tensor) -> "CalibrationStep":
        """A step with only the samples at `rows`."""
        return CalibrationStep(self.timestep, self.sample[rows], {k: v[rows] for k, v in self.conditioning.items()},
                               dict(self.shared))


def _check_same_inputs(first: CalibrationStep, step: CalibrationStep) -> None:
    """Raises ValueError unless `step` has the inputs of `first`: names, shapes (the batch aside), dtypes."""
    def spec(s: CalibrationStep) -> dict[str, tuple]:
        batched = {SAMPLE: s.sample, **s.conditioning}
        return {**{k: (tuple(v.shape[1:]), v.dtype) for k, v in batched.items()},
                **{k: (tuple(v.shape), v.dtype) for k, v in s.shared.items()}}

    want, got = spec(first), spec(step)
    if want == got:
        return
    if set(want) != set(got):
        raise ValueError(f"The calibration step at timestep {step.timestep} has the inputs {sorted(got)}; the first "
                         f"step has {sorted(want)}. Every step of one calibration set must come from the same "
                         "pipeline call.")
    name = next(k for k in want if want[k] != got[k])
    raise ValueError(f"The calibration step at timestep {step.timestep} has '{name}' of shape {got[name][0]} "
                     f"({got[name][1]}) per sample; the first step has {want[name][0]} ({want[name][1]}). Every step "
                     "of one calibration set must have the same resolution, channels and prompt length.")


@dataclass
class CalibrationData:
    """UNet inputs along FP sampling trajectories, one `CalibrationStep` per kept sampler step."""

    steps: list[CalibrationStep]

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def timesteps(self) -> list[float]:
        return [s.timestep for s in self.steps]

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self.steps)

    def validate(self) -> None:
        """Raises ValueError if the data is empty, holds NaN/Inf, or its steps do not have the same inputs (names,
        shapes but for the batch, dtypes): one graph is exported for all of them."""
        if not self.steps:
            raise ValueError("The calibration data is empty: collect it with collect_calibration_data(...).")
        first = self.steps[0]
        for s in self.steps:
            tensors = {"sample": s.sample, **s.conditioning, **s.shared}
            if s is not first:
                _check_same_inputs(first, s)
            for name, t in tensors.items():
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"The calibration data has NaN/Inf in '{name}' at timestep {s.timestep}: "
                                     "the floating-point model or scheduler diverged; fix it before calibrating.")

    def subset(self, samples_per_step: int) -> "CalibrationData":
        """`samples_per_step` samples of every step, evenly spaced over it (`evenly_spaced_rows`, so a guided
        step keeps both halves): a cheaper calibration set."""
        return CalibrationData([s.select(evenly_spaced_rows(len(s), samples_per_step)) for s in self.steps])

    def share(self, rank: int, world_size: int) -> "CalibrationData":
        """A rank's contiguous share of every step's samples (`distributed.shard`), as a copy in memory; steps
        where it has none are left out. With one rank it is this data itself (no copy).

        Raises:
            ValueError: the rank would get no samples at all.
        """
        if world_size == 1:
            return self
        steps = []
        for step in self.steps:
            rows = shard(len(step), rank, world_size)
            if len(rows):
                steps.append(step.select(torch.arange(rows.start, rows.stop)))
        if not steps:
            raise ValueError(f"rank {rank} of {world_size} gets no calibration samples; every rank needs at least "
                             "one (use more samples per step, or fewer ranks).")
        return CalibrationData(steps)

    def mixed_batch(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The graph inputs of the samples `rows[i]` of every step i, in one batch (a timestep per sample)."""
        if len(rows) != len(self.steps):
            raise ValueError(f"mixed_batch needs one row index tensor per step ({len(self.steps)}), got {len(rows)}.")
        parts = [step.select(r).graph_inputs() for step, r in zip(self.steps, rows)]
        shared = self.steps[0].shared
        return {k: (shared[k] if k in shared else torch.cat([p[k] for p in parts])) for k in parts[0]}

    def batches(self, batch_size: int):
        """(step, graph inputs) for every batch of at most `batch_size` samples, step by step (one timestep
        per batch)."""
        for step in self.steps:
            for start in range(0, len(step), batch_size):
                yield step, step.graph_inputs(start, start + batch_size)


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


def label_observers(prepared: torch.fx.GraphModule) -> list[torch.nn.Module]:
    """Names every diffusion-ao observer after the layer that consumes it (for error messages); returns them."""
    from .passes.analysis import module_path

    found = []
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        obs = prepared.get_submodule(node.target)
        if isinstance(obs, (TimestepFakeQuantize, WeightFakeQuantize)):  # a QAT graph: label its statistics
            obs = obs.activation_post_process
        if not isinstance(obs, (TimestepActivationObserver, WeightObserver)):
            continue
        users = [u for u in node.users if u.op == "call_function"]
        layer = module_path(users[0]) if users else ""
        kind = "weight" if isinstance(obs, WeightObserver) else "input"
        obs.label = f"the {kind} of '{layer or node.name}'"
        found.append(obs)
    return found


@torch.no_grad()
def calibrate(prepared: torch.fx.GraphModule, data: CalibrationData, batch_size: int = 256,
              progress: bool = True, reset: bool = False) -> None:
    """Runs the prepared graph over the calibration data, telling observers which timestep they are at.

    Statistics accumulate: a second `calibrate` on the same graph adds its data to what the observers hold
    (calibration in parts, e.g. one call per stored batch), and warns that it does, since a retry of the same
    data would count it twice and move MSE-chosen ranges. `reset=True` forgets the earlier statistics first.

    With a `torch.distributed` process group of several ranks, each rank runs its contiguous share of every
    step's samples and the observers' statistics are then merged across ranks (`distributed.reduce_observers`).

    Args:
        prepared: the result of `prepare_pt2e(graph, DiffusionQuantizer(...))`.
        data: from `collect_calibration_data`.
        batch_size: samples per forward.
        progress: show a progress bar.
        reset: forget the activation statistics of earlier `calibrate` calls first (default: add to them).
    """
    require_exported(prepared, "calibrate")
    observers = label_observers(prepared)
    if not observers:
        raise ValueError("calibrate found no diffusion-ao observers in this graph: prepare it first with "
                         "`prepare_pt2e(graph, DiffusionQuantizer(config))` (and do not convert it before).")
    if not isinstance(data, CalibrationData):
        raise TypeError(f"calibrate needs CalibrationData from collect_calibration_data, got {type(data).__name__}.")
    data.validate()
    specs = input_specs(prepared)
    max_batch = min((s.max_batch for s in specs.values() if s.max_batch is not None), default=None)
    if batch_size < 1 or (max_batch is not None and batch_size > max_batch):
        raise ValueError(f"calibrate: batch_size must be in 1..{max_batch or 'inf'} (the largest batch the graph was "
                         f"exported for), got {batch_size}.")
    seen = [obs for obs in observers if isinstance(obs, TimestepActivationObserver) and obs.stats]
    if seen and reset:
        for obs in seen:
            obs.reset_statistics()
    elif seen:
        warnings.warn(f"calibrate: {len(seen)} observers already hold statistics of an earlier calibrate call; "
                      "this data is added to them. To calibrate again from scratch (e.g. after an interrupted "
                      "run), pass reset=True.", UserWarning, stacklevel=2)
    rank, world_size = world()
    shares = [shard(len(step), rank, world_size) for step in data.steps]  # all of it in one process
    if not any(shares):
        raise ValueError(f"calibrate: rank {rank} of {world_size} gets no calibration samples; every rank needs "
                         "at least one (use more samples per step, or fewer ranks).")
    bar = tqdm(total=sum(len(r) for r in shares), desc="calibrating", disable=not progress, unit="sample")
    names = graph_input_names(prepared)
    for step, share in zip(data.steps, shares):
        for start in range(share.start, share.stop, batch_size):
            stop = min(start + batch_size, share.stop)
            inputs = step.graph_inputs(start, stop)
            check_graph_inputs(specs, inputs, "calibrate")  # a clear error where torch's guards would assert
            with timestep_context(step.timestep, rows=(start, stop)):  # rows: the observers' subsample
                call_graph(prepared, inputs, names)
            bar.update(len(inputs[SAMPLE]))
    bar.close()
    reduce_observers(prepared)  # all ranks end with the statistics of all the data (nothing with one process)
