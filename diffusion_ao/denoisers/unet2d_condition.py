"""`UNet2DConditionModel` (SD 1.x / 2.x, SDXL): text conditioning by cross-attention; SDXL adds
`added_cond_kwargs` (`text_embeds`, `time_ids`), whose embedding width its pipeline reads from the UNet."""
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from diffusion_ao.denoisers.base import DenoiserAdapter

ADAPTER = DenoiserAdapter(UNet2DConditionModel, sample_arg="sample", output_class=UNet2DConditionOutput,
                          wrapper_attributes=("add_embedding.linear_1.in_features",))
