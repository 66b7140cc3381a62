"""Trains the default model: a DDPM (epsilon prediction, EMA weights) on the 16x16 digits.

Retrain the shipped weights with:

    python -m diffusion_ao.models.train --steps 5000 --out diffusion_ao/models/assets/digits_unet

Every ``--save-every`` steps the EMA weights are written (usable at once) together with the full training
state in ``train_state.pt`` beside them, so a stopped run continues exactly with ``--resume``.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from .digits import load_digits_tensor
from .unet_config import DEFAULT_SCHEDULE_KWARGS, build_default_unet


def train(steps: int, out: Path, batch_size: int = 128, lr: float = 5e-4, ema_decay: float = 0.999,
          save_every: int = 500, seed: int = 0, threads: int | None = None, resume: bool = False) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    images, _ = load_digits_tensor()
    unet = build_default_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(**DEFAULT_SCHEDULE_KWARGS)
    alphas_cumprod = scheduler.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"
    first_step, running = 1, None
    if resume:
        state = torch.load(state_path, weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        first_step, running = state["step"] + 1, state["running"]
        print(f"resumed at step {state['step']}", flush=True)
    start = time.time()
    for step in range(first_step, steps + 1):
        x0 = images[torch.randint(0, len(images), (batch_size,))]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = (unet(xt, t).sample - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))  # warm EMA so early checkpoints are usable
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step}/{steps} loss {running:.4f} {time.time() - start:.0f}s", flush=True)
        if step % save_every == 0 or step == steps:
            ema.save_pretrained(out)
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "rng": torch.get_rng_state(), "step": step,
                        "running": running}, state_path)
            (out / "TRAINING.txt").write_text(
                f"steps={step} batch_size={batch_size} lr={lr} ema_decay={ema_decay} seed={seed} "
                f"final_loss_ema={running:.4f} schedule={DEFAULT_SCHEDULE_KWARGS}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "assets" / "digits_unet")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    args = parser.parse_args()
    train(args.steps, args.out, args.batch_size, args.lr, save_every=args.save_every, seed=args.seed,
          threads=args.threads, resume=args.resume)


if __name__ == "__main__":
    main()
