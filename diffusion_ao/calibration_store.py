"""Calibration data on disk, for data larger than memory: safetensors part files and an index, read back lazily.

A store is a directory with `calibration.json` (the steps in order: timestep, rows, and where each part of the
rows lies) and part files `part-*.safetensors`, each holding some rows of some steps under keys
`"<n>/<input name>"`. `load_calibration_data` gives `CalibrationData` whose steps are `StoredCalibrationStep`s:
they read their rows when used, a batch at a time in `calibrate`, so a process holds one batch and what the
methods keep (their subsets), not the whole data.

`capture_calibration_data(pipe, ..., store=path)` writes every pipeline call's recording to its own part file as
soon as the call returns (under torchrun each rank writes its own calls; the directory must be shared by the
ranks), or, with `memory_budget_mib`, only once a rank's recordings outgrow the budget; `save_calibration_data(data,
path)` stores data already in memory.

Example:
    >>> data = capture_calibration_data(pipe, 20, calls=calls, store="calib/")   # one part file per call
    >>> data = load_calibration_data("calib/")                                   # later, or in another process
    >>> calibrate(prepared, data)                                                # reads a batch at a time
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .calibration import CalibrationData, CalibrationStep
from .denoisers import SAMPLE, TIMESTEP

INDEX_FILE = "calibration.json"
FORMAT_VERSION = 1


class StoredCalibrationStep(CalibrationStep):
    """A `CalibrationStep` whose tensors stay in safetensors part files until used.

    `sample`, `conditioning` and `shared` read the whole step; `graph_inputs(start, stop)` reads only those rows;
    `select(rows)` returns an in-memory `CalibrationStep`. Nothing is cached: each use reads the files again
    (through the OS page cache).

    Args:
        root: the store directory.
        timestep: the step's timestep value.
        parts: the step's rows in order, as (part file name, key prefix, number of rows).
        batched: the names of the batched inputs (the sample and its conditioning).
        shared: the names of the inputs without a batch dimension (read from the first part).
    """

    def __init__(self, root: Union[str, Path], timestep: float, parts: list[tuple[str, str, int]],
                 batched: list[str], shared: list[str]) -> None:
        if SAMPLE not in batched:
            raise ValueError(f"a stored calibration step needs a '{SAMPLE}' input; it has {batched}.")
        self.timestep = float(timestep)
        self.root, self.parts = Path(root), [tuple(p) for p in parts]
        self.batched, self.shared_names = list(batched), list(shared)
        self.rows = sum(rows for _, _, rows in self.parts)

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"StoredCalibrationStep(timestep={self.timestep}, rows={self.rows}, parts={len(self.parts)})"

    def _read(self, name: str, start: int, stop: int) -> torch.Tensor:
        pieces, offset = [], 0
        for file, prefix, rows in self.parts:
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            if lo < hi:
                with safe_open(self.root / file, framework="pt") as f:
                    pieces.append(f.get_slice(f"{prefix}/{name}")[lo:hi])
            offset += rows
        if not pieces:  # an empty range: the shape and dtype of no rows
            with safe_open(self.root / self.parts[0][0], framework="pt") as f:
                return f.get_slice(f"{self.parts[0][1]}/{name}")[0:0]
        return torch.cat(pieces)

    @property
    def sample(self) -> torch.Tensor:
        return self._read(SAMPLE, 0, self.rows)

    @property
    def conditioning(self) -> dict[str, torch.Tensor]:
        return {name: self._read(name, 0, self.rows) for name in self.batched if name != SAMPLE}

    @property
    def shared(self) -> dict[str, torch.Tensor]:
        file, prefix, _ = self.parts[0]
        with safe_open(self.root / file, framework="pt") as f:
            return {name: f.get_tensor(f"{prefix}/{name}") for name in self.shared_names}

    def graph_inputs(self, start: int = 0, stop: Optional[int] = None) -> dict[str, torch.Tensor]:
        start, stop, _ = slice(start, stop).indices(self.rows)
        x = self._read(SAMPLE, start, stop)
        return {SAMPLE: x, TIMESTEP: torch.full((len(x),), self.timestep),
                **{name: self._read(name, start, stop) for name in self.batched if name != SAMPLE}, **self.shared}

    def select(self, rows: torch.Tensor) -> CalibrationStep:
        """An in-memory step of the samples at `rows`; reads only the span of rows they lie in."""
        if len(rows) == 0:
            return CalibrationStep(self.timestep, *self._span(0, 0), self.shared)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        sample, conditioning = self._span(lo, hi)
        local = rows - lo
        return CalibrationStep(self.timestep, sample[local], {k: v[local] for k, v in conditioning.items()},
                               self.shared)

    def _span(self, start: int, stop: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return (self._read(SAMPLE, start, stop),
                {name: self._read(name, start, stop) for name in self.batched if name != SAMPLE})


def write_part(root: Path, file: str, steps: list[CalibrationStep]) -> dict[float, list[tuple[str, str, int]]]:
    """Writes `steps` (some rows of some timesteps) to the part file `root / file`; returns where each lies, by
    timestep, for the index."""
    tensors, where = {}, {}
    for n, step in enumerate(steps):
        for name, value in {SAMPLE: step.sample, **step.conditioning, **step.shared}.items():
            tensors[f"{n}/{name}"] = value.detach().cpu().contiguous()
        where[step.timestep] = [(file, str(n), len(step))]
    save_file(tensors, root / file)
    return where


def stored_data(root: Path, where: dict[float, list[tuple[str, str, int]]], batched: list[str],
                shared: list[str]) -> CalibrationData:
    """`CalibrationData` of the parts in `where` (timestep -> parts in row order, steps in insertion order), after
    checking that every part holds the inputs `batched` and `shared` with the same shapes, and the same shared
    inputs as the step's first part."""
    layout = None
    for t, parts in where.items():
        first_shared = None
        for file, prefix, _ in parts:
            with safe_open(root / file, framework="pt") as f:
                slices = {name: f.get_slice(f"{prefix}/{name}") for name in batched + shared}
                shapes = {name: (tuple(v.get_shape()[0 if name in shared else 1:]), v.get_dtype())
                          for name, v in slices.items()}
                values = {name: f.get_tensor(f"{prefix}/{name}") for name in shared}
            layout = layout or shapes
            if shapes != layout:
                raise TypeError(f"the stored calibration data changes its inputs' shapes at timestep {t} ({file}): "
                                f"{shapes} vs {layout}; capture calls that share their inputs' names and shapes.")
            first_shared = first_shared or values
            changed = [name for name in shared if not torch.equal(values[name], first_shared[name])]
            if changed:
                raise TypeError(f"The shared input '{changed[0]}' changes between calls at timestep {t} ({file}).")
    return CalibrationData([StoredCalibrationStep(root, t, parts, batched, shared) for t, parts in where.items()])


