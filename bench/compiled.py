"""What compiling a bench row yields: the int8 kernels inductor lowered it to (`compile_and_count`, `kernel_kind`)
and the process memory around it (`rss_mib`, `release_freed_memory`)."""
from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path
from typing import Optional

import torch

from diffusion_ao import compile_for_cpu, count_int8_kernels
from diffusion_ao.grouped_graph import TimeGroupedGraph


def release_freed_memory() -> None:
    """Hands freed heap pages back to the OS after a row. glibc keeps them otherwise, and each row's
    calibration temporaries (~1 GiB on the DiT) land in new pages: 12 rows outgrew 24 GiB. Linux / glibc only;
    elsewhere a no-op."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mib() -> float:
    """This process's resident memory in MiB (Linux; 0.0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def compile_and_count(converted: torch.nn.Module, probe_x: torch.Tensor, probe_t: torch.Tensor,
                      probe_kw: dict) -> tuple[torch.nn.Module, Optional[dict]]:
    """`compile_for_cpu(converted)` and the int8 kernels inductor emitted; a `TimeGroupedGraph` compiles every
    group (a call with one of its timesteps each), and its counts are per group (the groups must agree)."""
    model = compile_for_cpu(converted)
    if not isinstance(model, TimeGroupedGraph):
        return model, count_int8_kernels(model, probe_x, probe_t, **probe_kw)
    per_group = [count_int8_kernels(model, probe_x, torch.full_like(probe_t, group[0]), **probe_kw)
                 for group in model.group_timesteps()]
    if any(c != per_group[0] for c in per_group):
        raise RuntimeError(f"The time groups lowered to different int8 kernels: {per_group}.")
    return model, per_group[0]


def kernel_kind(counts: Optional[dict], expected: Optional[int]) -> str:
    """"int8" when the compiled graph runs the quantized layers on int8 kernels ("int8, int8 attention" with
    attention on torchao's integer template), else "simulated"."""
    counts = counts or {}
    layers = counts.get("qconv", 0) + counts.get("qlinear", 0) + counts.get("merged_linears", 0)
    if layers == 0:
        return "simulated"
    if expected is not None and layers < expected:
        return "simulated"  # some quantized layers still run as q/dq in fp32
    return "int8, int8 attention" if counts.get("attention") else "int8"
