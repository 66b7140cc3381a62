"""The low-rank branch (`LowRankConfig`): the split's properties, the graph rewrite, and the recipe on a tiny DiT
(which layers get a branch, their bit widths, size, save/load, int8 kernels)."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffusion_ao import (DiffusionQuantizer, QuantConfig, collect_calibration_data, export_denoiser,
                          load_quantized, quantize_denoiser, save_quantized)
from diffusion_ao.config import LayerQuant, LowRankConfig
from diffusion_ao.graph import call_graph, graph_input_names
from diffusion_ao.methods.low_rank import apply_low_rank, low_rank_split, low_rank_targets
from diffusion_ao.passes.analysis import LOW_RANK_META
from diffusion_ao.passes.low_rank import add_low_rank_branch
from diffusion_ao.serialization.size import size_mb, weight_code_bits
from tests.conftest import tiny_dit

TORCH_THREADS = 2
RANK = 4


def _weight_and_rms(seed: int, out: int, features: int, outliers: int):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, features, generator=g, dtype=torch.float64)
    rms = torch.rand(features, generator=g, dtype=torch.float64) + 0.1
    rms[:outliers] *= 50  # a few outlier input channels, as transformers' activations have
    return weight, rms


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), out=st.integers(1, 12), features=st.integers(1, 12), outliers=st.integers(0, 3),
       data=st.data())
def test_the_split_sums_to_the_weight_and_is_the_best_rank_r_fit_in_the_input_norm(seed, out, features, outliers,
                                                                                   data):
    weight, rms = _weight_and_rms(seed, out, features, outliers)
    rank = data.draw(st.integers(1, min(out, features)))
    up, down, residual = low_rank_split(weight, rms, rank)
    assert up.shape == (out, rank) and down.shape == (rank, features) and residual.shape == weight.shape
    assert torch.allclose(up @ down + residual, weight, atol=1e-10)
    tail = torch.linalg.svdvals(weight * rms)[rank:].square().sum()
    left = (residual * rms).square().sum()
    assert torch.isclose(left, tail, rtol=1e-8, atol=1e-10)  # Eckart-Young in the norm the inputs induce
    u, sv, vh = torch.linalg.svd(weight, full_matrices=False)  # the plain SVD ignores the inputs: never better
    plain = weight - (u[:, :rank] * sv[:rank]) @ vh[:rank]
    assert left <= (plain * rms).square().sum() * (1 + 1e-9) + 1e-12
    if rank == min(out, features):
        assert torch.allclose(residual, torch.zeros_like(residual), atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), factor=st.floats(1e-3, 1e3), dead=st.integers(0, 3))
def test_the_split_ignores_the_inputs_overall_scale_and_survives_dead_channels(seed, factor, dead):
    weight, rms = _weight_and_rms(seed, 6, 8, 1)
    rms[8 - dead:] = 0  # inputs that never fire
    up, down, _ = low_rank_split(weight, rms, 2)
    up2, down2, residual2 = low_rank_split(weight, rms * factor, 2)
    assert torch.isfinite(residual2).all()
    assert torch.allclose(up @ down, up2 @ down2, atol=1e-7 * float(weight.abs().max()))


def test_the_split_and_the_config_reject_bad_input():
    weight = torch.randn(4, 6)
    for rms, rank, match in ((torch.ones(5), 2, "an \\[in\\] input RMS"), (torch.ones(6), 0, "rank 0 must be in 1..4"),
                             (torch.ones(6), 5, "rank 5"), (-torch.ones(6), 2, "finite and >= 0"),
                             (torch.full((6,), float("nan")), 2, "finite and >= 0")):
        with pytest.raises(ValueError, match=match):
            low_rank_split(weight, rms, rank)
    for kwargs, match in ((dict(rank=0), "rank=0"), (dict(rank=True), "rank=True"), (dict(down_bits=4), "down_bits=4"),
                          (dict(down_bits=True), "down_bits=True"), (dict(samples_per_step=0), "samples_per_step"),
                          (dict(denoisers=("vae",)), "LowRankConfig.denoisers")):
        with pytest.raises(TypeError if kwargs == dict(rank=True) else ValueError, match=match):
            LowRankConfig(**kwargs)
    with pytest.raises(TypeError, match="low_rank must be a LowRankConfig"):
        QuantConfig(low_rank=dict(rank=4))


@pytest.fixture(scope="module")
def dit():
    return tiny_dit(attention_head_dim=16)


@pytest.fixture(scope="module")
def dit_graph(dit, dit_data):
    return export_denoiser(dit, dit_data.steps[0])


def _outputs(graph, data):
    names = graph_input_names(graph)
    with torch.no_grad():
        return [call_graph(graph, step.graph_inputs(0, len(step)), names) for step in data.steps]


def test_the_branch_leaves_the_float_model_unchanged_and_goes_only_on_low_bit_linears(dit, dit_graph, dit_data):
    graph = copy.deepcopy(dit_graph)
    before = {n: p.clone() for n, p in dit.named_parameters()}
    promoted = "transformer_blocks.0.ff.net.2"
    config = QuantConfig.preset("w4a8").replace(module_name_overrides={promoted: LayerQuant(8, 8)})
    quantizer = DiffusionQuantizer(config)
    targets = {n.name for n in low_rank_targets(graph, quantizer, LowRankConfig(rank=RANK))}
    planned = quantizer.planned_layers(graph)
    low_bit = {n.name for n, p in planned.items() if n.target == torch.ops.aten.linear.default
               and p.layer.weight_bits < 8}
    assert targets and targets <= low_bit and any(n.name not in targets for n in planned)  # 8-bit: no branch
    results = apply_low_rank(graph, dit_data, quantizer, LowRankConfig(rank=RANK), progress=False)
    assert promoted not in results and len(results) == len(targets)
    assert all(r.rank == RANK and 0 < r.energy < 1 for r in results.values())
    branch = [n for n in graph.graph.nodes if n.meta.get(LOW_RANK_META)]
    roles = [n.meta[LOW_RANK_META] for n in branch]
    assert roles.count("down") == roles.count("up") == len(results) == len(branch) // 2
    for new, old in zip(_outputs(graph, dit_data), _outputs(dit_graph, dit_data)):
        assert torch.allclose(new, old, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in dit.named_parameters())  # the eager model is untouched
    with pytest.raises(ValueError, match="is itself a low-rank branch"):
        add_low_rank_branch(graph, branch[0], torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1))


@pytest.mark.parametrize("preset, down_bits", [("w4a8", None), ("w4a8", 8), ("w4a6", 8)])
def test_the_recipe_quantizes_the_residual_and_the_branch_at_its_own_bits(dit, dit_graph, dit_data, preset, down_bits,
                                                                          tmp_path):
    base_config = QuantConfig.preset(preset)
    config = base_config.replace(low_rank=LowRankConfig(rank=RANK, down_bits=down_bits))
    base, _ = quantize_denoiser(dit_graph, dit_data, base_config, progress=False)
    converted, report = quantize_denoiser(dit_graph, dit_data, config, progress=False)
    downs = [d for d in report.quantizer.decisions if d.reason.startswith("low-rank branch down")]
    ups = [d for d in report.quantizer.decisions if d.reason.startswith("low-rank branch up")]
    assert len(downs) == len(ups) == len(report.low_rank) > 0
    # the down-projection at 8-bit weights and 8-bit activations, even where the layer's are 6-bit
    assert all(d.layer == (None if down_bits is None else LayerQuant(8, 8)) for d in downs)
    assert all(d.layer is None for d in ups)  # the up-projection always in floating point
    bits = sorted(weight_code_bits(converted).values())
    assert bits.count(4) == sorted(weight_code_bits(base).values()).count(4)  # every residual still at 4 bits
    assert bits.count(8) == (0 if down_bits is None else len(report.low_rank))
    branch_params = sum(getattr(converted, n.target).numel() for n in converted.graph.nodes
                        if n.op == "get_attr" and "_low_rank_" in n.target)
    extra = (size_mb(converted) - size_mb(base)) * 2**20
    if down_bits is None:  # the branch's two FP32 factors, rank x (in + out)
        assert extra == pytest.approx(4 * branch_params)
    else:  # the FP32 up factors (the only branch constants left) and the down-projections' 8-bit codes and scales
        assert all("_low_rank_up" in n.target for n in converted.graph.nodes
                   if n.op == "get_attr" and "_low_rank_" in n.target)
        down_fp32 = 4 * RANK * sum(dit.get_submodule(key.split(" (")[0]).in_features for key in report.low_rank)
        assert 0 < extra - 4 * branch_params < down_fp32 / 2
    save_quantized(converted, tmp_path / "lr")
    loaded = load_quantized(tmp_path / "lr")
    for a, b in zip(_outputs(converted, dit_data), _outputs(loaded, dit_data)):  # FP32 GEMMs may differ by an ulp
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_branch_limited_to_transformers_is_skipped_on_a_unet_and_reported(unet, scheduler):
    data = collect_calibration_data(unet, scheduler, num_samples=2, num_inference_steps=2, progress=False)
    config = QuantConfig.preset("w4a8").replace(low_rank=LowRankConfig(rank=2, denoisers=("transformer",)))
    _, report = quantize_denoiser(unet, data, config, progress=False)
    assert report.low_rank == {}
    assert report.choices()["low-rank branch"] == ("not run: the config limits it to transformer denoisers, "
                                                  "this is a unet")


@pytest.mark.slow
@pytest.mark.parametrize("down_bits", [None, 8])
def test_the_compiled_model_runs_the_residual_and_an_8_bit_down_projection_on_int8_kernels(dit_graph, dit_data,
                                                                                          down_bits):
    from diffusion_ao import compile_for_cpu, count_int8_kernels

    base, _ = quantize_denoiser(dit_graph, dit_data, "w4a8", progress=False)
    config = QuantConfig.preset("w4a8").replace(low_rank=LowRankConfig(rank=RANK, down_bits=down_bits))
    converted, report = quantize_denoiser(dit_graph, dit_data, config, progress=False)
    step = dit_data.steps[0]
    names = graph_input_names(converted)
    inputs = step.graph_inputs(0, len(step))
    counts = [count_int8_kernels(lambda g=g: call_graph(compile_for_cpu(g), inputs, names))
              for g in (base, converted)]
    added = 0 if down_bits is None else len(report.low_rank)
    layers = [c["qlinear"] + c["merged_linears"] for c in counts]
    assert layers[1] == layers[0] + added
    fast = compile_for_cpu(converted)
    with torch.no_grad():
        eager, compiled = call_graph(converted, inputs, names), call_graph(fast, inputs, names)
    assert torch.allclose(compiled, eager, atol=0.05 * float(eager.abs().max()))
