"""`AnnotationContext`: the per-graph state every annotator consults (the config, the roles of nodes, the
qspec factories), and the `LayerDecision` it records for each layer.

It lives apart from `DiffusionQuantizer` so that the annotators (`annotators.py`) and the quantizer that runs them
both import it, and neither imports the other's module for it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import QuantizationSpec

from diffusion_ao.backends.x86_features import int16_pair_overflows
from diffusion_ao.config import LayerQuant, QuantConfig
from diffusion_ao.observers import TimestepActivationObserver, WeightObserver
from diffusion_ao.observers.fake_quantize import TimestepFakeQuantize, WeightFakeQuantize
from diffusion_ao.passes.analysis import (
    CONV_OPS,
    LOW_RANK_META,
    module_names,
    module_path,
    module_type_name,
    resolve_type,
)
from diffusion_ao.primitives import int_range


def check_module_name_overrides(graph: GraphModule, config: QuantConfig) -> None:
    """Raises a ValueError naming every `config.module_name_overrides` key that is no module path of the model
    `graph` was exported from (a typo would otherwise quantize the model as if the override were absent), with
    the nearest paths."""
    known = module_names(graph)
    unknown = [key for key in config.module_name_overrides if key and key not in known]
    if not unknown:
        return
    hints = "; ".join(f"{key!r}: nearest {difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.5) or 'none'}"
                      for key in unknown)
    raise ValueError(f"QuantConfig.module_name_overrides names {len(unknown)} module(s) the model does not have "
                     f"({hints}). Keys are module paths as in model.named_modules() (e.g. 'mid_block' or "
                     f"'down_blocks.1.resnets.0'), without a prefix such as 'unet.'.")


@dataclass
class LayerDecision:
    """What the quantizer decided for one op, and why (for reports and logs)."""

    module: str
    op: str
    layer: Optional[LayerQuant]
    reason: str
    act_range: Optional[tuple[int, int]] = None
    range_reason: str = ""  # why the activation range is one bit reduced ("" where it is not)


@dataclass
class AnnotationContext:
    """Per-graph state that annotators consult: the config, the roles of nodes, and the qspec factories."""

    config: QuantConfig
    first_last: set[Node]
    time_path: set[Node]
    shortcuts: set[Node]
    saturating_kernels: frozenset[str]  # the int8 kernels ("qconv", "qlinear") whose int16 pair sums overflow
    kernels_probed: bool  # whether that set was measured (`cpu.int8_kernel_saturates`) or forced
    qat: bool = False  # FakeQuantize modules (for `prepare_qat_pt2e`) instead of observers
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
        role = node.meta.get(LOW_RANK_META)  # "down" / "up": a linear of a quantized layer's low-rank branch
        if role:
            layer = layer if found else self.config.default_layer
            bits = self.config.low_rank.down_bits if self.config.low_rank is not None else None
            if role == "down" and bits is not None and layer is not None:
                layer = LayerQuant(bits, bits if layer.act_bits is not None else None)
                reason = f"low-rank branch down-projection at {bits} bits"
            else:
                layer, reason = None, f"low-rank branch {role}-projection in floating point"
        elif not found:
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
        kwargs = dict(dtype=torch.uint8, qscheme=qscheme, quant_min=qmin, quant_max=qmax,
                      method=self.config.act_observer, aggregation=self.config.timestep_aggregation)
        ctor = TimestepFakeQuantize.with_args(observer=TimestepActivationObserver, **kwargs) if self.qat \
            else TimestepActivationObserver.with_args(**kwargs)
        return QuantizationSpec(dtype=torch.uint8, quant_min=qmin, quant_max=qmax, qscheme=qscheme,
                                observer_or_fake_quant_ctr=ctor)

    def weighted_input_spec(self, layer: LayerQuant, node: Node) -> QuantizationSpec:
        """The input spec of a conv/linear: one bit less where its CPU int8 kernel would overflow int16."""
        reduce, why = self.config.reduce_range, ""
        kernel = "qconv" if node.target in CONV_OPS else "qlinear"
        if reduce == "auto":
            reduce = kernel in self.saturating_kernels and int16_pair_overflows(layer.weight_bits, layer.act_bits)
            if reduce:
                how = "probed" if self.kernels_probed else "forced with has_vnni=False"
                why = (f"oneDNN's int8 {kernel} adds products in int16 here ({how}) and {layer.act_bits}-bit "
                       f"activations x {layer.weight_bits}-bit weights can overflow it")
        elif reduce:
            why = "QuantConfig(reduce_range=True)"
        spec = self.activation_spec(layer.act_bits, reduce)
        if self.decisions:
            self.decisions[-1].act_range = (spec.quant_min, spec.quant_max)
            self.decisions[-1].range_reason = why
        return spec

    def weight_spec(self, bits: int) -> QuantizationSpec:
        qmin, qmax = int_range(bits, signed=True)
        per_channel = self.config.weight_granularity == "per_channel"
        qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
        kwargs = dict(dtype=torch.int8, qscheme=qscheme, quant_min=qmin, quant_max=qmax, ch_axis=0,
                      method=self.config.weight_observer)
        ctor = WeightFakeQuantize.with_args(observer=WeightObserver, **kwargs) if self.qat \
            else WeightObserver.with_args(**kwargs)
        return QuantizationSpec(dtype=torch.int8, quant_min=qmin, quant_max=qmax, qscheme=qscheme,
                                ch_axis=0 if per_channel else None, is_dynamic=False,
                                observer_or_fake_quant_ctr=ctor)
