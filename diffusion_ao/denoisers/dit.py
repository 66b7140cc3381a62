"""`DiTTransformer2DModel`: class-conditional, adaLN-Zero modulation from the timestep and class embeddings."""
from diffusers import DiTTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from diffusion_ao.denoisers.base import DenoiserAdapter

ADAPTER = DenoiserAdapter(DiTTransformer2DModel, sample_arg="hidden_states", output_class=Transformer2DModelOutput)
