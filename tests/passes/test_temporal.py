"""TIB detection and the temporal-feature cache: exact time-path nodes, FP outputs on the cached timesteps for
several schedulers (bit for bit at the batch size the cache was computed with, within the FP graph's own
batch-size rounding at others), the time MLP removed, unseen timesteps rejected."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx import Interpreter
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UNet2DModel

from diffusion_ao import as_diffusers_unet, export_unet
from diffusion_ao.export import SAMPLE
from diffusion_ao.models.unet_config import DEFAULT_SCHEDULE_KWARGS
from diffusion_ao.passes.analysis import input_dependencies, module_path, time_embedding_nodes
from diffusion_ao.passes.channel_scaling import scale_input_channels
from diffusion_ao.passes.temporal import find_temporal_blocks
from diffusion_ao.passes.temporal_cache import CACHE_META, cache_temporal_features
from tests.conftest import tiny_conditional_unet, tiny_unet

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads


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


CACHE_BATCH = 2  # the batch size evaluate_nodes computes the cached values with


def _rows_as_cached(fn, *batched, **batched_kwargs):
    """fn row by row, each row computed the way its cached values were: at batch CACHE_BATCH, every sample of the
    batch at the row's timestep, the row in the first position."""
    args = (*batched, *batched_kwargs.values())
    rows = []
    for i in range(len(batched[0])):
        chunk = [a[i:i + 1].expand(CACHE_BATCH, *a.shape[1:]) for a in args]
        rows.append(fn(*chunk[:len(batched)], **dict(zip(batched_kwargs, chunk[len(batched):])))[:1])
    return torch.cat(rows)


def assert_cached_matches_fp(cached, reference, x, t, **kwargs):
    """The cache's exactness claims on one batch.

    Where the cached graph runs the same kernels on the same values as the FP graph, which is at the batch size
    the cache was computed with (2, one timestep per batch), it equals it bit for bit. At another batch size B, or
    with several timesteps in a batch, the FP graph's own GEMMs may round differently (the time MLP's M changes),
    and so may the rest of the network in both graphs. With c2 == r2 every row computed as it was cached,
    |c_B - r_B| <= |c_B - c2| + |r_B - r2| elementwise (exact), plus a few float32 ulps of the output for rounding
    those differences. The lookups themselves are exact at any batch
    (`test_lookup_returns_the_row_of_each_samples_timestep_at_any_batch`), so |c_B - c2| is the rest of the
    network's batch-size rounding, not the cache's.
    """
    c2 = _rows_as_cached(cached, x, t, **kwargs)
    r2 = _rows_as_cached(reference, x, t, **kwargs)
    assert torch.equal(c2, r2)
    c, r = cached(x, t, **kwargs), reference(x, t, **kwargs)
    if len(x) == CACHE_BATCH and (t == t[0]).all():
        assert torch.equal(c, r)
        return
    ulp = torch.finfo(r.dtype).eps * r.abs().max()
    bound = (c - c2).abs() + (r - r2).abs() + 4 * ulp
    excess = (c - r).abs() - bound
    assert (excess <= 0).all(), (f"batch {len(x)}: cached vs FP {(c - r).abs().max().item():.3g}, FP's own batch "
                                 f"rounding {(r - r2).abs().max().item():.3g}, excess {excess.max().item():.3g}")


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_cached_graph_equals_the_fp_graph(schedule, tiny):
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
        for batch in (CACHE_BATCH, 1, 3, 4):
            assert_cached_matches_fp(cached, reference, x[:batch], torch.full((batch,), t))
    # A batch that mixes timesteps: each row still at most its FP graph's batch rounding away.
    mixed = torch.tensor(timesteps[:4])
    assert_cached_matches_fp(cached, reference, x, mixed)


def test_class_conditional_cache_keeps_the_class_term():
    unet = class_conditional_unet()
    reference, cached = _export(unet), _export(unet)
    timesteps = _timesteps(DDIMScheduler)
    info = cache_temporal_features(cached, timesteps)
    assert list(info.features) == ["time_embedding.linear_2"]
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    for t in timesteps:
        for batch in (CACHE_BATCH, 3):
            assert_cached_matches_fp(cached, reference, x[:batch], torch.full((batch,), t),
                                     class_labels=labels[:batch])
    assert any(module_path(n).startswith("class_embedding") for n in cached.graph.nodes)



def test_label_cache_removes_the_class_term_and_matches_fp():
    """With the labels as keys, what depends on the timestep and / or the label (time MLP, class embedding,
    every time projection) becomes `[L * T, C]` lookups, and only the cached labels are accepted."""
    unet = class_conditional_unet()
    reference, cached = _export(unet), _export(unet)
    timesteps = _timesteps(DDIMScheduler, steps=3)
    info = cache_temporal_features(cached, timesteps, labels=[2, 0])
    assert info.labels == [2, 0] and all(shape[0] == 2 * len(timesteps) for shape in info.features.values())
    assert set(_time_proj_paths(unet)) <= set(info.removed_layers)
    assert not any(module_path(n).startswith(("class_embedding", "time_embedding")) for n in cached.graph.nodes
                   if n.op == "call_function")
    x = torch.randn(3, 1, 8, 8)
    for t in timesteps:
        for labels in (torch.tensor([0, 0]), torch.tensor([2, 2]), torch.tensor([2, 0, 2])):
            assert_cached_matches_fp(cached, reference, x[:len(labels)], torch.full((len(labels),), t),
                                     class_labels=labels)
    with pytest.raises(RuntimeError, match="class label is not in the set"):
        cached(x[:2], torch.full((2,), timesteps[0]), class_labels=torch.tensor([0, 1]))
    wrapped = as_diffusers_unet(cached, like=unet)
    with pytest.raises(ValueError, match=r"Class label\(s\) \[1\] are not in the set"):
        wrapped(x[:2], timesteps[0], class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="over the budget of 100"):
        cache_temporal_features(_export(unet), timesteps, labels=[0, 1, 2], budget_bytes=100)
    with pytest.raises(ValueError, match="needs a graph with a 'class_labels' input"):
        cache_temporal_features(_export(tiny_unet()), timesteps, labels=[0])

class _Record(Interpreter):
    """Runs a graph and keeps the values of chosen nodes."""

    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.nodes, self.values = set(nodes), {}

    def run_node(self, n):
        value = super().run_node(n)
        if n in self.nodes:
            self.values[n.meta[CACHE_META]] = value
        return value


@pytest.fixture(scope="module")
def cached_ddim(tiny):
    timesteps = SCHEDULES["ddim"]()
    graph = copy.deepcopy(tiny[1])
    cache_temporal_features(graph, timesteps)
    return graph, timesteps


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_lookup_returns_the_row_of_each_samples_timestep_at_any_batch(cached_ddim, data):
    """index_select is a copy: at any batch size and any mix of timesteps, every sample gets its timestep's row of
    every cache buffer exactly."""
    graph, timesteps = cached_ddim
    picks = data.draw(st.lists(st.integers(0, len(timesteps) - 1), min_size=1, max_size=9))
    lookups = [n for n in graph.graph.nodes if CACHE_META in n.meta]
    tables = {n.meta[CACHE_META]: getattr(graph, n.args[0].target) for n in lookups}
    record = _Record(graph, lookups)
    record.run(torch.zeros(len(picks), 1, 8, 8), torch.tensor([timesteps[i] for i in picks]))
    assert set(record.values) == set(tables)
    for name, value in record.values.items():
        assert torch.equal(value, tables[name][picks]), name


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
