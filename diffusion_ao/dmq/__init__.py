"""DMQ (METHODS.md §3–§5): adaptive timestep weighting and power-of-two channel scaling with voting.

Both run at calibration time on the PT2E graph; `quantize_unet` applies them when `QuantConfig.dmq` is set.
"""
from .pts import PowerOfTwoVotes, apply_power_of_two_scaling, per_sample_channel_errors, vote
from .timestep_weights import AdaptiveTimestepWeights, adapt_timestep_weights, timestep_weights

__all__ = ["AdaptiveTimestepWeights", "PowerOfTwoVotes", "adapt_timestep_weights", "apply_power_of_two_scaling",
           "per_sample_channel_errors", "timestep_weights", "vote"]
