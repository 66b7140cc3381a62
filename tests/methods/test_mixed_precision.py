"""Sensitivity-driven mixed precision: sensitivities measured one layer at a time, the greedy plan within the size
budget, and the recipe's decisions and packed size following the plan."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffusion_ao import QuantConfig, collect_calibration_data, export_unet, quantize_denoiser
from diffusion_ao.config import LayerQuant, MixedPrecisionConfig
from diffusion_ao.methods.mixed_precision import layer_sensitivities, plan_mixed_precision
from diffusion_ao.serialization.size import size_mb

TORCH_THREADS = 2  # set for this module's tests by conftest.module_threads


@pytest.fixture(scope="module")
def data(unet, scheduler):
    return collect_calibration_data(unet, scheduler, num_samples=4, num_inference_steps=3, progress=False)


@pytest.fixture(scope="module")
def sensitivities(graph, data):
    return layer_sensitivities(graph, data.subset(2), QuantConfig.preset("w4a8"))


def test_sensitivities_cover_every_low_bit_layer_and_leave_the_graph_as_it_was(unet, graph, data, sensitivities):
    x, t = data.steps[0].sample, torch.full((len(data.steps[0].sample),), data.steps[0].timestep)
    assert torch.equal(graph(x, t), export_unet(unet, sample_shape=(1, 1, 8, 8))(x, t))  # weights restored
    from diffusion_ao.quantizer.quantizer import DiffusionQuantizer
    planned = DiffusionQuantizer(QuantConfig.preset("w4a8")).planned_layers(graph)
    assert len(sensitivities) == len(planned)  # every layer has its own module path in the tiny UNet
    assert all(n > 0 and c > 0 and err > 0 for n, c, err, _ in sensitivities.values())
    # 8-bit weights are not candidates for an 8-bit promotion
    assert layer_sensitivities(graph, data.subset(1), QuantConfig.preset("w8a8")) == {}


def test_a_layer_rounded_coarser_is_more_sensitive(graph, data, sensitivities):
    at_3_bits = layer_sensitivities(graph, data.subset(2), QuantConfig.preset("w4a8").replace(weight_bits=3))
    worse = sum(at_3_bits[p][2] > sensitivities[p][2] for p in sensitivities)
    assert worse >= 0.8 * len(sensitivities)


@settings(max_examples=6, deadline=None)
@given(budget=st.floats(0.1, 0.6))
def test_plan_stays_within_the_budget_and_promotes_greedily(graph, data, budget):
    config = QuantConfig.preset("w4a8")
    plan = plan_mixed_precision(graph, data, config, MixedPrecisionConfig(size_budget=budget, samples_per_step=1))
    assert plan.fp32_bytes == int(size_mb(graph) * 2**20)
    promoted = [layer for layer in plan.layers if layer.weight_bits == 8]
    assert set(plan.overrides) == {layer.path for layer in promoted}
    assert all(q == LayerQuant(8, 8) for q in plan.overrides.values())
    all_low = plan.planned_bytes - sum(layer.numel // 2 for layer in promoted)  # 8 bits cost numel/2 more bytes
    if all_low <= budget * plan.fp32_bytes:
        assert plan.size_ratio <= budget
        rest = [layer for layer in plan.layers if layer.weight_bits == 4]
        # greedy by error per byte: nothing left out would have fitted
        assert all(plan.planned_bytes + layer.numel // 2 > budget * plan.fp32_bytes for layer in rest)
    else:
        assert not promoted


@pytest.mark.parametrize("has_vnni", [True, False], ids=["vnni", "no-vnni"])
def test_recipe_quantizes_the_plan_and_its_size_estimate_holds(unet, data, has_vnni):
    config = QuantConfig.preset("w4a8").replace(mixed_precision=MixedPrecisionConfig(size_budget=0.3,
                                                                                     samples_per_step=1))
    converted, report = quantize_denoiser(unet, data, config, has_vnni=has_vnni, progress=False)
    plan = report.mixed_precision
    assert plan is not None and plan.overrides
    quantized = [d for d in report.quantizer.decisions if d.layer is not None]
    widths = {d.module: d.layer.weight_bits for d in quantized}
    assert {widths[p] for p in plan.overrides} == {8}
    assert {w for p, w in widths.items() if p not in plan.overrides} == {4}
    # without VNNI the promoted 8-bit-weight layers need the 7-bit activation range (int16 pair sums); 4-bit not
    top = {d.module: d.act_range[1] for d in quantized if d.act_range}
    assert {top[p] for p in plan.overrides if p in top} == ({255} if has_vnni else {127})
    assert {v for p, v in top.items() if p not in plan.overrides} == {255}
    actual = size_mb(converted) * 2**20
    assert actual == pytest.approx(plan.planned_bytes, rel=0.05)


def test_bad_mixed_precision_settings_are_rejected():
    with pytest.raises(ValueError, match="size_budget"):
        MixedPrecisionConfig(size_budget=0)
    with pytest.raises(ValueError, match="must be above the config's weight_bits"):
        QuantConfig.preset("w8a8").replace(mixed_precision=MixedPrecisionConfig())
    with pytest.raises(TypeError, match="mixed_precision must be a MixedPrecisionConfig"):
        QuantConfig(mixed_precision=0.17)


def test_with_the_temporal_cache_the_budget_goes_to_layers_that_stay(unet, data):
    from diffusion_ao.config import TFMQConfig

    config = QuantConfig.preset("w4a8").replace(tfmq=TFMQConfig(cache="all", fsc="none"),
                                                mixed_precision=MixedPrecisionConfig(samples_per_step=1))
    converted, report = quantize_denoiser(unet, data, config, progress=False)
    removed = set(report.tfmq.cache.removed_layers)
    assert removed and not removed & {layer.path for layer in report.mixed_precision.layers}
    # the budget is a fraction of the FP32 model, not of the cached graph
    assert report.mixed_precision.fp32_bytes == int(size_mb(export_unet(unet, sample_shape=(1, 1, 8, 8))) * 2**20)
