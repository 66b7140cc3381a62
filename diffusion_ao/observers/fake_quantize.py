"""FakeQuantize modules for PT2E quantization-aware training (`prepare_qat_pt2e`, `DiffusionQuantizer(qat=True)`).

Each wraps one of the diffusion-ao observers (as `activation_post_process`, torchao's convention) and adds what
training needs:

* `TimestepFakeQuantize` (activations): the per-timestep statistics of `TimestepActivationObserver`, then a
  learnable step size (LSQ, `observers.lsq`) initialised from the range those statistics choose; the zero point
  stays the statistics' one.
* `WeightFakeQuantize` (weights): the per-channel range of `WeightObserver`, then either a learnable per-channel
  step (LSQ) or AdaRound's learnable rounding on the fixed grid (`observers.adaround`), hardened at the end.

Life cycle (`diffusion_ao.methods.qat` drives it for a whole graph):
1. observe: observers on, fake quantization *off* (`calibrate` runs the graph in floating point, so the
   statistics are those `prepare_pt2e`'s observers would collect: the same ranges as PTQ);
2. learn: `enable_range_learning()` freezes the statistics, turns fake quantization on and the step (and
   rounding) into parameters; with fake quantization on and observers still on (`enable_fake_quant()` alone),
   the forward uses the qparams of the statistics so far, straight through for the gradient;
3. finish: `disable_range_learning()` fixes them (AdaRound's rounding becomes hard); `convert_pt2e` then asks
   `calculate_qparams()` for the learned qparams. Converting while learning, or a module whose fake quantization
   was never turned on (a model trained without quantization), is an error.

Every rounding is `quantize_per_tensor` / `quantize_per_channel`'s (multiply by 1/scale, round half to even,
clamp), so the forward after learning equals the converted graph's q/dq.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

from diffusion_ao.observers.activation import TimestepActivationObserver
from diffusion_ao.observers.adaround import AdaRoundWeightQuantizer, round_regularizer
from diffusion_ao.observers.lsq import LSQActivationQuantizer, scale_gradient
from diffusion_ao.observers.weight import WeightObserver
from diffusion_ao.primitives import fake_quantize_ste

MIN_STEP = 1e-8


class _DiffusionFakeQuantize(FakeQuantizeBase):
    """What both FakeQuantize modules share: the wrapped observer, torchao's attributes, the learning flag."""

    def __init__(self, observer: Union[type, torch.nn.Module], **observer_kwargs) -> None:
        super().__init__()
        observer_kwargs.pop("is_dynamic", None)  # static quantization only (the specs never ask otherwise)
        if isinstance(observer, torch.nn.Module):  # `around`: a calibrated observer, kept as it is
            if observer_kwargs:
                raise TypeError(f"{type(self).__name__} around an observer instance takes no observer arguments, "
                                f"got {sorted(observer_kwargs)}.")
            self.activation_post_process = observer
        else:
            self.activation_post_process = observer(**observer_kwargs)
        obs = self.activation_post_process
        self.dtype, self.qscheme = obs.dtype, obs.qscheme
        self.quant_min, self.quant_max = obs.quant_min, obs.quant_max
        self.ch_axis = getattr(obs, "ch_axis", -1)
        self.is_dynamic = False
        self.register_buffer("learning_enabled", torch.tensor([0], dtype=torch.uint8))
        self._qparams_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # of the statistics so far
        self.zero_point_dtype = torch.int64  # of the learned qparams; set from the observer's when learning starts
        self.fake_quant_was_enabled = False
        self.disable_fake_quant()  # calibration sees floating-point activations, as with prepare_pt2e

    @classmethod
    def around(cls, observer: torch.nn.Module) -> "_DiffusionFakeQuantize":
        """A FakeQuantize whose statistics are `observer` (calibrated: its ranges are kept), observing off and
        fake quantization on at the observer's qparams, so the forward is the converted graph's q/dq. This is
        how a `prepare_pt2e` graph's observers learn (`diffusion_ao.methods.learning.wrap_observers`)."""
        if not isinstance(observer, cls.observer_type):
            raise TypeError(f"{cls.__name__}.around needs a {cls.observer_type.__name__}, got "
                            f"{type(observer).__name__}.")
        fq = cls(observer)
        fq.disable_observer()
        fq.enable_fake_quant()
        return fq

    @torch.jit.export
    def enable_fake_quant(self, enabled: bool = True) -> None:
        super().enable_fake_quant(enabled)
        self.fake_quant_was_enabled = self.fake_quant_was_enabled or enabled

    @property
    def label(self) -> str:
        return self.activation_post_process.label

    @label.setter
    def label(self, value: str) -> None:
        self.activation_post_process.label = value

    @property
    def learning(self) -> bool:
        return bool(self.learning_enabled[0])

    def _observe(self, x: torch.Tensor) -> None:
        if self.observer_enabled[0]:
            self.activation_post_process(x.detach())
            self._qparams_cache = None

    def _statistics_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._qparams_cache is None:
            self._qparams_cache = self.activation_post_process.calculate_qparams()
        return self._qparams_cache

    def _require_convertible(self, what: str) -> None:
        if not self.fake_quant_was_enabled:
            raise RuntimeError(f"{what}: the FakeQuantize of {self.label} never had fake quantization on, so "
                               "whatever trained this graph saw no quantization. Call "
                               "`diffusion_ao.methods.qat.enable_learning(prepared)` before training (or prepare with "
                               "`prepare_pt2e` for post-training quantization).")
        if self.learning:
            raise RuntimeError(f"{what}: the FakeQuantize of {self.label} is still learning. Call "
                               "`diffusion_ao.methods.learning.finish_training(prepared)` (it fixes the learned steps and hardens "
                               "the rounding) before `convert_pt2e`.")

    def learned_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters range learning created (empty if it never started): LSQ's step, AdaRound's rounding
        or the weight step."""
        return list(self.parameters())

    def parameters_to_learn(self) -> list[torch.nn.Parameter]:
        """The parameters `enable_range_learning` made trainable."""
        return [p for p in self.parameters() if p.requires_grad]


class TimestepFakeQuantize(_DiffusionFakeQuantize):
    """Per-tensor activation FakeQuantize: per-timestep statistics, then an LSQ step size.

    Args:
        observer: the statistics (default `TimestepActivationObserver`).
        **observer_kwargs: passed to it (dtype, qscheme, quant_min, quant_max, method, aggregation, ...).

    Example:
        >>> fq = TimestepFakeQuantize(quant_min=0, quant_max=255, method="minmax")
        >>> with timestep_context(500.0):
        ...     y = fq(x)                 # observes x; fake quantization starts off, so y is x
        >>> fq.enable_range_learning()    # fake quantization on, the step a parameter (`fq.lsq.scale`)
    """

    observer_type = TimestepActivationObserver

    def __init__(self, observer: Union[type, torch.nn.Module] = TimestepActivationObserver,
                 **observer_kwargs) -> None:
        super().__init__(observer, **observer_kwargs)
        self.lsq: Optional[LSQActivationQuantizer] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._observe(x)
        if not self.fake_quant_enabled[0]:
            return x
        if self.lsq is not None:
            return self.lsq(x)
        scale, zero_point = self._statistics_qparams()
        return fake_quantize_ste(x, scale, zero_point.float(), self.quant_min, self.quant_max)

    def enable_range_learning(self) -> None:
        """Makes the step size a parameter, starting at the statistics' step; stops observing."""
        if self.lsq is None:
            scale, zero_point = self._statistics_qparams()
            self.zero_point_dtype = zero_point.dtype  # convert stores what the observer would have returned
            self.lsq = LSQActivationQuantizer(scale, zero_point, self.quant_min, self.quant_max, learn=True)
        self.lsq.scale.requires_grad_(True)
        self.disable_observer()
        self.enable_fake_quant()
        self.learning_enabled[0] = 1

    def disable_range_learning(self) -> None:
        """Fixes the learned step (no gradient); `calculate_qparams` returns it."""
        if self.lsq is not None:
            self.lsq.scale.requires_grad_(False)
        self.learning_enabled[0] = 0

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_convertible("calculate_qparams")
        if self.lsq is None:
            return self.activation_post_process.calculate_qparams()
        scale = self.lsq.scale.detach().abs().clamp_min(MIN_STEP).reshape(())
        return scale.clone(), self.lsq.zero_point.detach().round().to(self.zero_point_dtype).reshape(())

    def extra_repr(self) -> str:
        state = "learned step" if self.lsq is not None else "statistics"
        return f"range=({self.quant_min}, {self.quant_max}), qparams from {state}, learning={self.learning}"


