"""AdaRound (Nagel et al. 2020) as used by BRECQ / Q-Diffusion (docs/methods.md#adaround-and-lsq): learn, per
weight, whether to round down or up on the quantization grid.

w_soft = s * (clamp(floor(w / s) + h(V) + z, qmin, qmax) - z), with the rectified sigmoid
h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1). V starts where h(V) equals the fractional part of w / s
(so the soft weight starts at the FP weight, up to clamping; the hard rounding starts as round-to-nearest, ties to
even like `quantize_per_channel`), and a regulariser 1 - |2h - 1|^beta with beta
annealed from 20 to 2 pushes every h to 0 or 1. The final (hard) rounding is h(V) >= 0.5, i.e. V >= 0.
"""
from __future__ import annotations

from typing import Optional

import torch

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1): reaches exactly 0 and 1 at finite V.

    Example:
        >>> rectified_sigmoid(torch.tensor([-100.0, 0.0, 100.0]))
        tensor([0.0000, 0.5000, 1.0000])
    """
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """A V with rectified_sigmoid(V) = h for h in (0, 1) (the AdaRound initialisation)."""
    h = h.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def round_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean over the weights of 1 - |2 h(V) - 1|^beta: 0 when every h is 0 or 1, up to 1 at h = 0.5."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).mean()


def annealed_beta(iteration: int, iterations: int, warmup: float, start: float = 20.0,
                  end: float = 2.0) -> Optional[float]:
    """beta of the regulariser at `iteration`: None during the warm-up (no regulariser), then linear from
    `start` to `end`."""
    first = int(warmup * iterations)
    if iteration < first:
        return None
    progress = (iteration - first) / max(1, iterations - first)
    return end + (start - end) * max(0.0, 1.0 - progress)


class AdaRoundWeightQuantizer(torch.nn.Module):
    """Fake-quantizes one weight tensor with learnable rounding on a fixed grid (scale, zero point).

    Args:
        weight: the FP weight.
        scale, zero_point: per-channel (along `ch_axis`) or per-tensor qparams, as the weight observer returns.
        quant_min, quant_max: the integer range, e.g. -8, 7 for 4-bit weights.
        ch_axis: the channel axis of per-channel qparams.

    `soft` (default True while learning) selects h(V) or the hard rounding V >= 0. The forward ignores its
    input's values (it always quantizes the stored weight), so it can stand in for a weight observer.

    Example:
        >>> q = AdaRoundWeightQuantizer(w, scale, torch.zeros_like(scale), -8, 7)
        >>> q.soft = False; w_q = q.baked_weight()
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                 quant_max: int, ch_axis: int = 0) -> None:
        super().__init__()
        w = weight.detach().float()
        shape = [1] * w.dim()
        if scale.numel() > 1:
            shape[ch_axis] = -1
        self.register_buffer("scale", scale.detach().float().reshape(shape))
        self.register_buffer("zero_point", zero_point.detach().float().reshape(shape))
        self.quant_min, self.quant_max = quant_min, quant_max
        scaled = w * (1.0 / self.scale)  # convert's arithmetic
        floor = torch.floor(scaled)
        self.register_buffer("w_floor", floor)
        alpha = inverse_rectified_sigmoid(scaled - floor)
        # The hard choice must start as convert's round half to even: the extreme weights of a symmetric range
        # sit exactly on a half step (absmax / scale = 7.5 at 4 bits), where "h >= 0.5" alone would round up.
        up = torch.round(scaled) > floor
        alpha = torch.where(up, alpha.clamp_min(1e-6), alpha.clamp_max(-1e-6))
        self.alpha = torch.nn.Parameter(alpha)
        self.soft = True

    def rounding(self) -> torch.Tensor:
        """h(V) while soft, else the hard 0/1 choice."""
        return rectified_sigmoid(self.alpha) if self.soft else (self.alpha >= 0).to(self.alpha.dtype)

    def integer_weight(self) -> torch.Tensor:
        """The integer codes of the hard rounding."""
        hard = (self.alpha.detach() >= 0).float()
        return torch.clamp(self.w_floor + hard + self.zero_point, self.quant_min, self.quant_max)

    def baked_weight(self) -> torch.Tensor:
        """scale * (codes - zero point): the weight that convert's quantization maps back to `integer_weight`."""
        return (self.integer_weight() - self.zero_point) * self.scale

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.w_floor + self.rounding() + self.zero_point, self.quant_min, self.quant_max)
        return (q - self.zero_point) * self.scale
