"""`collect_calibration_data` with classifier-free guidance records the doubled batch the denoiser sees; subsets
of calibration data keep both guidance halves."""
import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from hypothesis import given, strategies as st

from diffusion_ao import collect_calibration_data
from diffusion_ao.calibration.data import evenly_spaced_rows
from diffusion_ao.models.unet_config import DEFAULT_SCHEDULE_KWARGS

TORCH_THREADS = 1


def test_guided_calibration_holds_both_halves_with_the_null_label():
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    scheduler = DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)
    labels = torch.tensor([3, 7, 1])
    data = collect_calibration_data(dit, scheduler, num_samples=3, num_inference_steps=2, class_labels=labels,
                                    guidance_scale=3.0, null_class_label=10, progress=False)
    for step in data.steps:
        assert len(step) == 6
        assert step.conditioning["class_labels"].tolist() == [10, 10, 10, 3, 7, 1]
        uncond, cond = step.sample.chunk(2)
        assert torch.equal(uncond, cond)  # one latent, seen with and without its label
    for step in data.subset(2).steps:  # LES, GPTQ, ... learn on subsets: they must see the conditional half too
        assert step.conditioning["class_labels"].tolist() == [10, 1]
    with pytest.raises(ValueError, match="needs class_labels and null_class_label"):
        collect_calibration_data(dit, scheduler, num_samples=3, num_inference_steps=2, class_labels=labels,
                                 guidance_scale=3.0, progress=False)


@given(batch=st.integers(1, 200), keep=st.one_of(st.none(), st.integers(1, 250)))
def test_evenly_spaced_rows_are_distinct_sorted_and_span_the_batch(batch, keep):
    rows = evenly_spaced_rows(batch, keep)
    expected = batch if keep is None else min(keep, batch)
    assert len(rows) == expected and len(rows.unique()) == expected
    assert bool((rows[1:] > rows[:-1]).all()) and rows[0] == 0 and rows.max() < batch
    if expected >= 2:
        assert rows[-1] == batch - 1  # the last row of a guided batch is conditional
        assert int(rows.diff().max()) - int(rows.diff().min()) <= 1  # even spacing


def test_evenly_spaced_rows_rejects_keeping_nothing():
    with pytest.raises(ValueError, match="keep must be >= 1"):
        evenly_spaced_rows(4, 0)
