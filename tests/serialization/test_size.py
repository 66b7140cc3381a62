"""`diffusion_ao.serialization.size`: what a model weighs. An eager module counts every tensor it holds, a graph
only the tensors its graph reads, with weight codes at their packed width (from the dequantize ranges, not the
dtype); storage shared by several tensors (or by the groups of a `TimeGroupedGraph`) counts once.

Small hand-built graphs give exact byte counts; tests/serialization/test_format.py checks `size_mb` of converted
graphs against the saved file, tests/methods/test_time_groups.py a real time-grouped model."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx import GraphModule

from diffusion_ao.export import export_unet
from diffusion_ao.grouped_graph import TimeGroupedGraph
from diffusion_ao.serialization.size import (
    graph_tensors,
    held_size_mb,
    module_tensors,
    packed_graph_bytes,
    signed_bits_for,
    size_mb,
    tensor_bytes,
    weight_code_bits,
)

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads
qd = torch.ops.quantized_decomposed
MiB = 2**20


def _codes(shape, lo, hi, seed=0):
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def _graph(root: torch.nn.Module, build) -> GraphModule:
    """A GraphModule over `root`'s tensors; `build(graph, x)` returns the outputs."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(tuple(build(graph, x)))
    return GraphModule(root, graph)


def _per_tensor_root():
    root = torch.nn.Module()
    root.codes4 = _codes((15, 7), -8, 7)      # 105 codes at 4 bits: 53 bytes (half a byte each, rounded up)
    root.codes8 = _codes((4, 4), -128, 127)   # 16 codes at 8 bits: 16 bytes
    root.codes2 = _codes((10,), -2, 1)        # 10 codes at 2 bits: 3 bytes
    root.bias = torch.zeros(16)               # float: 64 bytes
    return root


def _per_tensor_build(graph, x):
    outs = []
    for name, lo, hi in (("codes4", -8, 7), ("codes8", -128, 127), ("codes2", -2, 1)):
        codes = graph.get_attr(name)
        outs.append(graph.call_function(qd.dequantize_per_tensor.default, (codes, 0.5, 0, lo, hi, torch.int8)))
    outs.append(graph.get_attr("bias"))
    return outs


@pytest.fixture(scope="module")
def coded():
    return _graph(_per_tensor_root(), _per_tensor_build)


def test_weight_codes_count_at_their_packed_width(coded):
    assert weight_code_bits(coded) == {"codes4": 4, "codes8": 8, "codes2": 2}
    assert packed_graph_bytes(coded) == 53 + 16 + 3 + 64
    assert size_mb(coded) == (53 + 16 + 3 + 64) / MiB
    w4, w8, w2, _ = coded(torch.zeros(1))  # the graph runs: the codes really are dequantized
    assert torch.equal(w4, coded.codes4.float() * 0.5) and w8.shape == (4, 4) and w2.shape == (10,)


def test_a_graph_counts_what_it_reads_and_held_size_what_it_holds():
    gm = _graph(_per_tensor_root(), _per_tensor_build)
    before = size_mb(gm)
    gm.register_buffer("unused_fp_weight", torch.zeros(1000))  # like the FP weights convert_pt2e leaves behind
    gm.stale = torch.ones(10, dtype=torch.float64)             # a plain tensor attribute
    assert size_mb(gm) == before
    assert held_size_mb(gm) * MiB == sum(t.numel() * t.element_size() for t in module_tensors(gm))
    assert held_size_mb(gm) * MiB == 105 + 16 + 10 + 64 + 4000 + 80  # every code at a full byte, nothing packed


def test_the_width_comes_from_the_dequantize_range_not_the_dtype():
    root = torch.nn.Module()
    root.wide = _codes((16,), -4, 3).to(torch.int32)  # a 3-bit range in an int32 tensor: packed at 4 bits
    root.one_bit = _codes((16,), -1, 0)
    gm = _graph(root, lambda g, x: [g.call_function(qd.dequantize_per_tensor.default,
                                                    (g.get_attr(name), 1.0, 0, lo, hi, torch.int8))
                                    for name, lo, hi in (("wide", -4, 3), ("one_bit", -1, 0))])
    assert weight_code_bits(gm) == {"wide": 3, "one_bit": 1}
    assert packed_graph_bytes(gm) == 16 * 4 // 8 + 16 * 1 // 8


