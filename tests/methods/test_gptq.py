"""GPTQ rounding: the core algorithm's properties, conv patches, and the pass on a calibrated tiny UNet."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from diffusion_ao import QuantConfig, collect_calibration_data, export_unet
from diffusion_ao.config import GPTQConfig
from diffusion_ao.methods.gptq import apply_gptq, gptq_codes, layer_inputs_2d
from diffusion_ao.metrics import relative_mse
from diffusion_ao.observers import WeightObserver
from tests.conftest import calibrated_tiny_unet, probe_inputs

TORCH_THREADS = 2  # set for this module's tests by conftest.module_threads


def _grid(weight: torch.Tensor, bits: int):
    qmax = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=1).clamp_min(1e-6) / qmax
    return scale, torch.zeros_like(scale), -qmax - 1, qmax


def _nearest(weight, scale, zp, qmin, qmax):
    return torch.clamp(torch.round(weight.double() / scale.double().view(-1, 1)) + zp.double().view(-1, 1),
                       qmin, qmax)


def _correlated_inputs(n: int, features: int, seed: int, rank: int = 3) -> torch.Tensor:
    """Inputs dominated by a few shared directions, as a layer's input channels are in practice."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, features, generator=g,
                                                                              dtype=torch.float64)
            + 0.05 * torch.randn(n, features, generator=g, dtype=torch.float64))


def _output_error(weight, rounded, x):
    return ((x @ (weight.double() - rounded.double()).T).pow(2).sum() / (x @ weight.double().T).pow(2).sum()).item()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), out=st.integers(1, 6), features=st.integers(1, 20), bits=st.sampled_from([4, 8]),
       act_order=st.booleans(), block=st.integers(1, 8))
def test_uncorrelated_inputs_give_round_to_nearest(seed, out, features, bits, act_order, block):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, features, generator=g)
    hessian = torch.diag(torch.rand(features, generator=g, dtype=torch.float64) + 0.1)
    scale, zp, qmin, qmax = _grid(weight, bits)
    codes = gptq_codes(weight, hessian, scale, zp, qmin, qmax, block_size=block, act_order=act_order)
    assert torch.equal(codes.double(), _nearest(weight, scale, zp, qmin, qmax))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), out=st.integers(1, 6), features=st.integers(1, 24), bits=st.sampled_from([4, 8]),
       shrink=st.floats(0.3, 1.0), dead=st.integers(0, 3))
def test_codes_are_integers_in_range_even_with_clipping_and_dead_inputs(seed, out, features, bits, shrink, dead):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, features, generator=g)
    x = _correlated_inputs(64, features, seed)
    x[:, :min(dead, features)] = 0  # inputs that never fire
    scale, zp, qmin, qmax = _grid(weight, bits)
    codes = gptq_codes(weight, x.T @ x / len(x), scale * shrink, zp, qmin, qmax)
    assert codes.shape == weight.shape and torch.equal(codes, codes.round())
    assert codes.min() >= qmin and codes.max() <= qmax


@pytest.mark.parametrize("seed", range(5))
def test_gptq_lowers_the_output_error_of_correlated_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 48, generator=g)
    x = _correlated_inputs(512, 48, seed)
    scale, zp, qmin, qmax = _grid(weight, 4)
    nearest = scale.view(-1, 1).double() * _nearest(weight, scale, zp, qmin, qmax)
    rounded = scale.view(-1, 1) * gptq_codes(weight, x.T @ x / len(x), scale, zp, qmin, qmax)
    assert _output_error(weight, rounded, x) < 0.5 * _output_error(weight, nearest, x)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), block=st.integers(1, 16))
