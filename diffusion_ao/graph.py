"""Facts about exported denoiser graphs and the one interpreter that runs them node by node.

`GraphRunner` evaluates a graph (exported, prepared or converted) on named inputs, running only what the wanted
nodes depend on, with two kinds of hooks: callbacks that see a node's first input before it runs (what a layer
receives), and stand-ins for `call_module` targets (observers replaced by fake quantizers, or bypassed). Every
method that needs more than the graph's output uses it: activation capture for PTS / LES, the fake-quantized
simulation of block reconstruction, and the evaluation of temporal features for TFMQ-DM's cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from diffusion_ao.denoisers import SAMPLE, TIMESTEP

MAX_BATCH = 4096  # the largest batch an exported graph accepts
qd = torch.ops.quantized_decomposed
DEQUANTIZE_OPS = {qd.dequantize_per_channel.default, qd.dequantize_per_tensor.default,
                  qd.dequantize_per_tensor.tensor}
QUANTIZE_OPS = {qd.quantize_per_channel.default, qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor}


def resolve_attr(module: torch.nn.Module, target: str):
    """The object at dotted path `target` of `module` (a get_attr target)."""
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def graph_tensor_targets(graph: GraphModule) -> dict[str, torch.Tensor]:
    """get_attr target -> tensor, for every tensor constant the graph reads (in graph order).

    Raises:
        TypeError: if a get_attr reads something that is not a tensor (e.g. a submodule).
    """
    found = {}
    for node in graph.graph.nodes:
        if node.op == "get_attr" and node.target not in found:
            obj = resolve_attr(graph, node.target)
            if not isinstance(obj, torch.Tensor):
                raise TypeError(f"get_attr '{node.target}' reads a {type(obj).__name__}, not a tensor.")
            found[node.target] = obj
    return found


def graph_input_names(graph: GraphModule) -> list[str]:
    return [n.name for n in graph.graph.nodes if n.op == "placeholder"]


def require_exported(model: torch.nn.Module, what: str) -> GraphModule:
    """Raises a clear error unless `model` is a graph from `export_denoiser` (or prepared/converted from one)."""
    if not isinstance(model, GraphModule):
        raise TypeError(f"{what} needs an exported graph, got an eager {type(model).__name__}: call "
                        "`graph = export_denoiser(model, example)` first.")
    names = graph_input_names(model)
    if SAMPLE not in names or TIMESTEP not in names:
        raise ValueError(f"{what} needs a graph with inputs named '{SAMPLE}' and '{TIMESTEP}' (as export_denoiser "
                         f"produces); this graph's inputs are {names}.")
    return model


@dataclass(frozen=True)
class InputSpec:
    """What one graph input accepts, from the export metadata: its shape with None for the (dynamic) batch
    dimension, its dtype, and the largest batch the export allows (None where the input has no batch)."""

    shape: tuple[Optional[int], ...]
    dtype: torch.dtype
    max_batch: Optional[int]

    def describe(self) -> str:
        return f"({', '.join('batch' if s is None else str(s) for s in self.shape)}) {str(self.dtype).split('.')[-1]}"


def input_specs(gm: GraphModule) -> dict[str, InputSpec]:
    """Each tensor input of an exported (prepared, converted or reloaded) graph: shape, dtype and batch bound."""
    specs = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if not isinstance(val, torch.Tensor):
            continue
        shape = tuple(d if isinstance(d, int) else None for d in val.shape)
        max_batch = None
        if val.dim() and isinstance(val.shape[0], torch.SymInt):
            upper = val.shape[0].node.shape_env.var_to_range.get(val.shape[0].node.expr)
            max_batch = int(upper.upper) if upper is not None and upper.upper.is_finite else None
        specs[node.name] = InputSpec(shape, val.dtype, max_batch)
    return specs


def check_graph_inputs(specs: dict[str, InputSpec], inputs: dict[str, torch.Tensor], what: str) -> None:
    """Raises a clear error where `inputs` do not fit the graph's `input_specs`: a shape other than the exported
    one (the batch aside), another dtype, or a batch over the export's bound. Torch's own guards would raise an
    `AssertionError` naming a symbolic size instead.

    Args:
        specs: `input_specs(graph)`.
        inputs: graph inputs by name.
        what: who is calling, for the message (e.g. "calibrate (timestep 981)").
    """
    for name, spec in specs.items():
        value = inputs.get(name)
        if not isinstance(value, torch.Tensor):
            continue
        got = tuple(value.shape)
        if len(got) != len(spec.shape) or any(s is not None and s != g for s, g in zip(spec.shape, got)):
            raise ValueError(f"{what}: input '{name}' has shape {got}; the graph was exported for {spec.describe()}. "
                             "Use data captured from the same pipeline call (resolution, channels, prompt length) as "
                             "the export example, or export again for these inputs.")
        if value.dtype != spec.dtype:
            raise TypeError(f"{what}: input '{name}' is {value.dtype}; the graph was exported for {spec.dtype}. "
                            f"Cast the inputs (or the pipeline: pipe.to({spec.dtype})) to {spec.dtype}.")
        if spec.max_batch is not None and got and got[0] > spec.max_batch:
            raise ValueError(f"{what}: input '{name}' has a batch of {got[0]}; the graph accepts at most "
                             f"{spec.max_batch}. Call it in batches of <= {spec.max_batch}, or export (and save) "
                             "with a larger max_batch.")


def call_graph(graph: torch.nn.Module, inputs: dict[str, torch.Tensor], names: Sequence[str]):
    """Calls an exported graph (or a compiled / loaded one) with named inputs: `sample` and `timestep`
    positionally, the rest as keyword arguments, as `export_denoiser` traced it."""
    missing = [n for n in names if n not in inputs]
    if missing:
        raise TypeError(f"The graph needs the inputs {missing}; got {sorted(inputs)}.")
    return graph(inputs[SAMPLE], inputs[TIMESTEP], **{n: inputs[n] for n in names if n not in (SAMPLE, TIMESTEP)})


def register_constant(gm: GraphModule, base: str, value: torch.Tensor, before: Node, parameter: bool = False) -> Node:
    """Registers `value` on `gm` under a fresh name starting with `base` and returns a `get_attr` node for it,
    inserted before `before`, with `meta["val"]` set. The one way passes add constant tensors to a graph.

    Args:
        gm: the graph module.
        base: the name, suffixed with _1, _2, ... if taken.
        value: the tensor (registered as is; pass a copy if the caller's tensor may change).
        before: the node the `get_attr` goes in front of.
        parameter: register a (frozen) parameter instead of a buffer (weights, so that quantizers treat them
            as weights).
    """
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    if parameter:
        gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    else:
        gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def replace_constant(gm: GraphModule, attr_node: Node, make_new, requires_grad: bool | None = None) -> None:
    """Replaces the constant behind a `get_attr` node by `make_new(old)` (cast to the old dtype), out of place:
    exported graphs share their parameters with the eager model, which must not change. A parameter stays a
    parameter, with `requires_grad` (default: the old one's)."""
    *path, leaf = attr_node.target.split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    old = getattr(owner, leaf)
    new = make_new(old).to(old.dtype)
    if isinstance(old, torch.nn.Parameter):
        grad = old.requires_grad if requires_grad is None else requires_grad
        setattr(owner, leaf, torch.nn.Parameter(new, requires_grad=grad))
    else:
        setattr(owner, leaf, new)


def _ancestors(nodes: Iterable[Node]) -> set[Node]:
    needed: set[Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    return needed


class GraphRunner(Interpreter):
    """Runs the part of a graph that chosen nodes depend on, with input hooks and module stand-ins.

    Args:
        gm: an exported, prepared or converted graph.
        input_hooks: node name -> callback, called with the node's first input (detached) before the node runs.
        modules: `call_module` target -> callable that replaces it (e.g. an observer by a fake quantizer, or by
            `lambda x: x` to bypass it).

    Example:
        >>> runner = GraphRunner(prepared, modules={t: (lambda x: x) for t in observer_targets})
        >>> (out,) = runner.values(step.graph_inputs(), [output_node])
    """

    def __init__(self, gm: GraphModule, input_hooks: Optional[dict[str, Callable[[torch.Tensor], None]]] = None,
                 modules: Optional[dict[str, Callable]] = None) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.input_hooks = dict(input_hooks or {})
        self.modules = dict(modules or {})
        missing = sorted(set(self.input_hooks) - {n.name for n in gm.graph.nodes})
        if missing:
            raise ValueError(f"GraphRunner: no nodes named {missing} in this graph.")
        self._plans: dict[tuple[Node, ...], tuple[list[Node], dict[Node, list[Node]]]] = {}

    def call_module(self, target, args, kwargs):
        if target in self.modules:
            return self.modules[target](*args)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: Node):
        hook = self.input_hooks.get(n.name)
        if hook is not None:
            hook(self.env[n.args[0]].detach())
        return super().run_node(n)

    def _plan(self, wanted: tuple[Node, ...]) -> tuple[list[Node], dict[Node, list[Node]]]:
        if wanted not in self._plans:
            needed = _ancestors(wanted)
            order = [n for n in self.graph.nodes if n in needed]
            last_use: dict[Node, Node] = {}
            for n in order:
                for i in n.all_input_nodes:
                    last_use[i] = n
            free: dict[Node, list[Node]] = {}
            for value, user in last_use.items():
                if value not in wanted:
                    free.setdefault(user, []).append(value)
            self._plans[wanted] = (order, free)
        return self._plans[wanted]

    @torch.no_grad()
    def values(self, inputs: dict[str, torch.Tensor], wanted: Sequence[Node]) -> list[torch.Tensor]:
        """The values of `wanted` nodes for graph inputs `inputs` (by placeholder name); runs only what they
        need (input hooks fire for the hooked nodes among those), freeing each value after its last use."""
        order, free = self._plan(tuple(wanted))
        self.env = {}
        try:
            for node in order:
                if node.op == "placeholder":
                    if node.name not in inputs:
                        raise TypeError(f"GraphRunner: the graph input '{node.name}' is missing; got {sorted(inputs)}.")
                    self.env[node] = inputs[node.name]
                else:
                    self.env[node] = self.run_node(node)
                for value in free.get(node, ()):
                    self.env.pop(value, None)
            return [self.env[n] for n in wanted]
        finally:
            self.env = {}
