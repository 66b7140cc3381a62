"""Properties of the learnable quantizers: rectified sigmoid, AdaRound's grid, LSQ's error bound."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffusion_ao.primitives import fake_quantize
from diffusion_ao.methods.qdiff import (AdaRoundWeightQuantizer, LSQActivationQuantizer, annealed_beta,
                                        rectified_sigmoid, round_regularizer)
from diffusion_ao.observers.adaround import inverse_rectified_sigmoid

seeds = st.integers(0, 10_000)


@given(seed=seeds, spread=st.floats(0.1, 1e3))
def test_rectified_sigmoid_is_in_unit_interval_monotone_and_reaches_the_ends(seed, spread):
    v = torch.sort(torch.randn(256, generator=torch.Generator().manual_seed(seed)) * spread).values
    h = rectified_sigmoid(v)
    assert bool(((h >= 0) & (h <= 1)).all())
    assert bool((h[1:] >= h[:-1]).all())
    assert rectified_sigmoid(torch.tensor([-20.0, 20.0])).tolist() == [0.0, 1.0]


@given(h=st.floats(0.001, 0.999))
def test_inverse_rectified_sigmoid(h):
    assert float(rectified_sigmoid(inverse_rectified_sigmoid(torch.tensor(h)))) == pytest.approx(h, abs=1e-5)


@given(seed=seeds, beta=st.floats(1.0, 20.0))
def test_regularizer_bounds(seed, beta):
    v = torch.randn(100, generator=torch.Generator().manual_seed(seed)) * 3
    r = float(round_regularizer(v, beta))
    assert 0.0 <= r <= 1.0
    assert float(round_regularizer(torch.tensor([-50.0, 50.0]), beta)) == 0.0


@given(iterations=st.integers(1, 5000), warmup=st.floats(0, 0.9))
def test_beta_anneals_from_start_to_end_after_warmup(iterations, warmup):
    betas = [annealed_beta(i, iterations, warmup, 20.0, 2.0) for i in range(iterations)]
    first = int(warmup * iterations)
    assert all(b is None for b in betas[:first])
    active = betas[first:]
    assert all(2.0 <= b <= 20.0 for b in active)
    assert all(a >= b for a, b in zip(active, active[1:]))
    if active:
        assert active[0] == 20.0


def _weight_and_qparams(seed, bits, per_channel):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, 3, 3, generator=g) * (torch.rand(6, 1, 1, 1, generator=g) + 0.1)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    absmax = w.abs().amax(dim=(1, 2, 3)) if per_channel else w.abs().max().reshape(1)
    scale = absmax * 0.8 / qmax  # a clipped range, as the MSE observer picks: some weights saturate
    return w, scale, torch.zeros_like(scale, dtype=torch.int32), qmin, qmax


@settings(max_examples=50)
@given(seed=seeds, bits=st.integers(2, 8), per_channel=st.booleans(), flip=st.floats(0, 1))
def test_adaround_hard_weights_are_on_the_grid_and_within_one_step_of_nearest(seed, bits, per_channel, flip):
    w, scale, zp, qmin, qmax = _weight_and_qparams(seed, bits, per_channel)
    q = AdaRoundWeightQuantizer(w, scale, zp, qmin, qmax)
    s = q.scale
    nearest = torch.clamp(torch.round(w * (1.0 / s)), qmin, qmax)
    assert torch.equal(q.integer_weight(), nearest)  # the initialisation is round-to-nearest
    with torch.no_grad():  # any learned state: flip a random share of the rounding choices
        mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed + 1)) < flip
        q.alpha[mask] = -q.alpha[mask] + 0.01
    codes = q.integer_weight()
    assert bool(((codes >= qmin) & (codes <= qmax)).all())
    assert torch.equal(codes, codes.round())
    assert bool(((codes - nearest).abs() <= 1).all())
    torch.testing.assert_close(q.baked_weight() / s, codes)
    q.soft = False
    torch.testing.assert_close(q(w), q.baked_weight())


@given(seed=seeds, bits=st.integers(2, 8))
def test_adaround_soft_weight_starts_at_the_fp_weight(seed, bits):
    w, scale, zp, qmin, qmax = _weight_and_qparams(seed, bits, True)
    q = AdaRoundWeightQuantizer(w, scale, zp, qmin, qmax)
    inside = ((w / q.scale) > qmin) & ((w / q.scale) < qmax - 1)
    err = (q(w).detach() - w).abs() / q.scale
    assert float(err[inside].max()) < 1e-3


@settings(max_examples=50)
@given(seed=seeds, bits=st.integers(4, 8), scale=st.floats(1e-3, 1.0), zp_share=st.floats(0, 1))
def test_lsq_matches_convert_at_init_and_error_is_at_most_half_a_step(seed, bits, scale, zp_share):
    qmin, qmax = 0, 2 ** bits - 1
    zp = torch.tensor(round(zp_share * qmax))
    s = torch.tensor(scale)
    lo, hi = float((qmin - zp) * s), float((qmax - zp) * s)
    x = torch.rand(500, generator=torch.Generator().manual_seed(seed)) * (hi - lo) + lo
    q = LSQActivationQuantizer(s, zp, qmin, qmax)
    with torch.no_grad():
        y = q(x)
    assert torch.equal(y, fake_quantize(x, s, zp, qmin, qmax))
    assert float((y - x).abs().max()) <= scale / 2 * (1 + 1e-5) + 1e-7


def test_lsq_step_size_gets_a_gradient():
    q = LSQActivationQuantizer(torch.tensor(0.1), torch.tensor(0), 0, 15)
    x = torch.linspace(0, 3, 100)  # partly above the range: clipping error pulls the step up
    (q(x) - x).pow(2).mean().backward()
    assert q.scale.grad is not None and float(q.scale.grad) < 0


@settings(max_examples=50, deadline=None)
@given(seed=seeds, factor=st.floats(1e-4, 1.0))
def test_scale_gradient_keeps_the_value_bit_for_bit_and_scales_the_gradient(seed, factor):
    from diffusion_ao.observers.lsq import scale_gradient

    x = (torch.rand(7, generator=torch.Generator().manual_seed(seed)) * 10).requires_grad_(True)
    y = scale_gradient(x, factor)
    assert torch.equal(y, x.detach())  # a step one ulp off would move codes that sit on a half step
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, factor))
