"""The method configs that `QuantConfig` composes: one frozen dataclass per method (DMQ, TFMQ-DM, Q-Diffusion,
GPTQ, the low-rank branch, output correction, mixed precision, time-grouped ranges, QAT fine-tune), each validated in `__post_init__`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


def _check_int(name: str, value, minimum: int, maximum: Optional[int] = None, allow_none: bool = False,
               hint: str = "") -> None:
    """The one integer check of the configs: a TypeError for a value that is no int (a bool included), a
    ValueError for an int outside [minimum, maximum]; `hint` says what a special value means."""
    if value is None and allow_none:
        return
    wanted = f"an int in {minimum}..{maximum}" if maximum is not None else f"an int >= {minimum}"
    wanted += " or None" if allow_none else ""
    wanted += f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} is not supported: use {wanted}.")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name}={value!r} is not supported: use {wanted}.")


def _check_bits(name: str, value: Optional[int], allowed: range, allow_none: bool) -> None:
    _check_int(name, value, allowed.start, allowed.stop - 1, allow_none, "weight-only" if allow_none else "")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported: choose one of {', '.join(map(repr, allowed))}.")


def _check_seed(owner: str, seed: int) -> None:
    _check_int(f"{owner}.seed", seed, 0)


def _check_rounding_schedule(owner: str, beta_start: float, beta_end: float, warmup: float) -> None:
    """AdaRound's regulariser schedule (`observers.adaround.annealed_beta`), shared by the learners that use it."""
    if not 0 < beta_end <= beta_start or not 0 <= warmup < 1:
        raise ValueError(f"{owner}: need 0 < beta_end <= beta_start and warmup in [0, 1); got beta {beta_start} -> "
                         f"{beta_end}, warmup {warmup}.")


# The denoiser families a method can be limited to (`ReconstructionConfig.denoisers`, ...): diffusers UNets, and
# diffusion transformers (DiT, PixArt, SD3, Flux). `passes.analysis.denoiser_family` tells a graph's.
DENOISER_FAMILIES = ("unet", "transformer")


def _check_families(owner: str, families: tuple[str, ...]) -> None:
    if not isinstance(families, tuple) or not families or any(f not in DENOISER_FAMILIES for f in families):
        raise ValueError(f"{owner}.denoisers={families!r}: use a non-empty tuple of {DENOISER_FAMILIES}.")


PTS_SELECTIONS = ("vote", "mse")
LES_INITS = ("ones", "smoothquant")


