"""Quantization arithmetic shared by observers, learned scaling and reconstruction.

The formulas match `torch.ops.quantized_decomposed.quantize_per_tensor` (multiply by 1/scale, round half to
even, add the zero point, clamp), so a range chosen here behaves the same after `convert_pt2e`.
"""
from __future__ import annotations

import torch


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range of a `bits`-bit code: signed is [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b - 1].

    Example:
        >>> int_range(4, signed=True)
        (-8, 7)
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported: codes are stored in 8-bit integers, use 1..8.")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
             quant_max: int) -> torch.Tensor:
    """Integer codes (as float) of `x`; `scale`/`zero_point` broadcast against `x`."""
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, quant_min, quant_max)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                  quant_max: int) -> torch.Tensor:
    """`dequantize(quantize(x))`: what the network sees after a q/dq pair."""
    return dequantize(quantize(x, scale, zero_point, quant_min, quant_max), scale, zero_point)



def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through gradient (d round(x) / dx := 1)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                      quant_max: int) -> torch.Tensor:
    """`fake_quantize` that gradients can pass: straight through the rounding, zero where the code clamps.

    Learned methods (LES, reconstruction) optimise through it; its forward value equals `fake_quantize`.
    """
    q = torch.clamp(round_ste(x * (1.0 / scale)) + zero_point, quant_min, quant_max)
    return (q - zero_point) * scale
