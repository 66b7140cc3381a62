"""Deprecated alias: `diffusion_ao.gpu` moved to `diffusion_ao.backends.cuda`; this path goes away in the next
release."""
import warnings

from diffusion_ao.backends import cuda as _moved

warnings.warn("diffusion_ao.gpu moved to diffusion_ao.backends.cuda; import it from there (the old path goes away in "
              "the next release).", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_moved, name)
