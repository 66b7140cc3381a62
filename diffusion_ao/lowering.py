"""Lowering a converted (q/dq) graph to real int8 kernels on x86 CPUs with inductor.

With `freezing=True`, inductor's quantization passes turn dq -> conv/linear (-> q) into oneDNN
`qconv_pointwise` / `qlinear_pointwise` calls on uint8 activations and int8 weights. Freezing must be on in the
global inductor config while the graph is compiled (compilation happens at the first call and at every
recompile), which `compile_for_cpu` takes care of.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters

from .passes.flatten_linear import drop_reshapes_around_activations
from .time_groups import TimeGroupedGraph

# The inductor counters that count int8 oneDNN kernels in the compiled graph.
INT8_KERNEL_COUNTERS = ("qconv_unary_lower_count", "qconv2d_binary_lower_count", "qlinear_unary_lower_count",
                        "qlinear_binary_lower_count")


class CompiledForCPU(torch.nn.Module):
    """A `torch.compile`d graph that always runs (and recompiles) with inductor freezing and no autograd."""

    def __init__(self, model: torch.nn.Module, dynamic: bool | None = None) -> None:
        super().__init__()
        if isinstance(model, torch.fx.GraphModule):
            drop_reshapes_around_activations(model)  # exact; lets inductor fuse the MLP's GELU into the qlinear
        self.model = model
        self._compiled = torch.compile(model, dynamic=dynamic)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self._compiled(*args, **kwargs)


def compile_for_cpu(model: torch.nn.Module, dynamic: bool | None = None) -> torch.nn.Module:
    """Compiles a converted graph (or a floating-point one, for comparison) for the CPU.

    Args:
        model: the output of `convert_pt2e`, or any module. A graph gets one exact in-place rewrite first
            (`passes.flatten_linear.drop_reshapes_around_activations`). A `TimeGroupedGraph` gets each of its
            groups compiled (one set of int8 kernels per group).
        dynamic: passed to `torch.compile`; None lets dynamo decide after a batch-size change.

    Example:
        >>> fast = compile_for_cpu(convert_pt2e(prepared))
        >>> out = fast(sample, timestep)   # first call compiles
    """
    if isinstance(model, TimeGroupedGraph):
        return model.map_groups(lambda group: CompiledForCPU(group, dynamic=dynamic))
    return CompiledForCPU(model, dynamic=dynamic)


def expected_int8_kernels(decisions: list) -> Optional[int]:
    """How many int8 conv/linear kernels a quantizer's layer decisions ask for (`DiffusionQuantizer.decisions`:
    every conv/linear with quantized weights and input), to compare with `count_int8_kernels`; None when there
    are no decisions (a peer quantizer that does not report them)."""
    if not decisions:
        return None
    return sum(1 for d in decisions if d.layer is not None and d.layer.act_bits and
               ("conv" in d.op or "linear" in d.op))


def count_int8_kernels(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, int]:
    """Calls `fn` (which must compile on this call) and returns how many int8 oneDNN kernels inductor emitted.

    Returns:
        {"qconv": n, "qlinear": m} from inductor's pattern-matcher counters.
    """
    counters.clear()
    fn(*args, **kwargs)
    c = counters["inductor"]
    return {kind: sum(c[name] for name in INT8_KERNEL_COUNTERS if name.startswith(kind)) for kind in ("qconv", "qlinear")}