@dataclass(frozen=True)
class DMQConfig:
    """DMQ's calibration-time pieces (docs/methods.md#dmq), applied by `quantize_unet` in the order LES, PTS,
    calibration, timestep weighting.

    Args:
        les: learned equivalent scaling of every quantized layer's input channels, folded into the graph.
        les_init: "ones" (DMQ) or "smoothquant" (s = max|x|^alpha / max|W|^(1-alpha)).
        les_alpha: SmoothQuant's alpha for `les_init="smoothquant"`.
        les_iterations: Adam steps per layer (DMQ: ~6k on a GPU). The default is a CPU budget: more steps
            bought little on the shipped model (`bench/les_iterations.py`; see docs/benchmarks.md).
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
        pts_min_spread: max / median of the per-channel |x| max at which a layer input gets PTS. 2 by default,
            low enough that the widest inputs of the shipped digits model (its skip concats among them) get PTS,
            although their spread is far below the outlier channels of large latent diffusion models; the vote
            itself keeps k = 0 wherever the folded factor costs more (weight rounding) than it gains (activation
            step).
        seed: seeds LES's minibatch draws.
        denoisers: the denoiser families it runs on (`DENOISER_FAMILIES`); on others the recipe skips all of DMQ
            and says so (`QuantizationReport.choices()`).
    """

    les: bool = True
    les_init: Literal["ones", "smoothquant"] = "ones"
    les_alpha: float = 0.5
    les_iterations: int = 100
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
    denoisers: tuple[str, ...] = DENOISER_FAMILIES

    def __post_init__(self) -> None:
        _check_seed("DMQConfig", self.seed)
        _check_families("DMQConfig", self.denoisers)
        _check_choice("pts_selection", self.pts_selection, PTS_SELECTIONS)
        _check_choice("les_init", self.les_init, LES_INITS)
        _check_int("DMQConfig.les_iterations", self.les_iterations, 0)
        _check_int("DMQConfig.les_samples_per_step", self.les_samples_per_step, 1)
        _check_int("DMQConfig.weighting_iterations", self.weighting_iterations, 0)
        _check_int("DMQConfig.pts_max_k", self.pts_max_k, 0, 7)
        if (not 0 <= self.les_alpha <= 1 or self.les_lr <= 0 or not 0 <= self.les_min_gain < 1
                or self.les_max_capture_mib < 1):
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
# The most bytes of (timestep, label) tables cache_class_labels="auto" caches when cache_budget_bytes is None.
AUTO_LABEL_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TFMQConfig:
    """TFMQ-DM's pieces (docs/methods.md#tfmq-dm), applied by `quantize_unet`. The finite set of timesteps is the
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
            generated afterwards. Capture the calibration data with every label you will use. "auto" does so
            only where it restricts nothing: the calibration labels cover every row of the graph's label
            embedding tables (the null label of guidance included) and the tables fit `cache_budget_bytes`
            (`AUTO_LABEL_CACHE_BYTES` when None); elsewhere, an unconditional denoiser included, it caches per
            timestep. `QuantizationReport.tfmq.label_cache` says which it chose and why.
        max_feature_error: relative MSE (over the finite set) below which "select" keeps a feature quantized.
        tiar: reconstruct the quantized TIB's temporal features jointly (TIAR: AdaRound + LSQ on the whole time
            path as one block, `diffusion_ao.methods.tfmq.tiar`), before finite-set calibration and selection.
        tiar_iterations: TIAR's optimisation steps.
        seed: seeds TIAR's sample choice and minibatches.
    """

    cache: Literal["none", "all", "select"] = "select"
    fsc: Literal["none", "temporal", "all"] = "temporal"
    cache_budget_bytes: Optional[int] = None
    cache_class_labels: bool | Literal["auto"] = False
    max_feature_error: float = 1e-3
    tiar: bool = False
    tiar_iterations: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        _check_seed("TFMQConfig", self.seed)
        _check_choice("cache", self.cache, TFMQ_CACHE)
        _check_choice("fsc", self.fsc, TFMQ_FSC)
        _check_int("TFMQConfig.cache_budget_bytes", self.cache_budget_bytes, 0, allow_none=True)
        if not self.max_feature_error >= 0:
            raise ValueError(f"max_feature_error must be >= 0, got {self.max_feature_error!r}.")
        if not isinstance(self.cache_class_labels, bool) and self.cache_class_labels != "auto":
            raise ValueError(f"cache_class_labels must be True, False or 'auto', got {self.cache_class_labels!r}.")
        if self.cache_class_labels and self.cache != "all":
            raise ValueError(f"cache_class_labels={self.cache_class_labels!r} caches whole (timestep, label) features: "
                             f"it needs cache='all' (got cache={self.cache!r}); disturbance-aware selection works "
                             "per timestep only.")
        if self.cache_budget_bytes is not None and self.cache != "select" and not self.cache_class_labels:
            raise ValueError("cache_budget_bytes only applies to cache='select' or to cache_class_labels=True / 'auto'.")
        _check_int("TFMQConfig.tiar_iterations", self.tiar_iterations, 0)


@dataclass(frozen=True)
class ReconstructionConfig:
    """Q-Diffusion's block reconstruction (BRECQ/AdaRound + LSQ, docs/methods.md#block-reconstruction) and its budget.

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
        denoisers: the denoiser families it runs on (`DENOISER_FAMILIES`); on others the recipe skips it and
            says so (`QuantizationReport.choices()`).

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
    denoisers: tuple[str, ...] = DENOISER_FAMILIES

    def __post_init__(self) -> None:
        _check_families("ReconstructionConfig", self.denoisers)
        minimum = dict(iterations=0, batch_size=1, max_samples=1, early_stop_patience=0, seed=0)
        for name, low in minimum.items():
            _check_int(f"ReconstructionConfig.{name}", getattr(self, name), low)
        if self.weight_lr <= 0 or self.act_lr <= 0 or self.round_weight < 0:
            raise ValueError("ReconstructionConfig: weight_lr and act_lr must be > 0 and round_weight >= 0; got "
                             f"{self.weight_lr}, {self.act_lr}, {self.round_weight}.")
        _check_rounding_schedule("ReconstructionConfig", self.beta_start, self.beta_end, self.warmup)


@dataclass(frozen=True)
class QDiffConfig:
    """Q-Diffusion's pieces (docs/methods.md#q-diffusion), applied by `DiffusionQuantizer` and `quantize_unet`.

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
            raise TypeError(f"QDiffConfig.split_shortcut must be a bool, got {self.split_shortcut!r}.")
        if self.reconstruction is not None and not isinstance(self.reconstruction, ReconstructionConfig):
            raise TypeError("QDiffConfig.reconstruction must be a ReconstructionConfig or None, got "
                             f"{type(self.reconstruction).__name__}.")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's Hessian-aware rounding of the quantized weights (`diffusion_ao.methods.gptq`), after calibration and
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
        _check_int("GPTQConfig.block_size", self.block_size, 1)
        _check_int("GPTQConfig.samples_per_step", self.samples_per_step, 1)


