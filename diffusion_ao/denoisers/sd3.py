"""`SD3Transformer2DModel` (MMDiT): joint attention over image and text tokens, modulation from the timestep
and the pooled text projection (`pooled_projections`)."""
from diffusers import SD3Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from diffusion_ao.denoisers.base import DenoiserAdapter

ADAPTER = DenoiserAdapter(SD3Transformer2DModel, sample_arg="hidden_states", output_class=Transformer2DModelOutput)
