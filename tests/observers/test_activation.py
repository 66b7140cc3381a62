import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao.observers import TimestepActivationObserver, timestep_context
from diffusion_ao.primitives import fake_quantize

methods = st.sampled_from(["minmax", "mse"])
aggregations = st.sampled_from(["global", "weighted"])


def _observe(obs, batches):
    for t, x in batches:
        with timestep_context(t):
            obs(x)


def _qparams_ok(obs):
    scale, zp = obs.calculate_qparams()
    assert scale.numel() == 1 and zp.numel() == 1
    assert scale.item() > 0
    assert obs.quant_min <= zp.item() <= obs.quant_max
    return scale, zp


@settings(max_examples=25, deadline=None)
@given(method=methods, aggregation=aggregations, bits=st.integers(4, 8), seed=st.integers(0, 1000),
       spread=st.floats(0.1, 50))
def test_qparams_are_within_dtype_limits(method, aggregation, bits, seed, spread):
    obs = TimestepActivationObserver(quant_min=0, quant_max=2**bits - 1, method=method, aggregation=aggregation)
    g = torch.Generator().manual_seed(seed)
    _observe(obs, [(float(t), torch.randn(64, generator=g) * spread * (1 + t / 100)) for t in (0, 500, 999)])
    _qparams_ok(obs)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), shift=st.floats(-5, 5), spread=st.floats(0.1, 20))
def test_minmax_global_round_trip_error_within_half_a_step(seed, shift, spread):
    obs = TimestepActivationObserver(method="minmax", aggregation="global")
    g = torch.Generator().manual_seed(seed)
    xs = [(float(t), torch.randn(256, generator=g) * spread + shift) for t in (1, 2, 3)]
    _observe(obs, xs)
    scale, zp = _qparams_ok(obs)
    x = torch.cat([v for _, v in xs])
    err = (fake_quantize(x, scale, zp.float(), obs.quant_min, obs.quant_max) - x).abs()
    assert err.max().item() <= scale.item() / 2 + 1e-5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), splits=st.integers(1, 6))
def test_extreme_tails_merge_exactly(seed, splits):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(seed))
    obs = TimestepActivationObserver(method="mse", samples_per_timestep=256, tail=16)
    _observe(obs, [(3.0, chunk) for chunk in x.chunk(splits)])
    s = obs.stats[3.0]
    assert torch.equal(s.high_tail.sort().values, x.topk(16).values.sort().values)
    assert torch.equal(s.low_tail.sort().values, (-(-x).topk(16).values).sort().values)
    assert s.sample.numel() <= 256


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), splits=st.integers(1, 6))
def test_per_timestep_statistics_merge_like_one_batch(seed, splits):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(600, generator=g) * 3
    whole = TimestepActivationObserver(method="minmax")
    parts = TimestepActivationObserver(method="minmax")
    _observe(whole, [(7.0, x)])
    _observe(parts, [(7.0, chunk) for chunk in x.chunk(splits)])
    assert parts.timestep_ranges() == whole.timestep_ranges()
    assert parts.stats[7.0].count == whole.stats[7.0].count
    assert parts.stats[7.0].sumsq == pytest.approx(whole.stats[7.0].sumsq, rel=1e-9)


@settings(max_examples=15, deadline=None)
@given(method=methods, seed=st.integers(0, 1000), batches=st.integers(1, 3), size=st.integers(1, 20_000))
def test_statistics_never_hold_on_to_the_observed_batch(method, seed, batches, size):
    """The per-timestep statistics are bounded copies: a view of an activation batch would keep the whole batch
    alive (an empty slice of each batch once held ~3 GiB of a DiT's activations after calibration)."""
    obs = TimestepActivationObserver(method=method, samples_per_timestep=256, tail=8)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(size, generator=g) for _ in range(batches)]
    _observe(obs, [(1.0, x) for x in xs])
    stats = obs.stats[1.0]
    for kept in (stats.sample, stats.low_tail, stats.high_tail):
        assert kept._base is None and kept.untyped_storage().nbytes() <= 256 * 4
        assert all(kept.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for x in xs)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 40), per_row=st.integers(1, 200),
       batch=st.integers(1, 40), order_seed=st.integers(0, 1000))
