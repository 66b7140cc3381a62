"""TIB detection and the temporal-feature cache: exact time-path nodes, bit-for-bit equal FP outputs on the cached
timesteps for several schedulers, the time MLP removed, unseen timesteps rejected."""
import copy

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UNet2DModel

from diffusion_ao import as_diffusers_unet, export_unet
from diffusion_ao.export import SAMPLE
from diffusion_ao.models.unet_config import DEFAULT_SCHEDULE_KWARGS
from diffusion_ao.passes.analysis import input_dependencies, module_path, time_embedding_nodes
from diffusion_ao.passes.channel_scaling import scale_input_channels
from diffusion_ao.passes.temporal import find_temporal_blocks
from diffusion_ao.passes.temporal_cache import cache_temporal_features
from tests.conftest import tiny_conditional_unet, tiny_unet

torch.set_num_threads(1)


def class_conditional_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=3).eval()


def _time_proj_paths(unet) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith("time_emb_proj")]


def _export(unet, **kw):
    return export_unet(unet, sample_shape=(1, 1, 8, 8), **kw)


@pytest.fixture(scope="module")
def tiny():
    """A tiny UNet and its export; tests cache into deep copies of the graph (exporting takes seconds)."""
    unet = tiny_unet()
    return unet, _export(unet)


@pytest.mark.parametrize("conditional", [False, True])
def test_tib_is_exactly_the_time_path(conditional, tiny):
    unet, graph = (tiny_conditional_unet(), None) if conditional else tiny
    graph = graph or _export(unet)
    tib = find_temporal_blocks(graph)
    expected = ["time_embedding.linear_1", "time_embedding.linear_2", *_time_proj_paths(unet)]
    assert sorted(tib.module_paths) == sorted(expected)
    assert "time_proj" in tib.all_module_paths  # the sinusoidal projection, which has no weights
    deps = input_dependencies(graph)
    assert all(SAMPLE not in deps[n] and len(deps[n]) == 1 for n in tib.nodes)
    assert sorted(tib.feature_names().values()) == sorted(["time_embedding.linear_2", *_time_proj_paths(unet)])


def test_class_term_is_not_part_of_the_tib():
    unet = class_conditional_unet()
    graph = _export(unet)
    tib = find_temporal_blocks(graph)
    # emb = time_embedding(t) + class_embedding(label): only the t part is timestep-only.
    assert tib.module_paths == ["time_embedding.linear_1", "time_embedding.linear_2"]
    assert list(tib.feature_names().values()) == ["time_embedding.linear_2"]
    assert not any(module_path(n).startswith("class_embedding") for n in tib.nodes)
    # The scope switch's time path (t and not sample) does include everything after the class term.
    scope_paths = {module_path(n) for n in time_embedding_nodes(graph)}
    assert set(_time_proj_paths(unet)) <= scope_paths


def _timesteps(scheduler_cls, steps=6, **kw):
    scheduler = scheduler_cls(**DEFAULT_SCHEDULE_KWARGS, **kw)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.float().tolist()


SCHEDULES = {
    "ddim": lambda: _timesteps(DDIMScheduler),
    "ddpm": lambda: _timesteps(DDPMScheduler),
    "euler-karras": lambda: _timesteps(EulerDiscreteScheduler, use_karras_sigmas=True),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_cached_graph_equals_the_fp_graph_bit_for_bit(schedule, tiny):
    timesteps = SCHEDULES[schedule]()
    if schedule == "euler-karras":
        assert any(t != int(t) for t in timesteps)  # the point of this case: non-integer timesteps
    unet, reference = tiny
    cached = copy.deepcopy(reference)
    info = cache_temporal_features(cached, timesteps)
    assert find_temporal_blocks(cached).linears == []  # the time MLP and projections are gone
    assert len(info.removed_layers) == 2 + len(_time_proj_paths(unet))
    x = torch.randn(4, 1, 8, 8)
    for t in timesteps:
        tt = torch.full((4,), t)
        assert torch.equal(cached(x, tt), reference(x, tt)), t


def test_class_conditional_cache_keeps_the_class_term():
    unet = class_conditional_unet()
    reference, cached = _export(unet), _export(unet)
    timesteps = _timesteps(DDIMScheduler)
    info = cache_temporal_features(cached, timesteps)
    assert list(info.features) == ["time_embedding.linear_2"]
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    for t in timesteps:
        tt = torch.full((3,), t)
        assert torch.equal(cached(x, tt, class_labels=labels), reference(x, tt, class_labels=labels))
    assert any(module_path(n).startswith("class_embedding") for n in cached.graph.nodes)


def test_unseen_timestep_is_an_error_in_the_graph_and_in_the_pipeline_wrapper(tiny):
    unet, graph = tiny[0], copy.deepcopy(tiny[1])
    cache_temporal_features(graph, [999.0, 500.0, 1.0])
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="not in the set"):
        graph(x, torch.tensor([500.0, 499.0]))
    wrapped = as_diffusers_unet(graph, like=unet)
    wrapped(x, 500.0)
    with pytest.raises(ValueError, match="499 are not in the finite set"):
        wrapped(x, 499.0)


def test_caching_leaves_the_eager_unet_intact_and_survives_channel_scaling():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    graph = _export(unet)
    timesteps = _timesteps(DDIMScheduler)
    cache_temporal_features(graph, timesteps)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), timesteps[2])
    expected = graph(x, t)
    # DMQ-style folding on the conv that reads h + temb (the cached feature's consumer): FP output unchanged.
    conv = next(n for n in graph.graph.nodes if module_path(n) == "down_blocks.0.resnets.0.conv2")
    scale_input_channels(graph, conv, torch.tensor([0.5, 1.0, 2.0, 4.0, 1.0, 0.25, 1.0, 2.0]))
    assert torch.allclose(graph(x, t), expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(unet(x, t).sample, unet(x, t).sample)  # the eager model still runs


def test_cache_rejects_bad_input(tiny):
    graph = copy.deepcopy(tiny[1])
    with pytest.raises(ValueError, match="timesteps is empty"):
        cache_temporal_features(graph, [])
    with pytest.raises(ValueError, match="not a temporal feature"):
        cache_temporal_features(graph, [1.0], features=["conv_in"])
