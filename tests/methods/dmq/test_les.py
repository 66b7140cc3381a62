"""DMQ's learned equivalent scaling: SmoothQuant initialisation, the learning loop, folding into the graph."""
import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from diffusion_ao import QuantConfig
from diffusion_ao.config import DMQConfig
from diffusion_ao.methods.dmq.les import (LayerQuantSim, apply_learned_scaling, learn_scales, smooth_max,
                                          smoothquant_scales)
from diffusion_ao.passes.analysis import LINEAR_OPS
from diffusion_ao.quantizer.quantizer import DiffusionQuantizer


class _Projection(torch.nn.Module):
    """A lone linear with the input names the quantizer expects."""

    def __init__(self, cin: int, cout: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(cin, cout)

    def forward(self, sample, timestep):
        return self.proj(sample)


def _layer(cin=16, cout=8, seed=0, preset="w4a8"):
    model = _Projection(cin, cout, seed).eval()
    gm = torch.export.export(model, (torch.randn(4, cin), torch.zeros(4))).module()
    config = QuantConfig.preset(preset).replace(quantize_first_last=True)  # the lone layer is first and last
    planned = DiffusionQuantizer(config, has_vnni=True).planned_layers(gm)
    node = next(n for n in planned if n.target in LINEAR_OPS)
    return gm, node, planned[node]


def _outlier_inputs(cin, seed, outlier=30.0, steps=(1.0, 501.0)):
    """Inputs whose channel 0 is far louder than the rest, as in the activations LES is for."""
    g = torch.Generator().manual_seed(seed)
    gain = torch.ones(cin)
    gain[0] = outlier
    return {t: torch.randn(12, cin, generator=g) * gain * (1 + i) for i, t in enumerate(steps)}


@given(x=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=16), alpha=st.floats(0, 1), seed=st.integers(0, 99))
def test_smoothquant_scales_are_positive_with_unit_geometric_mean(x, alpha, seed):
    x_absmax = torch.tensor(x, dtype=torch.float64)
    w_absmax = torch.rand(len(x), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.01
    s = smoothquant_scales(x_absmax, w_absmax, alpha)
    assert (s > 0).all() and torch.isfinite(s).all()
    assert s.log().mean().item() == pytest.approx(0.0, abs=1e-9)
    # alpha = 1 moves all of the activation's channel range into the weight: x/s is flat across channels.
    flat = smoothquant_scales(x_absmax, w_absmax, 1.0)
    assert torch.allclose(x_absmax / flat, (x_absmax / flat)[0].expand(len(x)))


def test_smoothquant_rejects_alpha_out_of_range():
    with pytest.raises(ValueError, match="alpha=1.5"):
        smoothquant_scales(torch.ones(2), torch.ones(2), 1.5)


def test_the_simulated_layer_at_s_one_is_the_fp_layer_up_to_quantization():
    gm, node, planned = _layer()
    sim = LayerQuantSim(gm, node, planned)
    x = torch.randn(4, 16)
    ref = sim.reference(x)
    assert torch.equal(ref, gm(x, torch.zeros(4)))
    with pytest.raises(RuntimeError, match="refresh_ranges"):
        sim(x)
    sim.refresh_ranges({1.0: x})
    err = (sim(x) - ref).pow(2).mean() / ref.pow(2).mean()
    assert 0 < err < 0.05  # 4-bit weights, 8-bit activations: a small but non-zero error


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), cin=st.integers(4, 24), weighting_r=st.sampled_from([0.0, 20.0]))
def test_les_loss_never_ends_above_where_it_started(seed, cin, weighting_r):
    gm, node, planned = _layer(cin=cin, seed=seed)
    inputs = _outlier_inputs(cin, seed)
    result = learn_scales(LayerQuantSim(gm, node, planned), inputs, torch.ones(cin), iterations=30,
                          weighting_r=weighting_r, seed=seed)
    assert result.loss_init == result.loss_unscaled
    assert result.loss_learned <= result.loss_init
    assert (result.scales > 0).all()
    assert 0 < result.deployed_unscaled < 1 and 0 < result.deployed_learned < 1


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 4), n=st.integers(1, 64), seed=st.integers(0, 10_000), spread=st.floats(1e-3, 1e3))
def test_smooth_max_lies_within_the_temperature_of_the_max(rows, n, seed, spread):
    values = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * spread
    top = values.amax(dim=1)
    soft = smooth_max(values, temperature=0.05)
    # A softmax-weighted mean at temperature T is at most the max and at least max - T log n.
    assert (soft <= top + 1e-12 * spread).all()
    assert (soft >= top - 0.05 * top.abs() * math.log(n) - 1e-12 * spread).all()
    # One entry 100x louder than the rest: every other entry weighs at most exp(-0.99 / 0.05) of it.
    loud = (values.abs().amax(dim=1) + 1) * 100
    soft = smooth_max(torch.cat([values, loud[:, None]], dim=1))
    assert ((loud - soft).abs() <= n * math.exp(-0.99 / 0.05) * 2 * loud).all()


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 1000))
def test_learned_scales_do_not_depend_on_the_inputs_last_bit(seed):
    """Another CPU rounds the FP model differently: a 1-ulp change of every input must not move the learned
    scales (DMQ's straight-through loop moved them by up to e^0.37 on the shipped model)."""
    cin = 16
    gm, node, planned = _layer(cin=cin, seed=seed)
    inputs = _outlier_inputs(cin, seed)
    g = torch.Generator().manual_seed(seed + 1)
    nudged = {t: x * (1 + 2.0**-23 * torch.randn(x.shape, generator=g)) for t, x in inputs.items()}
    runs = [learn_scales(LayerQuantSim(gm, node, planned), xs, torch.ones(cin), iterations=100, lr=0.05,
                         weighting_r=20.0) for xs in (inputs, nudged)]
    # Some draws leave every scale at 1 (2 of 80 seeds in 480-559, and seed 230: no scaling lowers the loss);
    # the property is about scales that moved.
    assume(runs[0].scales.log().abs().max() > 0.05)
    # Measured over seeds 480-559: median 1.5e-6, but seeds 523 and 496 move one channel by 2.3e-3 and 7.0e-3
    # (cause not traced yet); DMQ's straight-through loop moved them by 0.47-0.71.
    assert (runs[0].scales.log() - runs[1].scales.log()).abs().max() < 1e-2


