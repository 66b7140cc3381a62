"""Observers that plug into torchao's PT2E flow (`prepare_pt2e` / `convert_pt2e`)."""
from .activation import TimestepActivationObserver
from .context import current_timestep, timestep_context
from .weight import WeightObserver

__all__ = ["TimestepActivationObserver", "WeightObserver", "current_timestep", "timestep_context"]
