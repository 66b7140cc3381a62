"""Interleaved latency measurement of several models in one process, and thread-count helpers."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

# A model under test, called as fn(sample, timestep_vector).
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LatencyStats:
    """Per-call wall times of one model, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    rounds: int


def vnni_warning() -> str | None:
    """One line for the bench's output where the CPU's int8 kernels lack a dot-product instruction (no VNNI/AMX).

    There the int8 kernels add pairs of products in int16, so they gain less over FP32 than on a VNNI CPU, and the
    layers whose kernel overflows at full range run 7-bit activations.
    """
    from diffusion_ao.backends.x86_features import LOWERED_KERNELS, cpu_has_vnni, int8_kernel_saturates
    if cpu_has_vnni():
        return None
    reduced = [k for k in LOWERED_KERNELS if int8_kernel_saturates(k)]  # as the quantizer decides
    return (f"[bench] WARNING: {cpu_name()} has no VNNI/AMX: int8 kernels gain less over FP32 here than on a VNNI "
            f"CPU (docs/benchmarks.md, 'Speed on AVX2'), so speed ratios do not carry over; 7-bit activations for "
            f"{', '.join(reduced) or 'no kernel'}")


def physical_cores() -> int:
    """Number of physical cores available to this process (logical CPUs if /proc/cpuinfo cannot tell)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return logical
    cores, physical_id = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return min(logical, len(cores)) if cores else logical


def default_threads() -> int:
    """os.cpu_count() capped at the number of physical cores."""
    return max(1, min(os.cpu_count() or 1, physical_cores()))


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


@torch.no_grad()
def _time_call(fn: ForwardFn, x: torch.Tensor, t: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x, t)
    return (time.perf_counter() - start) * 1000.0


@torch.no_grad()
def measure_interleaved(models: dict[str, ForwardFn], x: torch.Tensor, t: torch.Tensor, rounds: int = 20,
                        warmup: int = 2, progress: bool = True) -> dict[str, LatencyStats]:
    """Times one forward of every model, round-robin, so that machine-load drift hits all models alike.

    Each round calls every model once (the order rotates every round) and records the wall time. Warm-up
    calls (which must not include compilation: compile the models before) are not recorded.

    Args:
        models: name -> forward function, called as fn(x, t).
        x: the input batch.
        t: the timestep vector, one value per sample.
        rounds: recorded calls per model.
        warmup: unrecorded calls per model before the first round.
        progress: show a progress bar.

    Returns:
        name -> `LatencyStats` (median and quartiles over the rounds).
    """
    names = list(models)
    for name in names:
        for _ in range(warmup):
            models[name](x, t)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(rounds), desc="latency rounds", disable=not progress):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_time_call(models[name], x, t))
    stats = {}
    for name, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        stats[name] = LatencyStats(statistics.median(values), q[0], q[2], len(values))
    return stats


CPU_FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
CPU_ENV_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                "OMP_NUM_THREADS", "TORCHINDUCTOR_CACHE_DIR")


def git_commit() -> Optional[str]:
    """The checkout's commit, with "+dirty" when tracked files differ from it; None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_meta() -> dict:
    """What a reader needs to reproduce a figure: CPU flags of note, the CPU-capability environment, commit."""
    from diffusion_ao.backends.x86_features import read_cpu_flags

    flags = read_cpu_flags() or set()
    return {"cpu_flags": [f for f in CPU_FLAGS_OF_NOTE if f in flags],
            "env": {k: os.environ[k] for k in CPU_ENV_VARS if k in os.environ}, "commit": git_commit()}
