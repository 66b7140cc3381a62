"""The PT2E quantizer: `DiffusionQuantizer` (quantizer.py), the per-op annotators keyed by pattern
(annotators.py) and the per-graph state they consult (context.py)."""
from diffusion_ao.quantizer.annotators import ANNOTATORS, register_annotator
from diffusion_ao.quantizer.context import AnnotationContext, LayerDecision, check_module_name_overrides
from diffusion_ao.quantizer.quantizer import DiffusionQuantizer, PlannedLayer

__all__ = ["ANNOTATORS", "AnnotationContext", "DiffusionQuantizer", "LayerDecision", "PlannedLayer",
           "check_module_name_overrides", "register_annotator"]
