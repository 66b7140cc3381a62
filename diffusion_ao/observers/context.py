"""Which denoising timestep the network is being run at, for observers that keep per-timestep statistics.

PT2E observers are graph modules, not hooks: they only see tensors. `calibrate` sets the timestep here
before each forward, and observers read it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

_current_timestep: Optional[float] = None


@contextlib.contextmanager
def timestep_context(timestep: float) -> Iterator[None]:
    """Runs the body with `current_timestep()` returning `timestep` (a scheduler's timestep value)."""
    global _current_timestep
    previous, _current_timestep = _current_timestep, float(timestep)
    try:
        yield
    finally:
        _current_timestep = previous


def current_timestep() -> Optional[float]:
    """The timestep set by the innermost `timestep_context`, or None outside calibration."""
    return _current_timestep
