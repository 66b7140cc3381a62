"""`QuantConfig`: what to quantize, to how many bits, and with which observers.

Every scope choice that the seed papers make silently (docs/methods.md#scopes) is an explicit field here, so two
results are only compared when their scopes are printed next to them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from diffusion_ao.method_configs import (  # noqa: F401
    DMQConfig,
    FinetuneConfig,
    GPTQConfig,
    LowRankConfig,
    MixedPrecisionConfig,
    OutputCorrectionConfig,
    QDiffConfig,
    ReconstructionConfig,
    TFMQConfig,
    TimeGroupConfig,
    _check_bits,
    _check_choice,
)

# The method sub-configs of `QuantConfig`, by field: each is None (off) or an instance of its class.
METHOD_CONFIGS = {"dmq": DMQConfig, "tfmq": TFMQConfig, "qdiff": QDiffConfig, "gptq": GPTQConfig,
                  "low_rank": LowRankConfig, "output_correction": OutputCorrectionConfig,
                  "mixed_precision": MixedPrecisionConfig, "time_groups": TimeGroupConfig,
                  "finetune": FinetuneConfig}
WEIGHT_BITS = range(2, 9)
ACT_BITS = range(4, 9)
OBSERVERS = ("minmax", "mse")
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
ACT_SCHEMES = ("affine", "symmetric")
TIMESTEP_AGGREGATIONS = ("global", "weighted")


def _reseeded(config, seed: int):
    """`config` with every `seed` field in it set to `seed`, nested method configs (e.g. `QDiffConfig.reconstruction`)
    included: a new method's config with a `seed` field needs no change here."""
    changes = {f.name: seed for f in dataclasses.fields(config) if f.name == "seed"}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = _reseeded(value, seed)
    return dataclasses.replace(config, **changes) if changes else config


@dataclass(frozen=True)
class LayerQuant:
    """Bit widths for one layer, used in `QuantConfig.module_name_overrides` / `module_type_overrides`.

    Args:
        weight_bits: 2..8.
        act_bits: 4..8, or None to keep this layer's input activation in floating point.
    """

    weight_bits: int = 8
    act_bits: Optional[int] = 8

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits, WEIGHT_BITS, allow_none=False)
        _check_bits("act_bits", self.act_bits, ACT_BITS, allow_none=True)


