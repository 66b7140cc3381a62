"""Deprecated alias: `diffusion_ao.lowering` moved to `diffusion_ao.backends.x86`; this path goes away in the next
release."""
import warnings

from diffusion_ao.backends import x86 as _moved

warnings.warn("diffusion_ao.lowering moved to diffusion_ao.backends.x86; import it from there (the old path goes away in "
              "the next release).", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_moved, name)
