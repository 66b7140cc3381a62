"""The architecture of the shipped default model, kept in one place for training and tests."""
from __future__ import annotations

from diffusers import UNet2DModel

from diffusion_ao.models.digits import IMAGE_SIZE

DEFAULT_UNET_KWARGS = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)

# The noise schedule the default model was trained with (passed to diffusers' schedulers).
DEFAULT_SCHEDULE_KWARGS = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def build_default_unet() -> UNet2DModel:
    """An untrained UNet2DModel with the default model's architecture (~1.1 M parameters)."""
    return UNet2DModel(**DEFAULT_UNET_KWARGS)
