"""Time-grouped activation ranges: the split is the best contiguous one, each group's graph carries its group's
qparams and shares the weights, a call dispatches every sample to its group's graph, every group lowers to the
int8 kernels (VNNI detection forced both ways), and a pipeline runs on it."""
import itertools

import pytest
import torch
from diffusers import DDIMPipeline
from hypothesis import given, settings, strategies as st

from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

from diffusion_ao import (DiffusionQuantizer, QuantConfig, calibrate, collect_calibration_data, compile_for_cpu,
                          count_int8_kernels, export_unet, quantize_pipeline)
from diffusion_ao.config import TFMQConfig, TimeGroupConfig
from diffusion_ao.backends.x86 import expected_int8_kernels
from diffusion_ao.observers import TimestepActivationObserver, diffusion_observers
from diffusion_ao.graph import graph_tensor_targets
from diffusion_ao.serialization.size import size_mb
from diffusion_ao.grouped_graph import TimeGroupedGraph
from diffusion_ao.methods.time_groups import _observer_ranges, convert_time_grouped, lost_bits, split_timesteps
from tests.conftest import KERNEL_ERROR_FRACTION, kernel_error_fraction, probe_inputs

TORCH_THREADS = 2  # set for this module's tests by conftest.module_threads
qd = torch.ops.quantized_decomposed


def _ranges(seed: int, T: int, O: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo = -torch.rand(T, O, generator=g, dtype=torch.float64) * 4
    hi = torch.rand(T, O, generator=g, dtype=torch.float64) * torch.logspace(0, 2, T, dtype=torch.float64)[:, None]
    return torch.stack([lo, hi], dim=-1)


def _contiguous_splits(T: int, K: int):
    for cuts in itertools.combinations(range(1, T), K - 1):
        bounds = [0, *cuts, T]
        yield list(zip(bounds[:-1], bounds[1:]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 7), O=st.integers(1, 3), data=st.data())
def test_ranges_split_loses_the_fewest_bits_of_any_contiguous_split(seed, T, O, data):
    K = data.draw(st.integers(1, T))
    ranges = _ranges(seed, T, O)
    spans = split_timesteps(ranges, K, "ranges")
    assert len(spans) == K and spans[0][0] == 0 and spans[-1][1] == T
    assert all(i < j for i, j in spans) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    best = min(lost_bits(ranges, s) for s in _contiguous_splits(T, K))
    assert lost_bits(ranges, spans) == pytest.approx(best, abs=1e-9)
    assert lost_bits(ranges, spans) <= lost_bits(ranges, split_timesteps(ranges, K, "uniform")) + 1e-9


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 60), data=st.data())
def test_uniform_split_has_groups_of_equal_size(T, data):
    K = data.draw(st.integers(1, T))
    spans = split_timesteps(torch.zeros(T, 1, 2), K, "uniform")
    sizes = [j - i for i, j in spans]
    assert len(spans) == K and sum(sizes) == T and max(sizes) - min(sizes) <= 1
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_lost_bits_of_a_timestep_sharing_a_wider_range():
    ranges = torch.tensor([[[0.0, 1.0]], [[0.0, 4.0]]], dtype=torch.float64)
    assert lost_bits(ranges, [(0, 2)]) == pytest.approx(2.0)  # t0 quantized with a 4x wider range: 2 bits
    assert lost_bits(ranges, [(0, 1), (1, 2)]) == 0.0


def test_bad_splits_are_clear_errors():
    with pytest.raises(ValueError, match="at most 3 groups"):
        split_timesteps(torch.zeros(3, 1, 2), 4)
    with pytest.raises(ValueError, match="int >= 2"):
        TimeGroupConfig(groups=1)
    with pytest.raises(ValueError, match="split"):
        TimeGroupConfig(split="kmeans")
    with pytest.raises(ValueError, match="both choose activation ranges"):
        QuantConfig(time_groups=TimeGroupConfig(), tfmq=TFMQConfig(fsc="all"))
    with pytest.raises(ValueError, match="needs act_bits"):
        QuantConfig(act_bits=None, time_groups=TimeGroupConfig())


@pytest.fixture(scope="module")
def data(unet, scheduler):
    return collect_calibration_data(unet, scheduler, num_samples=4, num_inference_steps=6, progress=False)


# The AVX2 (no-VNNI) side compiles every group again with 7-bit ranges: slow; the range decision itself is the
# quantizer's, tested both ways in test_end_to_end and test_cpu. Two groups: every group costs a compile, and the
# split itself is tested against brute force above.
GROUPS = 2
@pytest.fixture(scope="module", params=[True, pytest.param(False, marks=pytest.mark.slow)], ids=["vnni", "no-vnni"])
def grouped(request, unet, data):
    """(grouped graph, report, the observers' expected qparams per group, has_vnni) for a W4A8 tiny UNet in
    `GROUPS` groups, with the CPU detection forced both ways."""
    config = QuantConfig.preset("w4a8").replace(act_observer="minmax", timestep_aggregation="global")
    quantizer = DiffusionQuantizer(config, has_vnni=request.param)
    prepared = prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), quantizer)
    calibrate(prepared, data, progress=False)
    values = [float(t) for t in data.timesteps]
    spans = split_timesteps(_observer_ranges(prepared, values), GROUPS)
    observers = [obs for _, obs in diffusion_observers(prepared, "test") if isinstance(obs, TimestepActivationObserver)]
    expected = [{round(obs.qparams_over(values[i:j])[0].item(), 9) for obs in observers} for i, j in spans]
    model, report = convert_time_grouped(prepared, data.timesteps, TimeGroupConfig(groups=GROUPS))
    return model, report, expected, request.param, expected_int8_kernels(quantizer.decisions)


