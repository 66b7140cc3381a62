"""Calibration over several processes with `torch.distributed` (gloo on CPUs, NCCL on GPUs; launch with torchrun).

When a default process group with more than one rank is initialised, the calibration steps split their work by
samples and combine the results with collectives, so that every rank ends with the same result and a single
process behaves exactly as before:

* `collect_calibration_data` draws every trajectory's noise on every rank (the same seeds whatever the world
  size), runs the sampler on its contiguous share of the trajectories, and gathers the recorded steps in sample
  order (`gather_lists`); `capture_calibration_data(pipe, calls=[...])` runs each rank's share of the pipeline
  calls (each with its own generator) and gathers their recordings in call order;
* `calibrate` runs each rank's share of every step's samples through the prepared graph and merges the
  observers' per-timestep statistics across ranks (`reduce_observers`): min / max, counts, sums of squares and
  the exact tails are those of all the data, so min-max qparams equal one process's; MSE ranges are searched on a
  bottom-k subsample that does not depend on the split, so they equal one process's too;
* `reconstruct_blocks` (Q-Diffusion's block reconstruction, TIAR) caches each rank's share of a block's samples;
  every rank draws the same minibatch indices, computes the loss of the ones it holds, and the gradients are
  summed across ranks (`all_reduce_sum`) before every rank takes the same optimiser step: one process's
  gradient, up to float rounding;
* `apply_learned_scaling` (DMQ's LES) shares out the layers, whose learning is independent, and gathers the
  learned scales: one process's scales;
* `apply_gptq` accumulates each layer's H over each rank's share of the samples, sums it across ranks, then shares
  out the layers' solves (`share_by_work`) and gathers the codes;
* `mixed_precision.layer_sensitivities` shares out the layers, `dmq.timestep_weights.per_timestep_loss` and
  `estimate_output_correction` the steps, and they gather one process's result;
* `apply_power_of_two_scaling` (DMQ's PTS) observes each rank's share of the samples and merges the channel
  extremes (max), the observers (`merge_observers`) and the votes (sums): one process's factors.

Collectives time out with the process group's timeout (`init_process_group(timeout=...)`); a rank that fails or
times out raises `DistributedCalibrationError` naming the step, instead of hanging.

Example:
    >>> # torchrun --nproc-per-node 2 calibrate.py
    >>> torch.distributed.init_process_group("gloo")
    >>> data = collect_calibration_data(unet, scheduler, num_samples=64)   # each rank samples 32
    >>> calibrate(prepared, data)                                          # each rank observes half
    >>> quantized = convert_pt2e(prepared)                                 # the same on every rank
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


class DistributedCalibrationError(RuntimeError):
    """A collective of the distributed calibration failed (a rank died, or the group's timeout passed)."""


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of `n` items (the first `n % world_size` ranks take one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def share_by_work(items: list[Any], work: Callable[[Any], float], world_size: int) -> list[list[Any]]:
    """`items` shared out among `world_size` ranks with about equal work: the largest first, each to the rank
    with the least work so far (no rank exceeds the mean by more than the largest item). Within a share the items
    keep their order. Deterministic: every rank computes the same split from the same items.

    Example:
        >>> share_by_work(["a", "b", "c"], {"a": 3, "b": 2, "c": 2}.get, 2)
        [['a'], ['b', 'c']]
    """
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0.0] * world_size
    for i in sorted(range(len(items)), key=lambda i: work(items[i]), reverse=True):  # stable: ties keep order
        least = load.index(min(load))
        shares[least].append(i)
        load[least] += work(items[i])
    return [[items[i] for i in sorted(share)] for share in shares]


def _collective(call, verb: str, what: str) -> None:
    """Runs one collective; a failure (a rank died, the group's timeout passed) becomes a clear error."""
    rank, size = world()
    try:
        call()
    except Exception as error:  # gloo and NCCL raise RuntimeError subclasses with backend-specific messages
        raise DistributedCalibrationError(
            f"rank {rank}: {verb} {what} across {size} ranks failed ({type(error).__name__}: {error}). Another "
            "rank probably failed or is slower than the process group's timeout; see its log, or raise the timeout "
            "with init_process_group(timeout=...).") from error


def all_gather_objects(obj: Any, what: str) -> list[Any]:
    """Every rank's `obj`, in rank order (one entry when not distributed).

    Raises:
        DistributedCalibrationError: naming `what`, if a rank failed or the process group's timeout passed.
    """
    size = world()[1]
    if size == 1:
        return [obj]
    gathered: list[Any] = [None] * size
    _collective(lambda: dist.all_gather_object(gathered, obj), "gathering", what)
    return gathered


def gather_lists(local: dict[Any, list], what: str) -> dict[Any, list]:
    """Every rank's lists, concatenated per key in rank order; keys in order of first appearance (rank 0's first).
    With contiguous shards (`shard`) this is the order one process records them in. `local` when not distributed.

    Raises:
        DistributedCalibrationError: naming `what`, if a rank failed or the process group's timeout passed.
    """
    if world()[1] == 1:
        return local
    merged: dict[Any, list] = {}
    for part in all_gather_objects(local, what):
        for key, items in part.items():
            merged.setdefault(key, []).extend(items)
    return merged


def gather_dicts(local: dict[Any, Any], what: str) -> dict[Any, Any]:
    """The union of every rank's dict (each rank computed other keys: its share of the layers or steps), in rank
    order; a copy of `local` when not distributed.

    Raises:
        DistributedCalibrationError: naming `what`, if a rank failed or the process group's timeout passed.
    """
    return {key: value for part in all_gather_objects(local, what) for key, value in part.items()}


@torch.no_grad()
def reduce_observers(prepared: torch.fx.GraphModule) -> int:
    """Merges every timestep activation observer's statistics across ranks, in rank order, so that all ranks hold
    the statistics of all the data (weights are the same on every rank and need nothing). No-op with one rank.

    Returns:
        How many observers were merged.
    """
    from diffusion_ao.observers import TimestepActivationObserver

    observers = {name: m for name, m in prepared.named_modules() if isinstance(m, TimestepActivationObserver)}
    return merge_observers(observers, "the observers' statistics")


@torch.no_grad()
def merge_observers(observers: dict[str, Any], what: str) -> int:
    """Merges the statistics of timestep activation observers (by name, the same names on every rank) across
    ranks, in rank order: every rank ends with the statistics of all ranks' data. No-op with one rank.

    Raises:
        DistributedCalibrationError: the ranks have different observers, or a collective failed.
    """
    if world()[1] == 1 or not observers:
        return 0
    gathered = all_gather_objects({name: obs.stats for name, obs in observers.items()}, what)
    if any(set(g) != set(observers) for g in gathered):
        raise DistributedCalibrationError(f"the ranks have different observers while merging {what}: prepare the "
                                          "same graph with the same config on every rank.")
    for name, obs in observers.items():
        obs.reset_statistics()  # every rank merges the same statistics in the same order
        for stats in gathered:  # in rank order
            obs.merge(stats[name])
    return len(observers)


def all_reduce_sum(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (unchanged when not distributed).

    Raises:
        DistributedCalibrationError: naming `what`, if a rank failed or the process group's timeout passed.
    """
    return _all_reduce(tensor, dist.ReduceOp.SUM, "summing", what)


def all_reduce_max(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """The element-wise max of `tensor` over the ranks, in place (unchanged when not distributed).

    Raises:
        DistributedCalibrationError: naming `what`, if a rank failed or the process group's timeout passed.
    """
    return _all_reduce(tensor, dist.ReduceOp.MAX, "taking the max of", what)


def _all_reduce(tensor: torch.Tensor, op, verb: str, what: str) -> torch.Tensor:
    if world()[1] > 1:
        _collective(lambda: dist.all_reduce(tensor, op=op), verb, what)
    return tensor
