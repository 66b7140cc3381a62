"""Bad input fails early with an error that names the problem and the fix."""
import pytest
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from diffusion_ao import (CalibrationData, CalibrationStep, DiffusionQuantizer, LayerQuant, QuantConfig, calibrate,
                          collect_calibration_data, export_unet)


@pytest.fixture(scope="module")
def data(unet, scheduler):
    return collect_calibration_data(unet, scheduler, num_samples=4, num_inference_steps=2, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"weight_bits": 1}, r"weight_bits=1 is not supported: use an int in 2..8"),
    ({"weight_bits": 16}, r"weight_bits=16 is not supported"),
    ({"act_bits": 3}, r"act_bits=3 is not supported: use an int in 4..8"),
    ({"act_observer": "percentile99"}, r"act_observer='percentile99' is not supported: choose one of"),
    ({"reduce_range": "yes"}, r"reduce_range='yes' is not supported: use 'auto', True or False"),
])
def test_invalid_config_names_the_field_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"Unknown preset 'w3a3': choose one of .*w8a8"):
        QuantConfig.preset("w3a3")


def test_quantizer_rejects_a_graph_that_was_not_exported(unet):
    traced = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)))
    with pytest.raises(ValueError, match=r"inputs named 'sample' and 'timestep'.*export_denoiser"):
        prepare_pt2e(traced, DiffusionQuantizer())
    with pytest.raises(TypeError, match=r"needs an exported graph, got an eager UNet2DModel.*export_denoiser"):
        DiffusionQuantizer().annotate(unet)


def test_calibrate_rejects_an_eager_model_and_an_unprepared_graph(unet, data):
    with pytest.raises(TypeError, match=r"eager UNet2DModel.*export_denoiser"):
        calibrate(unet, data)
    with pytest.raises(ValueError, match=r"no diffusion-ao observers.*prepare_pt2e"):
        calibrate(export_unet(unet, sample_shape=(1, 1, 8, 8)), data)


def test_convert_before_calibrate_says_to_calibrate(unet):
    prepared = prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), DiffusionQuantizer())
    with pytest.raises(RuntimeError, match=r"saw no data: run `calibrate\(prepared, data\)`"):
        convert_pt2e(prepared)


def test_nan_in_calibration_data_is_caught_before_any_observer_sees_it(unet, data):
    prepared = prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), DiffusionQuantizer())
    bad_sample = data.steps[1].sample.clone()
    bad_sample[0, 0, 0, 0] = float("nan")
    bad = CalibrationData([data.steps[0], CalibrationStep(data.steps[1].timestep, bad_sample, {})])
    with pytest.raises(ValueError, match=r"NaN/Inf in 'sample' at timestep .*diverged"):
        calibrate(prepared, bad, progress=False)
    with pytest.raises(ValueError, match=r"calibration data is empty"):
        calibrate(prepared, CalibrationData([]), progress=False)


