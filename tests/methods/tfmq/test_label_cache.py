"""`TFMQConfig(cache_class_labels="auto")`, the choice `best-*` make per model: the whole (timestep, label)
modulation is cached only where that restricts nothing (the calibration labels cover the label table, within the
budget); elsewhere per timestep, and the report says why."""
import re

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from diffusion_ao import QuantConfig, collect_calibration_data, export_denoiser
from diffusion_ao.config import TFMQConfig
from diffusion_ao.models.unet_config import DEFAULT_SCHEDULE_KWARGS
from diffusion_ao.passes.temporal_cache import label_cache_bytes, label_table_sizes
from diffusion_ao.recipe import quantize_denoiser

TORCH_THREADS = 1
NUM_CLASSES = 4  # the label table has NUM_CLASSES + 1 rows: the last is the null label of guidance


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES).eval()


def _data(dit, labels):
    return collect_calibration_data(dit, DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS), num_samples=len(labels),
                                    num_inference_steps=2, class_labels=torch.tensor(labels), guidance_scale=3.0,
                                    null_class_label=NUM_CLASSES, progress=False)


def _auto(**tfmq):
    return QuantConfig.preset("w8a8").replace(tfmq=TFMQConfig(cache="all", fsc="none", cache_class_labels="auto",
                                                              **tfmq))


def test_label_tables_and_their_bytes_come_from_the_graph(dit):
    data = _data(dit, [0, 1])
    graph = export_denoiser(dit, data.steps[0])
    sizes = label_table_sizes(graph)  # the blocks and the output layer each embed the label
    assert len(sizes) >= 2 and set(sizes) == {NUM_CLASSES + 1}
    one = label_cache_bytes(graph, data.timesteps, [0])
    assert one > 0 and label_cache_bytes(graph, data.timesteps, range(3)) == 3 * one
    assert label_cache_bytes(graph, data.timesteps[:1], [0]) * len(data.timesteps) == one


def test_auto_caches_every_label_when_the_calibration_covers_the_table(dit):
    data = _data(dit, list(range(NUM_CLASSES)))  # with the null label: every row of the table
    converted, report = quantize_denoiser(dit, data, _auto(), progress=False)
    assert report.tfmq.cache.labels == list(range(NUM_CLASSES + 1))
    assert "transformer_blocks.0.norm1.linear" in report.tfmq.cache.removed_layers  # the adaLN modulation left
    assert report.choices()["modulation cache"].startswith("(timestep, label) cache: the calibration labels cover")


@pytest.mark.parametrize("labels, tfmq, why", [
    ([0, 1], {}, r"cover 3 of the 5 label embeddings \(missing \[2, 3\]\)"),
    (list(range(NUM_CLASSES)), {"cache_budget_bytes": 1000}, r"over the 1000 B budget"),
])
def test_auto_falls_back_to_the_timestep_cache_and_says_why(dit, labels, tfmq, why):
    _, report = quantize_denoiser(dit, _data(dit, labels), _auto(**tfmq), progress=False)
    assert report.tfmq.cache.labels is None and report.tfmq.cache.features  # per timestep, still cached
    assert "transformer_blocks.0.norm1.linear" not in report.tfmq.cache.removed_layers
    choice = report.choices()["modulation cache"]
    assert choice.startswith("timestep cache:")
    assert re.search(why, choice), choice


def test_auto_on_an_unconditional_denoiser_is_the_timestep_cache(unet, scheduler):
    data = collect_calibration_data(unet, scheduler, num_samples=2, num_inference_steps=2, progress=False)
    _, report = quantize_denoiser(unet, data, _auto(), progress=False)
    assert report.tfmq.cache.labels is None
    assert report.choices() == {"modulation cache": "timestep cache: the calibration data has no class labels"}


def test_best_presets_choose_the_label_cache_automatically_and_reject_bad_values():
    assert all(QuantConfig.preset(p).tfmq.cache_class_labels == "auto" for p in ("best-w4a8", "best-w4a6"))
    with pytest.raises(ValueError, match="cache_class_labels must be True, False or 'auto', got 'yes'"):
        TFMQConfig(cache="all", cache_class_labels="yes")
    with pytest.raises(ValueError, match="cache_class_labels='auto' caches whole .* needs cache='all'"):
        TFMQConfig(cache="select", cache_class_labels="auto")


@pytest.mark.parametrize("setting, labels", [(False, None), (True, list(range(3)) + [NUM_CLASSES])])
def test_a_configured_cache_is_not_reported_as_a_choice(dit, setting, labels):
    config = QuantConfig.preset("w8a8").replace(tfmq=TFMQConfig(cache="all", fsc="none", cache_class_labels=setting))
    _, report = quantize_denoiser(dit, _data(dit, [0, 1, 2]), config, progress=False)
    assert report.tfmq.cache.labels == labels and report.choices() == {}