class WeightFakeQuantize(_DiffusionFakeQuantize):
    """Weight FakeQuantize: the weight observer's per-channel range, then a learnable per-channel step (LSQ) or
    AdaRound's learnable rounding on that range.

    Args:
        observer: the range (default `WeightObserver`).
        **observer_kwargs: passed to it (dtype, qscheme, quant_min, quant_max, ch_axis, method, ...).

    Example:
        >>> fq = WeightFakeQuantize(quant_min=-8, quant_max=7, method="mse")
        >>> fq(weight)                                  # observes it (fake quantization starts off)
        >>> fq.enable_range_learning(adaround=True)   # learns up/down per weight (`fq.adaround.alpha`)
    """

    observer_type = WeightObserver

    def __init__(self, observer: Union[type, torch.nn.Module] = WeightObserver, **observer_kwargs) -> None:
        super().__init__(observer, **observer_kwargs)
        self.adaround: Optional[AdaRoundWeightQuantizer] = None
        self.step: Optional[torch.nn.Parameter] = None  # per-channel LSQ step, shaped like the broadcast scale
        self.register_buffer("step_zero_point", None)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self._observe(w)
        if not self.fake_quant_enabled[0]:
            return w
        if self.adaround is not None:
            if self.learning and w.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(f"AdaRound learns the rounding of fixed weights, but {self.label} is being "
                                   "trained: freeze the weights or learn the weight steps instead "
                                   "(`enable_range_learning(adaround=False)`).")
            return self.adaround(w)
        if self.step is not None:
            step = self.step.abs().clamp_min(MIN_STEP)
            if self.step.requires_grad and torch.is_grad_enabled():
                per_channel = w.numel() // max(1, self.step.numel())
                step = scale_gradient(step, 1.0 / math.sqrt(per_channel * self.quant_max))
            return fake_quantize_ste(w, step, self.step_zero_point, self.quant_min, self.quant_max)
        scale, zero_point = self._statistics_qparams()
        return fake_quantize_ste(w, scale, zero_point, self.quant_min, self.quant_max)

    def _statistics_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._qparams_cache is None:  # shaped to broadcast against the weight
            self._qparams_cache = self.activation_post_process.broadcast_qparams()
        return self._qparams_cache

    def enable_range_learning(self, adaround: bool = True, weight: Optional[torch.Tensor] = None) -> None:
        """Makes the rounding (AdaRound, on the observer's grid) or the per-channel step (LSQ) a parameter,
        starting at round-to-nearest on the observer's range; stops observing.

        Args:
            adaround: learn the rounding rather than the step.
            weight: the weight whose rounding AdaRound learns, when a pass replaced the constant after the
                observer saw it (GPTQ's rounded weights); default: the weight the observer saw (one forward).
        """
        obs = self.activation_post_process
        if obs.weight is None and weight is None:
            raise RuntimeError(f"The FakeQuantize of {self.label} never saw its weight: run the prepared graph once "
                               "(e.g. `calibrate(prepared, data)`) before enabling learning.")
        if self.adaround is None and self.step is None:
            scale, zero_point = obs.calculate_qparams()
            self.zero_point_dtype = zero_point.dtype  # convert stores what the observer would have returned
            if adaround:
                weight = obs.weight if weight is None else weight.detach()
                self.adaround = AdaRoundWeightQuantizer(weight, scale, zero_point, self.quant_min,
                                                        self.quant_max, obs.ch_axis if obs.per_channel else 0)
            else:
                b_scale, b_zero_point = obs.broadcast_qparams()
                self.step = torch.nn.Parameter(b_scale.detach().clone().float())
                self.step_zero_point = b_zero_point.detach().clone()
        if self.adaround is not None:
            self.adaround.soft = True
            self.adaround.alpha.requires_grad_(True)
        else:
            self.step.requires_grad_(True)
        self.disable_observer()
        self.enable_fake_quant()
        self.learning_enabled[0] = 1

    def disable_range_learning(self) -> None:
        """Fixes what was learned: AdaRound's rounding becomes hard, the step gets no gradient."""
        if self.adaround is not None:
            self.adaround.soft = False
            self.adaround.alpha.requires_grad_(False)
        if self.step is not None:
            self.step.requires_grad_(False)
        self.learning_enabled[0] = 0

    def rounding_regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser (mean of 1 - |2h - 1|^beta); 0 without AdaRound."""
        if self.adaround is None:
            return torch.zeros(())
        return round_regularizer(self.adaround.alpha, beta)

    def hardened_weight(self) -> Optional[torch.Tensor]:
        """With AdaRound, the weight on the learned grid points (scale * (hard codes - zero point)), which
        `convert_pt2e` quantizes back to exactly those codes; None without AdaRound (the weight is unchanged)."""
        return None if self.adaround is None else self.adaround.baked_weight()

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_convertible("calculate_qparams")
        obs = self.activation_post_process
        if self.adaround is not None:
            scale, zero_point = self.adaround.scale, self.adaround.zero_point
        elif self.step is not None:
            scale, zero_point = self.step.detach().abs().clamp_min(MIN_STEP), self.step_zero_point
        else:
            return obs.calculate_qparams()
        shape = () if not obs.per_channel else (-1,)
        return scale.reshape(shape).clone(), zero_point.reshape(shape).round().to(self.zero_point_dtype)

    def extra_repr(self) -> str:
        state = "AdaRound" if self.adaround is not None else "learned step" if self.step is not None else "observer"
        return f"range=({self.quant_min}, {self.quant_max}), {state}, learning={self.learning}"
