"""Which denoising timestep the network is being run at, for observers that keep per-timestep statistics.

PT2E observers are graph modules, not hooks: they only see tensors. `calibrate` sets the timestep here
before each forward, and observers read it; it also says which samples of the step the batch holds, so that
observers can name every value by its place in the whole calibration set (their subsample of it is then the
same however the data is batched or shared among ranks).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

_current_timestep: Optional[float] = None
_current_rows: Optional[tuple[int, int]] = None


@contextlib.contextmanager
def timestep_context(timestep: float, rows: Optional[tuple[int, int]] = None) -> Iterator[None]:
    """Runs the body with `current_timestep()` returning `timestep` (a scheduler's timestep value).

    Args:
        timestep: the timestep value the denoiser is run at.
        rows: (start, stop): the batch is samples start..stop-1 of that timestep's calibration step (None:
            unknown; observers then number the values in the order they see them).
    """
    global _current_timestep, _current_rows
    if rows is not None and not (0 <= rows[0] < rows[1]):
        raise ValueError(f"timestep_context: rows must be (start, stop) with 0 <= start < stop, got {rows}.")
    previous = _current_timestep, _current_rows
    _current_timestep, _current_rows = float(timestep), (None if rows is None else (int(rows[0]), int(rows[1])))
    try:
        yield
    finally:
        _current_timestep, _current_rows = previous


def current_timestep() -> Optional[float]:
    """The timestep set by the innermost `timestep_context`, or None outside calibration."""
    return _current_timestep


def current_rows() -> Optional[tuple[int, int]]:
    """The (start, stop) sample rows set by the innermost `timestep_context`, or None when it gave none."""
    return _current_rows
