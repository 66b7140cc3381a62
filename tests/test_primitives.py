import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao.primitives import dequantize, fake_quantize, int_range, quantize

bits = st.integers(min_value=2, max_value=8)


@given(bits=bits, signed=st.booleans())
def test_int_range_has_2_to_the_bits_levels(bits, signed):
    lo, hi = int_range(bits, signed)
    assert hi - lo + 1 == 2**bits
    assert (lo < 0) == signed


@settings(max_examples=50, deadline=None)
@given(bits=bits, scale=st.floats(1e-3, 10.0), zp_frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_round_trip_error_at_most_half_a_step_inside_the_range(bits, scale, zp_frac, seed):
    qmin, qmax = int_range(bits, signed=False)
    zp = float(round(qmin + zp_frac * (qmax - qmin)))
    lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
    x = torch.rand(1000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * (hi - lo) + lo
    s, z = torch.tensor(scale, dtype=torch.float64), torch.tensor(zp, dtype=torch.float64)
    err = (fake_quantize(x, s, z, qmin, qmax) - x).abs()
    assert err.max().item() <= scale / 2 * (1 + 1e-9)


@settings(max_examples=50, deadline=None)
@given(bits=bits, scale=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16))
def test_fake_quantize_is_idempotent_and_codes_stay_in_range(bits, scale, seed):
    qmin, qmax = int_range(bits, signed=True)
    x = torch.randn(500, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale * 2**bits
    s, z = torch.tensor(scale, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    once = fake_quantize(x, s, z, qmin, qmax)
    assert torch.equal(fake_quantize(once, s, z, qmin, qmax), once)
    q = quantize(x, s, z, qmin, qmax)
    assert q.min() >= qmin and q.max() <= qmax
    assert torch.equal(q, torch.round(q))
    assert torch.allclose(dequantize(q, s, z), once)


def test_matches_torch_quantize_per_tensor():
    x = torch.randn(4096) * 3
    scale, zp = 0.05, 100
    ref = torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zp, 0, 255, torch.uint8)
    ours = quantize(x, torch.tensor(scale), torch.tensor(float(zp)), 0, 255)
    assert torch.equal(ours.to(torch.uint8), ref)


def test_int_range_rejects_more_than_8_bits():
    import pytest
    with pytest.raises(ValueError, match="1..8"):
        int_range(9, signed=True)
