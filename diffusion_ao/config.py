"""`QuantConfig`: what to quantize, to how many bits, and with which observers.

Every scope choice that the seed papers make silently (METHODS.md §1) is an explicit field here, so two
results are only compared when their scopes are printed next to them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

WEIGHT_BITS = range(2, 9)
ACT_BITS = range(4, 9)
OBSERVERS = ("minmax", "mse")
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
ACT_SCHEMES = ("affine", "symmetric")
TIMESTEP_AGGREGATIONS = ("global", "weighted")


def _check_bits(name: str, value: Optional[int], allowed: range, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        extra = " or None (weight-only)" if allow_none else ""
        raise ValueError(f"{name}={value!r} is not supported: use an int in {allowed.start}..{allowed.stop - 1}{extra}.")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported: choose one of {', '.join(map(repr, allowed))}.")


def _check_seed(owner: str, seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{owner}.seed={seed!r}: use an int >= 0.")


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


PTS_SELECTIONS = ("vote", "mse")
LES_INITS = ("ones", "smoothquant")


@dataclass(frozen=True)
class DMQConfig:
    """DMQ's calibration-time pieces (METHODS.md §3–§5), applied by `quantize_unet` in the order LES, PTS,
    calibration, timestep weighting.

    Args:
        les: learned equivalent scaling of every quantized layer's input channels, folded into the graph.
        les_init: "ones" (DMQ) or "smoothquant" (s = max|x|^alpha / max|W|^(1-alpha)).
        les_alpha: SmoothQuant's alpha for `les_init="smoothquant"`.
        les_iterations: Adam steps per layer (DMQ: ~6k on a GPU; the default fits a CPU budget).
        les_lr: learning rate on log(s).
        les_samples_per_step: calibration trajectories per timestep whose layer inputs LES learns from.
        les_min_gain: a layer keeps s = 1 unless LES lowers its expected quantization error (the smooth loss it
            learns on, `dmq.les.learn_scales`) by this fraction.
        les_max_capture_mib: memory for captured layer inputs; layers are learned in groups that fit.
        timestep_weighting: adapt per-timestep weights lambda_t = (1 - L_t / sum L)^r of the activation ranges
            (needs `timestep_aggregation="weighted"`).
        weighting_r: r of the weights (DMQ: 20; 0 is uniform).
        weighting_ema: EMA factor of the per-timestep losses (DMQ: 0.95).
        weighting_iterations: convert / measure / reweight rounds.
        pts: power-of-two scaling of the input channels of layers whose channel spread reaches `pts_min_spread`.
        pts_selection: "vote" (per-sample MSE choice, then a vote with threshold kappa) or "mse" (lowest MSE
            summed over all samples).
        pts_max_k: factors are 2^-k for k in 0..pts_max_k.
        pts_kappa: share of votes a k needs to be used (else k = 0).
        pts_min_spread: max / median of the per-channel |x| max at which a layer input gets PTS. 2 by default:
            the shipped digits model has no input above 3.9 (its skip concats reach 2.6), far below the outlier
            channels of large latent diffusion models; the vote itself keeps k = 0 wherever the folded factor
            costs more (weight rounding) than it gains (activation step).
        seed: seeds LES's minibatch draws.
    """

    les: bool = True
    les_init: Literal["ones", "smoothquant"] = "ones"
    les_alpha: float = 0.5
    les_iterations: int = 200
    les_lr: float = 1e-2
    les_samples_per_step: int = 8
    les_min_gain: float = 0.01
    les_max_capture_mib: int = 1024
    timestep_weighting: bool = True
    weighting_r: float = 20.0
    weighting_ema: float = 0.95
    weighting_iterations: int = 3
    pts: bool = True
    pts_selection: Literal["vote", "mse"] = "vote"
    pts_max_k: int = 3
    pts_kappa: float = 0.85
    pts_min_spread: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_seed("DMQConfig", self.seed)
        _check_choice("pts_selection", self.pts_selection, PTS_SELECTIONS)
        _check_choice("les_init", self.les_init, LES_INITS)
        if (not 0 <= self.les_alpha <= 1 or self.les_iterations < 0 or self.les_lr <= 0
                or self.les_samples_per_step < 1 or not 0 <= self.les_min_gain < 1 or self.les_max_capture_mib < 1):
            raise ValueError("les_alpha must be in [0, 1], les_iterations >= 0, les_lr > 0, les_samples_per_step "
                             f">= 1, les_min_gain in [0, 1) and les_max_capture_mib >= 1; got {self.les_alpha}, "
                             f"{self.les_iterations}, {self.les_lr}, {self.les_samples_per_step}, "
                             f"{self.les_min_gain}, {self.les_max_capture_mib}.")
        if self.weighting_r < 0 or not 0 <= self.weighting_ema < 1 or self.weighting_iterations < 0:
            raise ValueError("weighting_r must be >= 0, weighting_ema in [0, 1) and weighting_iterations >= 0; got "
                             f"{self.weighting_r}, {self.weighting_ema}, {self.weighting_iterations}.")
        if not 0 <= self.pts_max_k <= 7 or not 0 < self.pts_kappa <= 1 or self.pts_min_spread < 1:
            raise ValueError("pts_max_k must be in 0..7, pts_kappa in (0, 1] and pts_min_spread >= 1; got "
                             f"{self.pts_max_k}, {self.pts_kappa}, {self.pts_min_spread}.")


TFMQ_CACHE = ("none", "all", "select")
TFMQ_FSC = ("none", "temporal", "all")


@dataclass(frozen=True)
class TFMQConfig:
    """TFMQ-DM's pieces (METHODS.md §3, §8), applied by `quantize_unet`. The finite set of timesteps is the
    calibration data's (`CalibrationData.timesteps`): sample with the same scheduler and step count.

    Args:
        cache: temporal features to precompute in FP for the finite set and look up at run time:
            "all" (the whole time-embedding computation is removed: the TIB stays exactly FP), "select"
            (disturbance-aware: cache the features whose quantization error exceeds `max_feature_error`,
            worst first, within `cache_budget_bytes`) or "none".
        fsc: finite-set calibration, one activation range per timestep: "temporal" (activations that depend on
            the timestep and not on the sample: the TIB linears' inputs; int8 kernels), "all" (every activation;
            conv inputs then run simulated, see passes/finite_set.py) or "none".
        cache_budget_bytes: the most bytes of `[T, C]` cache buffers "select" may use, or of the `[L * T, C]`
            buffers of a label cache (None: no limit).
        cache_class_labels: with cache="all" on a class-conditional denoiser whose modulation reads the label
            (DiT's adaLN-Zero), cache what depends on the timestep and / or the label for every (timestep, label)
            pair of the calibration data: the whole modulation leaves the graph, and only those labels can be
            generated afterwards. Capture the calibration data with every label you will use.
        max_feature_error: relative MSE (over the finite set) below which "select" keeps a feature quantized.
        tiar: reconstruct the quantized TIB's temporal features jointly (TIAR: AdaRound + LSQ on the whole time
            path as one block, `diffusion_ao.tfmq.tiar`), before finite-set calibration and selection.
        tiar_iterations: TIAR's optimisation steps.
        seed: seeds TIAR's sample choice and minibatches.
    """

    cache: Literal["none", "all", "select"] = "select"
    fsc: Literal["none", "temporal", "all"] = "temporal"
    cache_budget_bytes: Optional[int] = None
    cache_class_labels: bool = False
    max_feature_error: float = 1e-3
    tiar: bool = False
    tiar_iterations: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        _check_seed("TFMQConfig", self.seed)
        _check_choice("cache", self.cache, TFMQ_CACHE)
        _check_choice("fsc", self.fsc, TFMQ_FSC)
        if self.cache_budget_bytes is not None and (isinstance(self.cache_budget_bytes, bool) or not isinstance(
                self.cache_budget_bytes, int) or self.cache_budget_bytes < 0):
            raise ValueError(f"cache_budget_bytes must be an int >= 0 or None, got {self.cache_budget_bytes!r}.")
        if not self.max_feature_error >= 0:
            raise ValueError(f"max_feature_error must be >= 0, got {self.max_feature_error!r}.")
        if self.cache_class_labels and self.cache != "all":
            raise ValueError("cache_class_labels=True caches whole (timestep, label) features: it needs cache='all' "
                             f"(got cache={self.cache!r}); disturbance-aware selection works per timestep only.")
        if self.cache_budget_bytes is not None and self.cache != "select" and not self.cache_class_labels:
            raise ValueError("cache_budget_bytes only applies to cache='select' or to cache_class_labels=True.")
        if isinstance(self.tiar_iterations, bool) or not isinstance(self.tiar_iterations, int) or self.tiar_iterations < 0:
            raise ValueError(f"tiar_iterations must be an int >= 0, got {self.tiar_iterations!r}.")


@dataclass(frozen=True)
class ReconstructionConfig:
    """Q-Diffusion's block reconstruction (BRECQ/AdaRound + LSQ, METHODS.md §7) and its budget.

    Args:
        iterations: optimisation steps per block (Q-Diffusion: 20k; 0 keeps round-to-nearest and the observers'
            ranges, exactly the plain path).
        batch_size: samples per step.
        weight_lr: Adam learning rate of the AdaRound variables.
        act_lr: Adam learning rate of the LSQ activation step sizes.
        learn_act_scales: learn the activation step sizes (LSQ) of each block's activation quantizers.
        round_weight: weight of the AdaRound regulariser against the block's relative output error.
        beta_start, beta_end: the regulariser's exponent, annealed linearly after the warm-up.
        warmup: fraction of the iterations without the regulariser.
        max_samples: cap on the calibration samples cached per block (inputs and FP outputs; one block at a
            time), drawn evenly over the timesteps.
        early_stop_patience: stop a block after this many checks (every 10% of the iterations, after the
            warm-up) without a 1% improvement of the reconstruction loss; 0 disables.
        seed: seeds the sample choice and minibatches (deterministic for a fixed seed).
        use_timestep_weights: weight the loss per timestep with the recipe's timestep weights (DMQ's adaptive
            weights when `QuantConfig.dmq` computes them), else uniformly.

    Example:
        >>> ReconstructionConfig(iterations=200, batch_size=16)
    """

    iterations: int = 200
    batch_size: int = 16
    weight_lr: float = 1e-3
    act_lr: float = 4e-4
    learn_act_scales: bool = True
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    max_samples: int = 256
    early_stop_patience: int = 0
    seed: int = 0
    use_timestep_weights: bool = True

    def __post_init__(self) -> None:
        ints = dict(iterations=self.iterations, batch_size=self.batch_size, max_samples=self.max_samples,
                    early_stop_patience=self.early_stop_patience, seed=self.seed)
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ReconstructionConfig.{name}={value!r}: use an int >= 0.")
        if self.batch_size < 1 or self.max_samples < 1:
            raise ValueError(f"ReconstructionConfig: batch_size and max_samples must be >= 1, got "
                             f"{self.batch_size}, {self.max_samples}.")
        if self.weight_lr <= 0 or self.act_lr <= 0 or self.round_weight < 0:
            raise ValueError("ReconstructionConfig: weight_lr and act_lr must be > 0 and round_weight >= 0; got "
                             f"{self.weight_lr}, {self.act_lr}, {self.round_weight}.")
        if not 0 < self.beta_end <= self.beta_start or not 0 <= self.warmup < 1:
            raise ValueError("ReconstructionConfig: need 0 < beta_end <= beta_start and warmup in [0, 1); got "
                             f"beta {self.beta_start} -> {self.beta_end}, warmup {self.warmup}.")


@dataclass(frozen=True)
class QDiffConfig:
    """Q-Diffusion's pieces (METHODS.md §6, §7), applied by `DiffusionQuantizer` and `quantize_unet`.

    Args:
        split_shortcut: give each input of a conv on a channel concat (the UpBlock ResBlocks' `conv_shortcut` on
            `cat([h, skip])`) its own activation quantizer, by splitting the conv in the annotation phase.
        reconstruction: block reconstruction settings and budget, or None to skip it.

    Example:
        >>> QuantConfig.preset("w4a8").replace(qdiff=QDiffConfig(reconstruction=ReconstructionConfig()))
    """

    split_shortcut: bool = True
    reconstruction: Optional[ReconstructionConfig] = None

    def __post_init__(self) -> None:
        if not isinstance(self.split_shortcut, bool):
            raise ValueError(f"QDiffConfig.split_shortcut must be a bool, got {self.split_shortcut!r}.")
        if self.reconstruction is not None and not isinstance(self.reconstruction, ReconstructionConfig):
            raise ValueError("QDiffConfig.reconstruction must be a ReconstructionConfig or None, got "
                             f"{type(self.reconstruction).__name__}.")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's Hessian-aware rounding of the quantized weights (`diffusion_ao.gptq`), after calibration and
    before block reconstruction (which then starts from GPTQ's codes).

    Args:
        damp: added to H's diagonal, as a fraction of its mean diagonal (GPTQ: 0.01); keeps the inverse stable
            for inputs that are (nearly) linearly dependent.
        block_size: columns rounded together before their error is applied to the rest (a speed setting; the
            result does not depend on it up to float rounding).
        act_order: round the columns with the largest input energy first (GPTQ's "act-order"): they carry the
            most output error, and the later columns can absorb it.
        samples_per_step: calibration trajectories per timestep whose layer inputs form H.
        use_timestep_weights: weight each timestep's H by the adaptive timestep weights when the recipe learned
            them (DMQ's timestep weighting); else every timestep counts the same.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    samples_per_step: int = 16
    use_timestep_weights: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"GPTQConfig.damp={self.damp}: use a small positive fraction such as 0.01.")
        if self.block_size < 1 or self.samples_per_step < 1:
            raise ValueError(f"GPTQConfig: block_size ({self.block_size}) and samples_per_step "
                             f"({self.samples_per_step}) must be >= 1.")


@dataclass(frozen=True)
class OutputCorrectionConfig:
    """Per-timestep correction of the quantized denoiser's output (`diffusion_ao.output_correction`): the gain and
    bias of each output channel's prediction, estimated on the calibration data and divided out in the graph.

    Args:
        gain: correct the per-(timestep, channel) gain of the prediction (its correlated error).
        bias: correct the per-(timestep, channel) offset of the prediction.
        samples_per_step: calibration samples per timestep the estimate uses (None: all of them).
    """

    gain: bool = True
    bias: bool = True
    samples_per_step: Optional[int] = None

    def __post_init__(self) -> None:
        if not (self.gain or self.bias):
            raise ValueError("OutputCorrectionConfig: set gain or bias (or use output_correction=None).")
        if self.samples_per_step is not None and self.samples_per_step < 1:
            raise ValueError(f"OutputCorrectionConfig.samples_per_step={self.samples_per_step} must be >= 1 or None.")


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Sensitivity-driven mixed precision (`diffusion_ao.mixed_precision`): the layers whose low-bit weights hurt
    the prediction most get `weight_bits`, within a size budget.

    Args:
        size_budget: the packed model's size as a fraction of FP32's (e.g. 0.17; all-4-bit weights are ~0.14).
        weight_bits: the width of the promoted layers' weights.
        samples_per_step: calibration samples per timestep that measure each layer's sensitivity.
    """

    size_budget: float = 0.17
    weight_bits: int = 8
    samples_per_step: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.size_budget <= 1:
            raise ValueError(f"MixedPrecisionConfig.size_budget={self.size_budget}: a fraction of the FP32 size in "
                             "(0, 1], e.g. 0.17.")
        _check_bits("MixedPrecisionConfig.weight_bits", self.weight_bits, range(2, 9), allow_none=False)
        if self.samples_per_step < 1:
            raise ValueError(f"MixedPrecisionConfig.samples_per_step={self.samples_per_step} must be >= 1.")


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
        quantize_attention_matmuls: quantize the inputs of the attention matmuls (Q, K, V). No CPU integer
            kernel exists for these: they run as simulated q/dq around a floating-point attention.
        quantize_skip_convs: quantize the 1x1 convs on ResBlock shortcuts.
        reduce_range: "auto" picks a 7-bit activation range when 8-bit weights run on a CPU without VNNI
            (the AVX2 int8 kernels overflow otherwise); True / False force it.
        module_name_overrides: module path (as in `unet.named_modules()`, prefix match) -> `LayerQuant`, or
            None to keep that module in floating point. Longest matching prefix wins.
        module_type_overrides: module class (e.g. `torch.nn.Linear`) -> `LayerQuant` or None.
        dmq: DMQ's calibration pieces (`DMQConfig`), or None; `quantize_unet` applies them.
        tfmq: TFMQ-DM's pieces (`TFMQConfig`: temporal-feature cache, finite-set calibration), or None.
        qdiff: Q-Diffusion's pieces (`QDiffConfig`: shortcut splitting, block reconstruction), or None.
        gptq: round the weights with GPTQ on the calibration inputs (`GPTQConfig`) instead of to nearest, or None.
        output_correction: correct the output's per-timestep gain and bias (`OutputCorrectionConfig`), or None.
            The quantized denoiser then accepts only the calibration data's timesteps.
        mixed_precision: promote the most sensitive layers' weights within a size budget
            (`MixedPrecisionConfig`), or None. Explicit `module_name_overrides` win over its plan.
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
    output_correction: Optional[OutputCorrectionConfig] = None
    mixed_precision: Optional[MixedPrecisionConfig] = None
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
        for key, value in self.module_name_overrides.items():
            if not isinstance(key, str):
                raise ValueError(f"module_name_overrides keys must be module paths (str), got {key!r}.")
            if value is not None and not isinstance(value, LayerQuant):
                raise ValueError(f"module_name_overrides[{key!r}] must be a LayerQuant or None, got {value!r}.")
        for key, value in self.module_type_overrides.items():
            if not (isinstance(key, type) and issubclass(key, torch.nn.Module)):
                raise ValueError(f"module_type_overrides keys must be nn.Module classes, got {key!r}.")
            if value is not None and not isinstance(value, LayerQuant):
                raise ValueError(f"module_type_overrides[{key!r}] must be a LayerQuant or None, got {value!r}.")
        if self.dmq is not None and not isinstance(self.dmq, DMQConfig):
            raise ValueError(f"dmq must be a DMQConfig or None, got {type(self.dmq).__name__}.")
        if self.dmq is not None and self.act_bits is None and (self.dmq.pts or self.dmq.les):
            raise ValueError("dmq.pts and dmq.les scale activations: they need act_bits (or DMQConfig(pts=False, "
                             "les=False)).")
        if self.tfmq is not None:
            if not isinstance(self.tfmq, TFMQConfig):
                raise ValueError(f"tfmq must be a TFMQConfig or None, got {type(self.tfmq).__name__}.")
            if self.tfmq.fsc != "none" and self.act_bits is None:
                raise ValueError("tfmq.fsc sets activation ranges: it needs act_bits (or TFMQConfig(fsc='none')).")
            if self.tfmq.cache == "select" and not self.quantize_time_embedding:
                raise ValueError("TFMQConfig(cache='select') chooses between caching and quantizing the time "
                                 "path, which quantize_time_embedding=False keeps in FP: use cache='all'.")
        if self.qdiff is not None and not isinstance(self.qdiff, QDiffConfig):
            raise ValueError(f"qdiff must be a QDiffConfig or None, got {type(self.qdiff).__name__}.")
        if self.gptq is not None and not isinstance(self.gptq, GPTQConfig):
            raise ValueError(f"gptq must be a GPTQConfig or None, got {type(self.gptq).__name__}.")
        if self.mixed_precision is not None:
            if not isinstance(self.mixed_precision, MixedPrecisionConfig):
                raise ValueError("mixed_precision must be a MixedPrecisionConfig or None, got "
                                 f"{type(self.mixed_precision).__name__}.")
            if self.mixed_precision.weight_bits <= self.weight_bits:
                raise ValueError(f"MixedPrecisionConfig.weight_bits={self.mixed_precision.weight_bits} must be above "
                                 f"the config's weight_bits={self.weight_bits}.")
        if self.output_correction is not None and not isinstance(self.output_correction, OutputCorrectionConfig):
            raise ValueError("output_correction must be an OutputCorrectionConfig or None, got "
                             f"{type(self.output_correction).__name__}.")

    @property
    def default_layer(self) -> LayerQuant:
        return LayerQuant(self.weight_bits, self.act_bits)

    @property
    def scope(self) -> str:
        """A short, printable summary of what is quantized (METHODS.md §1)."""
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
        reconstruction's samples and minibatches). Calibration data has its own seed
        (`collect_calibration_data(seed=...)`).

        Example:
            >>> QuantConfig.preset("dmq-w4a8").with_seed(2).dmq.seed
            2
        """
        changes = {}
        if self.dmq is not None:
            changes["dmq"] = dataclasses.replace(self.dmq, seed=seed)
        if self.tfmq is not None:
            changes["tfmq"] = dataclasses.replace(self.tfmq, seed=seed)
        if self.qdiff is not None and self.qdiff.reconstruction is not None:
            changes["qdiff"] = dataclasses.replace(
                self.qdiff, reconstruction=dataclasses.replace(self.qdiff.reconstruction, seed=seed))
        return self.replace(**changes)

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
# The three *-scope presets reproduce each seed paper's scope at W4A8 (METHODS.md §1).
PRESETS: dict[str, dict] = {
    "w8a8": dict(weight_bits=8, act_bits=8),
    "w4a8": dict(weight_bits=4, act_bits=8, weight_observer="mse"),
    "w4a6": dict(weight_bits=4, act_bits=6, weight_observer="mse"),
    "w8a32": dict(weight_bits=8, act_bits=None),
    "w4a32": dict(weight_bits=4, act_bits=None, weight_observer="mse"),
    "qdiff-scope": dict(weight_bits=4, act_bits=8, weight_observer="mse", quantize_first_last=True,
                        quantize_time_embedding=True, quantize_skip_convs=True, quantize_attention_matmuls=True),
    # TFMQ-DM's scope (METHODS.md §1): the TIB is FP, here by caching it for the calibration timesteps.
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
    # The recommended recipe per width (README, "best-*"; each piece measured in `bench/run.py --ablation best`):
    # GPTQ rounding on the min-max weight grid, TFMQ-DM's cache of the temporal features, DMQ's adaptive timestep
    # weights (no LES / PTS), the most sensitive layers' weights at 8 bits within 0.17 x the FP32 size, and
    # Q-Diffusion's block reconstruction from GPTQ's codes (no shortcut split).
    "best-w4a8": dict(weight_bits=4, act_bits=8, weight_observer="minmax", gptq=GPTQConfig(),
                      tfmq=TFMQConfig(cache="all", fsc="none"), dmq=DMQConfig(les=False, pts=False),
                      mixed_precision=MixedPrecisionConfig(),
                      qdiff=QDiffConfig(split_shortcut=False, reconstruction=ReconstructionConfig())),
    "best-w4a6": dict(weight_bits=4, act_bits=6, weight_observer="minmax", gptq=GPTQConfig(),
                      tfmq=TFMQConfig(cache="all", fsc="none"), dmq=DMQConfig(les=False, pts=False),
                      mixed_precision=MixedPrecisionConfig(),
                      qdiff=QDiffConfig(split_shortcut=False, reconstruction=ReconstructionConfig())),
}
