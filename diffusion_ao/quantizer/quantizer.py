"""`DiffusionQuantizer`: a torchao PT2E quantizer for diffusion denoisers (UNets and diffusion transformers).

Example:
    >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
    >>> graph = export_denoiser(model, data.steps[0])
    >>> prepared = prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset("w8a8")))
    >>> calibrate(prepared, data)
    >>> quantized = convert_pt2e(prepared)
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional

from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import QuantizationSpec, Quantizer

from diffusion_ao.backends.x86_attention import int8_attention_unavailable
from diffusion_ao.backends.x86_features import LOWERED_KERNELS, int8_kernel_saturates
from diffusion_ao.config import LayerQuant, QuantConfig
from diffusion_ao.graph import require_exported
from diffusion_ao.passes.analysis import (
    UNSUPPORTED_WEIGHTED_OPS,
    WEIGHTED_OPS,
    first_and_last_layers,
    module_path,
    shortcut_convs,
    time_embedding_nodes,
)
from diffusion_ao.passes.flatten_linear import flatten_linear_inputs
from diffusion_ao.passes.shared_weights import unshare_weights
from diffusion_ao.passes.split_concat import split_concat_convs
from diffusion_ao.quantizer import annotators as annotators
from diffusion_ao.quantizer.context import AnnotationContext, LayerDecision, check_module_name_overrides

logger = logging.getLogger(__name__)


@dataclass
class PlannedLayer:
    """A conv/linear that the config quantizes: its bit widths and the specs `annotate` will give it."""

    layer: LayerQuant
    weight_spec: QuantizationSpec
    input_spec: Optional[QuantizationSpec]  # None: weight-only


class DiffusionQuantizer(Quantizer):
    """Annotates an exported diffusion denoiser for `prepare_pt2e` according to a `QuantConfig`.

    Args:
        config: what to quantize and how; defaults to `QuantConfig.preset("w8a8")`.
        has_vnni: force the answer to "do the int8 kernels here add products in int16?" for every kernel: True
            never reduces the activation range, False reduces it wherever a pair of products can overflow int16
            (`cpu.int16_pair_overflows`). None: ask each kernel (`cpu.int8_kernel_saturates` of oneDNN's
            `qconv` and `qlinear`, the kernels `compile_for_cpu` lowers to).
        qat: annotate with FakeQuantize modules (`TimestepFakeQuantize`, `WeightFakeQuantize`) for
            `prepare_qat_pt2e` instead of observers for `prepare_pt2e`; the bit widths and ranges are the same.

    After `prepare_pt2e`, `quantizer.decisions` lists every layer with its bit widths (or FP) and the reason, and
    its activation range with the reason for a reduced one; `quantizer.saturating_kernels` names the kernels
    whose int16 pair sums overflow here.
    """

    def __init__(self, config: Optional[QuantConfig] = None, has_vnni: Optional[bool] = None,
                 qat: bool = False) -> None:
        super().__init__()
        if config is not None and not isinstance(config, QuantConfig):
            raise TypeError(f"DiffusionQuantizer takes a QuantConfig, got {type(config).__name__}.")
        self.config = config or QuantConfig.preset("w8a8")
        if has_vnni is None:
            self.saturating_kernels = frozenset(k for k in LOWERED_KERNELS if int8_kernel_saturates(k))
            self.kernels_probed = True
        else:
            self.saturating_kernels = frozenset() if has_vnni else frozenset(LOWERED_KERNELS)
            self.kernels_probed = False
        self.qat = qat
        self.decisions: list[LayerDecision] = []
        self.split_convs: list[str] = []  # convs split by QDiffConfig.split_shortcut, by original node name

    @property
    def has_vnni(self) -> bool:
        """Whether no int8 kernel here adds products in int16 (so no activation range needs reducing), as on a CPU
        with VNNI."""
        return not self.saturating_kernels

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        require_exported(model, "DiffusionQuantizer")
        unshare_weights(model)
        flatten_linear_inputs(model)
        self.split_shortcuts(model)
        return model

    def split_shortcuts(self, model: GraphModule) -> list[str]:
        """Q-Diffusion's shortcut split (`QDiffConfig.split_shortcut`), if the config asks for it: every conv on a
        channel concat becomes one conv per part. Idempotent; `transform_for_annotation` runs it, and passes that
        plan per layer before `prepare_pt2e` (LES, PTS) run it first so that they plan on the split convs.

        Returns:
            The convs split by this call (all of them are in `self.split_convs`).
        """
        qdiff = self.config.qdiff
        if qdiff is None or not qdiff.split_shortcut or self.config.act_bits is None:
            return []
        done = split_concat_convs(model)
        self.split_convs += done
        return done

    def _context(self, model: GraphModule) -> AnnotationContext:
        check_module_name_overrides(model, self.config)
        first, last = first_and_last_layers(model)
        return AnnotationContext(self.config, first | last, time_embedding_nodes(model), shortcut_convs(model),
                                 self.saturating_kernels, self.kernels_probed, self.qat)

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
                    input_spec = ctx.weighted_input_spec(layer, node) if layer.act_bits is not None else None
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
        exempted = {d.reason for d in ctx.decisions}  # overrides that keep unsupported ops in FP act there
        ctx.decisions.clear()
        for node in list(model.graph.nodes):
            if node.op != "call_function":
                continue
            for annotate in annotators.ANNOTATORS.values():
                if annotate(node, ctx):
                    break
        self.decisions = ctx.decisions
        if not any(d.layer is not None for d in self.decisions):
            reasons = sorted({d.reason for d in self.decisions})
            raise ValueError(f"QuantConfig {self.config.name!r} quantizes no layer of this model: every one is kept in "
                             f"floating point ({', '.join(reasons) or 'no conv or linear found'}). Narrow "
                             "module_name_overrides / module_type_overrides, or use the model as it is.")
        self._warn_unused_type_overrides(exempted)
        self._log_summary()
        self._warn_simulated_attention(model)
        return model

    def _warn_unused_type_overrides(self, exempted: set[str]) -> None:
        """A `module_type_overrides` key that no layer of this model matched is a warning, not an error: one
        config may serve several denoiser families (a UNet's convs, a transformer's linears). `exempted`: the
        reasons of the unsupported ops an override keeps in FP (they act there too)."""
        reasons = {d.reason for d in self.decisions} | exempted
        unused = [key.__name__ for key in self.config.module_type_overrides
                  if f"module_type_overrides[{key.__name__}]" not in reasons]
        if unused:
            warnings.warn(f"QuantConfig.module_type_overrides {unused} decided no layer of this model (none is of "
                          "those types, or module_name_overrides decided them first): they change nothing here.", UserWarning, stacklevel=3)

    def _warn_simulated_attention(self, model: GraphModule) -> None:
        attention = [n for n in model.graph.nodes if n.op == "call_function"
                     and n.target in annotators.ATTENTION_OPERANDS and "quantization_annotation" in n.meta]
        if not attention:
            return
        why = int8_attention_unavailable()
        if why is None:  # torchao's integer template runs them here
            return
        warnings.warn(f"QuantConfig(quantize_attention_matmuls=True) quantizes {len(attention)} attention ops, which "
                      f"run simulated here (the accuracy cost of int8 attention, not its speed: slower than FP "
                      f"attention): {why}. See docs/methods.md#int8-attention.", UserWarning, stacklevel=3)

    def reduced_ranges(self) -> list[LayerDecision]:
        """The decisions whose activations got a one-bit-reduced range (each says why in `range_reason`)."""
        return [d for d in self.decisions if d.range_reason]

    def _log_summary(self) -> None:
        quantized = [d for d in self.decisions if d.layer is not None]
        reduced = self.reduced_ranges()
        logger.info("DiffusionQuantizer(%s): %d ops quantized, %d kept in FP; int8 kernels whose int16 pair sums "
                    "saturate here: %s; %d layers use a one-bit-reduced activation range", self.config.name,
                    len(quantized), len(self.decisions) - len(quantized), sorted(self.saturating_kernels) or "none",
                    len(reduced))

    def validate(self, model: GraphModule) -> None:
        pass