def test_unsigned_codes_count_at_their_storage_width_at_most():
    root = torch.nn.Module()
    root.codes = torch.randint(0, 256, (16,), dtype=torch.uint8)  # 0..255 needs 9 signed bits, 8 stored
    gm = _graph(root, lambda g, x: [g.call_function(qd.dequantize_per_tensor.default,
                                                    (g.get_attr("codes"), 0.1, 128, 0, 255, torch.uint8))])
    assert weight_code_bits(gm) == {"codes": 8}
    assert size_mb(gm) == 16 / 2**20


def test_per_channel_and_tensor_overload_ranges_and_integer_constants_that_are_not_codes():
    root = torch.nn.Module()
    root.codes = _codes((4, 3), -8, 7)                   # 12 codes at 4 bits: 6 bytes
    root.scales = torch.ones(4)                          # 16 bytes
    root.zero_points = torch.zeros(4, dtype=torch.long)  # an integer constant in a dequantize, not its codes: 32
    root.codes_t = _codes((8,), -128, 127)               # the .tensor overload: 8 bytes
    root.scale_t, root.zp_t = torch.tensor(0.1), torch.tensor(0, dtype=torch.long)  # 4 + 8 bytes
    root.index = torch.tensor([0, 2], dtype=torch.long)  # feeds an index, not a dequantize: 16 bytes
    root.mixed = _codes((8,), -8, 7)                     # feeds a dequantize and an add: full bytes, 8

    def build(g, x):
        per_channel = g.call_function(qd.dequantize_per_channel.default,
                                      (g.get_attr("codes"), g.get_attr("scales"), g.get_attr("zero_points"), 0, -8, 7,
                                       torch.int8))
        per_tensor = g.call_function(qd.dequantize_per_tensor.tensor,
                                     (g.get_attr("codes_t"), g.get_attr("scale_t"), g.get_attr("zp_t"), -128, 127,
                                      torch.int8))
        picked = g.call_function(torch.ops.aten.index_select.default, (per_channel, 0, g.get_attr("index")))
        mixed = g.get_attr("mixed")
        return [picked, per_tensor, g.call_function(qd.dequantize_per_tensor.default, (mixed, 1.0, 0, -8, 7,
                                                                                       torch.int8)),
                g.call_function(torch.ops.aten.add.Tensor, (mixed, 1))]

    gm = _graph(root, build)
    assert weight_code_bits(gm) == {"codes": 4, "codes_t": 8}
    assert packed_graph_bytes(gm) == 6 + 16 + 32 + 8 + 4 + 8 + 16 + 8
    picked, per_tensor, _, _ = gm(torch.zeros(1))
    assert picked.shape == (2, 3) and per_tensor.shape == (8,)


def test_codes_read_with_two_ranges_are_an_error_and_one_range_read_twice_counts_once():
    root = torch.nn.Module()
    root.codes = _codes((32,), -8, 7)

    def two_reads(lo2, hi2):
        def build(g, x):
            return [g.call_function(qd.dequantize_per_tensor.default, (g.get_attr("codes"), 1.0, 0, lo, hi,
                                                                       torch.int8))
                    for lo, hi in ((-8, 7), (lo2, hi2))]
        return _graph(root, build)

    same = two_reads(-8, 7)
    assert weight_code_bits(same) == {"codes": 4}
    assert packed_graph_bytes(same) == 16  # two get_attr nodes, one tensor
    with pytest.raises(ValueError, match=r"'codes' is dequantized with two different ranges"):
        weight_code_bits(two_reads(-128, 127))


def test_an_eager_module_counts_every_tensor_once_tied_weights_too():
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    second.weight = first.weight
    model = torch.nn.Sequential(first, second, torch.nn.BatchNorm1d(8))
    # one 8x8 weight, two biases; BatchNorm: weight, bias, running mean / var (float) and the int64 batch count
    expected = (64 + 8 + 8) * 4 + 4 * 8 * 4 + 8
    assert tensor_bytes(module_tensors(model)) == expected
    assert size_mb(model) == held_size_mb(model) == expected / MiB


