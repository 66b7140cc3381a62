"""The benchmark's figures: samples of every row side by side, and per-timestep noise-prediction error."""
from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on CI machines); imported when first used, so
    that the bench can say what is missing before it starts (`bench.run.check_bench_dependencies`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_sample_grid(images: dict[str, torch.Tensor], path: Path, per_row: int = 16) -> None:
    """One row of images per method, the same seeds in every column (FP32 first).

    Args:
        images: row name -> (N, 1, H, W) samples in [-1, 1], all from the same initial noise.
        path: where the PNG goes.
        per_row: how many seeds to show.
    """
    plt = _pyplot()
    names = list(images)
    cols = min(per_row, min(len(v) for v in images.values()))
    fig, axes = plt.subplots(len(names), cols, figsize=(cols * 0.6 + 1.8, len(names) * 0.62 + 0.2),
                             squeeze=False)
    for r, name in enumerate(names):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[name][c, 0].float().numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.13, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_per_timestep_plot(timesteps: list[float], errors: dict[str, list[float]], path: Path) -> None:
    """Relative MSE of each row's noise prediction vs FP at every sampler timestep (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in errors.items():
        ax.plot(timesteps, values, marker="o", markersize=2.5, linewidth=1, label=name)
    ax.set_xlabel("timestep (noisier to the right)")
    ax.set_ylabel("mean (eps_q - eps_fp)^2 / mean eps_fp^2")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
