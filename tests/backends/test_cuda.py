"""The GPU lowering: integer-matmul layers tested on CPU against the q/dq reference; CUDA timings skip without a GPU."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from diffusion_ao import DiffusionQuantizer, QuantConfig, calibrate, collect_calibration_data, export_unet
from diffusion_ao.backends.x86_features import int8_kernel_saturates, int16_pair_overflows
from diffusion_ao.backends.cuda import Int8Conv2d, Int8Linear, int_mm, lower_to_int_mm, time_vs_bf16
from diffusion_ao.primitives import int_range
from tests.conftest import KERNEL_ERROR_FRACTION, kernel_error_fraction, snr_db

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# On CPU, torch._int_mm is an s8 x s8 GEMM. Some CPU kernels (oneDNN's under an AVX2 cap on a VNNI CPU) shift the
# first operand to uint8 (+128) and add pairs of u8 x s8 products in int16, so they are exact only where those pairs
# cannot overflow: a 7-bit second operand, or a first operand below 0 (a uint8 activation of at most 7 bits,
# shifted by -128), which is the range the quantizer picks for 8-bit weights where kernels saturate. Others (seen on
# a real AVX2 CPU) are exact for all codes, as CUDA's is. `int8_kernel_saturates("int_mm")` asks the kernel, and
# `test_cpu_int_mm_is_wrong_at_full_range_exactly_where_its_probe_says_it_saturates` checks the probe.
EXACT_ON_THIS_CPU_WEIGHT_BITS = (max(b for b in range(2, 9) if not int16_pair_overflows(b, 8))
                                 if int8_kernel_saturates("int_mm") else 8)


def _codes(shape, lo, hi, seed):
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 30), n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_int_mm_pads_any_shape_exactly(m, k, n, seed):
    lo, hi = int_range(EXACT_ON_THIS_CPU_WEIGHT_BITS, signed=True)
    a, b = _codes((m, k), -128, 127, seed).to(torch.int8), _codes((k, n), lo, hi, seed + 1).to(torch.int8)
    assert torch.equal(int_mm(a, b), a.to(torch.int64).matmul(b.to(torch.int64)).to(torch.int32))


_INT_MM_RANGES = """
import json, torch
from diffusion_ao.backends.x86_features import int8_kernel_saturates
from diffusion_ao.backends.cuda import int_mm
g = torch.Generator().manual_seed(0)
wrong = {}
for name, (a_lo, a_hi), (b_lo, b_hi) in [("full", (-128, 127), (-128, 127)), ("7-bit weights", (-128, 127), (-64, 63)),
                                         ("7-bit activations", (-128, -1), (-128, 127))]:
    a = torch.randint(a_lo, a_hi + 1, (64, 288), generator=g).to(torch.int8)
    b = torch.randint(b_lo, b_hi + 1, (288, 32), generator=g).to(torch.int8)
    wrong[name] = int((int_mm(a, b) != a.long().matmul(b.long()).int()).sum())
print(json.dumps({"saturates": int8_kernel_saturates("int_mm"), "wrong": wrong}))
"""


@pytest.mark.parametrize("cap", [None, "AVX2"])
def test_cpu_int_mm_is_wrong_at_full_range_exactly_where_its_probe_says_it_saturates(cap):
    """The CPU stand-in for cuBLAS' int8 GEMM, uncapped and with oneDNN capped to AVX2 (a CPU without VNNI, emulated):
    random full-range codes go wrong iff `int8_kernel_saturates("int_mm")` says so (on a real AVX2 CPU it was
    exact while oneDNN's qconv / qlinear saturate); codes whose pairs cannot overflow int16 are always exact."""
    from tests.backends.test_x86_features import _run_capped, _x86_flags, onednn_ran_without_vnni
    if cap == "AVX2" and "avx2" not in _x86_flags():
        pytest.skip("the CPU lacks AVX2")
    result, isa, kernels = _run_capped(_INT_MM_RANGES, cap)
    print(f"int_mm under {cap or 'no cap'} ({isa}, {kernels}): wrong elements {result['wrong']}")
    if cap == "AVX2" and not onednn_ran_without_vnni(isa, kernels):
        pytest.skip(f"this oneDNN build does not honour ONEDNN_MAX_CPU_ISA=AVX2 (isa: {isa!r})")
    wrong = result["wrong"]
    assert wrong["7-bit weights"] == wrong["7-bit activations"] == 0
    assert (wrong["full"] > 0) is result["saturates"]


@settings(max_examples=30, deadline=None)
@given(zp=st.integers(0, 255), wbits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16),
       stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 1]), kernel=st.sampled_from([1, 3]))
