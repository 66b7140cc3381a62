"""`run_sampler`'s classifier-free guidance: one call on the doubled batch, eps_u + s (eps_c - eps_u)."""
import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao.models.unet_config import DEFAULT_SCHEDULE_KWARGS
from diffusion_ao.calibration.sampling import run_sampler


class LabelShift(torch.nn.Module):
    """eps = 0.1 * x + 0.01 * label: a denoiser whose guided prediction is known in closed form."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, class_labels, return_dict=False):
        self.calls.append(len(x))
        return (0.1 * x + 0.01 * class_labels.float().view(-1, 1, 1, 1),)


@settings(max_examples=10, deadline=None)
@given(scale=st.floats(1.5, 6.0), batch=st.integers(1, 4), seed=st.integers(0, 100))
def test_guidance_combines_both_halves_of_one_call(scale, batch, seed):
    scheduler = DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)
    noise = torch.randn(batch, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    labels, null = torch.randint(0, 10, (batch,)), torch.full((batch,), 10)
    model = LabelShift()
    guided = run_sampler(model, scheduler, noise, 3, {"class_labels": labels}, guidance_scale=scale,
                         unconditional={"class_labels": null})
    assert model.calls == [2 * batch] * 3  # one call per step on the doubled batch
    # eps_u + s (eps_c - eps_u) = 0.1 x + 0.01 (null + s (label - null)): the same as an unguided run with that label
    effective = null.float() + scale * (labels.float() - null.float())

    class Effective(torch.nn.Module):
        def forward(self, x, t, return_dict=False):
            return (0.1 * x + 0.01 * effective.view(-1, 1, 1, 1),)

    torch.testing.assert_close(guided, run_sampler(Effective(), scheduler, noise, 3), rtol=1e-5, atol=1e-6)


def test_guidance_needs_the_unconditional_inputs():
    scheduler = DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)
    with pytest.raises(ValueError, match=r"needs `unconditional` inputs.*class_labels"):
        run_sampler(LabelShift(), scheduler, torch.randn(1, 1, 4, 4), 2, {"class_labels": torch.tensor([3])},
                    guidance_scale=2.0)