class _UpsamplingDenoiser(torch.nn.Module):
    """A denoiser with a transposed conv, which the quantizer has no int8 path for."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(4, 1, 2, stride=2)

    def forward(self, sample, timestep):
        return self.up(self.down(sample) + timestep.view(-1, 1, 1, 1) / 1000)


def test_unsupported_layer_names_the_module_and_the_override_that_keeps_it_in_fp():
    model = _UpsamplingDenoiser().eval()
    example = (torch.randn(2, 1, 8, 8), torch.full((2,), 10.0))
    graph = torch.export.export(model, example).module()
    with pytest.raises(ValueError, match=r"cannot quantize .*conv_transpose.* in modules \['up'\].*"
                                         r"module_name_overrides=\{'up': None"):
        prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset("w8a8").replace(quantize_first_last=True)))
    # The fix the message names works.
    config = QuantConfig.preset("w8a8").replace(quantize_first_last=True, module_name_overrides={"up": None})
    quantizer = DiffusionQuantizer(config)
    prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    assert [d.module for d in quantizer.decisions if d.layer is not None] == ["down"]
    (up,) = [n for n in prepared.graph.nodes if "conv_transpose" in str(n.target)]
    assert not any("activation_post_process" in str(a) for a in up.all_input_nodes)


def test_export_rejects_models_it_does_not_know_and_wrong_shapes(unet):
    with pytest.raises(TypeError, match=r"supports diffusers UNet2DModel and UNet2DConditionModel, got Conv2d"):
        export_unet(torch.nn.Conv2d(1, 1, 3), sample_shape=(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"sample_shape has 3 channels but the UNet expects 1"):
        export_unet(unet, sample_shape=(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"encoder_hidden_states_shape is only for UNet2DConditionModel"):
        export_unet(unet, sample_shape=(1, 1, 8, 8), encoder_hidden_states_shape=(4, 16))


def test_module_override_must_be_a_layer_quant_or_none():
    with pytest.raises(TypeError, match=r"module_name_overrides\['conv_in'\] must be a LayerQuant or None"):
        QuantConfig(module_name_overrides={"conv_in": 8})
    QuantConfig(module_name_overrides={"conv_in": LayerQuant(weight_bits=8, act_bits=8)})


@pytest.mark.parametrize("key, nearest", [("mid_blocks", "mid_block"), ("down_blocks.9", "down_blocks.0"),
                                          ("unet.mid_block", "mid_block")])
def test_an_override_of_a_module_the_model_does_not_have_is_an_error_with_the_nearest_names(unet, key, nearest):
    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    config = QuantConfig.preset("w8a8").replace(module_name_overrides={key: None, "mid_block": None})
    with pytest.raises(ValueError, match=rf"names 1 module\(s\) the model does not have \('{key}': nearest "
                                         rf"\[.*'{nearest}'.*\]\)\. Keys are module paths as in model.named_modules"):
        prepare_pt2e(graph, DiffusionQuantizer(config))


def test_the_override_check_is_made_before_any_work_and_survives_passes_that_remove_modules(unet, data):
    from diffusion_ao import quantize_denoiser
    from diffusion_ao.config import TFMQConfig

    bad = QuantConfig.preset("w8a8").replace(module_name_overrides={"mid_blocks": None})
    with pytest.raises(ValueError, match=r"'mid_blocks': nearest \['mid_block'"):
        quantize_denoiser(unet, data, bad, progress=False)
    # the time embedding is cached away before the quantizer sees the graph: an override of it is still a module
    cached = QuantConfig.preset("w8a8").replace(tfmq=TFMQConfig(cache="all", fsc="none"),
                                                module_name_overrides={"time_embedding": None, "": None})
    with pytest.raises(ValueError, match=r"quantizes no layer of this model: every one is kept in floating point "
                                         r"\(module_name_overrides\[''\]\)"):
        quantize_denoiser(unet, data, cached, progress=False)
    partly = cached.replace(module_name_overrides={"time_embedding": LayerQuant(8, 8), "mid_block": None})
    _, report = quantize_denoiser(unet, data, partly, progress=False)
    assert not any(d.module.startswith("time_embedding") for d in report.quantizer.decisions)  # cached away
    assert all(d.layer is None for d in report.quantizer.decisions if d.module.startswith("mid_block"))


def test_a_second_calibrate_adds_to_the_statistics_and_says_so_and_reset_starts_over(unet, data):
    from diffusion_ao.observers import TimestepActivationObserver

    def qparams(prepared):
        return [tuple(float(v) for v in m.calculate_qparams()) for m in prepared.modules()
                if isinstance(m, TimestepActivationObserver)]

    def prepared_graph():
        graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
        return prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset("w8a8")))

    once = prepared_graph()
    calibrate(once, data, progress=False)
    retried = prepared_graph()
    calibrate(retried, data, progress=False)
    with pytest.warns(UserWarning, match=r"already hold statistics of an earlier calibrate call; this data is added "
                                         r"to them\. .* pass reset=True"):
        calibrate(retried, data, progress=False)
    assert all(obs.stats[t].count == 2 * once_obs.stats[t].count
               for obs, once_obs in zip((m for m in retried.modules() if isinstance(m, TimestepActivationObserver)),
                                        (m for m in once.modules() if isinstance(m, TimestepActivationObserver)))
               for t in obs.stats)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(retried, data, progress=False, reset=True)
    assert qparams(retried) == qparams(once)


def test_config_conflicts_are_refused_before_any_work(unet, data, monkeypatch):
    from diffusion_ao import quantize_denoiser
    from diffusion_ao import recipe
    from diffusion_ao.config import DMQConfig, TFMQConfig, TimeGroupConfig

    with pytest.raises(ValueError, match=r"timestep_weighting=True\) weights each timestep's .* use "
                                         r"timestep_aggregation='weighted'"):
        QuantConfig.preset("w4a8").replace(dmq=DMQConfig(les=False, pts=False), timestep_aggregation="global")
    QuantConfig.preset("w4a8").replace(dmq=DMQConfig(les=False, pts=False, timestep_weighting=False),
                                       timestep_aggregation="global")
    labels = QuantConfig.preset("w8a8").replace(tfmq=TFMQConfig(cache="all", fsc="none", cache_class_labels=True))
    groups = QuantConfig.preset("w8a8").replace(time_groups=TimeGroupConfig(groups=len(data.timesteps) + 1))
    for config, message in ((labels, r"cache_class_labels=True\) needs calibration data with class_labels"),
                            (groups, rf"groups={len(data.timesteps) + 1}\) needs at least as many calibration "
                                     rf"timesteps; the data has {len(data.timesteps)}")):
        with monkeypatch.context() as m:  # before the export, not after it
            m.setattr(recipe, "export_denoiser", lambda *a, **k: pytest.fail("exported before the check"))
            with pytest.raises(ValueError, match=message):
                quantize_denoiser(unet, data, config, progress=False)


def test_calibration_data_that_does_not_fit_the_graph_is_named_before_any_forward(unet, data):
    prepared = prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), DiffusionQuantizer())
    three = CalibrationData([CalibrationStep(s.timestep, s.sample.repeat(1, 3, 1, 1)) for s in data.steps])
    with pytest.raises(ValueError, match=r"calibrate: input 'sample' has shape \(4, 3, 8, 8\); the graph was "
                                         r"exported for \(batch, 1, 8, 8\) float32"):
        calibrate(prepared, three, progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be in 1..4096 .* got 5000"):
        calibrate(prepared, data, batch_size=5000, progress=False)
    mixed = CalibrationData([data.steps[0], CalibrationStep(data.steps[1].timestep, three.steps[1].sample)])
    with pytest.raises(ValueError, match=r"has 'sample' of shape \(3, 8, 8\) .* the first step has \(1, 8, 8\)"):
        mixed.validate()
    from diffusion_ao import quantize_denoiser
    with pytest.raises(ValueError, match=r"3 channels, but this UNet2DModel takes 1 \(config.in_channels\)"):
        quantize_denoiser(unet, three, "w8a8", progress=False)


def test_weights_that_were_never_loaded_are_named(unet, scheduler):
    from diffusion_ao import export_denoiser
    with torch.device("meta"):
        from tests.conftest import tiny_unet
        empty = tiny_unet()
    with pytest.raises(ValueError, match=r"export_denoiser: \d+ weights of this UNet2DModel are on the meta device"):
        export_denoiser(empty, {"sample": torch.randn(2, 1, 8, 8), "timestep": torch.full((2,), 10.0)})
    with pytest.raises(ValueError, match=r"collect_calibration_data: \d+ weights .* meta device"):
        collect_calibration_data(empty, scheduler, num_samples=2, num_inference_steps=2, progress=False)


def test_the_sampler_names_a_conditioning_the_denoiser_requires(scheduler):
    from tests.conftest import tiny_conditional_unet
    with pytest.raises(ValueError, match=r"UNet2DConditionModel needs \['encoder_hidden_states'\].*"
                                         r"capture_calibration_data"):
        collect_calibration_data(tiny_conditional_unet(), scheduler, num_samples=2, num_inference_steps=2,
                                 progress=False)


def test_a_config_that_quantizes_nothing_is_refused_at_prepare(unet):
    config = QuantConfig.preset("w8a8").replace(module_name_overrides={"": None})
    with pytest.raises(ValueError, match=r"quantizes no layer of this model: .*\(module_name_overrides\[''\]\)"):
        prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), DiffusionQuantizer(config))


def test_a_type_override_that_decides_no_layer_warns(unet):
    config = QuantConfig.preset("w8a8").replace(module_type_overrides={torch.nn.GRU: None})
    with pytest.warns(UserWarning, match=r"module_type_overrides \['GRU'\] decided no layer of this model"):
        prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), DiffusionQuantizer(config))


def test_a_quantized_denoiser_refuses_another_dtype_and_an_oversized_batch(unet, data):
    from diffusion_ao import as_diffusers_denoiser

    graph = export_unet(unet, sample_shape=(1, 1, 8, 8), max_batch=4)
    prepared = prepare_pt2e(graph, DiffusionQuantizer())
    calibrate(prepared, data, batch_size=4, progress=False)
    wrapper = as_diffusers_denoiser(convert_pt2e(prepared), like=unet)
    wrapper.to("cpu")  # moving is fine
    for cast in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        with pytest.raises(TypeError, match=r"runs a graph exported in torch.float32 .* cannot be cast to"):
            cast(wrapper)
        assert wrapper.dtype == torch.float32
    x = data.steps[0].sample
    with pytest.raises(TypeError, match=r"input 'sample' is torch.float16; the graph was exported for torch.float32"):
        wrapper(x.half()[:2], 10)
    with pytest.raises(ValueError, match=r"input 'sample' has a batch of 5; the graph accepts at most 4"):
        wrapper(x.repeat(2, 1, 1, 1)[:5], 10)
    assert wrapper(x[:4], 10).sample.shape == x[:4].shape


def test_a_bfloat16_pipeline_is_refused_for_int8_kernels_before_any_work(monkeypatch):
    from diffusion_ao import capture_calibration_data, compile_for_cpu, quantize_pipeline
    from diffusion_ao import recipe
    from tests.pipelines import tiny_pipeline

    pipe, kw = tiny_pipeline("ddpm")
    pipe.unet.to(torch.bfloat16)
    steps = kw.pop("num_inference_steps")
    # diffusers' DDIM pipeline cannot turn bfloat16 images into numpy (whatever the output type); the capture
    # needs only the denoiser calls before that, keeps them and says so
    with pytest.warns(UserWarning, match=r"DDIMPipeline failed after its last denoiser call .* keeps the recorded"):
        data = capture_calibration_data(pipe, steps, generator=torch.Generator().manual_seed(0), **kw)
    assert len(data.steps) == steps and data.steps[0].sample.dtype == torch.bfloat16
    monkeypatch.setattr(recipe, "quantize_denoiser", lambda *a, **k: pytest.fail("worked before the check"))
    with pytest.raises(ValueError, match=r"take a float32 graph, but pipe.unet is torch.bfloat16"):
        quantize_pipeline(pipe, "w8a8", data, progress=False)
    monkeypatch.undo()
    converted, _ = recipe.quantize_denoiser(pipe.unet, data, "w8a8", progress=False)
    with pytest.raises(ValueError, match=r"compile_for_cpu lowers to int8 kernels that take float32"):
        compile_for_cpu(converted)


def test_a_pipeline_failing_before_its_last_denoiser_call_is_not_hidden(monkeypatch):
    from diffusion_ao import capture_calibration_data
    from tests.pipelines import tiny_pipeline

    pipe, kw = tiny_pipeline("ddpm")
    steps = kw.pop("num_inference_steps")
    real_step, calls = pipe.scheduler.step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("scheduler broke")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", failing_step)
    with pytest.raises(RuntimeError, match="scheduler broke"):
        capture_calibration_data(pipe, steps, generator=torch.Generator().manual_seed(0), **kw)
