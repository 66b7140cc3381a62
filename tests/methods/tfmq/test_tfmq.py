"""TFMQ-DM through `quantize_unet`: config validation, the presets, disturbance-aware selection, TIAR."""
import pytest
import torch

from diffusion_ao import QuantConfig, as_diffusers_unet, collect_calibration_data, export_unet
from diffusion_ao.config import TFMQConfig
from diffusion_ao.passes.temporal import find_temporal_blocks
from diffusion_ao.passes.temporal_cache import CACHE_META, evaluate_nodes
from diffusion_ao.recipe import quantize_unet
from diffusion_ao.calibration.sampling import run_sampler
from diffusion_ao.methods.tfmq import reconstruct_temporal_features, select_cached_features, temporal_feature_errors

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache="some"), "cache='some'"),
    (dict(fsc="weights"), "fsc='weights'"),
    (dict(cache_budget_bytes=-1), "cache_budget_bytes"),
    (dict(cache="all", cache_budget_bytes=10), "only applies to cache='select'"),
    (dict(max_feature_error=float("nan")), "max_feature_error"),
    (dict(tiar_iterations=-1), "tiar_iterations"),
])
def test_tfmq_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TFMQConfig(**kwargs)


def test_quant_config_checks_tfmq_against_its_scope():
    with pytest.raises(ValueError, match="quantize_time_embedding=False keeps in FP"):
        QuantConfig(quantize_time_embedding=False, tfmq=TFMQConfig(cache="select"))
    with pytest.raises(ValueError, match="needs act_bits"):
        QuantConfig(act_bits=None, tfmq=TFMQConfig(fsc="temporal"))
    assert "time-emb:FP(cached)" in QuantConfig.preset("tfmq-scope").scope
    assert QuantConfig.preset("tfmq-w4a8").tfmq == TFMQConfig(tiar=True) and QuantConfig.preset("tfmq-w4a6").act_bits == 6


def test_selection_caches_the_worst_features_within_the_budget():
    errors = {"a": (0.5, 400), "b": (0.1, 400), "c": (0.01, 100), "d": (1e-5, 100)}
    choices = {c.name: c for c in select_cached_features(errors, max_error=1e-3, budget_bytes=500)}
    assert choices["a"].cached and not choices["b"].cached and choices["c"].cached  # b does not fit after a
    assert not choices["d"].cached and "stays quantized" in choices["d"].reason
    assert "over the budget" in choices["b"].reason
    unlimited = select_cached_features(errors, max_error=1e-3)
    assert [c.name for c in unlimited if c.cached] == ["a", "b", "c"]
    assert [c.name for c in select_cached_features(errors, max_error=1e-3, budget_bytes=0) if c.cached] == []


@pytest.fixture(scope="module")
def data(unet, scheduler):
    return collect_calibration_data(unet, scheduler, num_samples=8, num_inference_steps=4, progress=False)


def test_tfmq_preset_selects_caches_and_samples(unet, scheduler, data):
    config = QuantConfig.preset("tfmq-w4a8").replace(tfmq=TFMQConfig(max_feature_error=0.0, cache_budget_bytes=600),
                                                     act_observer="minmax", weight_observer="minmax")
    quantized, report = quantize_unet(unet, data, config, progress=False)
    selection = report.tfmq.selection
    assert len(selection) == 9  # the shared embedding and 8 ResBlock projections
    cached = [c for c in selection if c.cached]
    assert cached and sum(c.nbytes for c in cached) <= 600
    errors = [c.error for c in selection]
    assert errors == sorted(errors, reverse=True) and all(c.error_without_fsc is not None for c in selection)
    # The cached features are the FP values now; the others keep their quantization error.
    reference = export_unet(unet, sample_shape=(1, 1, 8, 8))
    after = temporal_feature_errors(quantized, reference, data.timesteps)
    assert set(after) == {c.name for c in selection if not c.cached} and all(e > 0 for e, _ in after.values())
    lookups = {n.meta[CACHE_META]: n for n in quantized.graph.nodes if CACHE_META in n.meta}
    fp_nodes = {name: n for n, name in find_temporal_blocks(reference).feature_names().items()}
    assert set(lookups) == {c.name for c in cached}
    for name, node in lookups.items():
        value, = evaluate_nodes(quantized, [node], data.timesteps)
        fp, = evaluate_nodes(reference, [fp_nodes[name]], data.timesteps)
        assert torch.equal(value, fp), name
    remaining = {p for p in find_temporal_blocks(quantized).module_paths}
    assert not any(c.name in remaining for c in cached if c.name.endswith("time_emb_proj"))
    fp_decisions = {d.module for d in report.quantizer.decisions if d.layer is None}
    assert all(c.name in fp_decisions for c in cached if c.name.endswith("time_emb_proj"))
    images = run_sampler(as_diffusers_unet(quantized, like=unet), scheduler, torch.randn(2, 1, 8, 8), 4)
    assert torch.isfinite(images).all()


@pytest.mark.slow
def test_tfmq_scope_preset_runs_with_the_tib_cached(unet, data):
    quantized, report = quantize_unet(unet, data, QuantConfig.preset("tfmq-scope"), progress=False)
    assert find_temporal_blocks(quantized).linears == []
    assert report.tfmq.cache.removed_layers[:2] == ["time_embedding.linear_1", "time_embedding.linear_2"]
    assert not any("time_emb" in d.module for d in report.quantizer.decisions)  # never seen by the quantizer


def test_tiar_brings_the_quantized_temporal_features_closer_to_fp(unet, data):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from diffusion_ao import DiffusionQuantizer, calibrate

    reference = export_unet(unet, sample_shape=(1, 1, 8, 8))
    errors = {}
    for iterations in (0, 150):
        prepared = prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)),
                                DiffusionQuantizer(QuantConfig.preset("w4a8")))
        calibrate(prepared, data, progress=False)
        report = reconstruct_temporal_features(prepared, data, iterations=iterations)
        if iterations:
            assert [b.name for b in report.blocks] == ["temporal features"]
            assert report.blocks[0].loss_after < report.blocks[0].loss_before
        feature_errors = temporal_feature_errors(convert_pt2e(prepared), reference, data.timesteps)
        errors[iterations] = sum(e for e, _ in feature_errors.values())
    print(f"TIAR: summed relative MSE of the temporal features {errors[0]:.3e} -> {errors[150]:.3e}")
    assert errors[150] < errors[0]


def test_tiar_has_nothing_to_do_when_the_time_path_is_fp(unet, data):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from diffusion_ao import DiffusionQuantizer, calibrate

    config = QuantConfig.preset("w4a8").replace(quantize_time_embedding=False)
    prepared = prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), DiffusionQuantizer(config))
    calibrate(prepared, data, progress=False)
    assert reconstruct_temporal_features(prepared, data, iterations=10) is None