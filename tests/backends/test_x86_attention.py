"""Int8 attention (`backends.x86_attention`): the reference kernel's error bound, the rewrite of a quantized SDPA
into torchao's `qscaled_dot_product`, its eager run, save/load, and the integer template where the CPU has AMX
(the AMX answer forced both ways for what the quantizer says)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao import (QuantConfig, compile_for_cpu, count_int8_kernels, load_quantized, quantize_denoiser,
                          save_quantized)
from diffusion_ao.backends import x86_attention
from diffusion_ao.backends.x86_attention import (SDPA, int8_attention_op, int8_attention_unavailable,
                                                 reference_int8_attention)
from diffusion_ao.graph import call_graph, graph_input_names


def _grid(x: torch.Tensor) -> tuple[float, int]:
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 1e-3)
    scale = (hi - lo) / 255
    return scale, int(round(-lo / scale))


def _quantize(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale) + zp, 0, 255).to(torch.uint8)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), heads=st.integers(1, 3), q_len=st.integers(1, 40), kv_len=st.integers(1, 40),
       head_dim=st.sampled_from([4, 8, 16]), spread=st.floats(0.1, 4.0))
def test_the_reference_kernel_errs_by_at_most_half_a_step_of_each_grid(seed, heads, q_len, kv_len, head_dim,
                                                                      spread):
    """With Q, K, V on their grids, the output differs from FP attention of the dequantized inputs by at most half
    an output step plus half a probability step times sum |v| (no saturation: the grids cover the values)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, head_dim, generator=g) * spread for n in (q_len, kv_len, kv_len))
    grids = [_grid(t) for t in (q, k, v)]
    qu, ku, vu = (_quantize(t, s, z) for t, (s, z) in zip((q, k, v), grids))
    qd, kd, vd = ((u.float() - z) * s for u, (s, z) in zip((qu, ku, vu), grids))
    exact = F.scaled_dot_product_attention(qd, kd, vd)
    peak = float((qd @ kd.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1).amax())
    a_scale = peak / 255
    o_scale, o_zp = _grid(exact)
    (qs, qz), (ks, kz), (vs, vz) = grids
    out = reference_int8_attention(qu, ku, vu, None, 0.0, False, None, qs, qz, ks, kz, vs, vz, a_scale, 0,
                                   o_scale, o_zp)
    assert out.dtype == torch.uint8 and out.shape == exact.shape
    got = (out.float() - o_zp) * o_scale
    bound = o_scale / 2 + a_scale / 2 * vd.abs().sum(-2, keepdim=True) + 1e-5
    assert ((got - exact).abs() <= bound).all()


def test_the_reference_kernel_refuses_dropout_and_causal_masks():
    x = torch.full((1, 1, 2, 4), 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match="neither dropout nor a causal mask"):
        reference_int8_attention(x, x, x, None, 0.1)
    with pytest.raises(ValueError, match="neither dropout nor a causal mask"):
        reference_int8_attention(x, x, x, None, 0.0, True)


