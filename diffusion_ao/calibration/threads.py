"""The intra-op thread count for loops of many small steps (LES, block reconstruction, the QAT fine-tune).

Such a loop runs thousands of small ops, each a parallel region that waits for its slowest thread. On an idle
machine two threads beat one; with another process busy on one of two cores, every region waits for a thread the
OS has parked, and two threads took over 3x longer than one. `ThreadChoice` times a few of the loop's own steps
with each candidate count and runs the rest with the fastest, so the loop degrades no worse than the CPU it gets.
The choice changes only the order of float summation inside the ops (the last bits of a result), never what is
computed.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch


class ThreadChoice:
    """Picks the faster of `torch.get_num_threads()` and 1 thread for the steps of one loop.

    Steps `warmup` .. `warmup + 2 * trials - 1` alternate between the candidates and are timed; from then on each
    step runs with the candidate whose fastest trial was fastest. A single-thread setting has nothing to choose.

    Args:
        trials: timed steps per candidate.
        warmup: first steps run with the current count, untimed (allocations, caches).

    Example:
        >>> choice = ThreadChoice()
        >>> for i in range(100):
        ...     with choice.step(i):
        ...         train_step()
        >>> choice.chosen  # 2 on an idle 2-core machine, 1 with another process busy on one core
    """

    def __init__(self, trials: int = 2, warmup: int = 1) -> None:
        if trials < 1 or warmup < 0:
            raise ValueError(f"ThreadChoice needs trials >= 1 and warmup >= 0, got {trials} and {warmup}.")
        self.base = torch.get_num_threads()
        self.candidates = (self.base, 1) if self.base > 1 else (self.base,)
        self.trials, self.warmup = trials, warmup
        self.best_s = {n: float("inf") for n in self.candidates}
        self.chosen: Optional[int] = None if len(self.candidates) > 1 else self.base

    def _threads_for(self, i: int) -> tuple[int, bool]:
        """(threads, timed) for step i."""
        if self.chosen is not None:
            return self.chosen, False
        k = i - self.warmup
        if k < 0:
            return self.base, False
        return self.candidates[k % len(self.candidates)], True

    @contextmanager
    def step(self, i: int) -> Iterator[None]:
        """Runs step i of the loop with the thread count chosen for it (restored afterwards)."""
        threads, timed = self._threads_for(i)
        previous = torch.get_num_threads()
        if threads != previous:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            if threads != previous:
                torch.set_num_threads(previous)
        if timed:
            self.best_s[threads] = min(self.best_s[threads], elapsed)
            if i - self.warmup + 1 >= self.trials * len(self.candidates):
                self.chosen = min(self.candidates, key=lambda n: self.best_s[n])


def _probe_workload() -> None:
    """A few small steps like those of the learned loops: a conv and a linear, forward and backward."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, 16, 16, generator=generator, requires_grad=True)
    w = torch.randn(64, 64, 3, 3, generator=generator, requires_grad=True)
    h = torch.randn(256, 256, generator=generator, requires_grad=True)
    for _ in range(3):
        y = torch.nn.functional.conv2d(x, w, padding=1)
        z = (y.flatten(1)[:, :256] @ h).relu()
        z.square().mean().backward()


PROBE_VALID_S = 60.0  # a probe's answer is reused this long (many calibrations in a row pay for one probe)
_last_probe: dict[int, tuple[float, int]] = {}  # thread count -> (time of the probe, its answer)


def faster_thread_count(repeats: int = 2) -> int:
    """The faster of `torch.get_num_threads()` and 1 thread on a short probe of small steps (about half a second):
    1 when another process keeps a core busy, the current count on an idle machine. The answer is reused for
    `PROBE_VALID_S` seconds."""
    base = torch.get_num_threads()
    if base == 1:
        return 1
    cached = _last_probe.get(base)
    if cached is not None and time.monotonic() - cached[0] < PROBE_VALID_S:
        return cached[1]
    best = {}
    for n in (base, 1):
        torch.set_num_threads(n)
        try:
            _probe_workload()  # warm-up at this count
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                _probe_workload()
                times.append(time.perf_counter() - start)
            best[n] = min(times)
        finally:
            torch.set_num_threads(base)
    answer = min(best, key=best.get)
    _last_probe[base] = (time.monotonic(), answer)
    return answer


@contextmanager
def calibration_threads() -> Iterator[int]:
    """Runs the block with `faster_thread_count()` threads (restored afterwards); yields the count.

    Example:
        >>> with calibration_threads() as n:
        ...     quantize(...)   # 1 thread on a busy 2-core machine, 2 on an idle one
    """
    base = torch.get_num_threads()
    n = faster_thread_count()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(base)