@dataclass(frozen=True)
class QuantConfig:
    """How `DiffusionQuantizer` quantizes a UNet.

    Args:
        weight_bits: bits of conv/linear weights, 2..8 (stored in int8 with a narrowed range below 8).
        act_bits: bits of the activations entering quantized layers, 4..8, or None for weight-only.
        weight_granularity: "per_channel" (symmetric, one scale per output channel) or "per_tensor".
        act_scheme: "affine" (uint8 with a zero point, the CPU kernels' format) or "symmetric".
        act_observer: "minmax" or "mse" (range searched to minimise quantization MSE).
        weight_observer: "minmax" or "mse".
        timestep_aggregation: how per-timestep activation statistics become one range: "global" (the union of
            all ranges, timestep-agnostic) or "weighted" (each timestep's error weighted, uniform by default).
        quantize_first_last: quantize the first conv (on the noisy input) and the last conv (the prediction).
        quantize_time_embedding: quantize the layers that depend on the timestep but not on the sample
            (the time MLP and every ResBlock's time projection; in conditional models also the class/text term
            added to the time embedding). The TIB of TFMQ-DM is the timestep-only part of this set; a cached
            TIB (`tfmq`) is removed from the graph and so is never quantized, whatever this switch says.
        quantize_attention_matmuls: attention in int8: Q, K, V, the softmax probabilities and the output
            (torchao's int8 attention op; an integer kernel on CPUs with AMX, simulated elsewhere, where the
            quantizer warns: docs/methods.md#int8-attention).
        quantize_skip_convs: quantize the 1x1 convs on ResBlock shortcuts.
        reduce_range: "auto" picks a 7-bit activation range when 8-bit weights run on a CPU without VNNI
            (the AVX2 int8 kernels overflow otherwise); True / False force it.
        module_name_overrides: module path (as in `unet.named_modules()`, prefix match) -> `LayerQuant`, or
            None to keep that module in floating point. Longest matching prefix wins.
        module_type_overrides: module class (e.g. `torch.nn.Linear`) -> `LayerQuant` or None; a layer takes the
            first key (in insertion order) it is an instance of, after `module_name_overrides`.
        dmq: DMQ's calibration pieces (`DMQConfig`), or None; `quantize_unet` applies them.
        tfmq: TFMQ-DM's pieces (`TFMQConfig`: temporal-feature cache, finite-set calibration), or None.
        qdiff: Q-Diffusion's pieces (`QDiffConfig`: shortcut splitting, block reconstruction), or None.
        gptq: round the weights with GPTQ on the calibration inputs (`GPTQConfig`) instead of to nearest, or None.
        low_rank: keep a low-rank branch of each low-bit linear's weight beside the quantized residual
            (`LowRankConfig`), or None.
        output_correction: correct the output's per-timestep gain and bias (`OutputCorrectionConfig`), or None.
            The quantized denoiser then accepts only the calibration data's timesteps.
        mixed_precision: promote the most sensitive layers' weights within a size budget
            (`MixedPrecisionConfig`), or None. Explicit `module_name_overrides` win over its plan.
        time_groups: one static activation range per group of consecutive timesteps, each group its own int8
            graph (`TimeGroupConfig`), or None. The quantized denoiser then accepts only the calibration data's
            timesteps.
        finetune: prepare with FakeQuantize modules (`prepare_qat_pt2e`) and train the quantization parameters
            to reproduce the FP model on the calibration trajectories (`FinetuneConfig`, `diffusion_ao.methods.qat`), or
            None. It replaces the PTQ learners that work on observers (GPTQ, block reconstruction, TIAR,
            finite-set calibration, time groups, DMQ's timestep weighting) and composes with the graph passes
            (LES, PTS, TFMQ-DM's cache, mixed precision) and the output correction.
        name: a label for reports; presets set it.

    Example:
        >>> cfg = QuantConfig(weight_bits=4, act_bits=8, module_name_overrides={"mid_block": None})
        >>> QuantConfig.preset("w8a8").act_bits
        8
    """

    weight_bits: int = 8
    act_bits: Optional[int] = 8
    weight_granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    act_scheme: Literal["affine", "symmetric"] = "affine"
    act_observer: Literal["minmax", "mse"] = "mse"
    weight_observer: Literal["minmax", "mse"] = "minmax"
    timestep_aggregation: Literal["global", "weighted"] = "weighted"
    quantize_first_last: bool = False
    quantize_time_embedding: bool = True
    quantize_attention_matmuls: bool = False
    quantize_skip_convs: bool = True
    reduce_range: bool | Literal["auto"] = "auto"
    module_name_overrides: dict[str, Optional[LayerQuant]] = field(default_factory=dict)
    module_type_overrides: dict[type, Optional[LayerQuant]] = field(default_factory=dict)
    dmq: Optional[DMQConfig] = None
    tfmq: Optional[TFMQConfig] = None
    qdiff: Optional[QDiffConfig] = None
    gptq: Optional[GPTQConfig] = None
    low_rank: Optional[LowRankConfig] = None
    output_correction: Optional[OutputCorrectionConfig] = None
    mixed_precision: Optional[MixedPrecisionConfig] = None
    time_groups: Optional[TimeGroupConfig] = None
    finetune: Optional[FinetuneConfig] = None
    name: str = "custom"

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits, WEIGHT_BITS, allow_none=False)
        _check_bits("act_bits", self.act_bits, ACT_BITS, allow_none=True)
        _check_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
        _check_choice("act_scheme", self.act_scheme, ACT_SCHEMES)
        _check_choice("act_observer", self.act_observer, OBSERVERS)
        _check_choice("weight_observer", self.weight_observer, OBSERVERS)
        _check_choice("timestep_aggregation", self.timestep_aggregation, TIMESTEP_AGGREGATIONS)
        if self.reduce_range not in (True, False, "auto"):
            raise ValueError(f"reduce_range={self.reduce_range!r} is not supported: use 'auto', True or False.")
        for name, cls in METHOD_CONFIGS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                article = "an" if cls.__name__[0] in "AEIOU" else "a"
                raise TypeError(f"{name} must be {article} {cls.__name__} or None, got {type(value).__name__}.")
        for key, value in self.module_name_overrides.items():
            if not isinstance(key, str):
                raise TypeError(f"module_name_overrides keys must be module paths (str), got {key!r}.")
            if value is not None and not isinstance(value, LayerQuant):
                raise TypeError(f"module_name_overrides[{key!r}] must be a LayerQuant or None, got {value!r}.")
        if self.module_type_overrides:
            import torch  # here only: the command line reads the presets before it imports torch
        for key, value in self.module_type_overrides.items():
            if not (isinstance(key, type) and issubclass(key, torch.nn.Module)):
                raise TypeError(f"module_type_overrides keys must be nn.Module classes, got {key!r}.")
            if value is not None and not isinstance(value, LayerQuant):
                raise TypeError(f"module_type_overrides[{key!r}] must be a LayerQuant or None, got {value!r}.")
        if self.dmq is not None and self.act_bits is None and (self.dmq.pts or self.dmq.les):
            raise ValueError("dmq.pts and dmq.les scale activations: they need act_bits (or DMQConfig(pts=False, "
                             "les=False)).")
        if self.dmq is not None and self.dmq.timestep_weighting and self.timestep_aggregation == "global" \
                and self.act_bits is not None:
            raise ValueError("DMQConfig(timestep_weighting=True) weights each timestep's activation statistics, "
                             "which timestep_aggregation='global' (one union range) ignores: use "
                             "timestep_aggregation='weighted', or DMQConfig(timestep_weighting=False).")
        if self.tfmq is not None:
            if self.tfmq.fsc != "none" and self.act_bits is None:
                raise ValueError("tfmq.fsc sets activation ranges: it needs act_bits (or TFMQConfig(fsc='none')).")
            if self.tfmq.cache == "select" and not self.quantize_time_embedding:
                raise ValueError("TFMQConfig(cache='select') chooses between caching and quantizing the time "
                                 "path, which quantize_time_embedding=False keeps in FP: use cache='all'.")
        if self.mixed_precision is not None:
            if self.mixed_precision.weight_bits <= self.weight_bits:
                raise ValueError(f"MixedPrecisionConfig.weight_bits={self.mixed_precision.weight_bits} must be above "
                                 f"the config's weight_bits={self.weight_bits}.")
        if self.time_groups is not None:
            if self.act_bits is None:
                raise ValueError("time_groups sets activation ranges: it needs act_bits (or time_groups=None).")
            if self.tfmq is not None and (self.tfmq.fsc != "none" or self.tfmq.cache == "select"):
                raise ValueError("time_groups and TFMQ-DM's finite-set calibration / feature selection both choose "
                                 "activation ranges per timestep: use one (TFMQConfig(cache='all' or 'none', "
                                 "fsc='none') with time_groups).")
        if self.finetune is not None:
            self._check_finetune()

    def _check_finetune(self) -> None:
        clashes = []
        if self.gptq is not None:
            clashes.append("gptq")
        if self.qdiff is not None and self.qdiff.reconstruction is not None and self.qdiff.reconstruction.iterations:
            clashes.append("qdiff.reconstruction")
        if self.tfmq is not None and (self.tfmq.tiar or self.tfmq.fsc != "none" or self.tfmq.cache == "select"):
            clashes.append("tfmq (tiar, fsc or cache='select')")
        if self.time_groups is not None:
            clashes.append("time_groups")
        if self.dmq is not None and self.dmq.timestep_weighting:
            clashes.append("dmq.timestep_weighting")
        if clashes:
            raise ValueError(f"finetune trains the FakeQuantize modules of a prepare_qat_pt2e graph; {', '.join(clashes)} "
                             "work on prepare_pt2e observers and cannot run on it. Drop them (the fine-tune weights "
                             "timesteps itself: FinetuneConfig.weighting_r), or set finetune=None.")

    @property
    def default_layer(self) -> LayerQuant:
        return LayerQuant(self.weight_bits, self.act_bits)

    @property
    def scope(self) -> str:
        """A short, printable summary of what is quantized (docs/methods.md#scopes)."""
        parts = [
            f"first/last:{'Q' if self.quantize_first_last else 'FP'}",
            f"time-emb:{self._time_scope}",
            f"skip-1x1:{'Q' if self.quantize_skip_convs else 'FP'}",
            f"attn-matmul:{'Q' if self.quantize_attention_matmuls else 'FP'}",
        ]
        return " ".join(parts)

    @property
    def _time_scope(self) -> str:
        cache = self.tfmq.cache if self.tfmq is not None else "none"
        if cache == "all":
            return "FP(cached)"
        base = "Q" if self.quantize_time_embedding else "FP"
        return base + ("/cached(select)" if cache == "select" else "")

    def replace(self, **changes) -> "QuantConfig":
        """A copy with some fields changed (and validated again)."""
        return dataclasses.replace(self, **changes)

    def with_seed(self, seed: int) -> "QuantConfig":
        """A copy whose methods all draw their random choices from `seed` (LES minibatches, TIAR's and block
        reconstruction's samples and minibatches, the fine-tune's minibatches). Calibration data has its own seed
        (`collect_calibration_data(seed=...)`).

        Example:
            >>> QuantConfig.preset("dmq-w4a8").with_seed(2).dmq.seed
            2
        """
        return self.replace(**{name: _reseeded(getattr(self, name), seed) for name in METHOD_CONFIGS
                               if getattr(self, name) is not None})

    @classmethod
    def preset(cls, name: str) -> "QuantConfig":
        """A named configuration. See `PRESETS` for the list.

        Args:
            name: e.g. "best-w4a8" / "best-w4a6" (the recommended recipes), "w8a8", "w4a8", "w4a6", "w8a32",
                "w4a32", "qdiff-scope", "tfmq-scope", "dmq-scope", "dmq-w4a8", "tfmq-w4a8", "qdiff-w4a8".
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}.")
        return cls(name=name, **PRESETS[name])


# Bit-width presets keep the project's default scope (first/last layers in FP, everything else quantized).
# The three *-scope presets reproduce each seed paper's scope at W4A8 (docs/methods.md#scopes).
PRESETS: dict[str, dict] = {
    "w8a8": dict(weight_bits=8, act_bits=8),
    "w4a8": dict(weight_bits=4, act_bits=8, weight_observer="mse"),
    "w4a6": dict(weight_bits=4, act_bits=6, weight_observer="mse"),
    "w8a32": dict(weight_bits=8, act_bits=None),
    "w4a32": dict(weight_bits=4, act_bits=None, weight_observer="mse"),
    "qdiff-scope": dict(weight_bits=4, act_bits=8, weight_observer="mse", quantize_first_last=True,
                        quantize_time_embedding=True, quantize_skip_convs=True, quantize_attention_matmuls=True),
    # TFMQ-DM's scope (docs/methods.md#scopes): the TIB is FP, here by caching it for the calibration timesteps.
    "tfmq-scope": dict(weight_bits=4, act_bits=8, weight_observer="mse", quantize_first_last=False,
                       quantize_time_embedding=False, quantize_skip_convs=False, quantize_attention_matmuls=True,
                       tfmq=TFMQConfig(cache="all", fsc="none")),
    "dmq-scope": dict(weight_bits=4, act_bits=8, weight_observer="mse", quantize_first_last=False,
                      quantize_time_embedding=False, quantize_skip_convs=True, quantize_attention_matmuls=False),
    "dmq-w4a8": dict(weight_bits=4, act_bits=8, weight_observer="mse", dmq=DMQConfig()),
    "dmq-w4a6": dict(weight_bits=4, act_bits=6, weight_observer="mse", dmq=DMQConfig()),
    # TFMQ-DM's pieces at the project's default scope: temporal features quantized with finite-set calibration,
    # cached where their error is large (disturbance-aware selection).
    "tfmq-w4a8": dict(weight_bits=4, act_bits=8, weight_observer="mse", tfmq=TFMQConfig(tiar=True)),
    "tfmq-w4a6": dict(weight_bits=4, act_bits=6, weight_observer="mse", tfmq=TFMQConfig(tiar=True)),
    "qdiff-w4a8": dict(weight_bits=4, act_bits=8, weight_observer="mse", quantize_first_last=True,
                       quantize_time_embedding=True, quantize_skip_convs=True, quantize_attention_matmuls=True,
                       qdiff=QDiffConfig(split_shortcut=True, reconstruction=ReconstructionConfig())),
    "qdiff-w4a6": dict(weight_bits=4, act_bits=6, weight_observer="mse", quantize_first_last=True,
                       quantize_time_embedding=True, quantize_skip_convs=True, quantize_attention_matmuls=True,
                       qdiff=QDiffConfig(split_shortcut=True, reconstruction=ReconstructionConfig())),
    # The recommended recipe per width (docs/methods.md#recommended-recipes; each piece is an ablation row of
    # `bench/run.py --ablation best`):
    # GPTQ rounding on the min-max weight grid, TFMQ-DM's cache of the temporal features (of the whole modulation
    # per (timestep, label) where the calibration labels cover the label table: DiT), on UNets DMQ's adaptive
    # timestep weights (no LES / PTS; on the DiT they cost FD 1.43 -> 2.01 over three calibration seeds,
    # bench/published/dit-best-pieces-3seeds), the most sensitive layers' weights at 8 bits within 0.17 x the
    # FP32 size, and the last step. On UNets that is the per-timestep output correction: over three calibration
    # seeds it matched Q-Diffusion's block reconstruction at half the calibration time
    # (bench/published/best-finish-3seeds). On transformers at W4A6 block reconstruction roughly halves the error
    # of the correction over three calibration seeds (bench/published/dit-w4a6-finish-3seeds), so best-w4a6
    # finishes with it there; W4A8 keeps the correction on both (not measured otherwise on the DiT). On
    # transformers a rank-16 low-rank branch beside each 4-bit linear, its down-projection on int8 kernels
    # (bench/published/dit-best-lowrank-3seeds).
    "best-w4a8": dict(weight_bits=4, act_bits=8, weight_observer="minmax", gptq=GPTQConfig(),
                      tfmq=TFMQConfig(cache="all", fsc="none", cache_class_labels="auto"),
                      dmq=DMQConfig(les=False, pts=False, denoisers=("unet",)),
                      mixed_precision=MixedPrecisionConfig(), output_correction=OutputCorrectionConfig(),
                      low_rank=LowRankConfig(rank=16, down_bits=8, denoisers=("transformer",))),
    "best-w4a6": dict(weight_bits=4, act_bits=6, weight_observer="minmax", gptq=GPTQConfig(),
                      tfmq=TFMQConfig(cache="all", fsc="none", cache_class_labels="auto"),
                      dmq=DMQConfig(les=False, pts=False, denoisers=("unet",)),
                      mixed_precision=MixedPrecisionConfig(),
                      qdiff=QDiffConfig(split_shortcut=False,
                                        reconstruction=ReconstructionConfig(denoisers=("transformer",))),
                      output_correction=OutputCorrectionConfig(denoisers=("unet",)),
                      low_rank=LowRankConfig(rank=16, down_bits=8, denoisers=("transformer",))),
}