def test_les_learns_to_shrink_an_outlier_channel():
    cin = 16
    gm, node, planned = _layer(cin=cin)
    inputs = _outlier_inputs(cin, seed=0)
    result = learn_scales(LayerQuantSim(gm, node, planned), inputs, torch.ones(cin), iterations=150, lr=0.05)
    print(f"LES on an outlier channel: {result.loss_unscaled:.3e} -> {result.loss_learned:.3e}")
    assert result.loss_learned < 0.7 * result.loss_unscaled
    assert result.scales[0] > result.scales[1:].median()  # the loud channel is divided by a larger s


def test_les_is_deterministic_and_zero_iterations_returns_the_initial_scales():
    gm, node, planned = _layer()
    inputs = _outlier_inputs(16, seed=1)
    runs = [learn_scales(LayerQuantSim(gm, node, planned), inputs, torch.ones(16), iterations=25, seed=3)
            for _ in range(2)]
    assert torch.equal(runs[0].scales, runs[1].scales)
    init = torch.linspace(0.5, 2.0, 16)
    none = learn_scales(LayerQuantSim(gm, node, planned), inputs, init, iterations=0)
    assert torch.allclose(none.scales, init) and none.iterations == 0


def test_bad_settings_are_rejected():
    gm, node, planned = _layer()
    with pytest.raises(ValueError, match="iterations >= 0"):
        learn_scales(LayerQuantSim(gm, node, planned), _outlier_inputs(16, 0), torch.ones(16), iterations=-1)
    with pytest.raises(ValueError, match="no inputs"):
        learn_scales(LayerQuantSim(gm, node, planned), {}, torch.ones(16), iterations=1)
    with pytest.raises(ValueError, match="les_init"):
        DMQConfig(les_init="random")
    with pytest.raises(ValueError, match="les_alpha"):
        DMQConfig(les_alpha=2.0)


@pytest.mark.parametrize("init", ["ones", "smoothquant"])
def test_les_on_a_unet_folds_scales_and_leaves_the_fp_graph_unchanged(unet, scheduler, init):
    from diffusion_ao import collect_calibration_data, export_unet

    data = collect_calibration_data(unet, scheduler, num_samples=4, num_inference_steps=3, progress=False)
    config = QuantConfig.preset("w4a8").replace(dmq=DMQConfig(les_init=init, les_iterations=10, pts=False,
                                                               les_samples_per_step=2, les_min_gain=0.0))
    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    x, t = data.steps[1].sample, torch.full((len(data.steps[1].sample),), data.steps[1].timestep)
    before = graph(x, t)
    results = apply_learned_scaling(graph, data, config, progress=False)
    planned = DiffusionQuantizer(config).planned_layers(export_unet(unet, sample_shape=(1, 1, 8, 8)))
    assert len(results) == sum(1 for p in planned.values() if p.input_spec is not None)
    folded = [r for r in results.values() if r.fold is not None]
    assert folded and {r.fold for r in folded} <= {"producer", "multiply"}
    assert all(r.loss_learned < r.loss_unscaled for r in folded)
    after = graph(x, t)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5 * before.abs().max().item())
    assert torch.allclose(unet(x, t).sample, before, atol=1e-6)  # the eager model's weights were not touched

