"""`FluxTransformer2DModel`: double- and single-stream blocks, rotary positions from `img_ids` / `txt_ids` (one
row per token, no batch dimension), and a guidance embedding (`guidance`) in the guidance-distilled models."""
from diffusers import FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from diffusion_ao.denoisers.base import DenoiserAdapter

ADAPTER = DenoiserAdapter(FluxTransformer2DModel, sample_arg="hidden_states", output_class=Transformer2DModelOutput,
                          shared_args=("img_ids", "txt_ids"))
