"""The calibration data types: the denoiser inputs recorded at each sampler step, by graph input name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from diffusion_ao.calibration.distributed import shard
from diffusion_ao.denoisers import SAMPLE, TIMESTEP

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
