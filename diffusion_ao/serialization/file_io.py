"""File writes shared by the saved model and the calibration store."""
from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


def save_tensors_file(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """`safetensors.torch.save_file`, with an I/O failure (a full disk, a lost mount) raised as the `OSError` it
    is, errno included, instead of safetensors' own error type, so that callers and users can tell a full disk
    from bad data."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        found = re.search(r"os error (\d+)", str(error))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, f"{errno.errorcode.get(code, 'I/O error')}: writing '{path}' failed ({error})",
                      str(path)) from error
