"""QuantConfig helpers: `with_seed` reaches every method's random choices and nothing else."""
import dataclasses

import pytest

from diffusion_ao import QuantConfig
from diffusion_ao.config import (PRESETS, DMQConfig, GPTQConfig, OutputCorrectionConfig, ReconstructionConfig,
                                 TFMQConfig)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_with_seed_sets_every_method_seed_and_changes_nothing_else(preset):
    config = QuantConfig.preset(preset)
    seeded = config.with_seed(3)
    seeds = [m.seed for m in (seeded.dmq, seeded.tfmq) if m is not None]
    if seeded.qdiff is not None and seeded.qdiff.reconstruction is not None:
        seeds.append(seeded.qdiff.reconstruction.seed)
    assert seeds == [3] * len(seeds)
    assert seeded.with_seed(0) == config  # every default seed is 0: only the seeds changed


@pytest.mark.parametrize("cls", [DMQConfig, TFMQConfig, ReconstructionConfig])
@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_seed_must_be_a_non_negative_int(cls, seed):
    with pytest.raises(ValueError if seed == -1 else TypeError, match="seed"):  # a wrong type is a TypeError
        cls(seed=seed)


def test_with_seed_keeps_a_config_without_methods_unchanged():
    config = QuantConfig.preset("w4a8")
    assert config.with_seed(5) == config and dataclasses.replace(config) == config


def test_label_cache_needs_the_whole_cache():
    with pytest.raises(ValueError, match="cache_class_labels=True .* needs cache='all'"):
        TFMQConfig(cache="select", cache_class_labels=True)
    with pytest.raises(ValueError, match="cache_budget_bytes only applies"):
        TFMQConfig(cache="all", cache_budget_bytes=10)
    assert TFMQConfig(cache="all", cache_class_labels=True, cache_budget_bytes=10).cache_budget_bytes == 10


def test_gptq_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="damp"):
        GPTQConfig(damp=0)
    with pytest.raises(ValueError, match="block_size"):
        GPTQConfig(block_size=0)
    with pytest.raises(TypeError, match="gptq must be a GPTQConfig"):
        QuantConfig(gptq={"damp": 0.01})


def test_output_correction_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="set gain or bias"):
        OutputCorrectionConfig(gain=False, bias=False)
    with pytest.raises(ValueError, match="samples_per_step"):
        OutputCorrectionConfig(samples_per_step=0)
    with pytest.raises(TypeError, match="output_correction must be an OutputCorrectionConfig"):
        QuantConfig(output_correction=True)
