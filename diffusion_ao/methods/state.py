"""What the recipe's steps share (`RecipeState`) and what they report (`QuantizationReport`).

A method takes part in the recipe (`diffusion_ao.recipe`) through up to three functions of its module, each
called with the `RecipeState` when its config field is set: `before_prepare(state)` changes the floating-point
graph before it is annotated (`state.graph`), `before_convert(state)` works on the calibrated graph
(`state.prepared`), `after_convert(state)` on the converted graph(s) (`state.converted`). Each writes its own
typed result into `state.report`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.fx import GraphModule

from diffusion_ao.calibration.data import CalibrationData
from diffusion_ao.config import QuantConfig
from diffusion_ao.grouped_graph import TimeGroupedGraph
from diffusion_ao.quantizer.quantizer import DiffusionQuantizer

if TYPE_CHECKING:
    from diffusion_ao.methods.dmq.les import LESResult
    from diffusion_ao.methods.dmq.pts import PTSResult
    from diffusion_ao.methods.gptq import GPTQResult
    from diffusion_ao.methods.low_rank import LowRankResult
    from diffusion_ao.methods.mixed_precision import MixedPrecisionPlan
    from diffusion_ao.methods.output_correction import OutputCorrection
    from diffusion_ao.methods.qat import FinetuneReport
    from diffusion_ao.methods.qdiff import ReconstructionReport
    from diffusion_ao.methods.tfmq import TFMQReport
    from diffusion_ao.methods.time_groups import TimeGroups


@dataclass
class QuantizationReport:
    """What the recipe did: the quantizer's per-layer decisions, each method's choices and the time taken.

    Attributes:
        quantizer: the `DiffusionQuantizer` (its `decisions` list every layer's bit widths and why).
        les, pts, gptq, low_rank: per layer, what LES, PTS, GPTQ and the low-rank branch did.
        timestep_weights: DMQ's adaptive weight of each timestep.
        tfmq, reconstruction, output_correction, mixed_precision, time_groups, finetune: those methods' reports.
        attention: per SDPA node rewritten as int8 attention, the largest softmax probability calibrated (its
            probabilities' uint8 grid is that / 255; `backends.x86_attention`).
        calib_s: seconds the whole recipe took.
        skipped: step -> why a step the config asks for did not run on this model.
    """

    quantizer: Optional[DiffusionQuantizer] = None
    les: dict[str, "LESResult"] = field(default_factory=dict)
    pts: dict[str, "PTSResult"] = field(default_factory=dict)
    timestep_weights: Optional[dict[float, float]] = None
    tfmq: Optional["TFMQReport"] = None
    reconstruction: Optional["ReconstructionReport"] = None
    gptq: dict[str, "GPTQResult"] = field(default_factory=dict)
    low_rank: dict[str, "LowRankResult"] = field(default_factory=dict)
    output_correction: Optional["OutputCorrection"] = None
    mixed_precision: Optional["MixedPrecisionPlan"] = None
    time_groups: Optional["TimeGroups"] = None
    finetune: Optional["FinetuneReport"] = None
    attention: dict[str, float] = field(default_factory=dict)
    calib_s: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)

    def choices(self) -> dict[str, str]:
        """What the recipe chose from the model and its data, and why (e.g. {"modulation cache": "..."})."""
        label_cache = self.tfmq.label_cache if self.tfmq is not None else None
        return {**({"modulation cache": label_cache} if label_cache else {}), **self.skipped}


@dataclass
class RecipeState:
    """The recipe's working state, handed to every method step.

    Attributes:
        config: the `QuantConfig` (a step may narrow it before the quantizer exists: mixed precision adds
            module overrides).
        data: the calibration data.
        pristine: the exported floating-point graph, never changed (`fresh_graph` copies it).
        family: "unet" or "transformer" (`passes.analysis.denoiser_family`).
        fp32_bytes: the floating-point model's size.
        has_vnni: the CPU override of `DiffusionQuantizer`.
        progress: show progress bars.
        graph: the floating-point graph the `before_prepare` steps change and `prepare_pt2e` annotates.
        prepared: the calibrated graph (`before_convert`).
        converted: the converted model (`after_convert`): a graph, or a `TimeGroupedGraph` of one per group.
        report: the `QuantizationReport` the steps fill.
        carry: values a method hands from one of its steps to a later one (e.g. TFMQ's finite-set tables).
    """

    config: QuantConfig
    data: CalibrationData
    pristine: GraphModule
    family: str
    fp32_bytes: int
    has_vnni: Optional[bool] = None
    progress: bool = True
    graph: Optional[GraphModule] = None
    prepared: Optional[GraphModule] = None
    converted: Optional[torch.nn.Module] = None
    report: QuantizationReport = field(default_factory=QuantizationReport)
    carry: dict[str, Any] = field(default_factory=dict)

    def fresh_graph(self) -> GraphModule:
        """A new copy of the floating-point graph (for a step that changes one, or needs an untouched reference)."""
        return copy.deepcopy(self.pristine)

    @property
    def converted_graphs(self) -> list[GraphModule]:
        """The converted graph, or each group's."""
        if isinstance(self.converted, TimeGroupedGraph):
            return list(self.converted.groups)
        return [self.converted]

    @property
    def quantizer(self) -> DiffusionQuantizer:
        """The config's quantizer, made on first use (after any step that narrows the config)."""
        if self.report.quantizer is None:
            self.report.quantizer = DiffusionQuantizer(self.config, has_vnni=self.has_vnni,
                                                       qat=self.config.finetune is not None)
        return self.report.quantizer

    def for_this_family(self, step: str, method):
        """`method` (a config with `denoisers`) if it runs on this denoiser family, else None, with the reason in
        `report.skipped`."""
        if method is None or self.family in method.denoisers:
            return method
        self.report.skipped[step] = (f"not run: the config limits it to {', '.join(method.denoisers)} denoisers, "
                                     f"this is a {self.family}")
        return None
