"""Save and load converted (quantized) graphs: packed low-bit weights, no floating-point copies.

A saved model is a directory with three files:

* `graph.pt2.xz`: the graph structure, `torch.export`-serialised (then xz-compressed) with every tensor it reads
  turned into an input, so that the archive holds no weights at all (neither the folded integer codes nor the
  original FP parameters that `convert_pt2e` leaves on the module unused).
* `tensors.safetensors`: every tensor the graph reads (weight codes, per-channel scales and zero points, biases,
  norms, and any buffer a method's pass registered, e.g. cached time embeddings or folded scales). Weight codes
  of 4 bits or fewer are packed (two 4-bit codes per byte); their width comes from the dequantize ops'
  quant_min / quant_max.
* `config.json`: format version, the graph's input names, the tensors in the order the graph reads them, the
  bit width, dtype and shape of the packed ones, and the manifest that binds the files together (each one's
  size and SHA-256, and a digest of config.json itself).

A time-grouped model (`TimeGroupedGraph`) adds one `graph.group<k>.pt2.xz` per further group (its groups read the
same tensors, stored once) and the timestep -> group table in config.json's `time_groups`.

`load_quantized` re-attaches the tensors as buffers of the loaded graph, which is then an ordinary converted
graph: it runs eagerly, `compile_for_cpu` lowers it to the same int8 kernels, and its batch size is dynamic.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import lzma
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.fx import GraphModule

from diffusion_ao.backends.x86_attention import int8_attention_op
from diffusion_ao.graph import DEQUANTIZE_OPS, MAX_BATCH, QUANTIZE_OPS, graph_input_names, graph_tensor_targets
from diffusion_ao.grouped_graph import GROUP_INDEX_BUFFER, TimeGroupedGraph
from diffusion_ao.passes.temporal_cache import TIMESTEPS_BUFFER
from diffusion_ao.serialization.file_io import save_tensors_file
from diffusion_ao.serialization.packing import pack_int, unpack_int
from diffusion_ao.serialization.size import weight_code_bits
from diffusion_ao.serialization.target import CONFIG_FILE, GRAPH_FILE, TENSORS_FILE, check_save_target  # noqa: F401 (public)

FORMAT = "diffusion-ao-quantized"
VERSION = 2  # 2: config.json holds a manifest (size, SHA-256 of every file) and its own digest
READABLE_VERSIONS = (1, 2)  # version 1 saves load without the checks
INPUTS_META = "diffusion_ao_inputs"
GUARDS_MODULE = "_guards_fn"  # torch.export's input-shape check; dynamo guards the compiled graph itself
_EXAMPLE_BATCH = 2  # torch.export specialises dimensions of size 1
TIME_GROUPS = "time_groups"  # config.json: timesteps, group of each, batch inputs of a TimeGroupedGraph
DROPPED_META = ("stack_trace", "from_node", "torch_fn", "source_fn_stack")


def _require_converted(graph: Any) -> GraphModule:
    if not isinstance(graph, GraphModule):
        raise TypeError(f"save_quantized needs the graph returned by convert_pt2e, got {type(graph).__name__}. "
                        "(A compiled model cannot be saved: save the converted graph before compile_for_cpu.)")
    targets = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    if any(n.op == "call_module" and n.target != GUARDS_MODULE for n in graph.graph.nodes):
        raise ValueError("save_quantized got a graph that still calls submodules (observers?): calibrate it and "
                         "run convert_pt2e first.")
    if not targets & (DEQUANTIZE_OPS | QUANTIZE_OPS):
        raise ValueError("save_quantized got a graph without quantize/dequantize ops: it is not quantized. Pass "
                         "the output of convert_pt2e (or quantize_denoiser).")
    return graph


def _example_inputs(graph: GraphModule) -> list[torch.Tensor]:
    examples = []
    for node in graph.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"Input '{node.name}' has no example metadata; save a graph from export_denoiser.")
        shape = [_EXAMPLE_BATCH if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
        examples.append(torch.zeros(shape, dtype=val.dtype))
    return examples


def _has_batch(graph: GraphModule, name: str) -> bool:
    val = next(n for n in graph.graph.nodes if n.op == "placeholder" and n.name == name).meta["val"]
    return val.dim() > 0 and isinstance(val.shape[0], torch.SymInt)


def _graph_with_tensor_inputs(graph: GraphModule, keys: dict[str, str]) -> GraphModule:
    """A copy of `graph` in which every get_attr is an input named by `keys` (appended after the real inputs)."""
    new = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    nodes = list(graph.graph.nodes)
    for node in nodes:
        if node.op == "placeholder":
            env[node] = new.placeholder(node.name)
    tensor_inputs = {target: new.placeholder(key) for target, key in keys.items()}
    for node in nodes:
        if node.op == "placeholder" or (node.op == "call_module" and node.target == GUARDS_MODULE):
            continue
        if node.op == "get_attr":
            env[node] = tensor_inputs[node.target]
        elif node.op == "output":
            out = node.args[0]
            # export's pytree codegen wraps a single output in a list; return the tensor itself
            if isinstance(out, (list, tuple)) and len(out) == 1:
                out = out[0]
            new.output(torch.fx.map_arg(out, lambda n: env[n]))
        else:
            env[node] = new.node_copy(node, lambda n: env[n])
    return GraphModule(torch.nn.Module(), new)


def tensor_key(target: str) -> str:
    """The safetensors key (and buffer name after loading) of a get_attr target."""
    return target.replace(".", "__")


def _graph_archive(graph: GraphModule, tensors: dict[str, torch.Tensor], keys: dict[str, str],
                   max_batch: int) -> bytes:
    """The graph's structure, `torch.export`-serialised with its tensors as inputs, xz-compressed."""
    flat = _graph_with_tensor_inputs(graph, keys)
    examples = _example_inputs(graph)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    # a batch dimension on every input exported with one (not on shared inputs such as Flux's img_ids)
    dynamic = [{0: batch} if _has_batch(graph, name) else None for name in graph_input_names(graph)]
    dynamic += [None] * len(tensors)
    with torch.no_grad():
        program = torch.export.export(flat, (*examples, *tensors.values()), dynamic_shapes=dynamic)
    program._example_inputs = None  # they would hold a copy of every tensor
    for node in program.graph.nodes:  # provenance metadata is most of the archive and not needed to run it
        for key in DROPPED_META:
            node.meta.pop(key, None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    # The archive is uncompressed JSON, which compresses well: xz keeps the graph small next to its weights.
    return lzma.compress(buffer.getvalue(), preset=6)


def _group_file(k: int) -> str:
    return GRAPH_FILE.replace("graph", f"graph.group{k}", 1)


def save_quantized(graph: GraphModule, path: Union[str, Path], metadata: Optional[dict[str, Any]] = None,
                   max_batch: int = MAX_BATCH, overwrite: bool = False) -> Path:
    """Saves a converted graph to the directory `path` with packed low-bit weights and no FP weights. A
    `TimeGroupedGraph` is saved with its tensors once and one graph file per group.

    The files are written into a temporary sibling directory, flushed to disk and only then renamed into place:
    an interrupted or failed save (disk full, Ctrl-C) leaves an earlier save at `path` as it was. config.json
    holds each file's size and SHA-256 and a digest of itself, which `load_quantized` checks.

    Args:
        graph: the output of `convert_pt2e` / `quantize_unet` (not compiled), possibly rewritten by passes that
            add buffers: every tensor its graph reads is saved.
        path: a new or empty directory, or (with `overwrite=True`) an earlier save to replace. A directory
            holding other files is never written into.
        metadata: JSON-serialisable extras stored in config.json (e.g. the preset name), checked before anything
            is written.
        max_batch: the largest batch the reloaded graph accepts.
        overwrite: replace an earlier save at `path` (only once the new one is complete).

    Returns:
        The directory.

    Raises:
        TypeError / ValueError: if `graph` is not a converted graph or `metadata` is not JSON-serialisable.
        FileExistsError: if `path` is a file, holds an earlier save (without `overwrite`) or other files.

    Example:
        >>> save_quantized(convert_pt2e(prepared), "unet-w4a8", metadata={"preset": "w4a8"})
        >>> fast = compile_for_cpu(load_quantized("unet-w4a8"))
    """
    path = Path(path)
    groups = graph.groups if isinstance(graph, TimeGroupedGraph) else [graph]
    for g in groups:
        _require_converted(g)
    try:
        json.dumps(metadata or {})
    except (TypeError, ValueError) as error:
        raise TypeError(f"save_quantized: metadata must be JSON-serialisable (str, numbers, lists, dicts): "
                        f"{error}. Convert the value first, e.g. str(torch.float16).") from None
    replaces = check_save_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0o700 would make the save private to its writer
    try:
        if isinstance(graph, TimeGroupedGraph):
            _save_time_grouped(graph, staging, metadata, max_batch)
        else:
            _write_config(staging, _save_graph(graph, staging, metadata, max_batch))
        _move_into_place(staging, path, replaces)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _move_into_place(staging: Path, path: Path, replaces: bool) -> None:
    """Renames the complete `staging` directory to `path`; an earlier save there is renamed aside first and
    removed only once the new one is in place."""
    for f in staging.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if not replaces:
        if path.is_dir():
            path.rmdir()  # empty (checked)
        os.replace(staging, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / "save")
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(old / "save", path)  # put the earlier save back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _save_graph(graph: GraphModule, path: Path, metadata: Optional[dict[str, Any]], max_batch: int) -> dict:
    """Writes one graph's archive and tensors into `path`; returns its config (not yet written)."""
    tensors = graph_tensor_targets(graph)
    bits = weight_code_bits(graph)
    keys = {target: tensor_key(target) for target in tensors}
    if len(set(keys.values())) != len(keys):
        raise ValueError("Two graph attributes map to the same file key; rename them.")
    inputs = graph_input_names(graph)
    (path / GRAPH_FILE).write_bytes(_graph_archive(graph, tensors, keys, max_batch))

    stored, packed = {}, {}
    for target, tensor in tensors.items():
        key = keys[target]
        if target in bits and bits[target] < 8:
            stored[key] = pack_int(tensor, bits[target])
            packed[key] = {"bits": bits[target], "dtype": str(tensor.dtype).removeprefix("torch."),
                           "shape": list(tensor.shape)}
        else:
            stored[key] = tensor.detach().contiguous().clone()
    save_tensors_file(stored, path / TENSORS_FILE)
    # `tensors` is in the order of the graph's extra inputs; `packed` says how to unpack the low-bit codes.
    return {"format": FORMAT, "version": VERSION, "inputs": inputs, "tensors": list(keys.values()),
            "packed": packed, "graph_meta_inputs": graph.meta.get(INPUTS_META, inputs), "metadata": metadata or {}}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _config_digest(config: dict) -> str:
    """SHA-256 of config.json's content as JSON reads it back (keys as strings, tuples as lists), digest aside."""
    body = json.loads(json.dumps({k: v for k, v in config.items() if k != "digest"}))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_config(path: Path, config: dict) -> None:
    """config.json with the manifest of every other file in `path` (size, SHA-256) and its own digest."""
    config["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                       for f in sorted(path.iterdir()) if f.name != CONFIG_FILE}
    config["digest"] = _config_digest(config)
    (path / CONFIG_FILE).write_text(json.dumps(config, separators=(",", ":")))


def _save_time_grouped(model: TimeGroupedGraph, path: Path, metadata: Optional[dict[str, Any]],
                       max_batch: int) -> None:
    """The first group as a plain save; every other group's graph beside it (`graph.group<k>.pt2.xz`), reading
    the same tensors; the timestep -> group table in config.json."""
    groups = model.groups
    config = _save_graph(groups[0], path, metadata, max_batch)
    first = graph_tensor_targets(groups[0])
    for k, group in enumerate(groups[1:], start=1):
        mine = graph_tensor_targets(group)
        if list(mine) != list(first) or any(mine[t] is not first[t] for t in mine):
            raise ValueError("save_quantized: the time groups do not read the same tensors; save the model that "
                             "convert_time_grouped / quantize_denoiser returned, unmodified.")
        (path / _group_file(k)).write_bytes(_graph_archive(group, mine, {t: tensor_key(t) for t in mine},
                                                           max_batch))
    config[TIME_GROUPS] = {"timesteps": getattr(model, TIMESTEPS_BUFFER).tolist(),
                           "group_of": getattr(model, GROUP_INDEX_BUFFER).tolist(),
                           "batch_inputs": model.batch_inputs}
    _write_config(path, config)


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"No saved quantized model at '{path}': expected a directory written by "
                                "save_quantized.")
    missing = [f for f in (GRAPH_FILE, TENSORS_FILE, CONFIG_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"'{path}' lacks {missing}: it is not (or no longer) a complete save_quantized "
                                "directory; save the model again.")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"'{path / CONFIG_FILE}' is not valid JSON ({error}): the file is truncated or was "
                         "edited; save the model again.") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"'{path / CONFIG_FILE}' is not a diffusion-ao quantized model (format "
                         f"{config.get('format') if isinstance(config, dict) else type(config).__name__!r}).")
    if config.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"'{path}' has format version {config.get('version')}; this diffusion-ao reads "
                         f"versions {list(READABLE_VERSIONS)}.")
    if config["version"] >= 2:
        _verify(path, config)
    return config


