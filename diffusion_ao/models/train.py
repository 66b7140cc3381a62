"""Trains the shipped models on the 16x16 digits (epsilon prediction, EMA weights): the default UNet (a DDPM)
and the class-conditional DiT (labels dropped to the null label 10 % of the time, for classifier-free guidance).

Retrain the shipped weights with:

    python -m diffusion_ao.models.train --steps 5000 --out diffusion_ao/models/assets/digits_unet
    python -m diffusion_ao.models.train --model dit --steps 6000 --lr 1e-3 --out diffusion_ao/models/assets/digits_dit

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

from diffusion_ao.models.digits import load_digits_tensor
from diffusion_ao.models.dit_config import build_default_dit
from diffusion_ao.models.unet_config import DEFAULT_SCHEDULE_KWARGS, build_default_unet

BUILDERS = {"unet": build_default_unet, "dit": build_default_dit}


def train(steps: int, out: Path, batch_size: int = 128, lr: float = 5e-4, ema_decay: float = 0.999,
          save_every: int = 500, seed: int = 0, threads: int | None = None, resume: bool = False,
          model: str = "unet") -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    images, labels = load_digits_tensor()
    conditional = model == "dit"
    unet = BUILDERS[model]().train()
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
        idx = torch.randint(0, len(images), (batch_size,))
        x0 = images[idx]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        # the DiT's label embedding replaces 10 % of the labels by the null label itself (train mode)
        pred = unet(xt, timestep=t, class_labels=labels[idx]).sample if conditional else unet(xt, t).sample
        loss = (pred - noise).pow(2).mean()
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
                f"model={model} steps={step} batch_size={batch_size} lr={lr} ema_decay={ema_decay} seed={seed} "
                f"final_loss_ema={running:.4f} schedule={DEFAULT_SCHEDULE_KWARGS}\n"
                f"command: python -m diffusion_ao.models.train --model {model} --steps {steps} --batch-size "
                f"{batch_size} --lr {lr} --seed {seed} --out {out} (add --resume to continue)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(BUILDERS), default="unet")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=None, help="default: assets/digits_<model>")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "assets" / f"digits_{args.model}"
    train(args.steps, out, args.batch_size, args.lr, save_every=args.save_every, seed=args.seed,
          threads=args.threads, resume=args.resume, model=args.model)


if __name__ == "__main__":
    main()
