"""The GPU lowering: integer-matmul layers tested on CPU against the q/dq reference; CUDA timings skip without a GPU."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from diffusion_ao import DiffusionQuantizer, QuantConfig, calibrate, collect_calibration_data, export_unet
from diffusion_ao.gpu import Int8Conv2d, Int8Linear, int_mm, lower_to_int_mm, time_vs_bf16
from tests.conftest import snr_db

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _codes(shape, lo, hi, seed):
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 30), n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_int_mm_pads_any_shape_exactly(m, k, n, seed):
    a, b = _codes((m, k), -128, 127, seed).to(torch.int8), _codes((k, n), -128, 127, seed + 1).to(torch.int8)
    assert torch.equal(int_mm(a, b), a.to(torch.int64).matmul(b.to(torch.int64)).to(torch.int32))


@settings(max_examples=30, deadline=None)
@given(zp=st.integers(0, 255), wbits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16),
       stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 1]), kernel=st.sampled_from([1, 3]))
def test_int8_conv_and_linear_equal_the_dequantized_float64_reference(zp, wbits, seed, stride, padding, kernel):
    lo, hi = -(2 ** (wbits - 1)), 2 ** (wbits - 1) - 1
    x_q = _codes((2, 5, 7, 6), 0, 255, seed).to(torch.uint8)
    w_q = _codes((4, 5, kernel, kernel), lo, hi, seed + 1).to(torch.int8)
    w_scale, bias, x_scale = torch.rand(4, dtype=torch.float64) + 0.1, torch.randn(4, dtype=torch.float64), 0.05
    x = (x_q.double() - zp) * x_scale
    w = w_q.double() * w_scale[:, None, None, None]
    ref = F.conv2d(x, w, bias, stride=stride, padding=padding)
    conv = Int8Conv2d(w_q, w_scale, bias.float(), x_scale, zp, [stride] * 2, [padding] * 2, [1, 1])
    torch.testing.assert_close(conv(x_q).double(), ref, rtol=1e-6, atol=1e-5)
    lin = Int8Linear(w_q[:, :, 0, 0], w_scale, bias.float(), x_scale, zp)
    x2_q = x_q.permute(0, 2, 3, 1)  # (..., 5) codes
    ref_lin = F.linear((x2_q.double() - zp) * x_scale, w_q[:, :, 0, 0].double() * w_scale[:, None], bias)
    torch.testing.assert_close(lin(x2_q).double(), ref_lin, rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="module")
def converted(unet, scheduler):
    data = collect_calibration_data(unet, scheduler, num_samples=4, num_inference_steps=3, progress=False)
    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    prepared = prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset("w8a8")))
    calibrate(prepared, data, progress=False)
    return convert_pt2e(prepared)


def test_lowered_graph_runs_every_quantized_layer_on_int_mm_and_matches_the_qdq_graph(converted):
    lowered = lower_to_int_mm(converted)
    layers = [n for n in converted.graph.nodes
              if n.op == "call_function" and n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)]
    quantized = [n for n in layers if "dequantize_per_tensor" in str(n.args[0].target)]
    assert sum(lowered.meta["int_mm_layers"].values()) == len(quantized) > 0
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 500.0, 900.0])
    with torch.no_grad():
        ref, out = converted(x, t), lowered(x, t)
    # Same integer arithmetic, different float rounding order: agreement far beyond the quantization noise.
    assert snr_db(ref, out) > 60


@cuda
def test_int_mm_lowering_on_cuda_matches_cpu_and_times_against_bf16(converted, unet):
    lowered = lower_to_int_mm(converted)
    x, t = torch.randn(32, 1, 8, 8), torch.full((32,), 500.0)
    with torch.no_grad():
        ref = lowered(x, t)
        on_gpu = lowered.to("cuda")(x.cuda(), t.cuda()).cpu()
    assert snr_db(ref, on_gpu) > 60
    timing = time_vs_bf16(export_unet(unet, sample_shape=(1, 1, 8, 8)), lowered, x.cuda(), t.cuda(), rounds=5)
    assert timing["bf16_ms"] > 0 and timing["lowered_ms"] > 0


@cuda
def test_torchao_linears_on_cuda(converted):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    from diffusion_ao.gpu import lower_linears_torchao
    gm = lower_linears_torchao(converted, Int8DynamicActivationInt8WeightConfig()).to("cuda")
    x, t = torch.randn(32, 1, 8, 8), torch.full((32,), 500.0)
    with torch.no_grad():
        assert snr_db(converted(x, t), gm(x.cuda(), t.cuda()).cpu()) > 20


def test_time_vs_bf16_needs_cuda(converted):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RuntimeError, match="CUDA"):
        time_vs_bf16(converted, converted, torch.zeros(1))
