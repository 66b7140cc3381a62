"""Lowering a converted (q/dq) graph to real int8 kernels on x86 CPUs with inductor.

With `freezing=True`, inductor's quantization passes turn dq -> conv/linear (-> q) into oneDNN
`qconv_pointwise` / `qlinear_pointwise` calls on uint8 activations and int8 weights. Freezing must be on in the
global inductor config while the graph is compiled (compilation happens at the first call and at every
recompile), which `compile_for_cpu` takes care of.

Inductor writes the scale and zero point of a per-tensor quantize / dequantize into the C++ source of the
kernel it fuses them into, so two calibrations of one model compile to different sources and nothing is reused
between them. While `compile_for_cpu` compiles, those two numbers are read from constant buffers instead
(`scales_in_buffers`): the same arithmetic in the same order, but one source per graph shape, so inductor's
kernel cache serves every later quantization of that shape (each bench row, each time group, each retry).

Inductor's default wrapper is Python: one interpreted call per kernel. `compile_for_cpu` asks for its C++
wrapper (`cpp_wrapper=True`) unless told otherwise: a quantized DiT-S/2 at batch 1 makes ~250 kernel calls of
50-300 us each, where the per-call cost shows; at large batches the two wrappers run the same.

With `autotune=True`, inductor also generates its own GEMM kernels (its C++ GEMM template, on AMX or AVX-512 VNNI
micro-kernels for int8) and keeps, per GEMM shape, whichever of those and oneDNN's kernel it measures faster
(`max_autotune`). On AMX the template wins on one-row linears (a timestep MLP at batch 1, where oneDNN's int8 call
has a fixed cost of tens of microseconds) and on a small transformer's projections; the compile takes longer
(each GEMM shape is timed once), and which kernel runs depends on those timings. CPUs with neither AMX nor VNNI
have no int8 micro-kernel: there every int8 GEMM stays on oneDNN.

Inductor's int8 weight prepack reads a constant weight as if it were contiguous: a transposed int8 weight
(a low-rank factor taken from an SVD, say) compiled to a qlinear whose outputs were wrong (relative error ~1
under torch 2.13). `compile_for_cpu` therefore makes every constant of a graph contiguous first.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
import torch._inductor.config as inductor_config
import torch._inductor.lowering as inductor_lowering
from torch._dynamo.utils import counters
from torch._inductor.cpu_vec_isa import pick_vec_isa
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.ir import Pointwise
from torch._inductor.virtualized import V, ops

from diffusion_ao.backends.x86_attention import INT8_ATTENTION_COUNTER, int8_attention_lowering
from diffusion_ao.denoisers import SAMPLE
from diffusion_ao.graph import QUANTIZE_OPS, input_specs, replace_constant
from diffusion_ao.grouped_graph import TimeGroupedGraph
from diffusion_ao.passes.analysis import get_attr_tensor
from diffusion_ao.passes.flatten_linear import drop_reshapes_around_activations
from diffusion_ao.passes.merge_linears import merge_shared_input_linears
from diffusion_ao.passes.narrow_grids import clamp_narrow_grids

# The inductor counters that count int8 oneDNN kernels in the compiled graph.
INT8_KERNEL_COUNTERS = ("qconv_unary_lower_count", "qconv2d_binary_lower_count", "qlinear_unary_lower_count",
                        "qlinear_binary_lower_count")
# The inductor counter of quantized linears merged into another one's kernel (`merge_shared_input_linears`).
MERGED_LINEARS_COUNTER = "diffusion_ao_merged_linears"


qd = torch.ops.quantized_decomposed


def _scalar_loader(value: float):
    """A loader of `value` from a new 0-d float32 constant of the graph being lowered."""
    return V.graph.add_tensor_constant(torch.tensor(value, dtype=torch.float32)).make_loader()


def _quantize_per_tensor(input, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype):
    """Inductor's lowering of `quantize_per_tensor.default`, the same operations on the same float32 values, with
    1 / scale and the zero point loaded from constants instead of written into the kernel's source. The integer
    range stays in the source: loaded, it cost ~2.5 % of the UNet's latency (the clamp no longer folds)."""
    if input.get_dtype() == torch.bfloat16:
        input = inductor_lowering.to_dtype(input, torch.float32)
    if input.get_dtype() != torch.float32:
        raise TypeError(f"quantize_per_tensor expects a float32 input, got {input.get_dtype()}.")
    input_loader = input.make_loader()
    inv_scale, zero = _scalar_loader(1.0 / scale), _scalar_loader(zero_point)

    def inner_fn(idx):
        val = ops.round(input_loader(idx) * inv_scale(())) + zero(())
        low, high = ops.constant(quant_min, torch.float32), ops.constant(quant_max, torch.float32)
        return ops.to_dtype(ops.minimum(ops.maximum(val, low), high), dtype)

    return Pointwise.create(device=input.get_device(), dtype=dtype, inner_fn=inner_fn, ranges=input.get_size())


