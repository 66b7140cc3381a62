"""`PixArtTransformer2DModel` (PixArt-α / Σ): adaLN-single (one timestep MLP for all blocks), text by
cross-attention with an attention mask; `added_cond_kwargs` (resolution, aspect ratio) where the model uses them."""
from diffusers import PixArtTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from diffusion_ao.denoisers.base import DenoiserAdapter

ADAPTER = DenoiserAdapter(PixArtTransformer2DModel, sample_arg="hidden_states",
                          output_class=Transformer2DModelOutput)
