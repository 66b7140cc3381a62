"""A small CNN digit classifier for 16x16 single-channel images in [-1, 1], used to evaluate sampled images.

Its penultimate layer is the feature space of the Fréchet distance in :mod:`diffusion_ao.metrics` (the role
Inception v3 plays for FID on natural images), and its predictions give the class histogram and coverage.
It is trained on the train split of :func:`~diffusion_ao.models.digits.split_indices` only, so its accuracy is
measured on the held-out split.

Retrain the shipped weights with:

    python -m diffusion_ao.models.classifier --out diffusion_ao/models/assets/digits_classifier
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_ao.models.digits import IMAGE_SIZE, load_digits_tensor, split_indices

NUM_CLASSES = 10
DEFAULT_CHANNELS = (16, 32, 64)
DEFAULT_FEATURE_DIM = 128
ASSET_DIR = Path(__file__).parent / "assets" / "digits_classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class DigitClassifier(nn.Module):
    """Three 3x3 conv layers (two 2x2 max-pools), a ReLU feature layer and a linear head.

    Args:
        channels: output channels of the three conv layers.
        feature_dim: width of the penultimate (feature) layer.
        image_size: side of the square input images; must be divisible by 4.
        num_classes: number of logits.
    """

    def __init__(self, channels: tuple[int, int, int] = DEFAULT_CHANNELS, feature_dim: int = DEFAULT_FEATURE_DIM,
                 image_size: int = IMAGE_SIZE, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3 * (image_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.image_size = image_size
        self.num_features = feature_dim  # read by torchmetrics' FID when used as its `feature` module

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features, shape (N, feature_dim), non-negative (post-ReLU)."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits, shape (N, num_classes)."""
        return self.head(self.features(x))


def build_classifier(channels: tuple[int, int, int] = DEFAULT_CHANNELS, feature_dim: int = DEFAULT_FEATURE_DIM,
                     image_size: int = IMAGE_SIZE) -> DigitClassifier:
    """Returns an untrained :class:`DigitClassifier` (about 155k parameters with the defaults)."""
    return DigitClassifier(tuple(channels), feature_dim, image_size)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shifts each image by an independent integer offset in [-max_shift, max_shift] on both axes.

    Pixels shifted in are background (-1).
    """
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Fraction of ``images`` whose argmax logit equals ``labels``."""
    was_training = model.training
    model.eval()
    correct = sum((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    model.train(was_training)
    return correct / len(images)


def train_classifier(steps: int = 3000, seed: int = 0, out_dir: Path | str | None = ASSET_DIR,
                     batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-4, max_shift: int = 1,
                     threads: int | None = 1) -> tuple[DigitClassifier, float]:
    """Trains the classifier on the train split and measures its accuracy on the held-out split.

    Args:
        steps: optimizer steps (AdamW, linear warm-up then cosine decay).
        seed: seeds the initialization, batches and augmentation (the data split itself is the fixed
            ``split_indices`` default, seed 0).
        out_dir: where ``model.safetensors`` and ``config.json`` are written; ``None`` writes nothing.
        batch_size: images per step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        max_shift: augmentation, random translation of up to this many pixels on each axis.
        threads: ``torch.set_num_threads`` value; ``None`` leaves it alone.

    Returns:
        The trained model in eval mode and its held-out accuracy.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits_tensor()
    train_idx, held_idx = split_indices(len(images))
    x_train, y_train = images[train_idx], labels[train_idx]
    x_held, y_held = images[held_idx], labels[held_idx]

    model = build_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = min(100, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start, running = time.time(), None
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_train), (batch_size,), generator=gen)
        x = random_shift(x_train[idx], max_shift, gen)
        loss = F.cross_entropy(model(x), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 500 == 0 or step == steps:
            print(f"step {step}/{steps} loss {running:.4f} held-out acc {accuracy(model, x_held, y_held):.4f} "
                  f"{time.time() - start:.0f}s", flush=True)
    model.eval()
    held_acc = accuracy(model, x_held, y_held)
    train_acc = accuracy(model, x_train, y_train)
    if out_dir is not None:
        save_classifier(model, Path(out_dir), {
            "held_out_accuracy": held_acc,
            "held_out_size": len(held_idx),
            "train_accuracy": train_acc,
            "train_size": len(train_idx),
            "split": {"function": "diffusion_ao.models.digits.split_indices", "held_out_fraction": 0.2, "seed": 0},
            "training": {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
                         "weight_decay": weight_decay, "optimizer": "AdamW, 100-step warm-up, cosine decay",
                         "augmentation": f"random integer shift of up to {max_shift} px per axis",
                         "final_loss_ema": running, "seconds": round(time.time() - start, 1),
                         "torch": torch.__version__},
        })
    return model, held_acc


def save_classifier(model: DigitClassifier, out_dir: Path, extra: dict | None = None) -> None:
    """Writes ``model.safetensors`` and ``config.json`` (architecture dims plus ``extra``) to ``out_dir``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME))
    (out_dir / WEIGHTS_NAME).chmod(0o644)  # safetensors creates it owner-only; it ships as package data
    config = {
        "architecture": "DigitClassifier",
        "channels": [model.conv1.out_channels, model.conv2.out_channels, model.conv3.out_channels],
        "feature_dim": model.fc.out_features,
        "image_size": model.image_size,
        "num_classes": model.head.out_features,
        "input_range": [-1.0, 1.0],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **(extra or {}),
    }
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(path: Path | str | None = None, device: torch.device | str = "cpu") -> DigitClassifier:
    """Loads the shipped classifier (or one saved by :func:`train_classifier` under ``path``), offline.

    Args:
        path: folder with ``model.safetensors`` and ``config.json``; defaults to the weights shipped next to
            this module.
        device: where to put the model.

    Returns:
        The classifier in eval mode with gradients disabled.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else ASSET_DIR
    config = json.loads((path / CONFIG_NAME).read_text())
    model = DigitClassifier(tuple(config["channels"]), config["feature_dim"], config["image_size"],
                            config["num_classes"])
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    return model.to(device).eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    _, acc = train_classifier(steps=args.steps, seed=args.seed, out_dir=args.out, threads=args.threads)
    print(f"held-out accuracy {acc:.4f}; wrote {args.out / WEIGHTS_NAME}")


if __name__ == "__main__":
    main()
