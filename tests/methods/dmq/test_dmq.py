"""DMQ's pieces: timestep weights, power-of-two factors and the vote."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffusion_ao.methods.dmq import (AdaptiveTimestepWeights, PowerOfTwoVotes, per_sample_channel_errors,
                                      timestep_weights, vote)
from diffusion_ao.methods.dmq.pts import factors, output_errors, range_preserving_max_k, weight_error_per_k

losses = st.dictionaries(st.floats(0, 999), st.floats(0, 1e3), min_size=1, max_size=50)


@given(losses=losses, r=st.floats(0, 40))
def test_weights_are_non_negative_and_sum_to_one(losses, r):
    w = timestep_weights(losses, r)
    assert set(w) == set(losses)
    assert all(v >= 0 for v in w.values())
    assert sum(w.values()) == pytest.approx(1.0)


@given(losses=losses)
def test_r_zero_is_uniform_and_a_larger_loss_never_gets_more_weight(losses):
    w0 = timestep_weights(losses, 0)
    assert all(v == pytest.approx(1 / len(losses)) for v in w0.values())
    w = timestep_weights(losses, 20)
    keys = sorted(losses, key=losses.get)
    assert all(w[a] >= w[b] - 1e-12 for a, b in zip(keys, keys[1:]))


def test_ema_of_losses():
    adaptive = AdaptiveTimestepWeights(r=1, ema=0.5)
    adaptive.update({1.0: 4.0, 2.0: 0.0})
    adaptive.update({1.0: 0.0, 2.0: 4.0})
    assert adaptive.losses == {1.0: 2.0, 2.0: 2.0}
    assert adaptive.weights() == {1.0: 0.5, 2.0: 0.5}
    with pytest.raises(ValueError, match="r=-1"):
        AdaptiveTimestepWeights(r=-1)


@settings(deadline=None, max_examples=30)
@given(n=st.integers(1, 4), c=st.integers(1, 6), max_k=st.integers(0, 4), seed=st.integers(0, 1000),
       bits=st.sampled_from([4, 6, 8]))
def test_pts_factors_are_powers_of_two_in_range(n, c, max_k, seed, bits):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, 16, c, generator=g) * torch.exp(torch.randn(c, generator=g) * 2)
    tally = PowerOfTwoVotes(c, max_k)
    tally.add(per_sample_channel_errors(rows, bits, max_k))
    for k in (tally.by_vote(0.85), tally.by_mse()):
        s = factors(k)
        assert ((k >= 0) & (k <= max_k)).all()
        assert torch.equal(torch.log2(s), -k.float())  # exactly 2^-k
    assert int(tally.votes.sum()) == n * c


def test_k_zero_is_exact_reference_and_small_channels_prefer_larger_k():
    # One loud channel sets the range; a quiet one gets a finer step by being scaled up.
    rows = torch.stack([torch.linspace(-8, 8, 64), torch.linspace(-0.1, 0.1, 64)], dim=-1).unsqueeze(0)
    errors = per_sample_channel_errors(rows, bits=4, max_k=3)
    assert errors[:, 0, 1].argmin() == 3 and errors[0, 0, 0] <= errors[3, 0, 0]


@settings(deadline=None, max_examples=50)
@given(c=st.integers(1, 8), max_k=st.integers(0, 5), seed=st.integers(0, 1000))
def test_range_preserving_cap_keeps_every_scaled_channel_inside_the_tensor_range(c, max_k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, c, generator=g) * torch.exp(torch.randn(c, generator=g) * 2) + torch.randn(c, generator=g)
    channel_min, channel_max = x.amin(0), x.amax(0)
    lo, hi = min(float(channel_min.min()), 0.0), max(float(channel_max.max()), 0.0)
    k = range_preserving_max_k(channel_min, channel_max, lo, hi, max_k)
    assert ((k >= 0) & (k <= max_k)).all()
    scaled = x * 2.0 ** k.float()
    assert scaled.min() >= lo and scaled.max() <= hi  # the tensor range, hence the observer's, is unchanged
    grown = x * 2.0 ** (k + 1).clamp(max=max_k + 1).float()  # one more doubling leaves the range (unless at max_k)
    escapes = (grown.amin(0) < lo) | (grown.amax(0) > hi)
    assert (escapes | (k == max_k)).all()


def test_capped_votes_never_pick_a_k_above_the_cap():
    rows = torch.stack([torch.linspace(-8, 8, 64), torch.linspace(-2, 2, 64)], dim=-1).unsqueeze(0)
    errors = per_sample_channel_errors(rows, bits=4, max_k=3, lo=-8.0, hi=8.0)
    uncapped, capped = PowerOfTwoVotes(2, 3), PowerOfTwoVotes(2, 3)
    uncapped.add(errors)
    capped.add(errors, k_cap=torch.tensor([0, 1]))
    assert uncapped.by_mse().tolist() == [0, 2]  # x4 fills [-8, 8] exactly
    assert capped.by_vote(0.85).tolist() == [0, 1] and capped.by_mse().tolist() == [0, 1]


def test_weight_error_at_k_zero_is_the_plain_quantization_error_and_grows_when_a_column_is_folded_small():
    from types import SimpleNamespace

    from diffusion_ao.observers.weight import WeightObserver

    spec = SimpleNamespace(observer_or_fake_quant_ctr=WeightObserver.with_args(quant_min=-8, quant_max=7))
    weight = torch.tensor([[8.0, 2.2], [-8.0, 1.7], [7.0, -2.4]])  # column 0 sets every row's 4-bit step
    errors = weight_error_per_k(weight, spec, max_k=3)
    observer = spec.observer_or_fake_quant_ctr()
    observer(weight)
    step = observer.calculate_qparams()[0].view(-1, 1)  # symmetric: zero point 0
    plain = ((torch.round(weight / step).clamp(-8, 7) * step - weight) ** 2).sum(dim=0)
    torch.testing.assert_close(errors[0], plain)
    assert errors[3, 1] > 10 * errors[0, 1]  # 2^-3 rounds the small column to zero, and the error is 64x'd back

    # The activation-only choice for the quiet channel is k = 2; counting the weight term keeps it lower.
    rows = torch.stack([torch.linspace(-8, 8, 64), torch.linspace(-2, 2, 64)], dim=-1).unsqueeze(0)
    activation = per_sample_channel_errors(rows, bits=8, max_k=3, lo=-8.0, hi=8.0)
    total = output_errors(rows, activation, weight, errors)
    assert int(activation[:, 0, 1].argmin()) == 2 and int(total[:, 0, 1].argmin()) < 2


def test_vote_falls_back_to_zero_below_kappa():
    votes = torch.tensor([[1, 0, 2], [9, 5, 0], [0, 5, 8]])  # (K+1, C): channel 0: 90% k=1, 1: 50/50, 2: 80% k=2
    assert vote(votes, 0.85).tolist() == [1, 0, 0]
    assert vote(votes, 0.8).tolist() == [1, 0, 2]
    assert vote(votes, 0.5).tolist() == [1, 1, 2]  # ties break to the smaller k


@pytest.fixture(scope="module")
def tiny_dmq(scheduler):
    from diffusion_ao import QuantConfig, collect_calibration_data
    from diffusion_ao.config import DMQConfig
    from diffusion_ao.recipe import quantize_unet
    from tests.conftest import tiny_unet

    unet = tiny_unet()
    data = collect_calibration_data(unet, scheduler, num_samples=8, num_inference_steps=4, progress=False)
    # min spread 1 puts every quantized layer through the vote, so the fold path is exercised; 8-bit weights
    # because at 4 bits the weight-aware vote keeps k = 0 on this tiny model (a folded 2^-k costs weight precision).
    config = QuantConfig.preset("dmq-w4a8").replace(weight_bits=8, act_bits=6, dmq=DMQConfig(pts_min_spread=1.0, pts_kappa=0.5,
                                                                   weighting_iterations=2, les_iterations=20,
                                                                   les_samples_per_step=2))
    quantized, report = quantize_unet(unet, data, config, progress=False)
    return unet, data, quantized, report


def test_dmq_recipe_scales_channels_sets_weights_and_stays_close_to_fp(tiny_dmq):
    from tests.conftest import snr_db

    unet, data, quantized, report = tiny_dmq
    assert report.pts and all(max(v.k) > 0 for v in report.pts.values())
    assert any(r.fold is not None for r in report.les.values())  # LES ran first and folded some scales
    assert sum(report.timestep_weights.values()) == pytest.approx(1.0)
    assert set(report.timestep_weights) == set(data.timesteps)
    x, t = data.steps[1].sample, torch.full((len(data.steps[1].sample),), data.steps[1].timestep)
    assert snr_db(unet(x, t).sample, quantized(x, t)) > 8.0


@pytest.mark.slow
def test_dmq_folded_graph_runs_on_int8_kernels(tiny_dmq):
    from diffusion_ao import compile_for_cpu, count_int8_kernels

    unet, data, quantized, report = tiny_dmq
    decisions = report.quantizer.decisions
    expected = sum(1 for d in decisions if d.layer is not None and d.layer.act_bits)
    x, t = data.steps[1].sample, torch.full((len(data.steps[1].sample),), data.steps[1].timestep)
    fast = compile_for_cpu(quantized)
    kernels = count_int8_kernels(fast, x, t)
    assert kernels["qconv"] + kernels["qlinear"] + kernels["merged_linears"] == expected
    from tests.conftest import snr_db
    snr = snr_db(quantized(x, t), fast(x, t))
    print(f"compiled vs eager q/dq after PTS folding: {snr:.1f} dB")
    assert snr > 30.0


def test_les_and_pts_plan_on_the_split_shortcut_convs(scheduler):
    # Q-Diffusion's split gives each part of a concat its own activation quantizer; LES and PTS must plan on those
    # parts, not on the one concat that prepare_pt2e no longer quantizes.
    from diffusion_ao import QuantConfig, collect_calibration_data
    from diffusion_ao.config import DMQConfig, QDiffConfig
    from diffusion_ao.recipe import quantize_unet
    from tests.conftest import snr_db, tiny_unet

    unet = tiny_unet()
    data = collect_calibration_data(unet, scheduler, num_samples=4, num_inference_steps=3, progress=False)
    config = QuantConfig.preset("dmq-w4a8").replace(
        weight_bits=8, qdiff=QDiffConfig(split_shortcut=True),
        dmq=DMQConfig(pts_min_spread=1.0, pts_kappa=0.5, weighting_iterations=1, les_iterations=5,
                      les_samples_per_step=2, les_min_gain=0.0))
    quantized, report = quantize_unet(unet, data, config, progress=False)
    split = report.quantizer.split_convs
    assert split
    shortcut_paths = {k.split("[part")[0] for k in report.les if "[part" in k}
    assert len(shortcut_paths) == len(split)
    for path in shortcut_paths:
        assert f"{path}[part 0]" in report.les and f"{path}[part 1]" in report.les and path not in report.les
    assert not shortcut_paths & set(report.pts)  # PTS factors, if any, are per part too
    x, t = data.steps[1].sample, torch.full((len(data.steps[1].sample),), data.steps[1].timestep)
    assert snr_db(unet(x, t).sample, quantized(x, t)) > 15.0
