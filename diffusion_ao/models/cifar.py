"""A CIFAR-10-size UNet (the DDPM CIFAR-10 architecture, ~35.7 M parameters) for speed measurements.

Random weights: it is for timing and kernel coverage, not for sampling.

Example:
    >>> unet = cifar10_unet()          # UNet2DModel, 3x32x32
    >>> graph = export_unet(unet, sample_shape=(1, 3, 32, 32))
"""
from __future__ import annotations

import torch
from diffusers import UNet2DModel

# The DDPM CIFAR-10 UNet (Ho et al. 2020) as diffusers' google/ddpm-* conversions configure it: single-head
# attention (attention_head_dim None: one head as wide as the block), eps 1e-6, DDPM's asymmetric downsample
# padding and its sinusoidal embedding layout. diffusers' default attention_head_dim=8 would give 32 heads of 8.
CIFAR10_UNET_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
)


def cifar10_unet(seed: int = 0) -> UNet2DModel:
    """The DDPM CIFAR-10 UNet with random weights (seeded), in eval mode."""
    torch.manual_seed(seed)
    return UNet2DModel(**CIFAR10_UNET_CONFIG).eval()
