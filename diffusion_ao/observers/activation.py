"""Activation observer that keeps statistics per denoising timestep.

Activation ranges drift strongly with the timestep (docs/methods.md#timestep-aware-calibration). This observer
records, for each timestep value set by `timestep_context`, the exact min/max, the mean square, and a bounded
random subsample of the values. `calculate_qparams` then turns them into one range:

* method "minmax", aggregation "global": the union of all ranges (what a timestep-agnostic observer does).
* method "minmax", aggregation "weighted": the weighted mean of the per-timestep min and max.
* method "mse", aggregation "global": the clipping range minimising the quantization MSE of all values pooled.
  The MSE is estimated from a random subsample plus the exact k smallest and largest values, each counted with
  the number of values it stands for, so that rare outliers are not clipped just because no sample saw them.
  The subsample is a bottom-k sample: every value is named by its place in the calibration set (the sample
  row `timestep_context` gives and its index in that row), the name is hashed, and the `samples_per_timestep`
  values with the smallest hashes are kept. It is uniform, and it is the same whatever the batch size, the
  order of the batches or the ranks the data was shared among, so merged observers equal one observer.
* method "mse", aggregation "weighted": the range minimising sum_t w_t * MSE_t / E[x_t^2], so a quiet
  timestep's relative error counts as much as a loud one's. Weights are uniform unless set with
  `set_timestep_weights` (DMQ's adaptive weights plug in there).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
from torchao.quantization.pt2e.observer import UniformQuantizationObserverBase

from diffusion_ao.observers.context import current_rows, current_timestep
from diffusion_ao.primitives import fake_quantize

METHODS = ("minmax", "mse")
AGGREGATIONS = ("global", "weighted")


def _normalised_weights(keys: list, weights: Optional[Mapping[float, float]]) -> torch.Tensor:
    if weights is None:
        return torch.full((len(keys),), 1.0 / len(keys))
    missing = [k for k in keys if k not in weights]
    if missing:
        raise ValueError(f"timestep weights are missing for timesteps {missing[:5]}: give a weight for every "
                         "calibrated timestep.")
    w = torch.tensor([float(weights[k]) for k in keys])
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("timestep weights must be finite, non-negative and not all zero.")
    return w / w.sum()


_MASK64 = (1 << 64) - 1
_KEY_MIN = -(1 << 63)


def position_keys(first: int, count: int, seed: int) -> torch.Tensor:
    """Pseudo-random int64 keys of the positions first..first+count-1 (the position plus a `seed`-dependent
    offset, through a multiply-xorshift finaliser): the ordering whose smallest `k` a bottom-k sample keeps. The
    same position and seed always give the same key; numpy's uint64 arithmetic wraps, as the hash needs."""
    z = np.arange(count, dtype=np.uint64)
    z += np.uint64((first + seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(31)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(29)
    return torch.from_numpy(z.view(np.int64))


def bottom_k(values: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` values with the smallest keys (all of them if fewer), ordered by key, and their keys."""
    if keys.numel() > k:
        keys, index = torch.topk(keys, k, largest=False, sorted=True)
    else:
        keys, index = torch.sort(keys)
    return values[index], keys


@functools.lru_cache(maxsize=256)
def smallest_keys(first: int, count: int, seed: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, keys) of the `k` positions of first..first+count-1 with the smallest `position_keys`, ordered by
    key. Cached: every observer whose input has the same size in a batch keeps the same positions, so the hash
    is computed once per batch and size rather than once per observer. Do not modify the tensors returned."""
    keys = position_keys(first, count, seed)
    if 4 * k < count:  # sort only the keys under a bound that ~4k of `count` uniform keys fall under
        under = torch.nonzero(keys < _KEY_MIN + int(4 * k / count * 2.0**64)).view(-1)
        if under.numel() >= k:
            top, at = torch.topk(keys[under], k, largest=False, sorted=True)
            return under[at], top
    keys, index = (torch.topk(keys, k, largest=False, sorted=True) if count > k else torch.sort(keys))
    return index, keys


@dataclass
class TimestepStats:
    """What one timestep's activations looked like. `sample` holds every value while `count <= capacity`,
    after that the bottom-k sample (see the module docstring; `sample_keys` are its keys, ascending);
    `low_tail` / `high_tail` always hold the exact extreme values."""

    lo: float
    hi: float
    count: int
    sumsq: float
    sample: torch.Tensor
    low_tail: torch.Tensor
    high_tail: torch.Tensor
    sample_keys: torch.Tensor

    @property
    def mean_square(self) -> float:
        return self.sumsq / self.count


class TimestepActivationObserver(UniformQuantizationObserverBase):
    """Per-tensor activation observer with per-timestep statistics (see the module docstring).

    Args:
        dtype, qscheme, quant_min, quant_max: as for torchao observers (uint8 + per_tensor_affine on CPU).
        method: "minmax" or "mse".
        aggregation: "global" or "weighted".
        samples_per_timestep: size of the random subsample kept per timestep for the MSE search.
        tail: how many of the smallest and of the largest values are kept exactly per timestep.
        grid: number of candidate clipping ratios per end of the range (grid x grid candidates).
        seed: salts the subsample's hash (another seed, another uniform subsample).

    Values seen outside a `timestep_context` that names the batch's rows are numbered in the order the observer
    sees them (per timestep), so their subsample depends on how the data was batched.
    """

    def __init__(self, dtype: torch.dtype = torch.uint8, qscheme: torch.qscheme = torch.per_tensor_affine,
                 quant_min: int = 0, quant_max: int = 255, method: str = "mse", aggregation: str = "weighted",
                 samples_per_timestep: int = 2048, tail: int = 64, grid: int = 20, seed: int = 0,
                 **kwargs) -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not supported: choose one of {METHODS}.")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r} is not supported: choose one of {AGGREGATIONS}.")
        kwargs.pop("reduce_range", None)  # the range is given explicitly by quant_min/quant_max
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        self.method, self.aggregation = method, aggregation
        self.samples_per_timestep, self.tail, self.grid = samples_per_timestep, tail, grid
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.label = "activation"  # set by `calibrate` to the consuming layer's name, for error messages
        self.stats: dict[Optional[float], TimestepStats] = {}
        self._weights: Optional[dict] = None
        self.fixed_qparams: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.seed = seed
        self._unplaced: dict[Optional[float], int] = {}  # values seen per timestep without their rows

    def reset_statistics(self) -> None:
        """Forgets everything observed."""
        self.stats = {}
        self._unplaced = {}
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        flat = x.detach().reshape(-1).float()
        lo, hi = (v.item() for v in torch.aminmax(flat))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"Non-finite values (NaN/Inf) reached the observer of {self.label}: check the "
                             "calibration data and the floating-point model before calibrating.")
        key = current_timestep()
        sumsq = flat.double().pow(2).sum().item()
        old = self.stats.get(key)
        if old is None:
            self.stats[key] = TimestepStats(lo, hi, flat.numel(), sumsq, *self._summarise(None, flat, key))
        else:
            self.stats[key] = TimestepStats(min(old.lo, lo), max(old.hi, hi), old.count + flat.numel(),
                                            old.sumsq + sumsq, *self._summarise(old, flat, key))
        self.min_val.fill_(min(self.min_val.item(), lo))
        self.max_val.fill_(max(self.max_val.item(), hi))
        return x

    def _first_position(self, key: Optional[float], n: int) -> int:
        """The place in the calibration set of the first of `n` values just observed at timestep `key`.

        Values of rows start..stop-1 (`timestep_context(rows=...)`) take the positions start * per_row onwards,
        with per_row = n / (stop - start), and so do not depend on the batching. Without rows (or when `n` does
        not split evenly into them), values are numbered per timestep in the order seen, from -1 downwards, so
        the two numberings never meet."""
        rows = current_rows()
        if rows is not None and n % (rows[1] - rows[0]) == 0:
            return rows[0] * (n // (rows[1] - rows[0]))
        seen = self._unplaced.get(key, 0) + n
        self._unplaced[key] = seen
        return -seen

    def _summarise(self, old: Optional[TimestepStats], new: torch.Tensor, key: Optional[float]):
        """(sample, low_tail, high_tail, sample_keys) of the old statistics merged with a new batch of values."""
        empty = new.new_empty(0)  # not new[:0]: a view would keep the whole activation batch alive
        if self.method != "mse":
            return empty, empty, empty, torch.empty(0, dtype=torch.int64)
        k, cap = self.tail, self.samples_per_timestep
        index, sample_keys = smallest_keys(self._first_position(key, new.numel()), new.numel(), self.seed, cap)
        sample = new[index]
        if old is not None:
            sample, sample_keys = bottom_k(torch.cat([old.sample, sample]), torch.cat([old.sample_keys, sample_keys]),
                                           cap)
        low = torch.cat([old.low_tail, new]) if old is not None else new
        high = torch.cat([old.high_tail, new]) if old is not None else new
        low_tail = torch.topk(low, min(k, low.numel()), largest=False).values
        high_tail = torch.topk(high, min(k, high.numel())).values
        return sample, low_tail, high_tail, sample_keys

    @torch.no_grad()
    def merge(self, stats: Mapping[Optional[float], TimestepStats]) -> None:
        """Folds in the statistics another observer of the same activation collected on other data (another
        rank's share of the calibration set, `diffusion_ao.calibration.distributed.reduce_observers`): min / max, counts, sums
        of squares, the exact tails and the bottom-k subsample are those of all the data (the subsample exactly
        so where both observers saw their values with their rows)."""
        for key, theirs in stats.items():
            ours = self.stats.get(key)
            if ours is None:
                self.stats[key] = theirs
            else:
                self.stats[key] = TimestepStats(min(ours.lo, theirs.lo), max(ours.hi, theirs.hi),
                                                ours.count + theirs.count, ours.sumsq + theirs.sumsq,
                                                *self._merge_samples(ours, theirs))
            self.min_val.fill_(min(self.min_val.item(), theirs.lo))
            self.max_val.fill_(max(self.max_val.item(), theirs.hi))

    def _merge_samples(self, a: TimestepStats, b: TimestepStats):
        if self.method != "mse":
            return a.sample, a.low_tail, a.high_tail, a.sample_keys
        k = self.tail
        sample, sample_keys = bottom_k(torch.cat([a.sample, b.sample]), torch.cat([a.sample_keys, b.sample_keys]),
                                       self.samples_per_timestep)
        low, high = torch.cat([a.low_tail, b.low_tail]), torch.cat([a.high_tail, b.high_tail])
        return (sample, torch.topk(low, min(k, low.numel()), largest=False).values,
                torch.topk(high, min(k, high.numel())).values, sample_keys)

    # --- statistics -------------------------------------------------------------------------------
    def timesteps(self) -> list:
        """The timestep values observed (None stands for data seen outside a `timestep_context`)."""
        return list(self.stats)

    def keys_for(self, timesteps: list[float], what: str) -> list:
        """The observer's own timestep keys for the float32 timestep values `timesteps` (a graph compares float32
        values; the keys are what `timestep_context` set). A ValueError naming `what` if one was never observed."""
        by_f32 = {torch.tensor(k, dtype=torch.float32).item(): k for k in self.stats if k is not None}
        missing = [t for t in timesteps if t not in by_f32]
        if missing:
            raise ValueError(f"{what}: the observer of {self.label} saw no data at timesteps {missing[:5]}; "
                             "calibrate on every timestep of the set.")
        return [by_f32[t] for t in timesteps]

    def timestep_ranges(self) -> dict:
        """{timestep: (min, max)} of everything observed at that timestep."""
        return {k: (s.lo, s.hi) for k, s in self.stats.items()}

    def set_timestep_weights(self, weights: Optional[Mapping[float, float]]) -> None:
        """Weights for the "weighted" aggregation, keyed by timestep value; None restores uniform weights."""
        self._weights = None if weights is None else dict(weights)

    def _require_data(self) -> None:
        if not self.stats:
            raise RuntimeError(f"The observer of {self.label} saw no data: run `calibrate(prepared, data)` "
                               "before `convert_pt2e`.")

    def chosen_range(self, keys: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) that the qparams are computed from: over every observed timestep, or over `keys`
        alone (one timestep for finite-set calibration, a group of them for time-grouped ranges)."""
        self._require_data()
        if keys is None:
            keys = self.timesteps()
        else:
            unseen = [k for k in keys if k not in self.stats]
            if unseen or not keys:
                shown = ", ".join(f"{k:g}" for k in unseen[:5]) if unseen else "(none given)"
                raise KeyError(f"The observer of {self.label} saw no data at timestep {shown}; calibrated timesteps "
                               f"are {sorted(k for k in self.stats if k is not None)[:8]}...")
        lo = torch.tensor(min(self.stats[k].lo for k in keys))
        hi = torch.tensor(max(self.stats[k].hi for k in keys))
        if self.method == "minmax":
            if self.aggregation == "global":
                return lo, hi
            w = _normalised_weights(keys, self._weights).tolist()
            lo = sum(wi * self.stats[k].lo for wi, k in zip(w, keys))
            hi = sum(wi * self.stats[k].hi for wi, k in zip(w, keys))
            return torch.tensor(lo), torch.tensor(hi)
        return self._mse_range(keys, lo, hi)

    def _mse_per_candidate(self, stats: TimestepStats, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        def sq_err(x: torch.Tensor) -> torch.Tensor:
            x = x.view(1, -1)
            return (fake_quantize(x, scale, zp, self.quant_min, self.quant_max) - x).pow(2).sum(dim=1)

        if stats.count <= self.samples_per_timestep:
            return sq_err(stats.sample) / stats.count
        tails = stats.low_tail.numel() + stats.high_tail.numel()
        rest_weight = max(stats.count - tails, 0) / stats.sample.numel()
        return (sq_err(stats.low_tail) + sq_err(stats.high_tail) + rest_weight * sq_err(stats.sample)) / stats.count

    def _mse_range(self, keys: list, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Candidates clip the observed range [lo, hi] of `keys` at grid x grid ratios.
        # The quantized range always holds 0, so the candidates clip [min(lo, 0), max(hi, 0)] (a range that is
        # all positive, e.g. one timestep of a post-SiLU input, would otherwise give candidates with lo > hi).
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        ratios = torch.linspace(1.0 / self.grid, 1.0, self.grid)
        lo_c = (lo * ratios).repeat_interleave(self.grid)
        hi_c = (hi * ratios).repeat(self.grid)
        scale, zp = self._calculate_qparams(lo_c, hi_c)
        scale, zp = scale.view(-1, 1), zp.view(-1, 1).float()
        if self.aggregation == "global":
            w = torch.tensor([float(self.stats[k].count) for k in keys])
            w = w / w.sum()
        else:
            w = _normalised_weights(keys, self._weights)
        loss = torch.zeros(len(lo_c))
        for wk, k in zip(w.tolist(), keys):
            err = self._mse_per_candidate(self.stats[k], scale, zp)
            if self.aggregation == "weighted":
                err = err / (self.stats[k].mean_square + 1e-12)
            loss += wk * err
        best = int(torch.argmin(loss))
        return lo_c[best], hi_c[best]

    def set_fixed_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Makes `calculate_qparams` return these qparams (e.g. step sizes learned by block reconstruction)
        instead of the ones chosen from the statistics."""
        self.fixed_qparams = (scale.detach().clone(), zero_point.detach().clone())

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fixed_qparams is not None:
            return self.fixed_qparams[0].clone(), self.fixed_qparams[1].clone()
        lo, hi = self.chosen_range()
        return self._calculate_qparams(lo.reshape(()), hi.reshape(()))

    def timestep_range(self, timestep: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) chosen from one timestep's statistics alone (finite-set calibration,
        docs/methods.md#finite-set-calibration-fsc): its own min/max for "minmax", else the MSE-optimal clipping
        of its own range."""
        return self.chosen_range([timestep])

    def learned_step_ratio(self) -> float:
        """Learned step / the step the statistics give, for an observer whose qparams were learned (block
        reconstruction, TIAR: `set_fixed_qparams`); 1.0 for one that only observed."""
        if self.fixed_qparams is None:
            return 1.0
        lo, hi = self.chosen_range()
        statistics_scale, _ = self._calculate_qparams(lo.reshape(()), hi.reshape(()))
        return float(self.fixed_qparams[0].reshape(()) / statistics_scale.reshape(()))

    def qparams_over(self, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) from the statistics of the timesteps `keys` alone (one timestep for finite-set
        calibration, a group for time-grouped ranges). A learned step keeps its correction: the scale is the
        statistics' scale times `learned_step_ratio()`, the zero point the statistics' one (as LSQ keeps it);
        without this, per-timestep or per-group qparams would silently undo what TIAR / reconstruction learned."""
        lo, hi = self.chosen_range(keys)
        scale, zero_point = self._calculate_qparams(lo.reshape(()), hi.reshape(()))
        return scale * self.learned_step_ratio(), zero_point

    def timestep_qparams(self, timestep: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) for `timestep` alone (`qparams_over([timestep])`)."""
        return self.qparams_over([timestep])

    def extra_repr(self) -> str:
        return (f"method={self.method}, aggregation={self.aggregation}, quant_range=({self.quant_min}, "
                f"{self.quant_max}), timesteps={len(self.stats)}")
