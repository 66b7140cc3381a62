"""Quiet output for the entry points (`bench/*.py`, `diffusion_ao.quantize_cli`): drops the third-party messages
a user of this project cannot act on, and nothing else.

Call `quiet_third_party()` before torch, torchao or diffusers are imported (the messages come at import time).
The library itself never calls it: a program that imports diffusion-ao keeps every message its libraries print.
This module imports only the standard library, and `import diffusion_ao` imports no submodule until one is used,
so an entry point can call it first.
"""
from __future__ import annotations

import logging
import re
import warnings

# logger name -> messages dropped from it (regular expressions, searched in the formatted message)
DROPPED_LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    # torchao's CPU wheel tries its CUDA extensions and Triton kernels at import
    "torchao": (r"^Failed to load .*\.so",),
    "torchao.kernel.intmm": (r"Detected no triton",),
    # torchao registers its Enums as pytree constants, which torch 2.13 deprecates
    "torch.utils._pytree": (r"is an Enum subclass and is now natively supported",),
    # diffusers probes torchao tensor classes that torchao 0.18 no longer has; this project does not load them
    "diffusers.quantizers.torchao.torchao_quantizer": (r"Unable to import `torchao` Tensor objects",),
}
# (category, module regex, message regex) of Python warnings dropped: deprecations inside the libraries, not in
# user code
DROPPED_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (DeprecationWarning, r"(torch|torchao|diffusers|transformers|torchmetrics)(\.|$)", ""),
    (FutureWarning, r"(torch|torchao|diffusers|transformers|torchmetrics)(\.|$)", ""),
    # torch.export's pytree specs, unpickled by deepcopy (attributed to the standard library's copyreg)
    (FutureWarning, r"copyreg", r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # inductor's oneDNN lowering copies a weight zero point with torch.tensor(tensor)
    (UserWarning, r"torch\._inductor\.mkldnn_lowerings", r"To copy construct from a tensor"),
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def quiet_third_party() -> None:
    """Drops the messages in `DROPPED_LOG_MESSAGES` and the library deprecations in `DROPPED_WARNINGS`.

    Idempotent. Loggers are configured by name, so this works before the libraries are imported.

    Example:
        >>> from diffusion_ao.quiet import quiet_third_party
        >>> quiet_third_party()      # first thing in an entry point, before `import torch`
    """
    for name, patterns in DROPPED_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
    for category, module, message in DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
