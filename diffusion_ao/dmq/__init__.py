"""DMQ (docs/methods.md#dmq): adaptive timestep weighting, learned equivalent scaling (LES) and power-of-two
channel scaling with voting.

All run at calibration time on the PT2E graph; `quantize_unet` applies them when `QuantConfig.dmq` is set.
"""
from .les import LESResult, apply_learned_scaling, learn_scales, smoothquant_scales
from .pts import PowerOfTwoVotes, apply_power_of_two_scaling, per_sample_channel_errors, vote
from .timestep_weights import AdaptiveTimestepWeights, adapt_timestep_weights, timestep_weights

__all__ = ["AdaptiveTimestepWeights", "LESResult", "PowerOfTwoVotes", "adapt_timestep_weights", "apply_learned_scaling",
           "apply_power_of_two_scaling", "learn_scales", "per_sample_channel_errors", "smoothquant_scales",
           "timestep_weights", "vote"]
