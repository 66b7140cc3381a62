"""passes.merge_linears: int8 linears on one quantized input become one linear whose output is sliced, with the
same results, in a copy of the graph; linears on another input or another grid stay apart."""
from typing import Optional

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao import (
    compile_for_cpu,
    count_int8_kernels,
    quantize_denoiser,
)
from diffusion_ao.backends.x86 import expected_int8_kernels
from diffusion_ao.graph import call_graph, graph_input_names
from diffusion_ao.passes.merge_linears import merge_shared_input_linears

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
GRID = (0.05, 128, 0, 255, torch.uint8)


class Projections(torch.nn.Module):
    """Linears that each quantize and dequantize `x` themselves, as a converted graph does (one q/dq pair per
    user): those with `grid[i]` 0 on GRID, 1 on another grid; the last one reads `x * 2` (another input); those
    with `requantized[i]` have their output quantized again."""

    def __init__(self, dim: int, widths: list[int], biases: list[bool], grids: list[int], weight_bits: int = 8,
                 requantized: Optional[list[bool]] = None):
        super().__init__()
        self.grids, limit = grids, 2 ** (weight_bits - 1)
        self.requantized = requantized or [False] * len(widths)
        for i, (width, bias) in enumerate(zip(widths, biases)):
            self.register_buffer(f"w{i}", torch.randint(-limit, limit, (width, dim), dtype=torch.int8))
            self.register_buffer(f"s{i}", torch.rand(width) * 0.1 + 0.01)
            self.register_buffer(f"z{i}", torch.zeros(width, dtype=torch.int64))
            if bias:
                self.register_buffer(f"b{i}", torch.randn(width))
            else:
                setattr(self, f"b{i}", None)
        self.count, self.limit = len(widths), limit

    def forward(self, x):
        outs = []
        for i in range(self.count):
            source = x * 2 if i == self.count - 1 else x
            grid = GRID if self.grids[i] == 0 else (0.07, 120, 0, 255, torch.uint8)
            xq = qd.quantize_per_tensor(source.reshape(-1, source.shape[-1]), *grid)
            xd = qd.dequantize_per_tensor(xq, *grid)
            w = qd.dequantize_per_channel(getattr(self, f"w{i}"), getattr(self, f"s{i}"), getattr(self, f"z{i}"), 0,
                                          -self.limit, self.limit - 1, torch.int8)
            out = torch.nn.functional.linear(xd, w, getattr(self, f"b{i}"))
            if self.requantized[i]:  # as int8 attention's operands are: reshaped, transposed, quantized
                out = out.reshape(*source.shape[:-1], -1).transpose(0, 1)
                out = qd.dequantize_per_tensor(qd.quantize_per_tensor(out, *GRID), *GRID)
            outs.append(out.sum(-1).flatten())
        return torch.stack(outs)


def _linears(gm):
    return sum(n.target == aten.linear.default for n in gm.graph.nodes)


@settings(max_examples=15, deadline=None)
@given(dim=st.integers(1, 12), widths=st.lists(st.integers(1, 9), min_size=2, max_size=5), data=st.data(),
       seed=st.integers(0, 2**16))
def test_merging_gives_the_same_outputs_and_one_linear_per_input_and_grid(dim, widths, data, seed):
    torch.manual_seed(seed)
    biases = data.draw(st.lists(st.booleans(), min_size=len(widths), max_size=len(widths)))
    grids = data.draw(st.lists(st.integers(0, 1), min_size=len(widths), max_size=len(widths)))
    x = torch.randn(2, 3, dim)
    gm = torch.export.export(Projections(dim, widths, biases, grids).eval(), (x,)).module()
    before = _linears(gm)
    merged, count = merge_shared_input_linears(gm)
    # the last linear reads another input; the others group by grid
    groups = len({g for g in grids[:-1]}) + 1
    assert count == before - groups and _linears(merged) == groups
    assert _linears(gm) == before  # the caller's graph keeps its layers
    torch.testing.assert_close(merged(x), gm(x), rtol=1e-5, atol=1e-4)
    if count == 0:
        assert merged is gm


@settings(max_examples=10, deadline=None)
@given(requantized=st.lists(st.booleans(), min_size=3, max_size=5), seed=st.integers(0, 2**16))
def test_linears_whose_outputs_are_quantized_again_stay_apart(requantized, seed):
    """Each keeps its own kernel, which writes the quantized output itself; the others on the input still merge."""
    torch.manual_seed(seed)
    x, n = torch.randn(2, 3, 6), len(requantized)
    gm = torch.export.export(Projections(6, [4] * n, [True] * n, [0] * n, requantized=requantized).eval(),
                             (x,)).module()
    merged, count = merge_shared_input_linears(gm)
    free = sum(not r for r in requantized[:-1])  # the last one reads another input
    assert count == max(free - 1, 0) and _linears(merged) == n - count
    torch.testing.assert_close(merged(x), gm(x), rtol=1e-5, atol=1e-4)


def test_linears_with_different_weight_ranges_stay_apart():
    x = torch.randn(4, 6)
    four_bit = Projections(6, [3, 3, 2], [True, True, True], [0, 0, 0], weight_bits=4)
    gm = torch.export.export(four_bit.eval(), (x,)).module()
    eight = next(n for n in gm.graph.nodes if n.target == qd.dequantize_per_channel.default)
    eight.args = (*eight.args[:4], -128, 127, torch.int8)  # the first linear's weight on the 8-bit range
    gm.recompile()
    merged, count = merge_shared_input_linears(gm)
    assert count == 0 and merged is gm


def test_every_attention_runs_q_k_v_in_one_int8_kernel(dit, dit_data):
    converted, report = quantize_denoiser(dit, dit_data, "w8a8", progress=False)
    blocks = len(dit.transformer_blocks)
    merged, count = merge_shared_input_linears(converted)
    assert count == 2 * blocks
    step = dit_data.steps[0]
    inputs, names = step.graph_inputs(0, len(step)), graph_input_names(converted)
    torch.testing.assert_close(call_graph(merged, inputs, names), call_graph(converted, inputs, names))

    fast = compile_for_cpu(converted)
    counts = count_int8_kernels(lambda: call_graph(fast, inputs, names))
    assert counts["merged_linears"] == fast.merged_linears == 2 * blocks
    assert counts["qconv"] + counts["qlinear"] + counts["merged_linears"] == \
        expected_int8_kernels(report.quantizer.decisions)
    separate = compile_for_cpu(converted, merge_linears=False)
    one_per_layer = count_int8_kernels(lambda: call_graph(separate, inputs, names))
    assert one_per_layer["merged_linears"] == 0 and one_per_layer["qlinear"] == counts["qlinear"] + 2 * blocks
    out, reference = call_graph(fast, inputs, names), call_graph(separate, inputs, names)
    out, reference = (o[0] if isinstance(o, (tuple, list)) else o for o in (out, reference))
    assert ((out - reference).norm() / reference.norm()).item() < 1e-4