def _activation_scales(gm) -> set[float]:
    return {round(float(n.args[1]), 9) for n in gm.graph.nodes if n.target == qd.quantize_per_tensor.default}


def test_each_group_carries_its_groups_qparams_and_shares_the_weights(grouped, data):
    model, report, expected, _, _ = grouped
    assert [len(g) for g in report.groups] == [len(g) for g in model.group_timesteps()]
    assert sum(report.groups, []) == [float(t) for t in data.timesteps]
    assert report.lost_bits < report.lost_bits_single
    for gm, scales in zip(model.groups, expected):
        assert _activation_scales(gm) == scales
    assert len({frozenset(_activation_scales(gm)) for gm in model.groups}) == GROUPS
    first = graph_tensor_targets(model.groups[0])
    for gm in model.groups[1:]:
        mine = graph_tensor_targets(gm)
        assert list(mine) == list(first) and all(mine[t] is first[t] for t in mine)  # weights, biases: one copy
    assert size_mb(model) == pytest.approx(size_mb(model.groups[0]), rel=1e-9)


def test_call_runs_each_samples_group(grouped, data):
    model, _, _, _, _ = grouped
    x, t = probe_inputs(data, per_step=2)
    groups = model.group_timesteps()
    with torch.no_grad():
        mixed = model(x, t)
        for k, timesteps in enumerate(groups):
            rows = torch.isin(t, torch.tensor(timesteps))
            alone = model.groups[k](x[rows], t[rows])
            assert torch.equal(model(x[rows], t[rows]), alone)  # one group per batch: that group's graph itself
            assert torch.allclose(mixed[rows], alone, rtol=1e-4, atol=1e-5)  # another batch size: up to rounding
    with pytest.raises(ValueError, match="not in the finite set"):
        model(x[:2], torch.full((2,), 3.0))


def test_every_group_lowers_to_the_int8_kernels(grouped, unet, data):
    model, _, _, has_vnni, expected = grouped
    fast = compile_for_cpu(model)
    assert isinstance(fast, TimeGroupedGraph)
    x, _ = probe_inputs(data, per_step=2)
    for k, timesteps in enumerate(fast.group_timesteps()):
        t = torch.full((len(x),), timesteps[0])
        counts = count_int8_kernels(fast, x, t)
        assert counts["qconv"] + counts["qlinear"] + counts["merged_linears"] == expected and counts["qconv"] > 0, counts
        with torch.no_grad():
            fp, eager, compiled = unet(x, t).sample, model(x, t), fast(x, t)
        assert kernel_error_fraction(fp, eager, compiled) < KERNEL_ERROR_FRACTION, (k, has_vnni)


def test_pipeline_samples_with_time_groups_and_only_its_timesteps(unet, scheduler):
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    data = collect_calibration_data(unet, scheduler, num_samples=2, num_inference_steps=5, progress=False)
    config = QuantConfig.preset("w8a8").replace(time_groups=TimeGroupConfig(groups=2, split="uniform"))
    report = quantize_pipeline(pipe, config, data, compile=False, progress=False)
    assert sorted(len(g) for g in report.time_groups.groups) == [2, 3]
    assert isinstance(pipe.unet.graph, TimeGroupedGraph)
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and torch.isfinite(torch.as_tensor(images)).all()
    with pytest.raises(ValueError, match="not in the finite set"):
        pipe(batch_size=1, num_inference_steps=4, output_type="np")


def test_saved_groups_load_with_their_tensors_once(grouped, data, tmp_path):
    from diffusion_ao import load_quantized, save_quantized

    model = grouped[0]
    save_quantized(model, tmp_path / "grouped")
    files = sorted(p.name for p in (tmp_path / "grouped").iterdir())
    assert files == sorted(["config.json", "graph.pt2.xz", "tensors.safetensors",
                            *(f"graph.group{k}.pt2.xz" for k in range(1, GROUPS))])
    loaded = load_quantized(tmp_path / "grouped")
    assert isinstance(loaded, TimeGroupedGraph) and loaded.group_timesteps() == model.group_timesteps()
    assert size_mb(loaded) == pytest.approx(size_mb(model), rel=1e-6)
    x, t = probe_inputs(data, per_step=2)
    with torch.no_grad():
        assert torch.allclose(loaded(x, t), model(x, t), rtol=1e-5, atol=1e-6)