def test_the_subsample_does_not_depend_on_batching_or_order(seed, rows, per_row, batch, order_seed):
    """Values named by their rows: any batch size, in any order, keeps the same bottom-k subsample and range."""
    x = torch.randn(rows, per_row, generator=torch.Generator().manual_seed(seed)) ** 3
    whole = TimestepActivationObserver(samples_per_timestep=256, tail=8)
    with timestep_context(3.0, rows=(0, rows)):
        whole(x)
    batched = TimestepActivationObserver(samples_per_timestep=256, tail=8)
    starts = list(range(0, rows, batch))
    random.Random(order_seed).shuffle(starts)
    for start in starts:
        stop = min(start + batch, rows)
        with timestep_context(3.0, rows=(start, stop)):
            batched(x[start:stop])
    a, b = whole.stats[3.0], batched.stats[3.0]
    assert a.sample.numel() == min(rows * per_row, 256)
    assert torch.equal(a.sample, b.sample) and torch.equal(a.sample_keys, b.sample_keys)
    assert torch.isin(a.sample, x).all()  # values of the data
    assert (a.sample_keys[1:] > a.sample_keys[:-1]).all()  # ordered by key, no value taken twice
    assert whole.calculate_qparams()[0].item() == batched.calculate_qparams()[0].item()


def test_the_subsample_is_uniform_over_positions():
    """Which positions the bottom-k hash keeps: about equally many from every part of the data (no bias to the
    first or last rows, nor to the start of a row)."""
    obs = TimestepActivationObserver(samples_per_timestep=4000, tail=1)
    x = torch.arange(100 * 400, dtype=torch.float32).view(100, 400)  # value = position
    with timestep_context(1.0, rows=(0, 100)):
        obs(x)
    kept = obs.stats[1.0].sample.long()
    by_row_decile = torch.bincount(kept // 4000, minlength=10)
    by_column_decile = torch.bincount((kept % 400) // 40, minlength=10)
    # 400 expected per bin; a binomial spread is sqrt(400 * 0.9) = 19, so 6 sigma is ~115
    assert (by_row_decile - 400).abs().max() < 115 and (by_column_decile - 400).abs().max() < 115


def test_a_seed_draws_another_subsample():
    x = torch.randn(50, 100, generator=torch.Generator().manual_seed(0))
    samples = []
    for seed in (0, 1):
        obs = TimestepActivationObserver(samples_per_timestep=500, tail=4, seed=seed)
        with timestep_context(1.0, rows=(0, 50)):
            obs(x)
        samples.append(set(obs.stats[1.0].sample.tolist()))
    assert len(samples[0] & samples[1]) < 0.3 * 500  # ~10 % overlap expected for two independent draws


def test_statistics_are_kept_per_timestep():
    obs = TimestepActivationObserver(method="minmax", aggregation="weighted")
    _observe(obs, [(999.0, torch.tensor([-4.0, 8.0])), (1.0, torch.tensor([0.0, 1.0])), (999.0, torch.tensor([9.0]))])
    assert obs.timestep_ranges() == {999.0: (-4.0, 9.0), 1.0: (0.0, 1.0)}
    lo, hi = obs.chosen_range()  # uniform weights: the mean of the per-timestep ranges
    assert lo.item() == pytest.approx(-2.0) and hi.item() == pytest.approx(5.0)
    obs.set_timestep_weights({999.0: 0.0, 1.0: 1.0})
    lo, hi = obs.chosen_range()
    assert (lo.item(), hi.item()) == pytest.approx((0.0, 1.0))


def _mse_of(obs, x):
    s, z = obs.calculate_qparams()
    return (fake_quantize(x, s, z.float(), obs.quant_min, obs.quant_max) - x).pow(2).mean().item()


def test_mse_search_clips_heavy_tails_and_beats_minmax():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((50000,))
    mse = TimestepActivationObserver(method="mse", quant_max=15)
    mm = TimestepActivationObserver(method="minmax", quant_max=15)
    _observe(mse, [(1.0, x)])
    _observe(mm, [(1.0, x)])
    assert mse.chosen_range()[1] < x.max()
    assert _mse_of(mse, x) < 0.5 * _mse_of(mm, x)


def test_mse_search_keeps_a_lone_outlier_that_no_subsample_would_see():
    # Clipping one value at 60 costs more than the coarser grid does; the exact tails must reveal that.
    x = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(0)), torch.tensor([60.0])])
    mse, mm = TimestepActivationObserver(method="mse"), TimestepActivationObserver(method="minmax")
    _observe(mse, [(1.0, x)])
    _observe(mm, [(1.0, x)])
    assert mse.chosen_range()[1] > 50.0
    assert _mse_of(mse, x) <= 1.05 * _mse_of(mm, x)


