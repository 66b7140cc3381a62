"""The architecture of the shipped class-conditional DiT on the 16x16 digits, kept in one place for training
and loading.

adaLN-Zero (diffusers' `DiTTransformer2DModel`), patch 2 (64 tokens), 10 classes; the label table has an 11th row,
`NULL_LABEL`, which training uses for 10 % of the samples (classifier-free guidance).
"""
from __future__ import annotations

from diffusers import DiTTransformer2DModel

from diffusion_ao.models.digits import IMAGE_SIZE

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the unconditional label (diffusers' LabelEmbedding: index num_classes)

DEFAULT_DIT_KWARGS = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,           # epsilon only (no learned variance)
    patch_size=2,
    num_attention_heads=4,
    attention_head_dim=32,    # hidden 128
    num_layers=4,
    num_embeds_ada_norm=NUM_CLASSES,
)


def build_default_dit() -> DiTTransformer2DModel:
    """An untrained DiTTransformer2DModel with the shipped DiT's architecture."""
    return DiTTransformer2DModel(**DEFAULT_DIT_KWARGS)
