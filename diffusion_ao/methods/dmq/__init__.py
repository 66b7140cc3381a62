"""DMQ (docs/methods.md#dmq): adaptive timestep weighting, learned equivalent scaling (LES) and power-of-two
channel scaling with voting.

All run at calibration time on the PT2E graph; `quantize_unet` applies them when `QuantConfig.dmq` is set.
"""
from diffusion_ao.methods.dmq.les import LESResult, apply_learned_scaling, learn_scales, smoothquant_scales
from diffusion_ao.methods.dmq.pts import (
                                         PowerOfTwoVotes,
                                         PTSResult,
                                         apply_power_of_two_scaling,
                                         per_sample_channel_errors,
                                         vote,
)
from diffusion_ao.methods.dmq.timestep_weights import adapt_timestep_weights
from diffusion_ao.methods.learning import AdaptiveTimestepWeights, timestep_weights

__all__ = ["AdaptiveTimestepWeights", "LESResult", "PTSResult", "PowerOfTwoVotes", "adapt_timestep_weights", "apply_learned_scaling",
           "apply_power_of_two_scaling", "learn_scales", "per_sample_channel_errors", "smoothquant_scales",
           "timestep_weights", "vote"]
