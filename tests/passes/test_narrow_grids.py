"""passes.narrow_grids: a clamp after every quantize narrower than its dtype, in a copy; the same eager results,
and compiled int8 kernels whose fused outputs keep to the narrow grid."""
import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao import compile_for_cpu
from diffusion_ao.passes.narrow_grids import clamp_narrow_grids

qd = torch.ops.quantized_decomposed


class QuantizedMLP(torch.nn.Module):
    """Two int8 linears with a ReLU between them, each input on its own per-tensor grid (quant_min, quant_max):
    inductor fuses the ReLU and the second quantize into the first linear's kernel."""

    def __init__(self, grid_in: tuple, grid_hidden: tuple, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.grids = grid_in, grid_hidden
        for name, (out, inp) in {"a": (24, 16), "b": (16, 24)}.items():
            self.register_buffer(f"w{name}", torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g))
            self.register_buffer(f"s{name}", torch.rand(out, generator=g) * 0.01 + 0.002)
            self.register_buffer(f"z{name}", torch.zeros(out, dtype=torch.int64))

    def _linear(self, x, name, grid):
        scale, zero_point, low, high = grid
        x = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, scale, zero_point, low, high, torch.uint8),
                                     scale, zero_point, low, high, torch.uint8)
        w = qd.dequantize_per_channel(getattr(self, f"w{name}"), getattr(self, f"s{name}"),
                                      getattr(self, f"z{name}"), 0, -128, 127, torch.int8)
        return torch.nn.functional.linear(x, w)

    def forward(self, x):
        return self._linear(torch.relu(self._linear(x, "a", self.grids[0])), "b", self.grids[1])


def _graph(module, x):
    return torch.export.export(module, (x,)).module()


def _clamps(gm):
    return sum(n.target == torch.ops.aten.clamp.default for n in gm.graph.nodes)


@settings(max_examples=25, deadline=None)
@given(bits=st.lists(st.integers(2, 8), min_size=2, max_size=2), scale=st.floats(0.01, 0.5), seed=st.integers(0, 999))
def test_a_clamp_follows_each_narrow_quantize_in_a_copy_with_the_same_results(bits, scale, seed):
    grids = [(scale, (2**b - 1) // 2, 0, 2**b - 1) for b in bits]
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed)) * 4
    gm = _graph(QuantizedMLP(*grids, seed=seed), x)
    before = str(gm.graph)
    clamped, n = clamp_narrow_grids(gm)
    assert n == sum(b < 8 for b in bits) == _clamps(clamped)
    assert str(gm.graph) == before and _clamps(gm) == 0  # the caller's graph is untouched
    assert (clamped is gm) == (n == 0)
    torch.testing.assert_close(clamped(x), gm(x), rtol=0, atol=0)  # the quantize had clamped already


def test_compiled_fused_outputs_keep_to_a_7_bit_grid():
    """The ReLU output, above the hidden grid's range, reaches the second linear as 127 at most (as in eager):
    without the clamp inductor's fused int8 output saturates at 255 and the compiled result equals eager on a
    full 8-bit grid instead."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 2
    gm7 = _graph(QuantizedMLP((0.05, 64, 0, 127), (0.05, 0, 0, 127)), x)
    gm8 = _graph(QuantizedMLP((0.05, 64, 0, 127), (0.05, 0, 0, 255)), x)
    hidden = torch.relu(QuantizedMLP((0.05, 64, 0, 127), (0.05, 0, 0, 127))._linear(x, "a", (0.05, 64, 0, 127)))
    assert (hidden > 0.05 * 127).any()  # the case: values beyond the 7-bit grid
    compiled = compile_for_cpu(copy.deepcopy(gm7), dynamic=False)(x)
    eager7, eager8 = gm7(x), gm8(x)
    assert ((eager7 - eager8).abs().max()) > 1.0  # the two grids give different results here
    torch.testing.assert_close(compiled, eager7, rtol=1e-4, atol=1e-3)
