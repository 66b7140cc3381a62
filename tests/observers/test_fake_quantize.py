"""FakeQuantize modules: statistics like the observers they wrap, forwards equal to convert's q/dq at their
qparams, LSQ and AdaRound gradients equal to their definitions, and clear errors for misuse."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffusion_ao.observers import (TimestepActivationObserver, TimestepFakeQuantize, WeightFakeQuantize,
                                    WeightObserver, timestep_context)
from diffusion_ao.observers.adaround import GAMMA, ZETA

qd = torch.ops.quantized_decomposed
seeds = st.integers(0, 10_000)
act_ranges = st.sampled_from([(0, 255), (0, 127), (0, 63)])
weight_ranges = st.sampled_from([(-8, 7), (-128, 127)])


def _act_fq(qmin, qmax, method="minmax"):
    return TimestepFakeQuantize(quant_min=qmin, quant_max=qmax, method=method)


def _weight_fq(qmin, qmax, method="minmax"):
    return WeightFakeQuantize(dtype=torch.int8, qscheme=torch.per_channel_symmetric, quant_min=qmin,
                              quant_max=qmax, ch_axis=0, method=method)


def _observe(fq, xs):
    for t, x in xs.items():
        with timestep_context(t):
            fq(x)


def _activation_data(seed):
    g = torch.Generator().manual_seed(seed)
    return {float(t): torch.randn(4, 6, 5, 5, generator=g) * (1 + t / 100) + t / 200 for t in (0, 250, 900)}


@settings(max_examples=25, deadline=None)
@given(seed=seeds, bounds=act_ranges, method=st.sampled_from(["minmax", "mse"]))
def test_activation_statistics_match_the_plain_observer_and_calibration_is_floating_point(seed, bounds, method):
    xs = _activation_data(seed)
    fq, obs = _act_fq(*bounds, method), TimestepActivationObserver(quant_min=bounds[0], quant_max=bounds[1],
                                                                   method=method)
    for t, x in xs.items():
        with timestep_context(t):
            assert torch.equal(fq(x), x)  # fake quantization starts off: calibration sees FP activations
            obs(x)
    fq.enable_fake_quant()
    s1, z1 = fq.calculate_qparams()
    s2, z2 = obs.calculate_qparams()
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, bounds=act_ranges, learn=st.booleans())
def test_activation_forward_is_converts_qdq_at_its_qparams(seed, bounds, learn):
    xs = _activation_data(seed)
    fq = _act_fq(*bounds)
    _observe(fq, xs)
    if learn:
        fq.enable_range_learning()
        with torch.no_grad():
            fq.lsq.scale.mul_(1.3)  # a learned step other than the statistics'
        fq.disable_range_learning()
    else:
        fq.disable_observer()
        fq.enable_fake_quant()
    scale, zp = fq.calculate_qparams()
    x = torch.cat(list(xs.values()))
    q = qd.quantize_per_tensor(x, float(scale), int(zp), bounds[0], bounds[1], torch.uint8)
    expected = qd.dequantize_per_tensor(q, float(scale), int(zp), bounds[0], bounds[1], torch.uint8)
    got = fq(x)
    # equal up to a code flip where x / scale lands within float rounding of a half step
    assert ((got - expected).abs() > float(scale) * 1e-4).float().mean() < 1e-3


@settings(max_examples=25, deadline=None)
@given(seed=seeds, bounds=act_ranges)
def test_lsq_step_gradient_is_its_definition(seed, bounds):
    qmin, qmax = bounds
    xs = _activation_data(seed)
    fq = _act_fq(qmin, qmax)
    _observe(fq, xs)
    fq.enable_range_learning()
    x = torch.cat(list(xs.values()))
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    (fq(x) * upstream).sum().backward()
    s, zp = fq.lsq.scale.detach(), fq.lsq.zero_point
    code = torch.round(x * (1.0 / s)) + zp
    inside = (code >= qmin) & (code <= qmax)
    d_out_d_s = torch.where(inside, torch.round(x * (1.0 / s)) - x / s, code.clamp(qmin, qmax) - zp)
    expected = (upstream * d_out_d_s).sum() / math.sqrt(x.numel() * qmax)
    # float32: round(x / s) - x / s cancels two numbers up to qmax in size
    magnitude = (upstream.abs() * (code.abs() + (x / s).abs())).sum() / math.sqrt(x.numel() * qmax)
    assert abs(float(fq.lsq.scale.grad) - float(expected)) <= 1e-6 * float(magnitude)


def _weight(seed, shape=(5, 4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.rand(shape[0], 1, 1, 1, generator=g)


def _learning_weight_fq(seed, qmin, qmax, adaround, method="minmax"):
    """(weight, its FakeQuantize after one observation and `enable_range_learning`)."""
    w = _weight(seed)
    fq = _weight_fq(qmin, qmax, method)
    fq(w)
    fq.enable_range_learning(adaround=adaround)
    return w, fq


@settings(max_examples=25, deadline=None)
@given(seed=seeds, bounds=weight_ranges)
def test_weight_lsq_gradient_is_its_definition_per_channel(seed, bounds):
    qmin, qmax = bounds
    w, fq = _learning_weight_fq(seed, qmin, qmax, adaround=False)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 1))
    (fq(w) * upstream).sum().backward()
    s = fq.step.detach()
    code = torch.round(w * (1.0 / s))
    inside = (code >= qmin) & (code <= qmax)
    d_out_d_s = torch.where(inside, code - w / s, code.clamp(qmin, qmax))
    expected = (upstream * d_out_d_s).sum(dim=(1, 2, 3)) / math.sqrt(w[0].numel() * qmax)
    # float32: code - w / s cancels two numbers up to qmax in size
    magnitude = (upstream.abs() * (code.abs() + (w / s).abs())).sum(dim=(1, 2, 3)) / math.sqrt(w[0].numel() * qmax)
    assert ((fq.step.grad.reshape(-1) - expected).abs() <= 1e-6 * magnitude).all()


@settings(max_examples=25, deadline=None)
@given(seed=seeds, bounds=weight_ranges)
def test_adaround_gradient_is_the_rectified_sigmoids_slope(seed, bounds):
    qmin, qmax = bounds
    w, fq = _learning_weight_fq(seed, qmin, qmax, adaround=True)
    q = fq.adaround
    with torch.no_grad():  # move some rounding variables off their start, some into the flat parts of h
        q.alpha.add_(torch.randn(q.alpha.shape, generator=torch.Generator().manual_seed(seed + 2)) * 3)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 1))
    (fq(w) * upstream).sum().backward()
    alpha = q.alpha.detach()
    sig = torch.sigmoid(alpha)
    h_raw = sig * (ZETA - GAMMA) + GAMMA
    code = q.w_floor + h_raw.clamp(0, 1)
    live = (h_raw > 0) & (h_raw < 1) & (code > qmin) & (code < qmax)
    expected = torch.where(live, upstream * q.scale * sig * (1 - sig) * (ZETA - GAMMA), torch.zeros(()))
    torch.testing.assert_close(q.alpha.grad, expected, rtol=1e-4, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, bounds=weight_ranges, adaround=st.booleans(), method=st.sampled_from(["minmax", "mse"]))
def test_weight_forward_after_learning_is_converts_qdq(seed, bounds, adaround, method):
    qmin, qmax = bounds
    w, fq = _learning_weight_fq(seed, qmin, qmax, adaround, method)
    with torch.no_grad():
        if adaround:
            fq.adaround.alpha.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)))
        else:
            fq.step.mul_(1.1)
    fq.disable_range_learning()
    scale, zp = fq.calculate_qparams()
    # convert quantizes the weight constant; with AdaRound that constant is the hardened weight
    constant = fq.hardened_weight() if adaround else w
    q = qd.quantize_per_channel(constant, scale, zp, 0, qmin, qmax, torch.int8)
    expected = qd.dequantize_per_channel(q, scale, zp, 0, qmin, qmax, torch.int8)
    torch.testing.assert_close(fq(w), expected, rtol=0, atol=float(scale.max()) * 1e-4)
    if adaround:  # the hardened weight sits on the grid: quantizing it again changes nothing
        torch.testing.assert_close(expected, constant, rtol=0, atol=float(scale.max()) * 1e-4)


def test_misuse_gets_clear_errors():
    fq = _act_fq(0, 255)
    with pytest.raises(RuntimeError, match="never had fake quantization on"):
        fq.calculate_qparams()
    with timestep_context(1.0):
        fq(torch.randn(10))
    fq.enable_range_learning()
    with pytest.raises(RuntimeError, match="still learning.*finish_training"):
        fq.calculate_qparams()
    wfq = _weight_fq(-8, 7)
    with pytest.raises(RuntimeError, match="never saw its weight"):
        wfq.enable_range_learning()
    w = torch.nn.Parameter(_weight(0))
    wfq(w.detach())
    wfq.enable_range_learning(adaround=True)
    with pytest.raises(RuntimeError, match="AdaRound learns the rounding of fixed weights"):
        wfq(w)


def test_weight_statistics_match_the_plain_observer():
    w = _weight(3)
    fq, obs = _weight_fq(-8, 7, "mse"), WeightObserver(dtype=torch.int8, qscheme=torch.per_channel_symmetric,
                                                       quant_min=-8, quant_max=7, method="mse")
    assert torch.equal(fq(w), w)
    obs(w)
    fq.enable_fake_quant()
    for a, b in zip(fq.calculate_qparams(), obs.calculate_qparams()):
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, bounds=act_ranges, method=st.sampled_from(["minmax", "mse"]))
def test_around_a_calibrated_activation_observer_is_converts_qdq_at_its_qparams(seed, bounds, method):
    xs = _activation_data(seed)
    obs = TimestepActivationObserver(quant_min=bounds[0], quant_max=bounds[1], method=method)
    _observe(obs, xs)
    scale, zp = obs.calculate_qparams()
    fq = TimestepFakeQuantize.around(obs)
    assert fq.activation_post_process is obs and fq.quant_max == bounds[1]
    x = xs[250.0]
    q = qd.quantize_per_tensor(x, float(scale), int(zp), bounds[0], bounds[1], torch.uint8)
    expected = qd.dequantize_per_tensor(q, float(scale), int(zp), bounds[0], bounds[1], torch.uint8)
    torch.testing.assert_close(fq(x), expected, rtol=0, atol=float(scale) * 1e-4)
    before = set(obs.stats)  # observing is off
    with timestep_context(123.0):
        fq(x * 100)
    assert set(obs.stats) == before  # the new timestep was not recorded
    for a, b in zip(fq.calculate_qparams(), (scale, zp)):
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, bounds=weight_ranges)
def test_adaround_learns_the_rounding_of_the_weight_it_is_given(seed, bounds):
    """A pass may replace the constant after the observer saw it (GPTQ): AdaRound starts from the given one."""
    qmin, qmax = bounds
    seen, replaced = _weight(seed), _weight(seed + 1)
    obs = WeightObserver(dtype=torch.int8, qscheme=torch.per_channel_symmetric, quant_min=qmin, quant_max=qmax,
                         ch_axis=0, method="minmax")
    obs(seen)
    fq = WeightFakeQuantize.around(obs)
    fq.enable_range_learning(adaround=True, weight=replaced)
    fq.disable_range_learning()
    scale, zp = obs.broadcast_qparams()
    nearest = torch.clamp(torch.round(replaced / scale) + zp, qmin, qmax)
    assert (fq.adaround.integer_weight() - nearest).abs().max() <= 1  # ties may go either way
    assert (fq.adaround.integer_weight() != nearest).float().mean() < 0.01


def test_around_needs_the_matching_observer():
    with pytest.raises(TypeError, match="needs a WeightObserver"):
        WeightFakeQuantize.around(TimestepActivationObserver(quant_min=0, quant_max=255))
    with pytest.raises(TypeError, match="needs a TimestepActivationObserver"):
        TimestepFakeQuantize.around(WeightObserver(quant_min=-8, quant_max=7))
    with pytest.raises(TypeError, match="takes no observer arguments"):
        TimestepFakeQuantize(TimestepActivationObserver(quant_min=0, quant_max=255), quant_min=0)
