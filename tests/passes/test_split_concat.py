"""Shortcut splitting: conv(cat([a, b, ...])) -> sum of convs, exact in FP, one activation quantizer per input,
the shortcut role kept, and every piece on an int8 kernel after lowering."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from diffusion_ao import (DiffusionQuantizer, QuantConfig, calibrate, collect_calibration_data, compile_for_cpu,
                          count_int8_kernels, export_unet)
from diffusion_ao.config import QDiffConfig
from diffusion_ao.passes.analysis import CONV_OPS, SPLIT_META, shortcut_convs
from diffusion_ao.passes.channel_scaling import scale_input_channels
from diffusion_ao.passes.split_concat import split_concat_convs

TORCH_THREADS = 2  # set for this module's tests by conftest.module_threads
qdequant = torch.ops.quantized_decomposed.dequantize_per_tensor.default


class _CatConv(torch.nn.Module):
    """conv on a channel concat that also feeds another op (as norm1 reads the concat in a ResBlock)."""

    def __init__(self, channels, kernel, bias, groups=1):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(1, c, 1) for c in channels)  # parts of different scales
        self.conv = torch.nn.Conv2d(sum(channels), 3 * groups, kernel, padding=kernel // 2, bias=bias, groups=groups)

    def forward(self, x):
        h = torch.cat([conv(x) * (i + 1) for i, conv in enumerate(self.convs)], dim=1)
        return self.conv(h) + h.mean(dim=1, keepdim=True)


def _export(model, batch=2):
    x = torch.randn(batch, 1, 5, 5)
    return torch.export.export(model.eval(), (x,)).module(), x


def _convs(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_OPS]


@settings(deadline=None, max_examples=12)
@given(channels=st.lists(st.integers(1, 6), min_size=2, max_size=4), kernel=st.sampled_from([1, 3]),
       bias=st.booleans(), seed=st.integers(0, 1000), scaled=st.booleans())
def test_split_leaves_fp_output_unchanged(channels, kernel, bias, seed, scaled):
    torch.manual_seed(seed)
    model = _CatConv(channels, kernel, bias)
    eager_weight = model.conv.weight.detach().clone()
    gm, x = _export(model)
    conv = _convs(gm)[-1]
    if scaled:  # a PTS / LES channel-scale multiply between the concat and the conv is split along with it
        scale_input_channels(gm, conv, torch.rand(sum(channels)) + 0.5)
    expected = gm(x)
    assert split_concat_convs(gm) == [conv.name]
    assert len(_convs(gm)) == len(channels) * 2  # the part producers and one piece per part
    pieces = [n for n in _convs(gm) if SPLIT_META in n.meta]
    assert [p.args[1].meta["val"].shape[1] for p in pieces] == channels
    # The pieces sum the same products in another order: within the float32 bound of each order, elementwise.
    after = gm(x)
    assert ((after - expected).abs() <= _reordering_bound(model, x, expected)).all()
    assert torch.equal(model.conv.weight, eager_weight)  # sliced out of place


def _reordering_bound(model, x, out):
    """Two float32 evaluations of conv(cat(h)) + b that sum its K products (+ bias, + the p - 1 piece sums) in
    different orders each lie within gamma_n * (|W| * |h| + |b|) of the exact value (Higham, Accuracy and Stability
    of Numerical Algorithms, 3.1; n = K + p + 1), so they differ by at most twice that; the final add of the mean
    rounds each by at most u |out|. Channel scales fold exactly in real arithmetic (|W s| * |h / s| = |W| * |h|);
    their own float32 rounding is a relative u on each product, covered by n + 2."""
    u = 2.0**-24
    parts = len(model.convs)
    k = model.conv.in_channels * model.conv.kernel_size[0] * model.conv.kernel_size[1]
    n = k + parts + 3
    gamma = n * u / (1 - n * u)
    with torch.no_grad():
        h = torch.cat([conv(x) * (i + 1) for i, conv in enumerate(model.convs)], dim=1).double().abs()
        bias = model.conv.bias.double().abs() if model.conv.bias is not None else None
        magnitude = torch.nn.functional.conv2d(h, model.conv.weight.double().abs(), bias,
                                               padding=model.conv.padding, groups=model.conv.groups)
    return (2 * gamma * magnitude + 2 * u * out.double().abs()).float()


def test_grouped_conv_and_plain_input_are_left_alone():
    gm, _ = _export(_CatConv([2, 2], 1, True, groups=2))
    assert split_concat_convs(gm) == []
    gm, _ = _export(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.Conv2d(2, 2, 1)))
    assert split_concat_convs(gm) == []


def test_pieces_keep_the_shortcut_role(unet):
    gm = export_unet(unet, sample_shape=(1, 1, 8, 8))
    before = {n.name for n in shortcut_convs(gm)}
    split = split_concat_convs(gm)
    assert split and set(split) <= before  # the tiny UNet's up-block shortcut convs read the skip concat
    after = shortcut_convs(gm)
    pieces = [n for n in after if SPLIT_META in n.meta]
    assert {p.meta[SPLIT_META]["of"] for p in pieces} == set(split)
    assert len(pieces) == 2 * len(split)
    assert {n.name for n in after if SPLIT_META not in n.meta} == before - set(split)
    quantizer = DiffusionQuantizer(QuantConfig(quantize_skip_convs=False, qdiff=QDiffConfig()))
    prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), quantizer)
    skipped = [d for d in quantizer.decisions if d.reason == "skip 1x1 conv"]
    assert len(skipped) == len(before) + len(split)  # every piece stays FP like the conv it came from


@pytest.fixture(scope="module")
def data(unet, scheduler):
    return collect_calibration_data(unet, scheduler, num_samples=8, num_inference_steps=4, progress=False)


@pytest.fixture(scope="module")
def split_w8a8(unet, data):
    # min-max ranges keep the fixture quick; the split does not depend on the range search
    quantizer = DiffusionQuantizer(QuantConfig.preset("w8a8").replace(act_observer="minmax", qdiff=QDiffConfig()))
    prepared = prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), quantizer)
    calibrate(prepared, data, progress=False)
    return convert_pt2e(prepared), quantizer


def test_each_concat_input_gets_its_own_activation_qparams(split_w8a8):
    converted, quantizer = split_w8a8
    assert quantizer.split_convs
    by_original = {}
    for node in _convs(converted):
        if SPLIT_META in node.meta:
            dq = node.args[0]
            assert dq.target == qdequant, "each piece's input must be dequantized from its own int8 tensor"
            by_original.setdefault(node.meta[SPLIT_META]["of"], []).append((float(dq.args[1]), int(dq.args[2])))
    assert set(by_original) == set(quantizer.split_convs)
    for original, qparams in by_original.items():
        assert len(qparams) == 2 and qparams[0] != qparams[1], f"{original}: {qparams}"


@pytest.mark.slow
def test_split_pieces_run_on_int8_kernels(split_w8a8, data):
    converted, quantizer = split_w8a8
    step = data.steps[len(data) // 2]
    x, t = step.sample[:4], torch.full((4,), step.timestep)
    kernels = count_int8_kernels(compile_for_cpu(converted), x, t)
    expected = sum(1 for d in quantizer.decisions if d.layer is not None and d.layer.act_bits)
    assert kernels["qconv"] + kernels["qlinear"] + kernels["merged_linears"] == expected
