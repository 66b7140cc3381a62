"""How good the shipped models' FP samples are: the digits classifier's agreement with the requested label (the
class-conditional DiT, with and without guidance), its class coverage, and the FD to real digits.

    python bench/model_quality.py                       # both models, 1000 samples, 20 DDIM steps
    python bench/model_quality.py --guidance 1,2,3,4 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/model_quality.py` from anywhere
from diffusion_ao.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before torch, torchao and diffusers print their import-time notes

import torch  # noqa: E402
from bench.quality import make_noise, sample_images  # noqa: E402
from diffusion_ao.metrics import class_coverage, fd_to_reference, label_agreement  # noqa: E402
from diffusion_ao.models import load_model  # noqa: E402
from diffusion_ao.models.digits import load_digits_tensor  # noqa: E402
from diffusion_ao.models.dit_config import NULL_LABEL, NUM_CLASSES  # noqa: E402


def sample(model, scheduler, n: int, steps: int, seed: int, batch: int, labels=None, guidance: float = 1.0):
    """The bench's own sampling (`bench.quality.sample_images`): same noise and per-batch seeding."""
    noise = make_noise(n, (1, 16, 16), batch, seed)
    padded = None if labels is None else torch.arange(len(noise)) % NUM_CLASSES
    return sample_images(model, scheduler, noise, n, steps, batch, seed, "samples", progress=False, labels=padded,
                         guidance_scale=guidance, null_label=NULL_LABEL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", default="1,2,3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    real, _ = load_digits_tensor()
    seeds = [int(s) for s in args.seeds.split(",")]
    labels = torch.arange(args.num_samples) % NUM_CLASSES
    rows = []

    def row(name, runs):
        cells = []
        for key in ("agreement", "coverage", "fd"):
            values = [r[key] for r in runs if r[key] is not None]
            cells.append(f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})" if values else "–")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)

    unet, scheduler = load_model("default")
    runs = []
    for seed in seeds:
        x = sample(unet, scheduler, args.num_samples, args.steps, seed, args.batch)
        runs.append(dict(agreement=None, coverage=class_coverage(x), fd=fd_to_reference(x, real)))
    row("UNet (unconditional)", runs)
    dit, scheduler = load_model("dit")
    for g in (float(v) for v in args.guidance.split(",")):
        runs = []
        for seed in seeds:
            x = sample(dit, scheduler, args.num_samples, args.steps, seed, args.batch, labels, g)
            runs.append(dict(agreement=label_agreement(x, labels), coverage=class_coverage(x),
                             fd=fd_to_reference(x, real)))
        row(f"DiT, guidance {g:g}", runs)
    print(f"\n{args.num_samples} samples, {args.steps} DDIM steps, mean (min–max) over seeds {seeds}; FD to the "
          f"{len(real)} real digits")
    print("| model | label agreement | class coverage | FD to real digits |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
