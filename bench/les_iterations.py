"""How LES's result depends on its iteration budget: DMQ's learned equivalent scaling run on the default model's
calibration data with several `DMQConfig.les_iterations`, reporting the wall time, how many layers keep learned
scales, and the layers' summed relative output errors (the expected loss LES minimises and the deployed
round-to-nearest error, before and after LES).

    OMP_NUM_THREADS=2 python bench/les_iterations.py --iterations 200,100,60
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/les_iterations.py` from anywhere
from diffusion_ao.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before torch, torchao and diffusers print their import-time notes

import torch  # noqa: E402
from bench.latency import default_threads  # noqa: E402
from diffusion_ao import QuantConfig, collect_calibration_data, export_denoiser  # noqa: E402
from diffusion_ao.methods.dmq.les import apply_learned_scaling  # noqa: E402
from diffusion_ao.models import load_default_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", default="200,100,60", help="comma-separated LES budgets")
    p.add_argument("--bits", default="w4a8,w4a6", help="comma-separated dmq preset bit widths")
    p.add_argument("--calib-samples", type=int, default=64, help="trajectories per timestep (the bench's)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads or default_threads())
    unet, scheduler = load_default_model()
    data = collect_calibration_data(unet, scheduler, num_samples=args.calib_samples, num_inference_steps=20,
                                    seed=1, progress=False)  # the bench's first calibration run
    graph = export_denoiser(unet, data.steps[0])
    print("| preset | iterations | LES s | layers kept | expected loss (s = 1 -> learned) "
          "| deployed error (s = 1 -> learned) |\n|---|---|---|---|---|---|")
    for bits in args.bits.split(","):
        for iterations in (int(i) for i in args.iterations.split(",")):
            config = QuantConfig.preset(f"dmq-{bits}")
            config = config.replace(dmq=dataclasses.replace(config.dmq, les_iterations=iterations))
            start = time.perf_counter()
            results = apply_learned_scaling(copy.deepcopy(graph), data, config, progress=False)
            seconds = time.perf_counter() - start
            kept = [r for r in results.values() if r.fold is not None]
            unscaled = sum(r.loss_unscaled for r in results.values())
            expected = sum(r.loss_learned if r.fold is not None else r.loss_unscaled for r in results.values())
            deployed_unscaled = sum(r.deployed_unscaled for r in results.values())
            deployed = sum(r.deployed_learned if r.fold is not None else r.deployed_unscaled
                           for r in results.values())
            print(f"| dmq-{bits} | {iterations} | {seconds:.1f} | {len(kept)}/{len(results)} | "
                  f"{unscaled:.4f} -> {expected:.4f} | {deployed_unscaled:.4f} -> {deployed:.4f} |", flush=True)


if __name__ == "__main__":
    main()
