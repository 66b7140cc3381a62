"""TFMQ-DM (docs/methods.md#tfmq-dm): temporal information blocks cached or quantized with finite-set calibration,
chosen per temporal feature by disturbance-aware selection. The graph passes live in `diffusion_ao.passes`
(temporal, temporal_cache, finite_set); this package holds the selection, TIAR and the recipe steps."""
from diffusion_ao.methods.tfmq.apply import TFMQReport
from diffusion_ao.methods.tfmq.selection import FeatureChoice, select_cached_features, temporal_feature_errors
from diffusion_ao.methods.tfmq.tiar import reconstruct_temporal_features

__all__ = ["FeatureChoice", "TFMQReport", "reconstruct_temporal_features",
           "select_cached_features", "temporal_feature_errors"]
