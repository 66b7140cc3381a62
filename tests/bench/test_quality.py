"""The bench's held-out noise predictions: running the steps together gives what running them one by one does."""
import torch

from bench.quality import noise_predictions
from diffusion_ao import collect_calibration_data, export_unet

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads


def test_mixed_timestep_batches_give_the_per_step_predictions(unet, scheduler):
    data = collect_calibration_data(unet, scheduler, num_samples=3, num_inference_steps=4, progress=False)
    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    together = noise_predictions(graph, data, batch=5)
    per_step = noise_predictions(graph, data, batch=5, mixed_timesteps=False)
    assert [p.shape for p in together] == [(3, 1, 8, 8)] * 4
    for a, b in zip(together, per_step):  # other batch compositions: equal up to the GEMMs' rounding
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