@pytest.fixture(scope="module")
def int8_attention(dit, dit_data):
    """The tiny DiT at W8A8 with int8 attention, and the same without (FP attention)."""
    config = QuantConfig.preset("w8a8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the simulated-attention warning where the CPU has no AMX
        with_attention, report = quantize_denoiser(dit, dit_data, config.replace(quantize_attention_matmuls=True),
                                                   progress=False)
    without, _ = quantize_denoiser(dit, dit_data, config, progress=False)
    return with_attention, report, without


def _output(graph, inputs, names=None):
    out = call_graph(graph, inputs, names or graph_input_names(graph))
    return out[0] if isinstance(out, (tuple, list)) else out


def test_the_recipe_rewrites_each_quantized_sdpa_as_int8_attention(int8_attention, dit_data):
    graph, report, fp_attention = int8_attention
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert SDPA not in targets and targets.count(int8_attention_op()) == 1  # one block, one attention
    (peak,) = report.attention.values()
    assert 0 < peak <= 1
    args = next(n.args for n in graph.graph.nodes if n.target == int8_attention_op())
    assert args[13] == pytest.approx(peak / 255) and args[14] == 0  # the probabilities' grid: max p / 255, zp 0
    inputs = dit_data.steps[0].graph_inputs()
    ours, fp = _output(graph, inputs), _output(fp_attention, inputs)
    assert torch.isfinite(ours).all()
    assert ((ours - fp).norm() / fp.norm()) < 0.05  # the tiny DiT: int8 attention is a small extra error


def test_an_sdpa_whose_output_is_not_quantized_stays_as_it_is(dit, dit_data):
    """With the output projection kept in FP there is no output grid to take: the SDPA stays (simulated q/dq)."""
    config = QuantConfig.preset("w8a8").replace(quantize_attention_matmuls=True,
                                                module_name_overrides={"transformer_blocks.0.attn1.to_out": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, report = quantize_denoiser(dit, dit_data, config, progress=False)
    assert report.attention == {}
    assert any(n.target == SDPA for n in graph.graph.nodes)


def test_a_low_rank_branch_beside_the_output_projection_requantizes_from_the_attention_output(dit, dit_data):
    from diffusion_ao.config import LowRankConfig

    config = QuantConfig.preset("w4a8").replace(low_rank=LowRankConfig(rank=2, down_bits=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, report = quantize_denoiser(dit, dit_data, config.replace(quantize_attention_matmuls=True),
                                          progress=False)
        fp_attention, _ = quantize_denoiser(dit, dit_data, config, progress=False)
    assert "transformer_blocks.0.attn1.to_out.0" in report.low_rank  # its input quantized twice
    assert len(report.attention) == 1 and not any(n.target == SDPA for n in graph.graph.nodes)
    inputs = dit_data.steps[0].graph_inputs()
    ours, fp = _output(graph, inputs), _output(fp_attention, inputs)
    assert ((ours - fp).norm() / fp.norm()) < 0.05


def test_int8_attention_survives_save_and_load(int8_attention, dit_data, tmp_path):
    graph = int8_attention[0]
    save_quantized(graph, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    assert any(n.target == int8_attention_op() for n in back.graph.nodes)
    inputs = dit_data.steps[0].graph_inputs()
    torch.testing.assert_close(_output(back, inputs), _output(graph, inputs))


def test_q_k_v_stay_apart_when_they_feed_int8_attention(int8_attention, dit):
    """Each projection then writes its uint8 operand from its own kernel; with floating-point attention they
    merge into one."""
    from diffusion_ao.passes.merge_linears import merge_shared_input_linears

    graph, _, fp_attention = int8_attention
    assert merge_shared_input_linears(graph)[1] == 0
    assert merge_shared_input_linears(fp_attention)[1] == 2 * len(dit.transformer_blocks)


@pytest.mark.skipif(not x86_attention.amx_available(), reason="torchao's integer attention template needs AMX")
def test_on_amx_the_attention_compiles_to_the_integer_template_and_matches_the_reference(int8_attention,
                                                                                         dit_data):
    graph = int8_attention[0]
    inputs = dit_data.steps[0].graph_inputs()
    names = graph_input_names(graph)
    fast = compile_for_cpu(graph)
    counts = count_int8_kernels(lambda: _output(fast, inputs, names))
    assert counts["attention"] == 1 and counts["qlinear"] > 0 and counts["merged_linears"] == 0
    eager, compiled = _output(graph, inputs), _output(fast, inputs, names)
    # one output step of the attention at most, on a few elements (exp approximation, accumulation order)
    assert ((compiled - eager).norm() / eager.norm()) < 0.02


@pytest.mark.slow  # two compiles of the tiny DiT, one of them timing each GEMM shape's kernels
def test_autotuned_gemms_keep_every_int8_kernel_and_the_outputs(int8_attention, dit_data):
    """`autotune=True` lets inductor pick its own GEMM template where it measures faster (AMX / VNNI CPUs; elsewhere
    oneDNN stays): the same layers on int8 kernels, outputs within rounding of the default compile's."""
    graph = int8_attention[0]
    inputs = dit_data.steps[0].graph_inputs()
    names = graph_input_names(graph)
    default, tuned = compile_for_cpu(graph), compile_for_cpu(graph, autotune=True)
    counts = count_int8_kernels(lambda: _output(tuned, inputs, names))
    assert counts == count_int8_kernels(lambda: _output(default, inputs, names))
    assert counts["qlinear"] + counts["merged_linears"] > 0
    eager, ref, ours = (_output(g, inputs, names) for g in (graph, default, tuned))
    # each kernel may round a requantized value one step the other way: both stay as close to eager as each other
    assert ((ours - eager).norm() / eager.norm()) < 0.02 and ((ref - eager).norm() / eager.norm()) < 0.02


def test_where_torch_runs_no_avx512_kernels_the_attention_compiles_to_the_op_kernel_not_the_template(
        monkeypatch, int8_attention, dit_data):
    """On an AMX CPU under `ATEN_CPU_CAPABILITY=avx2` torchao would pick its AVX-512-only template, which fails at
    run time; `compile_for_cpu` lowers the op to its CPU kernel instead (here the reference one, counted as no
    integer attention). Forced through `amx_available`, which reads the capability."""
    monkeypatch.setattr(x86_attention, "amx_available", lambda: False)
    graph = int8_attention[0]
    inputs = dit_data.steps[0].graph_inputs()
    names = graph_input_names(graph)
    tiles = torch.cpu._is_amx_tile_supported()
    fast = compile_for_cpu(graph)
    _, (code, *_) = run_and_get_code(lambda: _output(fast, inputs, names))
    assert "qscaled_dot_product" in code and "INT8_QSDPA_TEMPLATE" not in code  # the op's kernel, called
    assert count_int8_kernels(lambda: _output(fast, inputs, names))["attention"] == 0
    eager, compiled = _output(graph, inputs), _output(fast, inputs, names)
    assert ((compiled - eager).norm() / eager.norm()) < 0.02
    assert torch.cpu._is_amx_tile_supported() == tiles  # restored after compiling


@pytest.mark.parametrize("amx", [True, False])
def test_the_quantizer_warns_that_attention_is_simulated_exactly_where_the_cpu_has_no_amx(monkeypatch, dit, dit_data,
                                                                                         amx):
    from diffusion_ao import DiffusionQuantizer, export_denoiser

    monkeypatch.setattr(x86_attention, "amx_available", lambda: amx)
    int8_attention_unavailable.cache_clear()
    try:
        graph = export_denoiser(dit, dit_data.steps[0])
        quantizer = DiffusionQuantizer(QuantConfig.preset("w8a8").replace(quantize_attention_matmuls=True))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            quantizer.annotate(graph)
        simulated = [w for w in record if "run simulated here" in str(w.message)]
        if amx:
            assert int8_attention_unavailable() is None and not simulated
        else:
            assert "needs a CPU with AMX tiles running torch's AVX-512 kernels" in int8_attention_unavailable()
            assert len(simulated) == 1 and "AMX" in str(simulated[0].message)
    finally:
        int8_attention_unavailable.cache_clear()