@dataclass(frozen=True)
class LowRankConfig:
    """A low-rank branch beside each low-bit linear (SVDQuant's decomposition, `diffusion_ao.methods.low_rank`): the
    weight becomes W = up @ down + R, the branch up @ down taken from the SVD of W scaled by its input's
    per-channel RMS (the directions that carry the most output on the calibration inputs), and only the residual
    R is quantized (to the layer's bits, by GPTQ when `QuantConfig.gptq` is set).

    Args:
        rank: the branch's rank (SVDQuant: 16-32 on models 10x wider than the shipped DiT). Linears with
            min(in, out) <= 2 * rank keep no branch (it would cost as much as the layer).
        down_bits: None keeps the whole branch in floating point (two FP32 matmuls beside the int8 kernel); 8
            runs its down-projection (in -> rank, the one that reads the layer's full input) as an 8-bit linear
            with 8-bit activations on an int8 kernel, even where the layer's activations are narrower, and keeps
            the small up-projection (rank -> out) in floating point (docs/methods.md#low-rank-branch says why
            the up-projection is not offered at 8 bits).
        samples_per_step: calibration trajectories per timestep whose inputs give the per-channel RMS.
        denoisers: the denoiser families it runs on (`DENOISER_FAMILIES`); on others the recipe skips it and says
            so (`QuantizationReport.choices()`).

    Example:
        >>> LowRankConfig(rank=16, down_bits=8)
    """

    rank: int = 16
    down_bits: Optional[int] = None
    samples_per_step: int = 16
    denoisers: tuple[str, ...] = DENOISER_FAMILIES

    def __post_init__(self) -> None:
        _check_families("LowRankConfig", self.denoisers)
        for name, value in (("rank", self.rank), ("samples_per_step", self.samples_per_step)):
            _check_int(f"LowRankConfig.{name}", value, 1)
        if self.down_bits not in (None, 8) or isinstance(self.down_bits, bool):
            raise ValueError(f"LowRankConfig.down_bits={self.down_bits!r}: use None (a floating-point branch) or "
                             "8 (its down-projection on an int8 kernel).")


@dataclass(frozen=True)
class OutputCorrectionConfig:
    """Per-timestep correction of the quantized denoiser's output (`diffusion_ao.methods.output_correction`): the gain and
    bias of each output channel's prediction, estimated on the calibration data and divided out in the graph.

    Args:
        gain: correct the per-(timestep, channel) gain of the prediction (its correlated error).
        bias: correct the per-(timestep, channel) offset of the prediction.
        samples_per_step: calibration samples per timestep the estimate uses (None: all of them).
        denoisers: the denoiser families it runs on (`DENOISER_FAMILIES`); on others the recipe skips it and
            says so (`QuantizationReport.choices()`).
    """

    gain: bool = True
    bias: bool = True
    samples_per_step: Optional[int] = None
    denoisers: tuple[str, ...] = DENOISER_FAMILIES

    def __post_init__(self) -> None:
        _check_families("OutputCorrectionConfig", self.denoisers)
        if not (self.gain or self.bias):
            raise ValueError("OutputCorrectionConfig: set gain or bias (or use output_correction=None).")
        _check_int("OutputCorrectionConfig.samples_per_step", self.samples_per_step, 1, allow_none=True)


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Sensitivity-driven mixed precision (`diffusion_ao.methods.mixed_precision`): the layers whose low-bit weights hurt
    the prediction most get `weight_bits`, within a size budget.

    Args:
        size_budget: the packed model's size as a fraction of FP32's (e.g. 0.17; all-4-bit weights are a little
            above 4/32, for the scales and the FP layers).
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
        _check_int("MixedPrecisionConfig.samples_per_step", self.samples_per_step, 1)


TIME_GROUP_SPLITS = ("ranges", "uniform")


