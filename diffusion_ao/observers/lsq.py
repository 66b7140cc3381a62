"""LSQ (Esser et al. 2020): activation fake quantization with a learnable step size (docs/methods.md#adaround-and-lsq).

x_q = s * (clamp(round(x / s) + z, qmin, qmax) - z) with the straight-through estimator for round and the
gradient of s scaled by 1 / sqrt(numel * qmax), as in the LSQ paper. The zero point stays the observer's.
"""
from __future__ import annotations

import math

import torch

from diffusion_ao.primitives import fake_quantize_ste


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x forward (bit for bit: a step one ulp off would move the codes of values on a half step); its gradient
    multiplied by `factor` backward."""
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())


class LSQActivationQuantizer(torch.nn.Module):
    """Per-tensor activation fake quantizer with a learnable step size.

    Args:
        scale, zero_point: the initial qparams (from the calibrated observer).
        quant_min, quant_max: the integer range (e.g. 0, 255).
        learn: make the step size a trainable parameter.

    The arithmetic (multiply by 1/s, round half to even, add the zero point, clamp) is that of
    `quantize_per_tensor`, so at its initial step size it reproduces the converted graph.

    Example:
        >>> q = LSQActivationQuantizer(torch.tensor(0.02), torch.tensor(128), 0, 255)
        >>> y = q(x)
    """

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                 learn: bool = True) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(scale.detach().float().reshape(()).clone(), requires_grad=learn)
        self.register_buffer("zero_point", zero_point.detach().float().reshape(()).clone())
        self.quant_min, self.quant_max = quant_min, quant_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        if s.requires_grad and torch.is_grad_enabled():
            s = scale_gradient(s.abs().clamp_min(1e-8), 1.0 / math.sqrt(x.numel() * max(1, self.quant_max)))
        return fake_quantize_ste(x, s, self.zero_point, self.quant_min, self.quant_max)
