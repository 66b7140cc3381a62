"""The GPU path: lower a converted graph's quantized convs and linears to integer matmuls.

PT2E's q/dq graphs stay simulated on GPU (docs/methods.md#lowering-to-int8-kernels). `lower_to_int_mm` replaces every
`dequantize(uint8 x) -> conv2d/linear <- dequantize(int8 w)` of a converted graph by a module that multiplies
the integer codes with `torch._int_mm` (int8 x int8 -> int32; cuBLAS on CUDA, also available on CPU, which is
how the arithmetic is tested here):

* linear: `acc = (x_q - 128) @ w_q^T + (128 - z_x) * sum_k w_q`, `y = acc * s_x * s_w + b`. Shifting the uint8
  activation by 128 makes it int8 without losing a bit; the zero-point term is folded into a per-channel
  constant. The integer part is exact on CUDA; on CPU, where `cpu.int8_kernel_saturates("int_mm")` says
  `_int_mm` adds pairs of products in int16 (oneDNN's under an AVX2 cap on a VNNI CPU), it is exact only for the
  codes of a one-bit-reduced activation range, so a full-range graph lowered there is wrong.
* conv2d (groups = 1): im2col (`F.unfold`, padded with the code of 0.0 so padding stays exact) then the same
  matmul.

The activation quantize op stays in the graph (inductor fuses it with the preceding element-wise ops).
`lower_linears_torchao` instead hands the linears to torchao's kernels (`quantize_` with e.g.
`Int8DynamicActivationInt8WeightConfig` or `Int4WeightOnlyConfig`, CUDA only for int4), re-quantizing the
dequantized weights with torchao's own scheme. `time_vs_bf16` times a lowered graph against the bf16 FP graph,
both compiled, on the same GPU.

Example:
    >>> lowered = lower_to_int_mm(convert_pt2e(prepared)).to("cuda")
    >>> print(time_vs_bf16(fp_graph, lowered, sample, timestep))
"""
from __future__ import annotations

import copy
import statistics
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from diffusion_ao.grouped_graph import TimeGroupedGraph
from diffusion_ao.passes.analysis import CONV_OPS, LINEAR_OPS, get_attr_tensor

