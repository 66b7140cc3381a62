"""A quantized model on disk at its real size: the save format (format.py), packed low-bit codes (packing.py),
what a model weighs (size.py), where a save may go (target.py; standard library only, so that the command line
checks `--out` before it imports torch) and safe file writes (file_io.py). The names below load on first use."""
from __future__ import annotations

import importlib

_MODULE_OF = {"load_quantized": "format", "save_quantized": "format", "held_size_mb": "size", "size_mb": "size",
              "check_save_target": "target"}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
