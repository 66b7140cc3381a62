"""Where `save_quantized` may write: the file names of a save and the check made before any work.

Standard library only, so that a command line can check its `--out` before it imports torch.
"""
from __future__ import annotations

from pathlib import Path

GRAPH_FILE, TENSORS_FILE, CONFIG_FILE = "graph.pt2.xz", "tensors.safetensors", "config.json"


def is_save_file(name: str) -> bool:
    """Whether `name` is one of the files `save_quantized` writes (a time-grouped save has a graph per group)."""
    return name in (GRAPH_FILE, TENSORS_FILE, CONFIG_FILE) or (name.startswith("graph.group") and
                                                               name.endswith(".pt2.xz"))


def check_save_target(path: Path, overwrite: bool) -> bool:
    """Whether saving to `path` replaces an earlier save; a FileExistsError where saving would lose or mix
    anything (a file, someone else's files, an earlier save without `overwrite`). `save_quantized` calls it
    first; a command line can call it before the work."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"save_quantized: '{path}' is a file; give a new or empty directory.")
    if not path.is_dir() or not any(path.iterdir()):
        return False
    names = sorted(p.name for p in path.iterdir())
    foreign = [n for n in names if not is_save_file(n)]
    if foreign or CONFIG_FILE not in names:
        raise FileExistsError(f"save_quantized: '{path}' holds other files ({', '.join((foreign or names)[:5])}"
                              f"{' ...' if len(foreign or names) > 5 else ''}) and is not a diffusion-ao save; "
                              "choose a new or empty directory (nothing was written).")
    if not overwrite:
        raise FileExistsError(f"save_quantized: '{path}' already holds a saved model; pass overwrite=True "
                              "(CLI: --overwrite) to replace it, or choose another directory.")
    return True