def test_block_size_is_only_a_speed_setting(seed, block):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(8, 24, generator=g)
    x = _correlated_inputs(128, 24, seed)
    scale, zp, qmin, qmax = _grid(weight, 4)
    h = x.T @ x / len(x)
    a = gptq_codes(weight, h, scale, zp, qmin, qmax, block_size=block)
    b = gptq_codes(weight, h, scale, zp, qmin, qmax, block_size=24)
    assert (a == b).double().mean() >= 0.98  # float rounding can flip a near-tie


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       kernel=st.sampled_from([1, 3]))
def test_conv_patches_reproduce_the_conv(seed, stride, padding, dilation, kernel):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 9, 9, generator=g)
    weight = torch.randn(5, 3, kernel, kernel, generator=g)

    class Conv(torch.nn.Module):
        def forward(self, x, w):
            return F.conv2d(x, w, None, stride, padding, dilation)

    gm = torch.export.export(Conv(), (x, weight)).module()
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target))
    rows = layer_inputs_2d(node, x, (kernel, kernel))
    y = F.conv2d(x, weight, None, stride, padding, dilation)
    via_rows = (rows @ weight.reshape(5, -1).T).reshape(2, *y.shape[2:], 5).permute(0, 3, 1, 2)
    assert torch.allclose(via_rows, y, atol=1e-4)


@pytest.fixture(scope="module")
def data(unet, scheduler):
    return collect_calibration_data(unet, scheduler, num_samples=8, num_inference_steps=4, progress=False)


def _prepared(unet, data, config):
    return calibrated_tiny_unet(unet, data, config, has_vnni=True)


def test_apply_gptq_bakes_codes_on_the_observers_grid_and_lowers_layer_errors(unet, data):
    config = QuantConfig.preset("w4a8")
    prepared = _prepared(unet, data, config)
    grids = {name: obs.calculate_qparams() for name, obs in prepared.named_modules() if isinstance(obs, WeightObserver)}
    results = apply_gptq(prepared, data, GPTQConfig(samples_per_step=4), progress=False)
    assert len(results) == len(grids)
    # the summed output error over layers drops, and no layer gets much worse than round-to-nearest
    assert sum(r.gptq_error for r in results.values()) < 0.8 * sum(r.nearest_error for r in results.values())
    assert all(r.gptq_error <= 1.1 * r.nearest_error for r in results.values())
    for name, obs in prepared.named_modules():
        if isinstance(obs, WeightObserver):
            scale, zp = obs.calculate_qparams()
            assert torch.equal(scale, grids[name][0]) and torch.equal(zp, grids[name][1])
    x, t = probe_inputs(data)
    reference = export_unet(unet, sample_shape=(1, 1, 8, 8))(x, t)
    nearest = convert_pt2e(_prepared(unet, data, config))(x, t)
    gptq = convert_pt2e(prepared)(x, t)
    assert relative_mse(gptq, reference) < 0.8 * relative_mse(nearest, reference)


def test_timestep_weights_that_sum_to_zero_are_an_error(unet, data):
    prepared = _prepared(unet, data, QuantConfig.preset("w4a8"))
    with pytest.raises(ValueError, match="sum to 0"):
        apply_gptq(prepared, data, GPTQConfig(samples_per_step=2), timestep_weights={-1.0: 1.0}, progress=False)


# False: 7-bit activation ranges (AVX2 CPUs); slow: GPTQ changes weight values only, and the 7-bit lowering is
# tested in test_end_to_end and test_cpu
@pytest.mark.parametrize("has_vnni", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_the_recipe_runs_gptq_and_the_result_lowers_to_int8_kernels(unet, data, has_vnni):
    from diffusion_ao import compile_for_cpu, count_int8_kernels
    from diffusion_ao.backends.x86 import expected_int8_kernels
    from diffusion_ao.recipe import quantize_denoiser

    config = QuantConfig.preset("w4a8").replace(gptq=GPTQConfig(samples_per_step=4))
    converted, report = quantize_denoiser(unet, data, config, has_vnni=has_vnni, progress=False)
    expected = expected_int8_kernels(report.quantizer.decisions)
    assert len(report.gptq) == expected > 0
    x, t = probe_inputs(data)
    counts = count_int8_kernels(compile_for_cpu(converted), x, t)
    assert counts["qconv"] + counts["qlinear"] + counts["merged_linears"] == expected