def test_weighted_mse_balances_quiet_and_loud_timesteps():
    # A loud timestep dominates the pooled MSE; relative weighting protects the quiet one.
    g = torch.Generator().manual_seed(1)
    quiet, loud = torch.randn(4096, generator=g) * 0.05, torch.randn(4096, generator=g) * 20
    pooled = TimestepActivationObserver(method="mse", aggregation="global", quant_max=15)
    weighted = TimestepActivationObserver(method="mse", aggregation="weighted", quant_max=15)
    for obs in (pooled, weighted):
        _observe(obs, [(1.0, quiet), (999.0, loud)])
    def rel_err(obs, x):
        s, z = obs.calculate_qparams()
        return ((fake_quantize(x, s, z.float(), 0, 15) - x).pow(2).mean() / x.pow(2).mean()).item()
    assert rel_err(weighted, quiet) + rel_err(weighted, loud) <= rel_err(pooled, quiet) + rel_err(pooled, loud)


def test_no_data_is_a_clear_error():
    with pytest.raises(RuntimeError, match="calibrate"):
        TimestepActivationObserver().calculate_qparams()


def test_nan_is_a_clear_error():
    with pytest.raises(ValueError, match="NaN"):
        TimestepActivationObserver()(torch.tensor([1.0, float("nan")]))


def test_bad_weights_are_rejected():
    obs = TimestepActivationObserver(method="minmax", aggregation="weighted")
    _observe(obs, [(1.0, torch.ones(3)), (2.0, torch.ones(3))])
    obs.set_timestep_weights({1.0: 1.0})
    with pytest.raises(ValueError, match="missing"):
        obs.chosen_range()
    obs.set_timestep_weights({1.0: -1.0, 2.0: 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        obs.chosen_range()


def test_bad_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        TimestepActivationObserver(method="percentile")


@settings(max_examples=25, deadline=None)
@given(method=methods, aggregation=aggregations, seed=st.integers(0, 1000), spread=st.floats(0.1, 20),
       learned=st.floats(0.5, 2.0) | st.none())
def test_qparams_over_every_timestep_are_the_observers_own(method, aggregation, seed, spread, learned):
    """`qparams_over(all timesteps)` is `calculate_qparams()`, learned step or not; over one timestep it is
    `timestep_qparams`; a learned step's correction carries over to any subset of timesteps."""
    obs = TimestepActivationObserver(method=method, aggregation=aggregation)
    g = torch.Generator().manual_seed(seed)
    keys = [999.0, 500.0, 20.0]
    _observe(obs, [(t, torch.randn(300, generator=g) * spread * (1 + t / 300) + 0.3 * spread) for t in keys])
    plain_scale, plain_zp = obs.calculate_qparams()
    if learned is not None:
        obs.set_fixed_qparams(plain_scale * learned, plain_zp)
    scale, zp = obs.qparams_over(keys)
    fixed_scale, fixed_zp = obs.calculate_qparams()
    assert scale.item() == pytest.approx(fixed_scale.item(), rel=1e-5) and int(zp) == int(plain_zp)
    for t in keys:
        assert torch.equal(torch.stack(obs.qparams_over([t])), torch.stack(obs.timestep_qparams(t)))
    own_scale, _ = obs.qparams_over(keys[:2])
    obs.fixed_qparams = None
    statistics_scale, _ = obs.qparams_over(keys[:2])
    assert own_scale.item() == pytest.approx(statistics_scale.item() * (learned or 1.0), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), spread=st.floats(0.1, 20), start=st.integers(0, 3), size=st.integers(1, 4))
def test_minmax_range_of_a_group_lies_within_the_whole_range(seed, spread, start, size):
    obs = TimestepActivationObserver(method="minmax", aggregation="global")
    g = torch.Generator().manual_seed(seed)
    keys = [float(t) for t in (900, 700, 500, 300, 100)]
    _observe(obs, [(t, torch.randn(100, generator=g) * spread * (1 + t / 100)) for t in keys])
    group = keys[start:start + size]
    lo, hi = obs.chosen_range(group)
    assert lo.item() == min(obs.stats[t].lo for t in group) and hi.item() == max(obs.stats[t].hi for t in group)
    assert obs.qparams_over(group)[0] <= obs.calculate_qparams()[0]


def test_range_over_unseen_timesteps_is_a_clear_error():
    obs = TimestepActivationObserver()
    _observe(obs, [(1.0, torch.randn(10))])
    with pytest.raises(KeyError, match="saw no data at timestep 2"):
        obs.chosen_range([1.0, 2.0])
    with pytest.raises(KeyError, match="saw no data"):
        obs.qparams_over([])
