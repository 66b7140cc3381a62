"""Finite-set calibration: per-timestep qparams from the observers' per-timestep statistics, selected in the
converted graph by the current timestep, on int8 kernels where inductor can take a run-time scale."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from diffusion_ao import (DiffusionQuantizer, QuantConfig, as_diffusers_unet, calibrate, collect_calibration_data,
                          compile_for_cpu, count_int8_kernels, export_unet)
from diffusion_ao.observers import TimestepActivationObserver, timestep_context
from diffusion_ao.passes.finite_set import FSC_META, apply_finite_set_calibration, finite_set_tables
from diffusion_ao.passes.temporal_cache import cache_temporal_features, evaluate_nodes
from diffusion_ao.primitives import fake_quantize
from tests.conftest import KERNEL_ERROR_FRACTION, kernel_error_fraction

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.01, 100.0), method=st.sampled_from(["minmax", "mse"]))
def test_per_timestep_qparams_fit_each_timestep(seed, spread, method):
    g = torch.Generator().manual_seed(seed)
    obs = TimestepActivationObserver(method=method)
    data = {10.0: torch.randn(200, generator=g) * spread, 20.0: torch.rand(200, generator=g) + 3.0}
    for t, x in data.items():
        with timestep_context(t):
            obs(x)
    union_scale, _ = obs._calculate_qparams(obs.min_val, obs.max_val)  # one range over all timesteps
    for t, x in data.items():
        scale, zp = obs.timestep_qparams(t)
        lo, hi = obs.timestep_range(t)
        # The range comes from this timestep's values alone and never exceeds them (0 is always representable).
        assert lo >= min(x.min().item(), 0.0) - 1e-6 and hi <= max(x.max().item(), 0.0) + 1e-6
        assert scale <= union_scale * (1 + 1e-6)
        if method == "minmax":  # every value is inside the range: error at most half a step
            err = (fake_quantize(x, scale, zp.float(), 0, 255) - x).abs().max()
            assert err <= scale / 2 + 1e-5 * spread
    assert torch.equal(torch.stack(obs.timestep_qparams(10.0)), torch.stack(obs.timestep_qparams(10.0)))
    with pytest.raises(KeyError, match="saw no data at timestep 30"):
        obs.timestep_qparams(30.0)


@pytest.fixture(scope="module")
def calibrated(unet, scheduler):
    data = collect_calibration_data(unet, scheduler, num_samples=8, num_inference_steps=4, progress=False)
    config = QuantConfig.preset("w8a8").replace(act_observer="minmax")
    prepared = prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), DiffusionQuantizer(config))
    calibrate(prepared, data, progress=False)
    return data, prepared


def test_temporal_fsc_quantizes_each_timestep_with_its_own_range(calibrated):
    data, prepared = calibrated
    tables = finite_set_tables(prepared, data.timesteps, scope="temporal")
    # sinusoidal embedding, silu(linear_1), and silu(temb) in front of every ResBlock's time projection
    assert len(tables) == 2 + 8 and all(len(t.scales) == len(data) for t in tables)
    converted = convert_pt2e(copy.deepcopy(prepared))
    counts = apply_finite_set_calibration(converted, tables, data.timesteps)
    assert counts == {"int8": 10, "simulated": 0}
    pairs = [n for n in converted.graph.nodes if n.meta.get(FSC_META) and "dequantize" in str(n.target)]
    assert len(pairs) == 10
    table = tables[0]
    dq = next(n for n in pairs if n.users and next(iter(n.users)).name == table.consumers[0][0])
    x_node = dq.args[0].args[0]
    x, dequantized = evaluate_nodes(converted, [x_node, dq], data.timesteps)
    for i in range(len(data)):  # min-max per timestep: every value within half of that timestep's step
        assert (dequantized[i] - x[i]).abs().max() <= table.scales[i] / 2 + 1e-6
    assert table.scales.max() / table.scales.min() > 1.01  # the ranges do differ between timesteps


@settings(max_examples=8, deadline=None)
@given(factor=st.floats(0.25, 4.0), which=st.integers(0, 9))
def test_fsc_keeps_a_step_size_learned_by_reconstruction(calibrated, factor, which):
    # TIAR / block reconstruction leave their learned step in `fixed_qparams`; FSC must keep that correction.
    data, prepared = calibrated
    prepared = copy.deepcopy(prepared)
    before = finite_set_tables(prepared, data.timesteps, scope="temporal")
    obs = prepared.get_submodule(next(n for n in prepared.graph.nodes if n.name == before[which].observer).target)
    scale, zp = obs.calculate_qparams()
    obs.set_fixed_qparams(scale * factor, zp)
    after = finite_set_tables(prepared, data.timesteps, scope="temporal")
    for k, (old, new) in enumerate(zip(before, after)):
        expected = old.scales * (factor if k == which else 1.0)
        assert torch.allclose(new.scales, expected, rtol=1e-5)
        assert torch.equal(new.zero_points, old.zero_points)


def test_fsc_graph_rejects_mixed_timestep_batches(unet, calibrated):
    data, prepared = calibrated
    tables = finite_set_tables(prepared, data.timesteps, scope="all")
    converted = convert_pt2e(copy.deepcopy(prepared))
    apply_finite_set_calibration(converted, tables, data.timesteps)
    wrapped = as_diffusers_unet(converted, like=unet)
    x = data.steps[0].sample[:2]
    assert torch.isfinite(wrapped(x, data.timesteps[0]).sample).all()
    with pytest.raises(ValueError, match="one timestep per batch"):
        wrapped(x, torch.tensor(data.timesteps[:2]))


@pytest.mark.slow
def test_cache_and_fsc_lower_to_int8_kernels(unet, calibrated):
    """Cached TIB: every remaining quantized layer on int8 kernels. Temporal FSC: still all of them (qlinear with a
    run-time scale). FSC on every activation: linears stay int8, conv inputs become simulated fake quantization."""
    data, _ = calibrated
    step = data.steps[1]
    x, t = step.sample[:4], torch.full((4,), step.timestep)
    results = {}
    for name, cache, scope in (("cache", True, None), ("fsc-temporal", False, "temporal"), ("fsc-all", True, "all")):
        graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
        if cache:
            cache_temporal_features(graph, data.timesteps)
        quantizer = DiffusionQuantizer(QuantConfig.preset("w8a8"))
        prepared = prepare_pt2e(graph, quantizer)
        calibrate(prepared, data, progress=False)
        tables = finite_set_tables(prepared, data.timesteps, scope) if scope else []
        converted = convert_pt2e(prepared)
        apply_finite_set_calibration(converted, tables, data.timesteps)
        fast = compile_for_cpu(converted)
        planned = sum(1 for d in quantizer.decisions if d.layer is not None)
        results[name] = (count_int8_kernels(fast, x, t), planned)
        fraction = kernel_error_fraction(unet(x, t).sample, converted(x, t), fast(x, t))
        assert fraction < KERNEL_ERROR_FRACTION, (name, fraction)
    kernels, planned = results["cache"]
    assert kernels["qconv"] + kernels["qlinear"] + kernels["merged_linears"] == planned and kernels["qlinear"] == planned - kernels["qconv"] > 0
    kernels, planned = results["fsc-temporal"]
    assert kernels["qconv"] + kernels["qlinear"] + kernels["merged_linears"] == planned
    kernels, _ = results["fsc-all"]
    assert kernels["qconv"] == 0 and kernels["qlinear"] == results["cache"][0]["qlinear"]
