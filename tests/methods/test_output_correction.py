"""Per-timestep output correction: the fit recovers a known gain and offset, the graph rewrite divides them out per
sample's timestep, the corrected graph has no gain or offset left, and it still runs on the int8 kernels."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffusion_ao import QuantConfig, collect_calibration_data, export_unet, quantize_denoiser
from diffusion_ao.config import OutputCorrectionConfig
from diffusion_ao.methods.output_correction import (OutputCorrection, _Moments, apply_output_correction,
                                                    estimate_output_correction)
from tests.conftest import probe_inputs

TORCH_THREADS = 2  # set for this module's tests by conftest.module_threads


def _distorted(unet, timesteps, gain, bias):
    """The FP graph with the output g * eps + b per (timestep, channel): an output correction with 1 / g and -b / g
    (its formula is checked directly in test_rewritten_graph_divides_out_each_samples_tables)."""
    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    apply_output_correction(graph, OutputCorrection(timesteps, gain=1.0 / gain, bias=-bias / gain))
    return graph


@pytest.fixture(scope="module")
def data(unet, scheduler):
    return collect_calibration_data(unet, scheduler, num_samples=6, num_inference_steps=4, progress=False)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 200), channels=st.integers(1, 4), gain=st.floats(0.5, 2.0),
       bias=st.floats(-1.0, 1.0), which=st.sampled_from(["both", "gain", "bias"]))
def test_moments_fit_and_error_match_direct_computation(seed, n, channels, gain, bias, which):
    g = torch.Generator().manual_seed(seed)
    fp = torch.randn(n, channels, 3, generator=g, dtype=torch.float64)
    q = gain * fp + bias + 0.1 * torch.randn(fp.shape, generator=g, dtype=torch.float64)
    m = _Moments(channels)
    m.add(fp[: n // 2], q[: n // 2], 1)  # in two pieces: the sums accumulate
    m.add(fp[n // 2:], q[n // 2:], 1)
    config = OutputCorrectionConfig(gain=which != "bias", bias=which != "gain")
    fitted_gain, fitted_bias = m.fit(config)
    x, y = fp.movedim(1, 0).reshape(channels, -1), q.movedim(1, 0).reshape(channels, -1)
    if which == "both":
        design = torch.stack([x, torch.ones_like(x)], dim=-1)  # per channel: y = g x + b
        expected = torch.linalg.lstsq(design, y.unsqueeze(-1)).solution.squeeze(-1)
        assert torch.allclose(fitted_gain, expected[:, 0], atol=1e-6) and torch.allclose(fitted_bias, expected[:, 1],
                                                                                         atol=1e-6)
    elif which == "gain":
        assert torch.allclose(fitted_gain, (x * y).sum(1) / (x * x).sum(1)) and not fitted_bias.any()
    else:
        assert torch.equal(fitted_gain, torch.ones(channels)) and torch.allclose(fitted_bias, (y - x).mean(1))
    corrected = (y - fitted_bias[:, None]) / fitted_gain[:, None]
    direct = ((corrected - x) ** 2).sum() / (x ** 2).sum()
    assert m.relative_error(fitted_gain, fitted_bias) == pytest.approx(direct.item(), rel=1e-6, abs=1e-12)


def test_estimate_recovers_a_known_gain_and_offset_per_timestep(unet, graph, data):
    timesteps = [float(t) for t in data.timesteps]
    gain = torch.tensor([[0.9], [1.05], [1.2], [0.97]])
    bias = torch.tensor([[0.02], [-0.1], [0.0], [0.3]])
    fitted = estimate_output_correction(_distorted(unet, timesteps, gain, bias), graph, data)
    assert fitted.timesteps == timesteps
    assert torch.allclose(fitted.gain, gain, atol=1e-4) and torch.allclose(fitted.bias, bias, atol=1e-4)
    assert all(fitted.error_after[t] < 1e-8 < fitted.error_before[t] for t in timesteps)


def test_a_lost_prediction_is_an_error_not_a_division(unet, graph, data):
    timesteps = [float(t) for t in data.timesteps]
    gain = torch.full((4, 1), 0.05)
    with pytest.raises(ValueError, match="gain at timestep .* nearly lost"):
        estimate_output_correction(_distorted(unet, timesteps, gain, torch.zeros(4, 1)), graph, data)


def test_rewritten_graph_divides_out_each_samples_tables(unet, data):
    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    timesteps = [float(t) for t in data.timesteps]
    correction = OutputCorrection(timesteps, gain=torch.tensor([[0.5], [2.0], [1.25], [0.8]]),
                                  bias=torch.tensor([[1.0], [-0.5], [0.0], [0.25]]))
    x, t = probe_inputs(data)
    before = graph(x, t)
    apply_output_correction(graph, correction)
    after = graph(x, t)
    rows = torch.tensor([timesteps.index(float(v)) for v in t])
    expected = (before - correction.bias[rows][:, :, None, None]) / correction.gain[rows][:, :, None, None]
    assert torch.allclose(after, expected, atol=1e-5)
    with pytest.raises(RuntimeError, match="not in the set"):
        graph(x[:1], torch.tensor([3.0]))


def test_token_shaped_predictions_are_corrected_per_last_dim():
    class Tokens(torch.nn.Module):
        def forward(self, sample, timestep):
            return (sample * 2 + timestep[:, None, None],)

    x = torch.randn(2, 5, 3)
    t = torch.tensor([10.0, 20.0])
    graph = torch.export.export(Tokens(), (x, t), dynamic_shapes=({0: torch.export.Dim("b")}, {0: torch.export.Dim("b")})
                                ).module()
    correction = OutputCorrection([10.0, 20.0], gain=torch.tensor([[1.0, 2.0, 4.0], [0.5, 1.0, 1.0]]),
                                  bias=torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]))
    apply_output_correction(graph, correction)
    expected = (Tokens()(x, t)[0] - correction.bias[:, None, :]) / correction.gain[:, None, :]
    assert torch.allclose(graph(x, t)[0], expected, atol=1e-6)


@pytest.fixture(scope="module", params=[True, False], ids=["vnni", "no-vnni"])
def corrected(request, unet, data):
    config = QuantConfig.preset("w4a8").replace(output_correction=OutputCorrectionConfig())
    converted, report = quantize_denoiser(unet, data, config, has_vnni=request.param, progress=False)
    return converted, report


def test_recipe_leaves_no_gain_or_offset_on_the_calibration_data(corrected, graph, data):
    converted, report = corrected
    fitted = report.output_correction
    assert fitted is not None and fitted.gain.shape == (len(data.timesteps), 1)
    assert not torch.equal(fitted.gain, torch.ones_like(fitted.gain))  # 4-bit weights leave some gain
    again = estimate_output_correction(converted, graph, data)  # on the corrected graph: nothing left to fit
    assert torch.allclose(again.gain, torch.ones_like(again.gain), atol=1e-4)
    assert torch.allclose(again.bias, torch.zeros_like(again.bias), atol=1e-4 * fitted.bias.abs().max().item() + 1e-6)


@pytest.mark.slow
def test_corrected_graph_runs_on_int8_kernels(unet, corrected, data):
    from diffusion_ao import compile_for_cpu, count_int8_kernels
    from diffusion_ao.backends.x86 import expected_int8_kernels
    from tests.conftest import KERNEL_ERROR_FRACTION, kernel_error_fraction

    converted, report = corrected
    x, t = data.steps[1].sample, torch.full((len(data.steps[1].sample),), data.steps[1].timestep)
    eager = converted(x, t)
    fast = compile_for_cpu(converted)
    kernels = count_int8_kernels(fast, x, t)
    assert kernels["qconv"] + kernels["qlinear"] + kernels["merged_linears"] == expected_int8_kernels(report.quantizer.decisions)
    assert kernel_error_fraction(unet(x, t).sample, eager, fast(x, t)) < KERNEL_ERROR_FRACTION
