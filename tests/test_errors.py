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
    with pytest.raises(ValueError, match=r"module_name_overrides\['conv_in'\] must be a LayerQuant or None"):
        QuantConfig(module_name_overrides={"conv_in": 8})
    QuantConfig(module_name_overrides={"conv_in": LayerQuant(weight_bits=8, act_bits=8)})