def _dequantize_per_tensor(input, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype, *,
                           out_dtype: Optional[torch.dtype] = None):
    """Inductor's lowering of `dequantize_per_tensor.default`, with the scale and zero point loaded from
    constants (see `_quantize_per_tensor`)."""
    if input.get_dtype() != dtype:
        raise TypeError(f"dequantize_per_tensor expects a {dtype} input, got {input.get_dtype()}.")
    out_dtype = out_dtype or torch.float32
    input_loader = input.make_loader()
    scale_loader, zero_point_loader = _scalar_loader(scale), _scalar_loader(zero_point)

    def inner_fn(idx):
        val = ops.sub(ops.to_dtype(input_loader(idx), torch.float32), zero_point_loader(())) * scale_loader(())
        return ops.to_dtype(val, out_dtype)

    return Pointwise.create(device=input.get_device(), dtype=out_dtype, inner_fn=inner_fn, ranges=input.get_size())


@contextlib.contextmanager
def scales_in_buffers() -> Iterator[None]:
    """While active, inductor lowers per-tensor quantize / dequantize with their scale and zero point in constant
    buffers (see the module docstring); the lowerings it had are back on exit."""
    ours = {}
    for op, fn in ((qd.quantize_per_tensor.default, _quantize_per_tensor),
                   (qd.dequantize_per_tensor.default, _dequantize_per_tensor)):
        inductor_lowering._register_lowering(op, fn, broadcast=False, type_promotion_kind=None,
                                             convert_input_to_bool=False, lowering_dict=ours)
    saved = {op: inductor_lowering.lowerings[op] for op in ours}
    inductor_lowering.lowerings.update(ours)
    try:
        yield
    finally:
        inductor_lowering.lowerings.update(saved)


def make_constants_contiguous(gm: torch.fx.GraphModule) -> int:
    """Replaces each non-contiguous constant tensor a `get_attr` of `gm` reads by a contiguous copy of it (the
    same values; see the module docstring for why) and returns how many it replaced."""
    replaced = 0
    for node in gm.graph.nodes:
        value = get_attr_tensor(gm, node)
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            replace_constant(gm, node, lambda old: old.detach().contiguous())
            replaced += 1
    return replaced


def _require_float32_if_quantized(gm: torch.fx.GraphModule) -> None:
    """oneDNN's int8 kernels take float32 around them; a quantized graph traced in another dtype fails deep in
    inductor, so it is refused here."""
    sample = input_specs(gm).get(SAMPLE)
    quantized = any(n.op == "call_function" and n.target in QUANTIZE_OPS for n in gm.graph.nodes)
    if quantized and sample is not None and sample.dtype != torch.float32:
        raise ValueError(f"compile_for_cpu lowers to int8 kernels that take float32, but this graph was exported in "
                         f"{sample.dtype}: quantize the float32 model (load the pipeline with "
                         "torch_dtype=torch.float32), or run the converted graph without compiling it.")


# `compile_for_cpu`'s wrapper where none is given: inductor's C++ one. Building it takes seconds per compile
# (inductor's graph cache skips graphs with prepacked oneDNN weights, so every compile builds its wrapper again).
DEFAULT_CPP_WRAPPER = True


class _PostGradPass(CustomGraphPass):
    """Inductor's post-grad pass of every `compile_for_cpu` graph. It adds the graph's merged linears to inductor's
    counters each time it compiles the graph (and, through the counter deltas its cache keeps, each time it loads
    it), beside the kernels it counts.

    Its `uuid` is part of inductor's cache key, and so is the vector ISA in it: inductor's key leaves out the ISA
    that `ATEN_CPU_CAPABILITY` selects, so a graph compiled for AVX-512 was loaded from the cache under
    `ATEN_CPU_CAPABILITY=avx2` and run with 8-float vectors on code written for 16 (half of each block skipped)."""

    def __init__(self, merged: int) -> None:
        self.merged = merged

    def __call__(self, graph: torch.fx.Graph) -> None:
        counters["inductor"][MERGED_LINEARS_COUNTER] += self.merged

    def uuid(self) -> str:
        return f"diffusion_ao.merged_linears.{self.merged}.{pick_vec_isa()}"


