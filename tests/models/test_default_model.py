"""The shipped default model: loads offline, and a short sample is digits, not noise."""
import torch

from diffusion_ao.metrics import class_coverage, fd_to_reference
from diffusion_ao.models import DEFAULT_MODEL_DIR, load_default_model, load_model
from diffusion_ao.models.classifier import load_classifier
from diffusion_ao.models.digits import load_digits_tensor
from diffusion_ao.calibration.sampling import run_sampler

TORCH_THREADS = 2  # set for this module's tests by conftest.module_threads


def _confidence(images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_classifier()(images).softmax(dim=1).max(dim=1).values


def test_default_model_loads_offline_and_is_the_documented_size():
    unet, scheduler = load_default_model()
    assert 1_000_000 <= sum(p.numel() for p in unet.parameters()) <= 3_000_000
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    assert (DEFAULT_MODEL_DIR / "diffusion_pytorch_model.safetensors").stat().st_size < 10_000_000
    assert not unet.training


def test_a_short_ddim_sample_is_digits_not_noise():
    unet, scheduler = load_default_model()
    noise = torch.randn(128, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    samples = run_sampler(unet, scheduler, noise, num_inference_steps=4).clamp(-1, 1)
    real, _ = load_digits_tensor()
    fake = torch.rand(128, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # The classifier is confident on most samples, and they sit far closer to real digits than noise does.
    assert (_confidence(samples) > 0.9).float().mean() > 0.7
    assert fd_to_reference(samples, real) < 0.2 * fd_to_reference(fake, real)
    assert class_coverage(samples) >= 0.9


def test_load_model_accepts_a_diffusers_directory(tmp_path):
    unet, _ = load_default_model()
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    loaded, scheduler = load_model(tmp_path / "pipe")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, unet(x, t).sample)
    assert scheduler.config.num_train_timesteps == 1000


def test_noise_is_not_mistaken_for_digits():
    # The control for the test above: the same checks reject uniform noise.
    noise = torch.rand(128, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert (_confidence(noise) > 0.9).float().mean() < 0.7 or class_coverage(noise) < 0.9


def test_loading_asks_the_user_to_install_nothing(capfd):
    import logging

    from diffusion_ao.models import load_default_model

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        load_default_model()
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    out, err = capfd.readouterr()
    text = out + err + "\n".join(r.getMessage() for r in records)
    assert "pip install" not in text and "accelerate" not in text