@dataclass(frozen=True)
class TimeGroupConfig:
    """Time-grouped activation ranges (`diffusion_ao.methods.time_groups`): the sampler's timesteps split into `groups`
    runs of consecutive steps, each with its own static activation qparams and its own converted (and compiled)
    graph; the drop-in wrapper picks the graph by timestep.

    Args:
        groups: how many groups (>= 2; one group is the plain static ranges: leave `time_groups=None`).
        split: "ranges" (the boundaries that lose the fewest bits of activation resolution to sharing a range,
            found by dynamic programming over every observer's per-timestep ranges) or "uniform" (groups of equal
            size, TQ-DiT's time grouping).
    """

    groups: int = 4
    split: Literal["ranges", "uniform"] = "ranges"

    def __post_init__(self) -> None:
        _check_int("TimeGroupConfig.groups", self.groups, 2,
                   hint="one group is the plain static ranges: QuantConfig(time_groups=None)")
        _check_choice("TimeGroupConfig.split", self.split, TIME_GROUP_SPLITS)


@dataclass(frozen=True)
class FinetuneConfig:
    """A short quantization-aware fine-tune (`diffusion_ao.methods.qat.finetune`): the denoiser is prepared with
    FakeQuantize modules (`prepare_qat_pt2e`), calibrated, and then only the quantization parameters (activation
    step sizes, and AdaRound's rounding or the weight step sizes) are trained to reproduce the FP model's noise
    prediction on the calibration trajectories (distillation: no training data), with DMQ's adaptive timestep
    weights.

    Args:
        iterations: Adam steps over the whole denoiser.
        batch_per_step: calibration samples drawn from every timestep in each step.
        adaround: learn each weight's rounding (AdaRound, on the weight observer's grid); False learns the
            per-channel weight steps (LSQ).
        weight_lr: Adam learning rate of AdaRound's rounding variables.
        weight_step_lr: Adam learning rate of the per-channel weight steps (with `adaround=False`). Adam moves a
            parameter by about this much per step whatever its gradient's scale, and a 4-bit weight step is
            ~1e-2, so it needs a smaller rate than the rounding variables (which live on [0, 1]).
        act_lr: Adam learning rate of the activation step sizes.
        round_weight: weight of AdaRound's regulariser against the relative noise-prediction error.
        beta_start, beta_end: the regulariser's exponent, annealed linearly after the warm-up.
        warmup: fraction of the iterations without the regulariser.
        weighting_r: r of DMQ's adaptive timestep weights (0: uniform).
        weighting_ema: EMA factor of the per-timestep losses.
        lora_rank: rank of a learned low-rank correction W + A B of every quantized weight (EfficientDM), merged
            into the weight before it is quantized at the end; 0 (default) learns none. Needs `adaround=False`
            (AdaRound learns the rounding of fixed weights).
        lora_lr: Adam learning rate of A and B.
        seed: seeds the minibatch draws (and the initial B of the low-rank correction).

    Example:
        >>> QuantConfig.preset("w4a8").replace(finetune=FinetuneConfig(iterations=200))
        >>> FinetuneConfig(adaround=False, lora_rank=4)   # EfficientDM-style: weight steps + low-rank correction
    """

    iterations: int = 200
    batch_per_step: int = 2
    adaround: bool = True
    weight_lr: float = 1e-3
    weight_step_lr: float = 1e-5
    act_lr: float = 4e-4
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    weighting_r: float = 20.0
    weighting_ema: float = 0.95
    lora_rank: int = 0
    lora_lr: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_per_step"):
            value = getattr(self, name)
            _check_int(f"FinetuneConfig.{name}", value, 1)
        _check_seed("FinetuneConfig", self.seed)
        if min(self.weight_lr, self.weight_step_lr, self.act_lr) <= 0 or self.round_weight < 0 or self.weighting_r < 0:
            raise ValueError("FinetuneConfig: weight_lr, weight_step_lr and act_lr must be > 0, round_weight and "
                             f"weighting_r >= 0; got {self.weight_lr}, {self.weight_step_lr}, {self.act_lr}, "
                             f"{self.round_weight}, {self.weighting_r}.")
        _check_rounding_schedule("FinetuneConfig", self.beta_start, self.beta_end, self.warmup)
        if not 0 <= self.weighting_ema < 1:
            raise ValueError(f"FinetuneConfig.weighting_ema={self.weighting_ema}: use a value in [0, 1).")
        _check_int("FinetuneConfig.lora_rank", self.lora_rank, 0, hint="0: no correction")
        if self.lora_rank and self.adaround:
            raise ValueError("FinetuneConfig: lora_rank > 0 changes the weights, but AdaRound learns the rounding of "
                             "fixed weights; use adaround=False (learned weight steps) with the correction.")
        if self.lora_lr <= 0:
            raise ValueError(f"FinetuneConfig.lora_lr={self.lora_lr}: use a learning rate > 0.")
