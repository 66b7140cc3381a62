"""Annotators: one function per op pattern, each marking the graph edges it wants quantized.

Add a pattern with `@register_annotator("name")`; `DiffusionQuantizer` tries every registered annotator on
every node, in registration order, and the first that returns True owns the node.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx import Node
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

from diffusion_ao.passes.analysis import CONV_OPS, LINEAR_OPS
from diffusion_ao.quantizer.context import AnnotationContext

aten = torch.ops.aten
Annotator = Callable[[Node, AnnotationContext], bool]
ANNOTATORS: dict[str, Annotator] = {}

# op -> positions of the two (or three) tensors multiplied inside attention
ATTENTION_OPERANDS = {
    aten.scaled_dot_product_attention.default: (0, 1, 2),
    aten.bmm.default: (0, 1),
    aten.baddbmm.default: (1, 2),
}


def register_annotator(pattern: str) -> Callable[[Annotator], Annotator]:
    def register(fn: Annotator) -> Annotator:
        if pattern in ANNOTATORS:
            raise ValueError(f"An annotator for {pattern!r} is already registered.")
        ANNOTATORS[pattern] = fn
        return fn
    return register


def _annotate_weighted(node: Node, ctx: AnnotationContext) -> bool:
    layer = ctx.layer_for(node)
    if layer is None:
        return False
    qspec_map = {node.args[1]: ctx.weight_spec(layer.weight_bits)}
    if layer.act_bits is not None:
        qspec_map[node.args[0]] = ctx.weighted_input_spec(layer, node)
    node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=qspec_map, _annotated=True)
    return True


@register_annotator("conv2d")
def annotate_conv2d(node: Node, ctx: AnnotationContext) -> bool:
    return node.target in CONV_OPS and _annotate_weighted(node, ctx)


@register_annotator("linear")
def annotate_linear(node: Node, ctx: AnnotationContext) -> bool:
    return node.target in LINEAR_OPS and _annotate_weighted(node, ctx)


@register_annotator("attention")
def annotate_attention(node: Node, ctx: AnnotationContext) -> bool:
    """Quantizes the operands of the attention matmuls (Q, K, V); after convert the recipe rewrites each such SDPA
    as int8 attention (`backends.x86_attention`)."""
    if node.target not in ATTENTION_OPERANDS or not ctx.config.quantize_attention_matmuls:
        return False
    layer = ctx.layer_for(node)
    if layer is not None and layer.act_bits is None:  # attention has no weights: weight-only bits quantize nothing
        ctx.decisions[-1].layer, ctx.decisions[-1].reason = None, "attention operands under weight-only bits"
        return False
    if layer is None:
        return False
    operands = [node.args[i] for i in ATTENTION_OPERANDS[node.target]]
    spec = ctx.activation_spec(layer.act_bits, reduce=False)
    node.meta["quantization_annotation"] = QuantizationAnnotation(
        input_qspec_map={op: spec for op in operands if isinstance(op, Node)}, _annotated=True)
    return True