class CompiledForCPU(torch.nn.Module):
    """A `torch.compile`d graph that always runs (and recompiles) with inductor freezing, inductor's C++ wrapper
    (unless `cpp_wrapper=False`), GEMM autotuning where asked (`autotune=True`) and no autograd.

    Attributes:
        merged_linears: how many int8 linears run inside another one's kernel (`merge_shared_input_linears`;
            2 per attention's Q/K/V), so that `count_int8_kernels` counts that many fewer qlinear kernels than
            the graph has quantized linears.
    """

    def __init__(self, model: torch.nn.Module, dynamic: bool | None = None, cpp_wrapper: bool | None = None,
                 merge_linears: bool = True, autotune: bool = False) -> None:
        super().__init__()
        self.merged_linears = 0
        if isinstance(model, torch.fx.GraphModule):
            _require_float32_if_quantized(model)
            drop_reshapes_around_activations(model)  # exact; lets inductor fuse the MLP's GELU into the qlinear
            make_constants_contiguous(model)  # exact; inductor's int8 weight prepack needs it
            if merge_linears:  # on a copy: the caller's graph keeps its layers
                model, self.merged_linears = merge_shared_input_linears(model)
            model, _ = clamp_narrow_grids(model)  # on a copy; inductor's fused int8 outputs saturate at 255
        self.model = model
        self.cpp_wrapper = DEFAULT_CPP_WRAPPER if cpp_wrapper is None else cpp_wrapper
        self.autotune = autotune
        self._compiled = torch.compile(model, dynamic=dynamic)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tuning = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"} if self.autotune else {}
        settings = inductor_config.patch(freezing=True, cpp_wrapper=self.cpp_wrapper,
                                         post_grad_custom_post_pass=_PostGradPass(self.merged_linears),
                                         **tuning)
        with torch.no_grad(), settings, scales_in_buffers(), int8_attention_lowering():
            return self._compiled(*args, **kwargs)


def compile_for_cpu(model: torch.nn.Module, dynamic: bool | None = None, cpp_wrapper: bool | None = None,
                    merge_linears: bool = True, autotune: bool = False) -> torch.nn.Module:
    """Compiles a converted graph (or a floating-point one, for comparison) for the CPU.

    Args:
        model: the output of `convert_pt2e`, or any module. A graph gets two exact in-place rewrites first
            (`passes.flatten_linear.drop_reshapes_around_activations`, `make_constants_contiguous`), then the
            linears on one quantized input are merged in a copy (`merge_linears`). A
            `TimeGroupedGraph` gets each of its groups compiled (one set of int8 kernels per group).
        dynamic: passed to `torch.compile`; None lets dynamo decide after a batch-size change.
        cpp_wrapper: inductor's C++ wrapper instead of its Python one (see the module docstring): faster at small
            batches; False gives inductor's default; None (the default) `DEFAULT_CPP_WRAPPER`, True.
        merge_linears: run the int8 linears that read one quantized activation (Q, K, V) as one kernel, except
            those whose outputs are quantized again, as int8 attention's are (`passes.merge_linears`, exact up to
            float rounding; the compiled graph's `merged_linears` says how many); False keeps one kernel per layer.
        autotune: time inductor's own GEMM kernels against oneDNN's per GEMM shape and keep the faster (see the
            module docstring): faster at small batches on AMX / VNNI CPUs, a longer compile.

    Example:
        >>> fast = compile_for_cpu(convert_pt2e(prepared))
        >>> out = fast(sample, timestep)   # first call compiles
    """
    if isinstance(model, TimeGroupedGraph):
        return model.map_groups(lambda group: CompiledForCPU(group, dynamic, cpp_wrapper, merge_linears, autotune))
    return CompiledForCPU(model, dynamic, cpp_wrapper, merge_linears, autotune)


def expected_int8_kernels(decisions: list) -> Optional[int]:
    """How many int8 conv/linear kernels a quantizer's layer decisions ask for (`DiffusionQuantizer.decisions`:
    every conv/linear with quantized weights and input), to compare with `count_int8_kernels`; None when there
    are no decisions (a peer quantizer that does not report them)."""
    if not decisions:
        return None
    return sum(1 for d in decisions if d.layer is not None and d.layer.act_bits and
               ("conv" in d.op or "linear" in d.op))


def count_int8_kernels(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, int]:
    """Calls `fn` (which must compile on this call) and returns how many int8 kernels inductor emitted.

    Returns:
        {"qconv": n, "qlinear": m, "attention": a, "merged_linears": k}: oneDNN int8 convs and linears from
        inductor's pattern-matcher counters; int8 attention ops lowered to torchao's integer template
        (`backends.x86_attention`; an attention op that falls back to the floating-point reference kernel is not
        counted); and the quantized linears that run inside another one's kernel
        (`merge_shared_input_linears`). The quantized layers on int8 kernels are `qconv + qlinear + merged_linears`.
    """
    counters.clear()
    fn(*args, **kwargs)
    c = counters["inductor"]
    counts = {kind: sum(c[name] for name in INT8_KERNEL_COUNTERS if name.startswith(kind))
              for kind in ("qconv", "qlinear")}
    return {**counts, "attention": c[INT8_ATTENTION_COUNTER], "merged_linears": c[MERGED_LINEARS_COUNTER]}
