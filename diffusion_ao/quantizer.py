"""`DiffusionQuantizer`: a torchao PT2E quantizer for diffusion UNets.

Example:
    >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
    >>> graph = export_unet(unet, sample_shape=(1, 1, 16, 16))
    >>> prepared = prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset("w8a8")))
    >>> calibrate(prepared, collect_calibration_data(unet, scheduler))
    >>> quantized = convert_pt2e(prepared)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import QuantizationSpec, Quantizer

from . import annotators
from .config import LayerQuant, QuantConfig
from .cpu import cpu_has_vnni, int16_pair_overflows
from .export import require_exported
from .observers import TimestepActivationObserver, WeightObserver
from .passes.flatten_linear import flatten_linear_inputs
from .passes.split_concat import split_concat_convs
from .passes.analysis import (UNSUPPORTED_WEIGHTED_OPS, WEIGHTED_OPS, first_and_last_layers, module_path,
                              module_type_name,
                              resolve_type, shortcut_convs, time_embedding_nodes)
from .primitives import int_range

logger = logging.getLogger(__name__)


@dataclass
class LayerDecision:
    """What the quantizer decided for one op, and why (for reports and logs)."""

    module: str
    op: str
    layer: Optional[LayerQuant]
    reason: str
    act_range: Optional[tuple[int, int]] = None


@dataclass
class AnnotationContext:
    """Per-graph state that annotators consult: the config, the roles of nodes, and the qspec factories."""

    config: QuantConfig
    first_last: set[Node]
    time_path: set[Node]
    shortcuts: set[Node]
    has_vnni: bool
    decisions: list[LayerDecision] = field(default_factory=list)

    def _override(self, node: Node) -> tuple[bool, Optional[LayerQuant], str]:
        path = module_path(node)
        matches = [k for k in self.config.module_name_overrides
                   if path == k or path.startswith(k + ".") or k == ""]
        if matches:
            key = max(matches, key=len)
            return True, self.config.module_name_overrides[key], f"module_name_overrides[{key!r}]"
        cls = resolve_type(module_type_name(node)) if module_type_name(node) else None
        if cls is not None:
            for key, value in self.config.module_type_overrides.items():
                if issubclass(cls, key):
                    return True, value, f"module_type_overrides[{key.__name__}]"
        return False, None, ""

    def layer_for(self, node: Node) -> Optional[LayerQuant]:
        """The bit widths for `node`'s layer, or None to keep it in floating point."""
        found, layer, reason = self._override(node)
        if not found:
            cfg = self.config
            if node in self.first_last and not cfg.quantize_first_last:
                layer, reason = None, "first/last layer"
            elif node in self.time_path and not cfg.quantize_time_embedding:
                layer, reason = None, "time-embedding path"
            elif node in self.shortcuts and not cfg.quantize_skip_convs:
                layer, reason = None, "skip 1x1 conv"
            else:
                layer, reason = cfg.default_layer, "default"
        self.decisions.append(LayerDecision(module_path(node), str(node.target), layer, reason))
        return layer

    def activation_spec(self, bits: int, reduce: bool) -> QuantizationSpec:
        qmin, qmax = int_range(bits - 1 if reduce else bits, signed=False)
        symmetric = self.config.act_scheme == "symmetric"
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        ctor = TimestepActivationObserver.with_args(
            dtype=torch.uint8, qscheme=qscheme, quant_min=qmin, quant_max=qmax,
            method=self.config.act_observer, aggregation=self.config.timestep_aggregation)
        return QuantizationSpec(dtype=torch.uint8, quant_min=qmin, quant_max=qmax, qscheme=qscheme,
                                observer_or_fake_quant_ctr=ctor)

    def weighted_input_spec(self, layer: LayerQuant) -> QuantizationSpec:
        """The input spec of a conv/linear: one bit less on CPUs whose int8 kernels would overflow int16."""
        reduce = self.config.reduce_range
        if reduce == "auto":
            reduce = not self.has_vnni and int16_pair_overflows(layer.weight_bits, layer.act_bits)
        spec = self.activation_spec(layer.act_bits, reduce)
        if self.decisions:
            self.decisions[-1].act_range = (spec.quant_min, spec.quant_max)
        return spec

    def weight_spec(self, bits: int) -> QuantizationSpec:
        qmin, qmax = int_range(bits, signed=True)
        per_channel = self.config.weight_granularity == "per_channel"
        qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
        ctor = WeightObserver.with_args(dtype=torch.int8, qscheme=qscheme, quant_min=qmin, quant_max=qmax,
                                        ch_axis=0, method=self.config.weight_observer)
        return QuantizationSpec(dtype=torch.int8, quant_min=qmin, quant_max=qmax, qscheme=qscheme,
                                ch_axis=0 if per_channel else None, is_dynamic=False,
                                observer_or_fake_quant_ctr=ctor)


