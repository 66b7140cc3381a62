"""The benchmark's rows: one `RowSpec` per method, in one list (`default_rows`).

To add a method (e.g. a DMQ / TFMQ / Q-Diffusion ablation), append a `RowSpec` to `default_rows`: give it a
quantizer factory and, if its observers need more than plain forward passes, a calibration function.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torchao.quantization.pt2e.quantizer import Quantizer

from bench.peers import Peer, available_peers
from diffusion_ao import CalibrationData, QuantConfig
from diffusion_ao.graph import call_graph, graph_input_names

# (prepared graph, calibration data, show progress) -> None
CalibrateFn = Callable[[torch.fx.GraphModule, CalibrationData, bool], None]
# What a row calibrates on, for class-conditional models sampled with guidance: "sampler" is the doubled
# (unconditional + conditional) batch the guided sampler really runs; "conditional-half" keeps only the
# conditional rows of the same trajectories; "unguided" records trajectories sampled without guidance (as many
# conditional rows per step as the doubled batch has).
CALIBRATION_SOURCES = ("sampler", "conditional-half", "unguided")

DIFFUSION_AO_PRESETS = ("w8a8", "w4a8", "w4a6")
LOW_BIT_WIDTHS = ("w4a8", "w4a6")
# Each seed paper's headline preset per low-bit width, in its own scope (Q-Diffusion quantizes everything, so its
# own-scope naive row stands beside it).
SEED_FAMILIES = ("dmq", "tfmq", "qdiff")
# The recommended recipes (diffusion_ao.config.PRESETS), one per low-bit width.
BEST_PRESETS = tuple(f"best-{bits}" for bits in LOW_BIT_WIDTHS)
X86_SCOPE = "x86-default (all conv/linear + its own fusions)"
# Why the peer runs with reduce_range on a CPU without VNNI: torchao's `get_default_x86_inductor_quantization_config`
# says to set it there (oneDNN's int16 pair sums overflow on full-range uint8 activations).
X86_REDUCE_RANGE_WHY = "reduce_range=True, as torchao's docs say for CPUs without VNNI"
FP32_SCOPE = "none (FP32 reference)"


@dataclass(frozen=True)
class RowSpec:
    """One row of the benchmark table: how to build and calibrate one quantized model.

    Attributes:
        name: unique row id, used by `--methods` and as the label in plots (e.g. "naive-w4a8").
        method: the method family, e.g. "fp32", "naive-minmax", "diffusion-ao", "x86-inductor".
        preset: the diffusion-ao preset it is based on, or None.
        weight_bits: bits of conv/linear weights (32 for floating point).
        act_bits: bits of the activations entering quantized layers (32 for floating point).
        scope: printable summary of what is quantized.
        make_quantizer: builds a fresh PT2E quantizer, for peers; None for the FP32 reference and config rows.
        calibrate: runs the prepared graph over the calibration data.
        config: for diffusion-ao rows, the `QuantConfig` run through `quantize_unet` (which also applies the
            methods' graph passes); peers leave it None and use `make_quantizer` / `calibrate`.
        calibration: one of `CALIBRATION_SOURCES`; anything but "sampler" needs a model sampled with guidance.
        peer_config: for peers, the configuration that ran, in words (e.g. "default" or "reduce_range=True, ...").
        trap: a configuration a user might run but should not (a peer's default where its docs say to change it):
            measured like any row, but reported once as a note, never as the peer's quality.
        eager_peer: for the peers that quantize the eager diffusers model (`bench.peers`), the peer.
    """

    name: str
    method: str
    preset: Optional[str]
    weight_bits: int
    act_bits: int
    scope: str
    make_quantizer: Optional[Callable[[], Quantizer]] = None
    calibrate: Optional[CalibrateFn] = None
    config: Optional[QuantConfig] = None
    calibration: str = "sampler"
    peer_config: Optional[str] = None
    trap: bool = False
    eager_peer: Optional[Peer] = None

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_SOURCES:
            raise ValueError(f"RowSpec {self.name!r}: calibration={self.calibration!r}, choose from "
                             f"{CALIBRATION_SOURCES}.")

    @property
    def is_reference(self) -> bool:
        """True for the floating-point row that every other row is compared with."""
        return self.make_quantizer is None and self.config is None and self.eager_peer is None

    def matches(self, token: str) -> bool:
        """Whether a `--methods` token selects this row: its name, its method family or its preset; "=NAME"
        selects the row named NAME alone (a preset's own row, without the ablation rows built on it)."""
        if token.startswith("="):
            return token[1:] == self.name
        return token in (self.name, self.method, self.preset)


@torch.no_grad()
def plain_forward_calibrate(prepared: torch.fx.GraphModule, data: CalibrationData, progress: bool) -> None:
    """Calibrates any PT2E-prepared graph with plain forward passes over every recorded step.

    Args:
        prepared: a graph from `prepare_pt2e` with a quantizer whose observers need no timestep context.
        data: the calibration data shared by all rows.
        progress: unused (one forward per step is quick); kept for the `CalibrateFn` signature.
    """
    names = graph_input_names(prepared)
    for step in data.steps:
        call_graph(prepared, step.graph_inputs(), names)


def fp32_row() -> RowSpec:
    """The floating-point reference (the diffusers UNet itself)."""
    return RowSpec(name="fp32", method="fp32", preset=None, weight_bits=32, act_bits=32, scope=FP32_SCOPE)


def _config_row(name: str, method: str, preset: str, config: QuantConfig) -> RowSpec:
    return RowSpec(name=name, method=method, preset=preset, weight_bits=config.weight_bits,
                   act_bits=config.act_bits if config.act_bits is not None else 32, scope=config.scope,
                   config=config)


def naive_config(preset: str) -> QuantConfig:
    """The naive baseline: the preset's bits and scope, with min-max observers and timestep-agnostic ranges."""
    return QuantConfig.preset(preset).replace(act_observer="minmax", timestep_aggregation="global",
                                              weight_observer="minmax", name=f"naive-{preset}")


def naive_row(preset: str) -> RowSpec:
    """Naive min-max PTQ at the bit widths and scope of `preset`."""
    return _config_row(f"naive-{preset}", "naive-minmax", preset, naive_config(preset))


def diffusion_ao_row(preset: str) -> RowSpec:
    """diffusion-ao's current best for `preset` (MSE-searched, timestep-weighted activation ranges)."""
    return _config_row(f"diffusion-ao-{preset}", "diffusion-ao", preset, QuantConfig.preset(preset))


def preset_row(preset: str) -> RowSpec:
    """Any diffusion-ao preset as one row, named after it (e.g. "dmq-w4a8"); its method family is the preset's
    prefix ("dmq", "tfmq", "qdiff") or "diffusion-ao"."""
    family = preset.split("-")[0]
    method = family if family in (*SEED_FAMILIES, "best") else "diffusion-ao"
    return _config_row(preset, method, preset, QuantConfig.preset(preset))


def x86_inductor_quantizer(reduce_range: bool = False) -> Quantizer:
    """torchao's `X86InductorQuantizer` with its default (W8A8) global config, `reduce_range` as given."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    return quantizer


def x86_rows(has_vnni: Optional[bool] = None) -> list[RowSpec]:
    """The peer: torchao's X86InductorQuantizer through the same pipeline, configured as its docs say for the CPU
    at hand (`reduce_range=True` without VNNI). Without VNNI, the unconfigured default follows as a `trap` row: it
    is what a user gets who does not read the docs, reported once as a note.

    Args:
        has_vnni: whether the CPU has VNNI (default: `diffusion_ao.backends.x86_features.cpu_has_vnni()`).
    """
    from diffusion_ao.backends.x86_features import cpu_has_vnni

    has_vnni = cpu_has_vnni() if has_vnni is None else has_vnni
    common = dict(method="x86-inductor", preset=None, weight_bits=8, act_bits=8, scope=X86_SCOPE,
                  calibrate=plain_forward_calibrate)
    if has_vnni:
        return [RowSpec(name="x86-default", make_quantizer=x86_inductor_quantizer, peer_config="default", **common)]
    return [RowSpec(name="x86-default", make_quantizer=lambda: x86_inductor_quantizer(reduce_range=True),
                    peer_config=X86_REDUCE_RANGE_WHY, **common),
            RowSpec(name="x86-unconfigured", make_quantizer=x86_inductor_quantizer,
                    peer_config="default (reduce_range=False) on a CPU without VNNI", trap=True, **common)]


def dmq_rows(bits: str) -> list[RowSpec]:
    """DMQ's ablation at `bits` ("w4a8" / "w4a6"), cumulative as in the paper: diffusion-ao's row of that width
    (the baseline) -> +LES -> +timestep weighting -> +PTS, with PTS chosen by summed MSE or by vote."""
    base = QuantConfig.preset(bits)
    full = QuantConfig.preset(f"dmq-{bits}").dmq
    steps = [("les", dataclasses.replace(full, timestep_weighting=False, pts=False)),
             ("les+tw", dataclasses.replace(full, pts=False)),
             ("les+tw+pts-mse", dataclasses.replace(full, pts_selection="mse")),
             ("les+tw+pts-vote", full)]
    return [_config_row(f"dmq-{bits}-{label}", "dmq", f"dmq-{bits}",
                        base.replace(dmq=dmq, name=f"dmq-{bits}-{label}")) for label, dmq in steps]


def tfmq_rows(bits: str) -> list[RowSpec]:
    """TFMQ-DM's ablation at `bits` ("w4a8" / "w4a6"), on diffusion-ao's baseline of that width (time path
    quantized): + cache of every temporal feature, + finite-set calibration of every activation (conv inputs
    then simulated), FSC of the temporal activations alone, + TIAR (the quantized TIB reconstructed jointly), and
    the `tfmq-<bits>` preset (FSC on the temporal activations, TIAR, then disturbance-aware selection of the
    features to cache)."""
    from diffusion_ao.config import TFMQConfig

    base = QuantConfig.preset(bits)
    steps = [("baseline", None),
             ("cache", TFMQConfig(cache="all", fsc="none")),
             ("cache+fsc", TFMQConfig(cache="all", fsc="all")),
             ("fsc-temporal", TFMQConfig(cache="none", fsc="temporal")),
             ("fsc-temporal+tiar", TFMQConfig(cache="none", fsc="temporal", tiar=True)),
             ("select", QuantConfig.preset(f"tfmq-{bits}").tfmq)]
    return [_config_row(f"tfmq-{bits}-{label}", "tfmq", f"tfmq-{bits}",
                        base.replace(tfmq=tfmq, name=f"tfmq-{bits}-{label}")) for label, tfmq in steps]


def qdiff_rows(bits: str) -> list[RowSpec]:
    """Q-Diffusion's ablation at `bits` ("w4a8" / "w4a6"), all in Q-Diffusion's scope (everything quantized):
    naive (min-max, timestep-agnostic) -> +timestep-aware calibration (diffusion-ao's MSE-searched weights and
    timestep-weighted activation ranges) -> +shortcut splitting -> +block reconstruction, and the same with DMQ's
    pieces (PTS, adaptive timestep weights, which also weight the reconstruction loss)."""
    from diffusion_ao.config import DMQConfig, QDiffConfig

    full = QuantConfig.preset(f"qdiff-{bits}")
    scope = full.replace(qdiff=None)
    steps = [("naive", scope.replace(act_observer="minmax", weight_observer="minmax", timestep_aggregation="global")),
             ("tw", scope),
             ("split", scope.replace(qdiff=QDiffConfig(split_shortcut=True))),
             ("recon", full),
             ("recon+dmq", full.replace(dmq=DMQConfig()))]
    return [_config_row(f"qdiff-{bits}-{label}", "qdiff", f"qdiff-{bits}", cfg.replace(name=f"qdiff-{bits}-{label}"))
            for label, cfg in steps]


def dit_rows(bits: str) -> list[RowSpec]:
    """What a class-conditional DiT needs that the UNet did not, each on diffusion-ao's row of `bits` (the
    baseline, not repeated here):

    * the adaLN modulation cached per (timestep, label): "cache-t" caches the timestep-only features (the
      timestep embedder), "cache-t+label" everything that depends only on the timestep and the label (the whole
      modulation of every block), exact for the calibration timesteps x labels;
    * channel balancing of the linears' inputs: SmoothQuant's closed form (alpha 0.5, no learning), DMQ's LES
      learned from ones, LES with adaptive timestep weights, LES started from SmoothQuant with timestep weights;
    * min-max instead of MSE-searched 4-bit weight ranges (clipping the modulation path's weights shifts every
      token's scale and shift; docs/methods.md#diffusion-transformers);
    * below 8-bit activations, the skewed post-GELU inputs of the MLPs' second linear (`ff.net.2`) kept at 8 bits;
    * the calibration source: the conditional half of the guided trajectories, or unguided trajectories, instead
      of the doubled batch the guided sampler runs;
    * `best-<bits>` with the modulation cached per timestep only (on the DiT, `best-*` caches it per (timestep,
      label): its calibration labels cover the label table), and, below 8-bit activations, `best-<bits>` with
      the post-GELU inputs at 8 bits.
    """
    from diffusion_ao.config import DMQConfig, LayerQuant, TFMQConfig
    from diffusion_ao.models.dit_config import DEFAULT_DIT_KWARGS

    base = QuantConfig.preset(bits)
    no_pts = DMQConfig(pts=False)
    fc2 = {f"transformer_blocks.{i}.ff.net.2": LayerQuant(base.weight_bits, 8)
           for i in range(DEFAULT_DIT_KWARGS["num_layers"])}
    steps = [("cache-t", base.replace(tfmq=TFMQConfig(cache="all", fsc="none"))),
             ("cache-t+label", base.replace(tfmq=TFMQConfig(cache="all", fsc="none", cache_class_labels=True))),
             ("smoothquant", base.replace(dmq=dataclasses.replace(no_pts, les_init="smoothquant", les_iterations=0,
                                                                  les_min_gain=0.0, timestep_weighting=False))),
             ("les", base.replace(dmq=dataclasses.replace(no_pts, timestep_weighting=False))),
             ("les+tw", base.replace(dmq=no_pts)),
             ("smoothquant+les+tw", base.replace(dmq=dataclasses.replace(no_pts, les_init="smoothquant"))),
             ("weights-minmax", base.replace(weight_observer="minmax"))]
    if base.act_bits < 8:
        steps.append(("fc2-a8", base.replace(module_name_overrides=fc2)))
    best = QuantConfig.preset(f"best-{bits}")
    steps.append(("best-cache-t", best.replace(tfmq=dataclasses.replace(best.tfmq, cache_class_labels=False))))
    if base.act_bits < 8:
        steps.append(("best-fc2-a8", best.replace(module_name_overrides=fc2)))
    rows = [_config_row(f"dit-{bits}-{label}", "dit", bits, cfg.replace(name=f"dit-{bits}-{label}"))
            for label, cfg in steps]
    for source in ("conditional-half", "unguided"):
        rows.append(dataclasses.replace(_config_row(f"dit-{bits}-calib-{source}", "dit", bits,
                                                    base.replace(name=f"dit-{bits}-calib-{source}")),
                                        calibration=source))
    return rows


def best_rows(bits: str) -> list[RowSpec]:
    """What each candidate piece of the `best-<bits>` recipe buys, on diffusion-ao's row of `bits` (the
    baseline, not repeated here): the error of the 4-bit weights alone (activations in FP), with round-to-nearest
    and with GPTQ; GPTQ under the full preset, on the MSE-searched grid and on the min-max grid; then, each on
    GPTQ with the min-max grid, the seeds' pieces: TFMQ-DM's cache of the temporal features (as in `best-*`: of
    the whole modulation per (timestep, label) where the calibration labels cover the label table), DMQ's adaptive
    timestep weights (of the activation ranges and of GPTQ's H; no LES / PTS), Q-Diffusion's block
    reconstruction starting from GPTQ's codes (no shortcut split), the per-timestep output correction (gain and
    bias), sensitivity-driven 8-bit weights within 0.17 x the FP32 size, and the pieces together in turn; last,
    `best-<bits>` with a low-rank branch of rank 16 and 32, in floating point and as 8-bit linears."""
    from diffusion_ao.config import (DMQConfig, GPTQConfig, LowRankConfig, MixedPrecisionConfig,
                                     OutputCorrectionConfig, QDiffConfig, ReconstructionConfig, TFMQConfig)

    base = QuantConfig.preset(bits)
    gptq = GPTQConfig()
    cache = TFMQConfig(cache="all", fsc="none", cache_class_labels="auto")  # as best-*: per model
    grid = base.replace(gptq=gptq, weight_observer="minmax")
    steps = [("gptq", base.replace(gptq=gptq)),
             ("gptq-minmax-grid", grid),
             ("gptq-minmax-grid+cache", grid.replace(tfmq=cache)),
             ("gptq-minmax-grid+tw", grid.replace(dmq=DMQConfig(les=False, pts=False))),
             ("gptq-minmax-grid+recon", grid.replace(qdiff=QDiffConfig(split_shortcut=False,
                                                                       reconstruction=ReconstructionConfig()))),
             ("gptq-minmax-grid+cache+tw", grid.replace(tfmq=cache,
                                                         dmq=DMQConfig(les=False, pts=False))),
             ("gptq-minmax-grid+oc", grid.replace(output_correction=OutputCorrectionConfig())),
             ("gptq-minmax-grid+cache+tw+oc", grid.replace(
                 tfmq=cache, dmq=DMQConfig(les=False, pts=False),
                 output_correction=OutputCorrectionConfig())),
             ("gptq-minmax-grid+mp", grid.replace(mixed_precision=MixedPrecisionConfig())),
             ("gptq-minmax-grid+cache+tw+mp", grid.replace(
                 tfmq=cache, dmq=DMQConfig(les=False, pts=False),
                 mixed_precision=MixedPrecisionConfig())),
             ("gptq-minmax-grid+cache+tw+mp+oc", grid.replace(
                 tfmq=cache, dmq=DMQConfig(les=False, pts=False),
                 mixed_precision=MixedPrecisionConfig(), output_correction=OutputCorrectionConfig())),
             ("gptq-minmax-grid+cache+tw+mp+recon", grid.replace(
                 tfmq=cache, dmq=DMQConfig(les=False, pts=False),
                 mixed_precision=MixedPrecisionConfig(),
                 qdiff=QDiffConfig(split_shortcut=False, reconstruction=ReconstructionConfig()))),
             ("gptq-minmax-grid+cache+tw+recon", grid.replace(
                 tfmq=cache, dmq=DMQConfig(les=False, pts=False),
                 qdiff=QDiffConfig(split_shortcut=False, reconstruction=ReconstructionConfig())))]
    best = QuantConfig.preset(f"best-{bits}")
    # the low-rank branch: best-* runs rank 16 with its down-projection on int8 kernels (on transformers); these
    # rows run it in floating point, at rank 32, and without it
    for rank in (16, 32):
        steps.append((f"lowrank{rank}", best.replace(low_rank=LowRankConfig(rank=rank))))
    steps.append(("lowrank32-int8down", best.replace(low_rank=LowRankConfig(rank=32, down_bits=8))))
    steps.append(("no-lowrank", best.replace(low_rank=None)))
    # best-* weight timesteps (DMQ) on UNets only; this row weights them on every family
    steps.append(("tw-all-families", best.replace(dmq=DMQConfig(les=False, pts=False))))
    if bits == "w4a8":  # the weight-only rows do not depend on the activation width: listed once
        steps = [("weights-only", base.replace(act_bits=None)),
                 ("weights-only+gptq", base.replace(act_bits=None, gptq=gptq))] + steps
    return [_config_row(f"best-{bits}-{label}", "best", f"best-{bits}", cfg.replace(name=f"best-{bits}-{label}"))
            for label, cfg in steps]


def time_group_rows(bits: str) -> list[RowSpec]:
    """Time-grouped activation ranges on `best-<bits>`: K = 2, 4, 8 groups cut where the fewest bits of
    activation resolution are lost, and K = 4 in equal groups (TQ-DiT's split). Each group compiles its own int8
    graph: the rows' compile time and compiled memory show the cost."""
    from diffusion_ao.config import TimeGroupConfig

    best = QuantConfig.preset(f"best-{bits}")
    steps = [(f"tg{k}", TimeGroupConfig(groups=k)) for k in (2, 4, 8)]
    steps.append(("tg4-uniform", TimeGroupConfig(groups=4, split="uniform")))
    return [_config_row(f"best-{bits}-{label}", "timegroups", f"best-{bits}",
                        best.replace(time_groups=groups, name=f"best-{bits}-{label}")) for label, groups in steps]


def qat_rows(bits: str) -> list[RowSpec]:
    """The QAT fine-tune (`QuantConfig.finetune`: `prepare_qat_pt2e`, then the quantization parameters trained to
    reproduce the FP model on the calibration trajectories) on diffusion-ao's row of `bits` (the baseline, not
    repeated here), with AdaRound rounding or learned weight steps (alone, and with EfficientDM's rank-4 weight
    correction), and on best-<bits>'s graph passes (TFMQ-DM's
    cache, 8-bit weights for the most sensitive layers, the min-max weight grid) in place of its GPTQ +
    reconstruction."""
    from diffusion_ao.config import FinetuneConfig, MixedPrecisionConfig, TFMQConfig

    base = QuantConfig.preset(bits)
    steps = [("adaround", base.replace(finetune=FinetuneConfig())),
             ("lsq-weights", base.replace(finetune=FinetuneConfig(adaround=False))),
             ("lsq-weights+lora", base.replace(finetune=FinetuneConfig(adaround=False, lora_rank=4))),
             ("adaround+cache+mp", base.replace(weight_observer="minmax", finetune=FinetuneConfig(),
                                                tfmq=TFMQConfig(cache="all", fsc="none"),
                                                mixed_precision=MixedPrecisionConfig()))]
    return [_config_row(f"qat-{bits}-{label}", "qat", bits, cfg.replace(name=f"qat-{bits}-{label}"))
            for label, cfg in steps]


def attention_rows() -> list[RowSpec]:
    """Int8 attention (`QuantConfig(quantize_attention_matmuls=True)`: torchao's integer attention on CPUs with
    AMX, simulated elsewhere) on diffusion-ao's W8A8 and W4A8 rows and on `best-w4a8`, each beside its row with
    floating-point attention (W8A8 and W4A8 are default rows; `=best-w4a8` selects the preset alone)."""
    rows = [("w8a8", QuantConfig.preset("w8a8")), ("w4a8", QuantConfig.preset("w4a8")),
            ("best-w4a8", QuantConfig.preset("best-w4a8"))]
    return [_config_row(f"{name}-int8-attention", "attention", name,
                        cfg.replace(quantize_attention_matmuls=True, name=f"{name}-int8-attention"))
            for name, cfg in rows]


def seed_rows(bits: str) -> list[RowSpec]:
    """Each seed paper's headline preset at `bits`, in its own scope: DMQ, TFMQ-DM, and Q-Diffusion with the naive
    row of its scope (everything quantized) beside it."""
    return [preset_row(f"dmq-{bits}"), preset_row(f"tfmq-{bits}"), qdiff_rows(bits)[0], preset_row(f"qdiff-{bits}")]


# Extra rows that `--ablation NAME` appends (they do not fit the default run's 15-minute budget).
ABLATIONS: dict[str, Callable[[], list[RowSpec]]] = {
    "seeds": lambda: seed_rows("w4a6"),
    "dmq": lambda: dmq_rows("w4a8") + dmq_rows("w4a6"),
    "tfmq": lambda: tfmq_rows("w4a8") + tfmq_rows("w4a6"),
    "qdiff": lambda: qdiff_rows("w4a8") + qdiff_rows("w4a6"),
    "dit": lambda: dit_rows("w4a8") + dit_rows("w4a6"),
    "best": lambda: best_rows("w4a8") + best_rows("w4a6"),
    "timegroups": lambda: time_group_rows("w4a8") + time_group_rows("w4a6"),
    "qat": lambda: qat_rows("w4a8") + qat_rows("w4a6"),
    "attention": attention_rows,
}


def peer_rows(names: Optional[list[str]] = None, default_only: bool = False) -> tuple[list[RowSpec], list[str]]:
    """The rows of the installed peers that quantize the eager model (`bench.peers`), and a line per package left
    out because it is not installed."""
    peers, notes = available_peers(names, default_only)
    return [RowSpec(name=p.name, method=f"peer-{p.family}", preset=None, weight_bits=p.weight_bits,
                    act_bits=p.act_bits, scope=f"{p.family}'s own (see the layers column)",
                    peer_config=f"{p.package} {p.version()}: {p.config}", eager_peer=p) for p in peers], notes


def default_rows(ablations: tuple[str, ...] = (), has_vnni: Optional[bool] = None) -> list[RowSpec]:
    """Every row of the benchmark, in table order, plus the rows of the named ablations. Add methods here.

    The default run: FP32, naive W8A8 / W4A8 / W4A6, the X86 peer (`x86_rows`), each seed's W4A8 headline preset in
    its own scope, and the recommended `best-*`; the seeds' W4A6 presets are `--ablation seeds`.

    Args:
        ablations: names in `ABLATIONS` whose rows are appended.
        has_vnni: passed to `x86_rows` (default: the CPU's).
    """
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"Unknown ablation(s) {unknown}: choose from {sorted(ABLATIONS)}.")
    rows = [fp32_row()] + [naive_row(p) for p in DIFFUSION_AO_PRESETS] + x86_rows(has_vnni)
    rows += seed_rows("w4a8")
    rows += [preset_row(p) for p in BEST_PRESETS]
    if ablations:  # every ablation's rows stand on diffusion-ao's plain rows of their width
        rows += [diffusion_ao_row(bits) for bits in DIFFUSION_AO_PRESETS]
    for name in ablations:
        have = {r.name for r in rows}
        rows += [r for r in ABLATIONS[name]() if r.name not in have]  # e.g. qdiff-w4a8-naive is a default row
    return rows


def select_rows(rows: list[RowSpec], methods: Optional[str]) -> list[RowSpec]:
    """The rows selected by a comma-separated `--methods` filter; the FP32 reference is always kept.

    A preset name that no row matches (e.g. "tfmq-scope") adds that preset as a row, and "diffusion-ao-<preset>"
    (e.g. "diffusion-ao-w4a8") diffusion-ao's plain row of it.

    Args:
        rows: all rows, in table order.
        methods: e.g. "fp32,w8a8" or "naive-w4a6,x86-default,dmq-w4a6"; "=best-w4a8" selects that row alone;
            None or "" selects every row.

    Raises:
        ValueError: if a token matches no row and names no preset.
    """
    from diffusion_ao.config import PRESETS

    if not methods:
        return list(rows)
    tokens = [t.strip() for t in methods.split(",") if t.strip()]
    unmatched = [t for t in tokens if not any(r.matches(t) for r in rows)]
    plain = {f"diffusion-ao-{p}": p for p in PRESETS}  # diffusion-ao's plain row of any preset, by its row name
    unknown = [t for t in unmatched if t not in PRESETS and t not in plain]
    if unknown:
        raise ValueError(f"--methods: {unknown} match no row and name no preset; rows are {[r.name for r in rows]} "
                         f"(a method family or preset name selects all its rows), presets are {sorted(PRESETS)}.")
    return ([r for r in rows if r.is_reference or any(r.matches(t) for t in tokens)]
            + [diffusion_ao_row(plain[t]) if t in plain else preset_row(t) for t in unmatched])
