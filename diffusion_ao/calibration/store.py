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
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from diffusion_ao.calibration.data import CalibrationData, CalibrationStep
from diffusion_ao.denoisers import SAMPLE, TIMESTEP
from diffusion_ao.serialization.file_io import save_tensors_file

INDEX_FILE = "calibration.json"
FORMAT_VERSION = 2  # 2: the index binds every part file (its size and the token in its header)
READABLE_VERSIONS = (1, 2)
LOCK_PREFIX = ".capture.lock-rank"  # one per writing rank while a capture or save writes the store
PART_TOKEN = "diffusion_ao_part"  # safetensors metadata key: a random token per part file


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
    save_tensors_file(tensors, root / file, metadata={PART_TOKEN: uuid.uuid4().hex})
    return where


def _part_token(path: Path) -> Optional[str]:
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get(PART_TOKEN)


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
    files = sorted({file for s in data.steps for file, _, _ in s.parts})
    parts = {file: {"bytes": (root / file).stat().st_size, "token": _part_token(root / file)} for file in files}
    index = json.dumps({"format": FORMAT_VERSION, "steps": steps, "parts": parts}, indent=1)
    temporary = root / f".{INDEX_FILE}.partial"
    temporary.write_text(index)
    os.replace(temporary, root / INDEX_FILE)  # the index appears whole or not at all


def _lock_owner(lock: Path) -> str:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return "an unknown process"
    alive = ""
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
            alive = ", still running"
        except (OSError, ValueError, KeyError):
            alive = ", which no longer runs: that capture was interrupted"
    return f"process {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')}{alive})"


def prepare_store(path: Union[str, Path], files: list[str], rank: int = 0) -> Path:
    """The store directory, created if needed, locked for this `rank` (`release_store` unlocks it).

    Raises:
        FileExistsError: the directory already holds an index or one of `files`, or another capture holds the
            lock of `rank` (two writers of one store).
    """
    root = Path(path)
    if (root / INDEX_FILE).exists() or any((root / f).exists() for f in files):
        raise FileExistsError(f"{root} already holds calibration data: store into a new or empty directory.")
    root.mkdir(parents=True, exist_ok=True)
    lock = root / f"{LOCK_PREFIX}{rank}"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise FileExistsError(f"{root} is being written by another capture ({_lock_owner(lock)}): two writers "
                              f"would mix their part files. Store into another directory; if that capture was "
                              f"interrupted, delete {root} (its parts cannot be resumed) and capture again.") from None
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
    return root


def release_store(root: Path, rank: int = 0, written: Iterable[str] = (), failed: bool = False) -> None:
    """Unlocks `root` for `rank`; after a failed capture, first removes the part files this rank `written`, so
    that the directory holds nothing half-done."""
    if failed:
        for file in written:
            (root / file).unlink(missing_ok=True)
    (root / f"{LOCK_PREFIX}{rank}").unlink(missing_ok=True)


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
    failed = True
    try:
        first = data.steps[0]
        stored = stored_data(root, write_part(root, file, data.steps), [SAMPLE, *first.conditioning],
                             list(first.shared))
        write_index(root, stored)
        failed = False
    finally:
        release_store(root, written=[file], failed=failed)
    return stored


def _check_parts(root: Path, index: dict) -> None:
    """Every part file the index names is there, unchanged (size and token; format 2), readable, and holds the
    rows it claims."""
    for file, expected in (index["parts"].items() if index["format"] >= 2 else ()):
        path = root / file
        if not path.is_file():
            raise ValueError(f"{path} is missing: the store is incomplete; capture it again.")
        if path.stat().st_size != expected["bytes"] or _part_token(path) != expected["token"]:
            raise ValueError(f"{path} does not belong to this store (its size or token differs from "
                             f"{root / INDEX_FILE}'s): it was replaced or rewritten; capture the store again.")
    for step in index["steps"]:
        for file, prefix, rows in step["parts"]:
            try:
                with safe_open(root / file, framework="pt") as f:
                    held = f.get_slice(f"{prefix}/{SAMPLE}").get_shape()[0]
            except (OSError, SafetensorError) as err:
                raise ValueError(f"{root / file} cannot be read ({type(err).__name__}: {err}): it is missing, "
                                 "truncated or corrupt; capture the store again.") from None
            if held != rows:
                raise ValueError(f"{root / INDEX_FILE} claims {rows} rows of timestep {step['timestep']} in {file}, "
                                 f"which holds {held}: the store is inconsistent; capture it again.")


def load_calibration_data(path: Union[str, Path]) -> CalibrationData:
    """The calibration data of the store at `path`, read lazily (see the module's docstring).

    Raises:
        FileNotFoundError: `path` holds no store (no calibration.json), or an unfinished capture.
        ValueError: the store was written by a newer format, or a part file is missing, replaced, rewritten or
            holds fewer rows than the index claims.
    """
    root = Path(path)
    if not (root / INDEX_FILE).is_file():
        locks = sorted(root.glob(f"{LOCK_PREFIX}*")) if root.is_dir() else []
        if locks:
            raise FileNotFoundError(f"{root} holds an unfinished capture (no {INDEX_FILE} yet; written by "
                                    f"{_lock_owner(locks[0])}). Wait for it to finish, or, if it was interrupted, "
                                    f"delete {root} and capture again.")
        raise FileNotFoundError(f"{root} holds no calibration data ({INDEX_FILE} is missing): write it with "
                                "save_calibration_data or capture_calibration_data(..., store=path).")
    try:
        index = json.loads((root / INDEX_FILE).read_text())
        steps = index["steps"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{root / INDEX_FILE} is not a calibration store index ({type(err).__name__}: {err}); "
                         "capture the store again.") from None
    if index.get("format") not in READABLE_VERSIONS:
        raise ValueError(f"{root / INDEX_FILE} has format {index.get('format')}; this diffusion-ao reads formats "
                         f"{READABLE_VERSIONS}.")
    _check_parts(root, index)
    return CalibrationData([StoredCalibrationStep(root, s["timestep"], s["parts"], s["batched"], s["shared"])
                            for s in steps])