def test_int8_conv_and_linear_equal_the_dequantized_float64_reference(zp, wbits, seed, stride, padding, kernel):
    lo, hi = -(2 ** (wbits - 1)), 2 ** (wbits - 1) - 1
    # The activation range these weights need on this CPU's int_mm (7 bits where its int16 pairs overflow).
    act_max = int_range(7 if int8_kernel_saturates("int_mm") and int16_pair_overflows(wbits, 8) else 8,
                        signed=False)[1]
    zp = min(zp, act_max)
    x_q = _codes((2, 5, 7, 6), 0, act_max, seed).to(torch.uint8)
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


def test_lowered_graph_runs_every_quantized_layer_on_int_mm_and_matches_the_qdq_graph(converted, unet):
    lowered = lower_to_int_mm(converted)
    layers = [n for n in converted.graph.nodes
              if n.op == "call_function" and n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)]
    quantized = [n for n in layers if "dequantize_per_tensor" in str(n.args[0].target)]
    assert sum(lowered.meta["int_mm_layers"].values()) == len(quantized) > 0
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 500.0, 900.0])
    with torch.no_grad():
        fp, ref, out = unet(x, t).sample, converted(x, t), lowered(x, t)
    # Same integer arithmetic, different float rounding order: at most codes flipped at rounding boundaries.
    assert kernel_error_fraction(fp, ref, out) < KERNEL_ERROR_FRACTION


@cuda
def test_int_mm_lowering_on_cuda_matches_cpu_and_times_against_bf16(converted, unet):
    lowered = lower_to_int_mm(converted)
    x, t = torch.randn(32, 1, 8, 8), torch.full((32,), 500.0)
    with torch.no_grad():
        fp, qdq, ref = unet(x, t).sample, converted(x, t), lowered(x, t)
        on_gpu = lowered.to("cuda")(x.cuda(), t.cuda()).cpu()
    # The same integer codes on cuBLAS: what differs is FP rounding, hence at most codes flipped at boundaries.
    assert kernel_error_fraction(fp, qdq, on_gpu) < KERNEL_ERROR_FRACTION
    assert kernel_error_fraction(fp, qdq, ref) < KERNEL_ERROR_FRACTION
    timing = time_vs_bf16(export_unet(unet, sample_shape=(1, 1, 8, 8)), lowered, x.cuda(), t.cuda(), rounds=5)
    assert timing["bf16_ms"] > 0 and timing["lowered_ms"] > 0


@cuda
def test_torchao_linears_on_cuda(converted):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    from diffusion_ao.backends.cuda import lower_linears_torchao
    gm = lower_linears_torchao(converted, Int8DynamicActivationInt8WeightConfig()).to("cuda")
    x, t = torch.randn(32, 1, 8, 8), torch.full((32,), 500.0)
    with torch.no_grad():
        assert snr_db(converted(x, t), gm(x.cuda(), t.cuda()).cpu()) > 20


def test_torchao_linears_in_bf16_take_and_give_the_graphs_float32(converted):
    """`compute_dtype` (for kernels that take bf16 only, like the tile-packed int4 one) casts each torchao linear's
    input to it and its output back, so the graph around them stays float32; run here on CPU with int8 dynamic."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    from diffusion_ao.backends.cuda import lower_linears_torchao
    fp32 = lower_linears_torchao(converted, Int8DynamicActivationInt8WeightConfig())
    bf16 = lower_linears_torchao(converted, Int8DynamicActivationInt8WeightConfig(), compute_dtype=torch.bfloat16)
    assert bf16.meta["torchao_linears"] == fp32.meta["torchao_linears"] > 0
    casts = [n.args[1] for n in bf16.graph.nodes if n.op == "call_method" and n.target == "to"]
    assert casts.count(torch.bfloat16) == casts.count(torch.float32) == bf16.meta["torchao_linears"]
    assert all(m.weight.dtype == torch.bfloat16 for name, m in bf16.named_modules() if name.startswith("torchao_"))
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 500.0)
    with torch.no_grad():
        out = bf16(x, t)
        assert out.dtype == torch.float32
        assert snr_db(fp32(x, t), out) > 20


def test_time_vs_bf16_needs_cuda(converted):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RuntimeError, match="CUDA"):
        time_vs_bf16(converted, converted, torch.zeros(1))
