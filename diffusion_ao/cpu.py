"""Deprecated alias: `diffusion_ao.cpu` moved to `diffusion_ao.backends.x86_features`; this path goes away in the next
release."""
import warnings

from diffusion_ao.backends import x86_features as _moved

warnings.warn("diffusion_ao.cpu moved to diffusion_ao.backends.x86_features; import it from there (the old path goes away in "
              "the next release).", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_moved, name)
