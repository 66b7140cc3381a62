"""Latency cost of Q-Diffusion's shortcut splitting on real int8 kernels: the same config with and without
`QDiffConfig(split_shortcut=True)`, compiled for the CPU, timed interleaved in one process.

    OMP_NUM_THREADS=2 python bench/split_latency.py --preset w8a8 --batch 250 --rounds 20
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/split_latency.py` from anywhere
from diffusion_ao.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before torch, torchao and diffusers print their import-time notes

import torch  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402

from bench.latency import default_threads, measure_interleaved  # noqa: E402
from diffusion_ao import (DiffusionQuantizer, QuantConfig, calibrate, collect_calibration_data,  # noqa: E402
                          compile_for_cpu, count_int8_kernels, export_unet)
from diffusion_ao.config import QDiffConfig  # noqa: E402
from diffusion_ao.models import load_default_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="w8a8")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads or default_threads())
    unet, scheduler = load_default_model()
    data = collect_calibration_data(unet, scheduler, num_samples=8, num_inference_steps=5, progress=False)
    x = torch.randn(args.batch, 1, 16, 16)
    t = torch.full((args.batch,), float(data.timesteps[len(data) // 2]))
    # min-max ranges: quick to calibrate, and latency does not depend on where the ranges sit
    base = QuantConfig.preset(args.preset).replace(act_observer="minmax")
    models = {}
    for name, config in (("no-split", base), ("split", base.replace(qdiff=QDiffConfig(split_shortcut=True)))):
        quantizer = DiffusionQuantizer(config)
        prepared = prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 16, 16)), quantizer)
        calibrate(prepared, data, progress=False)
        fast = compile_for_cpu(convert_pt2e(prepared))
        kernels = count_int8_kernels(fast, x, t)
        layers = sum(1 for d in quantizer.decisions if d.layer is not None and d.layer.act_bits)
        print(f"{name}: {kernels} int8 kernels for {layers} quantized layers", flush=True)
        models[name] = fast
    stats = measure_interleaved(models, x, t, rounds=args.rounds, progress=False)
    for name, s in stats.items():
        print(f"{name}: median {s.median_ms:.2f} ms (p25 {s.p25_ms:.2f}, p75 {s.p75_ms:.2f}, {s.rounds} rounds)")
    print(f"split / no-split latency: {stats['split'].median_ms / stats['no-split'].median_ms:.3f}")


if __name__ == "__main__":
    main()
