"""Quantize a denoiser from the command line, on one process or several (`torchrun`), and save the result.

    python -m diffusion_ao.quantize_cli --model default --preset w8a8 --out quantized/
    torchrun --nproc-per-node 2 -m diffusion_ao.quantize_cli --model path/to/pipeline --preset w8a8 --out q/

It captures calibration trajectories with this project's sampler (`collect_calibration_data`), runs the recipe
of the preset (`quantize_denoiser`) and writes `save_quantized`'s packed files from rank 0. Under torchrun (the
WORLD_SIZE / RANK environment variables) it joins a gloo process group, and the capture, the observers'
calibration, block reconstruction and LES are split between the ranks (`diffusion_ao.distributed`); the rest of
the recipe runs on every rank.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .calibration import collect_calibration_data
from .config import PRESETS
from .distributed import world
from .recipe import quantize_denoiser
from .serialization import save_quantized


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'dit', a diffusers directory or a cached hub id")
    p.add_argument("--preset", default="w8a8", choices=sorted(PRESETS))
    p.add_argument("--out", type=Path, required=True, help="directory for save_quantized's files")
    p.add_argument("--num-samples", type=int, default=64, help="calibration trajectories (split between ranks)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps per trajectory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a collective waits for the other ranks")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.steps < 1:
        p.error("--num-samples and --steps must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> Optional[Path]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    rank, world_size = world()
    try:
        from .models import load_model

        start = time.perf_counter()
        model, scheduler = load_model(args.model)
        data = collect_calibration_data(model, scheduler, num_samples=args.num_samples, num_inference_steps=args.steps,
                                        seed=args.seed, progress=not args.no_progress and rank == 0)
        captured = time.perf_counter()
        converted, report = quantize_denoiser(model, data, args.preset, progress=not args.no_progress and rank == 0)
        done = time.perf_counter()
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        summary = {"rank": rank, "world_size": world_size, "capture_s": round(captured - start, 1),
                   "quantize_s": round(done - captured, 1), "peak_rss_mib": round(peak_mib)}
        print(json.dumps(summary), flush=True)
        if rank != 0:
            return None
        return save_quantized(converted, args.out, metadata={"preset": args.preset, "model": str(args.model),
                                                             "calibration": summary})
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