@dataclass
class PlannedLayer:
    """A conv/linear that the config quantizes: its bit widths and the specs `annotate` will give it."""

    layer: LayerQuant
    weight_spec: QuantizationSpec
    input_spec: Optional[QuantizationSpec]  # None: weight-only


class DiffusionQuantizer(Quantizer):
    """Annotates an exported diffusion UNet for `prepare_pt2e` according to a `QuantConfig`.

    Args:
        config: what to quantize and how; defaults to `QuantConfig.preset("w8a8")`.
        has_vnni: override the CPU detection that chooses the activation range (None: detect).

    After `prepare_pt2e`, `quantizer.decisions` lists every layer with its bit widths (or FP) and the reason.
    """

    def __init__(self, config: Optional[QuantConfig] = None, has_vnni: Optional[bool] = None) -> None:
        super().__init__()
        if config is not None and not isinstance(config, QuantConfig):
            raise TypeError(f"DiffusionQuantizer takes a QuantConfig, got {type(config).__name__}.")
        self.config = config or QuantConfig.preset("w8a8")
        self.has_vnni = cpu_has_vnni() if has_vnni is None else has_vnni
        self.decisions: list[LayerDecision] = []
        self.split_convs: list[str] = []  # convs split by QDiffConfig.split_shortcut, by original node name

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        require_exported(model, "DiffusionQuantizer")
        flatten_linear_inputs(model)
        qdiff = self.config.qdiff
        if qdiff is not None and qdiff.split_shortcut and self.config.act_bits is not None:
            self.split_convs = split_concat_convs(model)
        return model

    def _context(self, model: GraphModule) -> AnnotationContext:
        first, last = first_and_last_layers(model)
        return AnnotationContext(self.config, first | last, time_embedding_nodes(model), shortcut_convs(model),
                                 self.has_vnni)

    def planned_layers(self, model: GraphModule) -> dict[Node, PlannedLayer]:
        """The conv/linear nodes of an exported graph that this config will quantize, with their bit widths and
        quantization specs (what `annotate` will do, without annotating). Graph passes use it to pick their
        targets and to simulate the quantizers `prepare_pt2e` will insert."""
        require_exported(model, "DiffusionQuantizer")
        ctx = self._context(model)
        planned = {}
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in WEIGHTED_OPS:
                layer = ctx.layer_for(node)
                if layer is not None:
                    input_spec = ctx.weighted_input_spec(layer) if layer.act_bits is not None else None
                    planned[node] = PlannedLayer(layer, ctx.weight_spec(layer.weight_bits), input_spec)
        return planned

    def annotate(self, model: GraphModule) -> GraphModule:
        require_exported(model, "DiffusionQuantizer")
        ctx = self._context(model)
        unsupported = [n for n in model.graph.nodes if n.op == "call_function"
                       and n.target in UNSUPPORTED_WEIGHTED_OPS and ctx.layer_for(n) is not None]
        if unsupported:
            names = sorted({module_path(n) or n.name for n in unsupported})
            ops = sorted({str(n.target) for n in unsupported})
            raise ValueError(f"DiffusionQuantizer cannot quantize {ops} in modules {names}. Keep them in floating "
                             f"point with QuantConfig(module_name_overrides={{{names[0]!r}: None, ...}}).")
        ctx.decisions.clear()
        for node in list(model.graph.nodes):
            if node.op != "call_function":
                continue
            for annotate in annotators.ANNOTATORS.values():
                if annotate(node, ctx):
                    break
        self.decisions = ctx.decisions
        self._log_summary()
        return model

    def _log_summary(self) -> None:
        quantized = [d for d in self.decisions if d.layer is not None]
        reduced = [d for d in quantized if d.act_range and d.act_range[1] < 2 ** d.layer.act_bits - 1]
        logger.info("DiffusionQuantizer(%s): %d ops quantized, %d kept in FP; CPU VNNI=%s, %d layers use a "
                    "one-bit-reduced activation range", self.config.name, len(quantized),
                    len(self.decisions) - len(quantized), self.has_vnni, len(reduced))

    def validate(self, model: GraphModule) -> None:
        pass
