"""`UNet2DModel` (DDPM / DDIM pixel-space UNets): sample, timestep, optional class_labels."""
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffusion_ao.denoisers.base import DenoiserAdapter

ADAPTER = DenoiserAdapter(UNet2DModel, sample_arg="sample", output_class=UNet2DOutput)
