import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao.observers import WeightObserver
from diffusion_ao.primitives import fake_quantize, int_range


def _fq(w, obs):
    scale, zp = obs.calculate_qparams()
    shape = (-1,) + (1,) * (w.dim() - 1) if obs.per_channel else ()
    return fake_quantize(w, scale.reshape(shape), zp.reshape(shape).float(), obs.quant_min, obs.quant_max)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), method=st.sampled_from(["minmax", "mse"]), per_channel=st.booleans(),
       seed=st.integers(0, 1000), out=st.integers(1, 16))
def test_symmetric_qparams_within_limits_and_error_bounded(bits, method, per_channel, seed, out):
    qmin, qmax = int_range(bits, signed=True)
    qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    obs = WeightObserver(qscheme=qscheme, quant_min=qmin, quant_max=qmax, method=method)
    w = torch.randn(out, 8, 3, 3, generator=torch.Generator().manual_seed(seed))
    obs(w)
    scale, zp = obs.calculate_qparams()
    assert (scale > 0).all()
    assert (zp == 0).all()  # symmetric
    assert scale.numel() == (out if per_channel else 1)
    wq = _fq(w, obs)
    if method == "minmax":  # inside the min-max range every weight is within half a step
        s = scale.reshape(-1, 1, 1, 1) if per_channel else scale
        assert ((wq - w).abs() <= s / 2 + 1e-6).all()
    assert torch.equal(_fq(wq, obs), wq) or method == "mse"  # idempotent on its own grid


def test_mse_beats_minmax_at_4_bits_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    w[:, 0] = 8.0  # an outlier column stretches every channel's range
    errs = {}
    for method in ("minmax", "mse"):
        obs = WeightObserver(quant_min=-8, quant_max=7, method=method)
        obs(w)
        errs[method] = (_fq(w, obs) - w).pow(2).sum().item()
    assert errs["mse"] < errs["minmax"]


def test_no_data_is_a_clear_error():
    with pytest.raises(RuntimeError, match="calibrate"):
        WeightObserver().calculate_qparams()