def write_index(root: Path, data: CalibrationData) -> None:
    """Writes the index of `data`, whose steps are all `StoredCalibrationStep`s of `root`."""
    steps = [{"timestep": s.timestep, "parts": [list(p) for p in s.parts], "batched": s.batched,
              "shared": s.shared_names} for s in data.steps]
    (root / INDEX_FILE).write_text(json.dumps({"format": FORMAT_VERSION, "steps": steps}, indent=1))


def prepare_store(path: Union[str, Path], files: list[str]) -> Path:
    """The store directory, created if needed; a FileExistsError if it already holds an index or one of `files`."""
    root = Path(path)
    if (root / INDEX_FILE).exists() or any((root / f).exists() for f in files):
        raise FileExistsError(f"{root} already holds calibration data: store into a new or empty directory.")
    root.mkdir(parents=True, exist_ok=True)
    return root


def save_calibration_data(data: CalibrationData, path: Union[str, Path]) -> CalibrationData:
    """Writes `data` to a new store at `path` (one part file) and returns it read back lazily from there.

    Raises:
        FileExistsError: `path` already holds a store.

    Example:
        >>> stored = save_calibration_data(collect_calibration_data(unet, scheduler), "calib/")
    """
    data.validate()
    if len(set(data.timesteps)) != len(data.steps):
        raise ValueError("the calibration data has two steps with one timestep value; a store keys steps by it.")
    file = "part-00000.safetensors"
    root = prepare_store(path, [file])
    first = data.steps[0]
    stored = stored_data(root, write_part(root, file, data.steps), [SAMPLE, *first.conditioning], list(first.shared))
    write_index(root, stored)
    return stored


def load_calibration_data(path: Union[str, Path]) -> CalibrationData:
    """The calibration data of the store at `path`, read lazily (see the module's docstring).

    Raises:
        FileNotFoundError: `path` holds no store (no calibration.json).
        ValueError: the store was written by a newer format.
    """
    root = Path(path)
    if not (root / INDEX_FILE).is_file():
        raise FileNotFoundError(f"{root} holds no calibration data ({INDEX_FILE} is missing): write it with "
                                "save_calibration_data or capture_calibration_data(..., store=path).")
    index = json.loads((root / INDEX_FILE).read_text())
    if index.get("format") != FORMAT_VERSION:
        raise ValueError(f"{root / INDEX_FILE} has format {index.get('format')}; this diffusion-ao reads format "
                         f"{FORMAT_VERSION}.")
    return CalibrationData([StoredCalibrationStep(root, s["timestep"], s["parts"], s["batched"], s["shared"])
                            for s in index["steps"]])