def test_an_exported_unet_weighs_what_the_eager_one_does(unet):
    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    eager = sum(p.numel() * p.element_size() for p in unet.parameters()) + sum(
        b.numel() * b.element_size() for b in unet.buffers())
    assert size_mb(unet) * MiB == eager
    assert weight_code_bits(graph) == {}  # not quantized: no codes
    assert size_mb(graph) * MiB == tensor_bytes(graph_tensors(graph))
    # the graph reads every weight of the model, each once (no weight of the tiny UNet has two users to unshare)
    assert size_mb(graph) == size_mb(unet)
    assert held_size_mb(graph) >= size_mb(graph)


def test_a_time_grouped_graph_counts_the_weights_its_groups_share_once():
    root = _per_tensor_root()
    first, second = _graph(root, _per_tensor_build), _graph(root, _per_tensor_build)  # the same tensors
    assert first.codes4 is second.codes4
    shared = TimeGroupedGraph([first, second], [10.0, 20.0], torch.tensor([0, 1]), ["x"])
    assert size_mb(shared) == size_mb(first) == (53 + 16 + 3 + 64) / MiB
    apart = TimeGroupedGraph([first, copy.deepcopy(first)], [10.0, 20.0], torch.tensor([0, 1]), ["x"])
    assert size_mb(apart) == 2 * size_mb(first)  # separate copies count twice, codes packed in both
    assert packed_graph_bytes(first, second, copy.deepcopy(second)) == 2 * (53 + 16 + 3 + 64)


def test_signed_bits_for_known_ranges():
    assert signed_bits_for(-8, 7) == 4
    assert signed_bits_for(-128, 127) == 8
    assert signed_bits_for(-7, 7) == 4          # a symmetric range narrowed by one
    assert signed_bits_for(-1, 0) == signed_bits_for(0, 0) == 1
    assert signed_bits_for(0, 1) == 2
    assert signed_bits_for(-9, 0) == 5
    assert signed_bits_for(0, 255) == 9         # an unsigned byte does not fit 8 signed bits


@settings(max_examples=200, deadline=None)
@given(a=st.integers(-(2**62), 2**62), b=st.integers(-(2**62), 2**62))
def test_signed_bits_for_is_the_fewest_bits_holding_the_range(a, b):
    qmin, qmax = min(a, b), max(a, b)
    bits = signed_bits_for(qmin, qmax)

    def fits(n):
        return -(2 ** (n - 1)) <= qmin and qmax <= 2 ** (n - 1) - 1

    assert 1 <= bits <= 64 and fits(bits)
    assert bits == 1 or not fits(bits - 1)


_DTYPES = [torch.float32, torch.float16, torch.int8, torch.int64, torch.uint8]


@settings(max_examples=100, deadline=None)
@given(bases=st.lists(st.tuples(st.integers(0, 40), st.sampled_from(_DTYPES)), min_size=1, max_size=5),
       picks=st.lists(st.tuples(st.integers(0, 4), st.sampled_from(["whole", "slice", "bytes", "alias", "2d"])),
                      max_size=12))
def test_tensor_bytes_counts_each_storage_once_however_it_is_viewed(bases, picks):
    storages = [torch.zeros(n, dtype=dtype) for n, dtype in bases]
    views = {"whole": lambda t: t, "slice": lambda t: t[len(t) // 2:], "bytes": lambda t: t.view(torch.uint8),
             "alias": lambda t: t.detach(), "2d": lambda t: t.reshape(1, -1)}
    tensors, used = [], set()
    for index, kind in picks:
        k = index % len(storages)
        tensors.append(views[kind](storages[k]))
        used.add(k)
    assert tensor_bytes(tensors) == sum(storages[k].numel() * storages[k].element_size() for k in used)
    # a copy is another storage: it counts again
    if tensors:
        assert tensor_bytes(tensors + [tensors[0].clone()]) == tensor_bytes(tensors) + (
            tensors[0].numel() * tensors[0].element_size())