qd = torch.ops.quantized_decomposed
_ACT_DQ = {qd.dequantize_per_tensor.default}
_W_DQ = {qd.dequantize_per_channel.default}
_SHIFT = 128  # uint8 code - 128 is an int8 code


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = (-t.shape[dim]) % multiple
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, extra]
    return F.pad(t, pad)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch._int_mm(a, b)` (int8 [M, K] x int8 [K, N] -> int32 [M, N]) for any sizes: pads M to > 16 and K, N to
    multiples of 8 with zeros (cuBLAS' constraints), which leaves the product unchanged."""
    m, n = a.shape[0], b.shape[1]
    a = _pad_to(_pad_to(a, 1, 8), 0, 8)
    if a.shape[0] <= 16:
        a = F.pad(a, [0, 0, 0, 17 - a.shape[0]])
    b = _pad_to(_pad_to(b, 0, 8), 1, 8)
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


class _IntMatmul(torch.nn.Module):
    """Shared state of the int8 layers: transposed weight codes, the zero-point correction and the scales."""

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor], x_scale: float,
                 x_zero_point: int) -> None:
        super().__init__()
        w2d = w_q.reshape(w_q.shape[0], -1).to(torch.int8)
        self.register_buffer("w_t", w2d.t().contiguous())                       # [K, N]
        correction = (_SHIFT - x_zero_point) * w2d.to(torch.int32).sum(dim=1)  # [N], exact in int32
        self.register_buffer("correction", correction)
        self.register_buffer("out_scale", (x_scale * w_scale.to(torch.float64)).to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.x_zero_point = int(x_zero_point)

    def _matmul(self, a: torch.Tensor) -> torch.Tensor:
        acc = int_mm(a, self.w_t) + self.correction
        y = acc.to(torch.float32) * self.out_scale
        return y if self.bias is None else y + self.bias


class Int8Linear(_IntMatmul):
    """y = dequant(x_q) @ dequant(w_q)^T + b on integer codes; takes the uint8 activation codes."""

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        a = (x_q.to(torch.int16) - _SHIFT).to(torch.int8)
        return self._matmul(a.reshape(-1, a.shape[-1])).reshape(*x_q.shape[:-1], -1)


class Int8Conv2d(_IntMatmul):
    """conv2d(dequant(x_q), dequant(w_q), b) as im2col + int8 matmul; takes the uint8 activation codes."""

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor], x_scale: float,
                 x_zero_point: int, stride, padding, dilation) -> None:
        super().__init__(w_q, w_scale, bias, x_scale, x_zero_point)
        self.kernel_size = tuple(w_q.shape[2:])
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        # Shifted codes in a float tensor (exact: |a| <= 128) so that unfold can run; pad with the code of 0.0.
        a = x_q.to(torch.float32) - _SHIFT
        ph, pw = self.padding
        if ph or pw:
            a = F.pad(a, [pw, pw, ph, ph], value=float(self.x_zero_point - _SHIFT))
        batch, _, h, w = a.shape
        cols = F.unfold(a, self.kernel_size, dilation=self.dilation, stride=self.stride)  # [B, C*kh*kw, L]
        kh, kw = self.kernel_size
        out_h = (h - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (w - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.int8)
        y = self._matmul(rows)                                                     # [B*L, N]
        return y.reshape(batch, out_h * out_w, -1).transpose(1, 2).reshape(batch, -1, out_h, out_w)


def _match(gm: GraphModule, node: Node) -> Optional[dict[str, Any]]:
    """The pieces of dq(x) -> conv/linear <- dq(w) around a layer node, or None if it is not that pattern."""
    x_dq, w_dq = node.args[0], node.args[1]
    if not (isinstance(x_dq, Node) and x_dq.target in _ACT_DQ and isinstance(w_dq, Node) and w_dq.target in _W_DQ):
        return None
    _, x_scale, x_zp, x_qmin, x_qmax, x_dtype = x_dq.args[:6]
    w_q = get_attr_tensor(gm, w_dq.args[0])
    w_scale, w_zp = get_attr_tensor(gm, w_dq.args[1]), get_attr_tensor(gm, w_dq.args[2])
    if x_dtype != torch.uint8 or w_q is None or w_scale is None or w_dq.args[3] != 0:
        return None
    if w_zp is not None and bool(w_zp.ne(0).any()):
        return None  # asymmetric weights: not this kernel's format
    bias = get_attr_tensor(gm, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
    if len(node.args) > 2 and node.args[2] is not None and bias is None:
        return None
    return dict(x_codes=x_dq.args[0], w_q=w_q, w_scale=w_scale, bias=bias, x_scale=float(x_scale),
                x_zero_point=int(x_zp))


def lower_to_int_mm(converted: GraphModule) -> torch.nn.Module:
    """A copy of a converted graph whose quantized convs (groups = 1) and linears run as int8 matmuls.

    Args:
        converted: the output of `convert_pt2e` (per-channel symmetric int8-stored weights of any bit width,
            uint8 activations).

    Returns:
        A new GraphModule (the input is not modified); move it to CUDA with `.to("cuda")`.
        `lowered.meta["int_mm_layers"]` counts the lowered layers.

    Example:
        >>> lowered = lower_to_int_mm(converted)
    """
    if isinstance(converted, TimeGroupedGraph):  # each group lowered on its own (K copies of the int8 weights)
        return converted.map_groups(lower_to_int_mm)
    gm = copy.deepcopy(converted)
    lowered = {"conv": 0, "linear": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in CONV_OPS | LINEAR_OPS:
            continue
        pieces = _match(gm, node)
        if pieces is None:
            continue
        x_codes = pieces.pop("x_codes")
        if node.target in LINEAR_OPS:
            module, kind = Int8Linear(**pieces), "linear"
        else:
            defaults = [[1, 1], [0, 0], [1, 1], 1]  # aten.conv2d's stride, padding, dilation, groups
            stride, padding, dilation, groups = list(node.args[3:7]) + defaults[len(node.args) - 3:]
            if groups != 1 or isinstance(padding, str):
                continue
            module, kind = Int8Conv2d(**pieces, stride=stride, padding=padding, dilation=dilation), "conv"
        name = f"int_mm_{kind}_{lowered[kind]}"
        gm.add_module(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x_codes,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        lowered[kind] += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.meta["int_mm_layers"] = lowered
    return gm


def lower_linears_torchao(converted: GraphModule, config: Any,
                          compute_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """A copy of a converted graph whose quantized linears are torchao-quantized `nn.Linear`s.

    Each linear gets the dequantized weight of its codes and is then quantized by `torchao.quantization.quantize_`
    with `config` (e.g. `Int8DynamicActivationInt8WeightConfig()`; `Int4WeightOnlyConfig()` needs CUDA). torchao
    re-quantizes with its own scheme; its input is the graph's fake-quantized activation. Convs are untouched
    (combine with `lower_to_int_mm` for them).

    Args:
        converted: a graph from `convert_pt2e` (or a `TimeGroupedGraph` of them).
        config: a torchao `quantize_` config.
        compute_dtype: the dtype the torchao linears run in (e.g. `torch.bfloat16` for kernels that take only bf16,
            such as the tile-packed int4 weight-only one); each one's input is cast to it and its output back to
            the graph's float32. None keeps float32.

    Example:
        >>> gm = lower_linears_torchao(converted, Int8DynamicActivationInt8WeightConfig()).to("cuda")
    """
    from torchao.quantization import quantize_

    if isinstance(converted, TimeGroupedGraph):
        return converted.map_groups(lambda group: lower_linears_torchao(group, config, compute_dtype))
    gm = copy.deepcopy(converted)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_OPS:
            continue
        w_dq = node.args[1]
        if not (isinstance(w_dq, Node) and w_dq.target in _W_DQ):
            continue
        w_q, w_scale = get_attr_tensor(gm, w_dq.args[0]), get_attr_tensor(gm, w_dq.args[1])
        bias = get_attr_tensor(gm, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
        weight = w_q.to(torch.float32) * w_scale.to(torch.float32)[:, None]
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        name = f"torchao_linear_{count}"
        gm.add_module(name, linear.to(compute_dtype) if compute_dtype is not None else linear)
        with gm.graph.inserting_before(node):
            x = node.args[0]
            if compute_dtype is not None:
                x = gm.graph.call_method("to", (x, compute_dtype))
            new = gm.graph.call_module(name, (x,))
            if compute_dtype is not None:
                new = gm.graph.call_method("to", (new, torch.float32))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    quantize_(gm, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("torchao_"))
    gm.meta["torchao_linears"] = count
    return gm


def time_vs_bf16(fp_graph: torch.nn.Module, lowered: torch.nn.Module, *inputs: torch.Tensor, rounds: int = 50,
                 warmup: int = 5, compile: bool = True,
                 extra: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
    """Median milliseconds of the bf16 FP graph and of a lowered graph on CUDA, both `torch.compile`d, interleaved.

    Args:
        fp_graph: the exported FP graph (copied and cast to bf16 on CUDA here).
        lowered: a graph from `lower_to_int_mm` / `lower_linears_torchao`, on CUDA.
        inputs: the graph's inputs (e.g. sample, timestep), on CUDA.
        extra: keyword inputs of both graphs (e.g. `class_labels`, `encoder_hidden_states`), on CUDA; floating
            ones are cast to bf16 for the bf16 graph.

    Returns:
        {"bf16_ms", "lowered_ms", "speedup_vs_bf16"}.

    Raises:
        RuntimeError: without CUDA.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_vs_bf16 needs a CUDA GPU; none is available.")
    bf16 = copy.deepcopy(fp_graph).to("cuda", torch.bfloat16)
    extra = extra or {}
    bf16_inputs = [x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs]
    bf16_extra = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in extra.items()}
    fns: dict[str, Callable[[], Any]] = {}
    runner_bf16 = torch.compile(bf16) if compile else bf16
    runner_low = torch.compile(lowered) if compile else lowered
    fns["bf16_ms"] = lambda: runner_bf16(*bf16_inputs, **bf16_extra)
    fns["lowered_ms"] = lambda: runner_low(*inputs, **extra)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        torch.cuda.synchronize()
        for _ in range(rounds):
            for key, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[key].append(start.elapsed_time(end))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["speedup_vs_bf16"] = out["bf16_ms"] / out["lowered_ms"]
    return out
