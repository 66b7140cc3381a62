"""Weight observer: symmetric, per output channel (or per tensor), min-max or MSE-searched range.

At 4 bits the min-max range wastes most of the grid on a few large weights; the MSE search shrinks each
channel's range to the factor that minimises that channel's quantization error.
"""
from __future__ import annotations

import torch
from torchao.quantization.pt2e.observer import UniformQuantizationObserverBase

from diffusion_ao.primitives import fake_quantize

METHODS = ("minmax", "mse")


class WeightObserver(UniformQuantizationObserverBase):
    """Args:
        dtype, qscheme, quant_min, quant_max: e.g. int8, per_channel_symmetric, -8, 7 for 4-bit weights.
        ch_axis: the output-channel axis for per-channel schemes (0 for conv and linear weights).
        method: "minmax" or "mse".
        grid: number of candidate shrink factors in [0.3, 1] for the MSE search.
    """

    def __init__(self, dtype: torch.dtype = torch.int8, qscheme: torch.qscheme = torch.per_channel_symmetric,
                 quant_min: int = -128, quant_max: int = 127, ch_axis: int = 0, method: str = "minmax",
                 grid: int = 71, **kwargs) -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not supported: choose one of {METHODS}.")
        kwargs.pop("reduce_range", None)
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        self.ch_axis, self.method, self.grid = ch_axis, method, grid
        self.per_channel = qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))
        self.weight: torch.Tensor | None = None
        self.fixed_qparams: tuple[torch.Tensor, torch.Tensor] | None = None
        self.label = "weight"

    @torch.no_grad()
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w_ = w.detach().float()
        if not torch.isfinite(w_).all():
            raise ValueError(f"The {self.label} has NaN/Inf entries: the floating-point model is broken.")
        if self.per_channel:
            flat = w_.transpose(0, self.ch_axis).reshape(w_.shape[self.ch_axis], -1)
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        else:
            lo, hi = w_.amin().reshape(1), w_.amax().reshape(1)
        self.min_val, self.max_val = lo, hi
        self.weight = w_
        return w

    def chosen_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weight is None:
            raise RuntimeError(f"The observer of {self.label} saw no data: run `calibrate(prepared, data)` "
                               "before `convert_pt2e`.")
        if self.method == "minmax":
            return self.min_val, self.max_val
        w = self.weight
        if self.per_channel:
            w = w.transpose(0, self.ch_axis).reshape(w.shape[self.ch_axis], -1)
        else:
            w = w.reshape(1, -1)
        best_err = torch.full((w.shape[0],), float("inf"))
        best_f = torch.ones(w.shape[0])
        for f in torch.linspace(0.3, 1.0, self.grid):
            scale, zp = self._calculate_qparams(self.min_val * f, self.max_val * f)
            err = (fake_quantize(w, scale.view(-1, 1), zp.view(-1, 1).float(), self.quant_min, self.quant_max)
                   - w).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_f = torch.where(better, f, best_f)
        return self.min_val * best_f, self.max_val * best_f

    def set_fixed_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Makes `calculate_qparams` return these qparams (block reconstruction bakes integer weights on this
        grid, which a new range search on the baked weights could otherwise move)."""
        self.fixed_qparams = (scale.detach().clone(), zero_point.detach().clone())

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fixed_qparams is not None:
            return self.fixed_qparams[0].clone(), self.fixed_qparams[1].clone()
        lo, hi = self.chosen_range()
        scale, zp = self._calculate_qparams(lo, hi)
        if not self.per_channel:
            return scale.reshape(()), zp.reshape(())
        return scale, zp

    def broadcast_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`calculate_qparams` shaped to broadcast against the observed weight (per channel along `ch_axis`),
        the zero point as float, ready for `fake_quantize`."""
        scale, zero_point = self.calculate_qparams()
        if not self.per_channel:
            return scale, zero_point.float()
        if self.weight is None:
            raise RuntimeError(f"The observer of {self.label} saw no data: call it on the weight first.")
        shape = [1] * self.weight.dim()
        shape[self.ch_axis] = -1
        return scale.reshape(shape), zero_point.reshape(shape).float()

    def fake_quantized(self, w: torch.Tensor) -> torch.Tensor:
        """Observes `w` and returns it on the grid this observer chooses for it (what convert's q/dq makes of it):
        how passes that plan before `prepare_pt2e` (LES, mixed precision) see a quantized weight."""
        self(w.detach())
        scale, zero_point = self.broadcast_qparams()
        return fake_quantize(w, scale, zero_point, self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        return f"method={self.method}, per_channel={self.per_channel}, range=({self.quant_min}, {self.quant_max})"