def _verify(path: Path, config: dict) -> None:
    """Checks config.json's digest and every file against its manifest (size, then SHA-256)."""
    if config.get("digest") != _config_digest(config):
        raise ValueError(f"'{path / CONFIG_FILE}' was edited after saving (its digest does not match its "
                         "content): the tensor order or qparams it lists may no longer fit the graph; save the "
                         "model again.")
    for name, entry in config.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"'{path}' lacks '{name}', which its config.json lists; save the model again.")
        if f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            raise ValueError(f"'{f}' does not belong to this save: its size or SHA-256 differs from config.json's "
                             "manifest (a file from another save, truncated or changed); save the model again.")


def load_quantized(path: Union[str, Path]) -> torch.nn.Module:
    """Loads a model saved by `save_quantized` as a converted graph (q/dq ops, integer weight codes).

    Args:
        path: the directory given to `save_quantized`.

    Returns:
        A GraphModule taking the same inputs as the saved graph (e.g. `(sample, timestep)`), with a dynamic
        batch (a `TimeGroupedGraph` of such graphs, sharing one set of tensors, for a time-grouped model); `compile_for_cpu` lowers it to int8 kernels and `as_diffusers_denoiser` puts it into a pipeline.
        `graph.meta["diffusion_ao_metadata"]` holds the `metadata` given when saving.

    Raises:
        FileNotFoundError: if the directory or one of its files is missing.
        ValueError: if the files are not a diffusion-ao quantized model of a known version, or do not belong
            together (a file's size or SHA-256 differs from config.json's manifest, or config.json was edited).

    Example:
        >>> quantized = load_quantized("unet-w4a8")
        >>> out = compile_for_cpu(quantized)(sample, timestep)
    """
    path = Path(path)
    config = _read_config(path)
    with _unreadable_as_value_error(path / TENSORS_FILE):
        stored = load_file(str(path / TENSORS_FILE))
    root = torch.nn.Module()
    for key in config["tensors"]:
        if key not in stored:
            raise ValueError(f"'{path / TENSORS_FILE}' lacks the tensor '{key}' that the graph reads.")
        data = stored[key]
        if key in config["packed"]:
            info = config["packed"][key]
            data = unpack_int(data, info["bits"], tuple(info["shape"]), getattr(torch, info["dtype"]))
        root.register_buffer(key, data)
    if TIME_GROUPS not in config:
        return _load_graph(path, path / GRAPH_FILE, config, root)
    grouped = config[TIME_GROUPS]
    files = [path / GRAPH_FILE] + [path / _group_file(k) for k in range(1, max(grouped["group_of"]) + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"'{path}' lacks the time groups' graphs {missing}; save the model again.")
    graphs = [_load_graph(path, f, config, root) for f in files]  # every group reads root's tensors
    return TimeGroupedGraph(graphs, grouped["timesteps"], torch.tensor(grouped["group_of"]), grouped["batch_inputs"])


@contextlib.contextmanager
def _unreadable_as_value_error(file: Path) -> Iterator[None]:
    """A file the manifest cannot vouch for (a version 1 save has none) may be truncated or corrupt: the reader's
    own error becomes one that names the file."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, EOFError, lzma.LZMAError, SafetensorError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"'{file}' cannot be read ({type(error).__name__}: {first[:200]}): it is truncated or "
                         "corrupt; save the model again.") from error


def _load_graph(path: Path, archive: Path, config: dict, root: torch.nn.Module) -> GraphModule:
    int8_attention_op()  # a graph with int8 attention calls torchao's op: its schema and a CPU kernel
    with _unreadable_as_value_error(archive):
        program = torch.export.load(io.BytesIO(lzma.decompress(archive.read_bytes())))
    flat = program.module()
    new = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    n_inputs = len(config["inputs"])
    placeholders = [n for n in flat.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != n_inputs + len(config["tensors"]):
        raise ValueError(f"'{path}': the graph has {len(placeholders)} inputs but config.json lists "
                         f"{n_inputs} inputs and {len(config['tensors'])} tensors; the files do not belong together.")
    for node, name in zip(placeholders[:n_inputs], config["inputs"]):
        env[node] = new.placeholder(name)
        env[node].meta = dict(node.meta)
    for node, key in zip(placeholders[n_inputs:], config["tensors"]):
        env[node] = new.get_attr(key)
    for node in flat.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, (list, tuple)) and len(out) == 1:
                out = out[0]
            new.output(torch.fx.map_arg(out, lambda n: env[n]))
        elif node.op == "call_module" and node.target == GUARDS_MODULE:
            continue
        else:
            env[node] = new.node_copy(node, lambda n: env[n])
    new.eliminate_dead_code()
    loaded = GraphModule(root, new)
    loaded.meta[INPUTS_META] = config.get("graph_meta_inputs", config["inputs"])
    loaded.meta["diffusion_ao_metadata"] = config.get("metadata", {})
    return loaded
