"""The shipped class-conditional DiT: loads offline, has the documented shape, and a short guided sample shows
the asked digit."""
import torch

from diffusion_ao.metrics import class_coverage, fd_to_reference, label_agreement
from diffusion_ao.models import DIT_MODEL_DIR, load_model
from diffusion_ao.models.digits import load_digits_tensor
from diffusion_ao.models.dit_config import NULL_LABEL, NUM_CLASSES
from diffusion_ao.calibration.sampling import run_sampler

TORCH_THREADS = 2


def test_dit_loads_offline_with_ten_classes_and_a_null_label():
    dit, scheduler = load_model("dit")
    assert type(dit).__name__ == "DiTTransformer2DModel" and not dit.training
    assert 1_000_000 <= sum(p.numel() for p in dit.parameters()) <= 4_000_000
    table = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == NUM_CLASSES + 1 and NULL_LABEL == NUM_CLASSES
    assert scheduler.config.num_train_timesteps == 1000
    assert (DIT_MODEL_DIR / "diffusion_pytorch_model.safetensors").stat().st_size < 10_000_000
    assert "command:" in (DIT_MODEL_DIR / "TRAINING.txt").read_text()


def test_a_short_guided_sample_shows_the_asked_digit():
    dit, scheduler = load_model("dit")
    labels = torch.arange(100) % NUM_CLASSES
    noise = torch.randn(100, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    samples = run_sampler(dit, scheduler, noise, 10, {"class_labels": labels}, guidance_scale=1.5,
                          unconditional={"class_labels": torch.full_like(labels, NULL_LABEL)}).clamp(-1, 1)
    real, _ = load_digits_tensor()
    fake = torch.rand(100, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert label_agreement(samples, labels) >= 0.9
    assert class_coverage(samples) == 1.0
    assert fd_to_reference(samples, real) < 0.2 * fd_to_reference(fake, real)
    # the control: shuffled labels do not agree
    assert label_agreement(samples, labels.roll(1)) < 0.3
