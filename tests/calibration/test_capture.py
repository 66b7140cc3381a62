"""`capture_calibration_data`: one step per timestep the pipeline's denoiser received, keyed by its real value; the
guided batch recorded as the pipeline builds it; `samples_per_step` rows evenly spaced over both halves;
several `calls` concatenated in call order; the errors raised before (or instead of) a capture.

Complements tests/test_pipelines.py (every family's capture, the DiT calls' order, the SD halves at
`samples_per_step=2`), tests/test_errors.py (a bfloat16 DDIM pipeline, a failure before the last denoiser call)
and tests/calibration/test_store.py (the on-disk store)."""
import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_ao.calibration.capture import capture_calibration_data
from diffusion_ao.calibration.data import evenly_spaced_rows
from diffusion_ao.export import export_unet
from diffusion_ao.wrapper import as_diffusers_denoiser
from tests.conftest import tiny_unet
from tests.pipelines import PROMPTS, SEQ, STEPS, tiny_pipeline

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads


@pytest.fixture(scope="module")
def sd():
    """(pipe, call kwargs without num_inference_steps): the tiny Stable Diffusion pipeline, guidance on."""
    pipe, kw = tiny_pipeline("sd")
    kw.pop("num_inference_steps")
    return pipe, kw


@pytest.fixture(scope="module")
def sd_data(sd):
    pipe, kw = sd
    return capture_calibration_data(pipe, STEPS, **kw, generator=torch.Generator().manual_seed(0))


class _Pipe:
    """A stand-in pipeline that calls its UNet with the given (sample, timestep) pairs and records its kwargs."""

    def __init__(self, unet, calls):
        self.unet, self.calls, self.received = unet, calls, []

    def __call__(self, **kwargs):
        self.received.append(kwargs)
        for sample, timestep in self.calls:
            self.unet(sample, timestep)


def _patched(module) -> bool:
    return "forward" in vars(module)


def test_one_step_per_timestep_with_the_values_the_scheduler_set():
    pipe, kw = tiny_pipeline("ddpm")
    steps = kw.pop("num_inference_steps")
    data = capture_calibration_data(pipe, steps, **kw, generator=torch.Generator().manual_seed(0))
    expected = DDIMScheduler.from_config(pipe.scheduler.config)
    expected.set_timesteps(steps)
    assert len(data) == steps == 3
    assert data.timesteps == [float(t) for t in expected.timesteps] == [float(t) for t in pipe.scheduler.timesteps]
    assert all(type(t) is float for t in data.timesteps)
    assert all(step.sample.shape == (PROMPTS, 1, 16, 16) and step.conditioning == {} for step in data.steps)
    # the first step's sample is the pipeline's initial noise, the later ones the latents the sampler produced
    noise = torch.randn((PROMPTS, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(data.steps[0].sample, noise, rtol=0, atol=0)
    assert not torch.allclose(data.steps[1].sample, data.steps[0].sample)
    two = capture_calibration_data(pipe, 2, **kw)
    expected.set_timesteps(2)
    assert two.timesteps == [float(t) for t in expected.timesteps] and two.timesteps != data.timesteps[:2]
    assert not _patched(pipe.unet)


def test_guidance_doubles_the_batch_with_the_unconditional_half_first(sd, sd_data):
    _, kw = sd
    for step in sd_data.steps:
        assert len(step) == 2 * PROMPTS
        torch.testing.assert_close(step.sample[:PROMPTS], step.sample[PROMPTS:], rtol=0, atol=0)  # cat([x] * 2)
        emb = step.conditioning["encoder_hidden_states"]
        torch.testing.assert_close(emb, torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]]), rtol=0, atol=0)
        assert set(step.conditioning) == {"encoder_hidden_states"}  # the timestep is the key, not an input


def test_without_guidance_only_the_conditional_batch_is_recorded(sd, sd_data):
    pipe, kw = sd
    data = capture_calibration_data(pipe, STEPS, **dict(kw, guidance_scale=1.0),
                                    generator=torch.Generator().manual_seed(0))
    assert data.timesteps == sd_data.timesteps
    for step in data.steps:
        assert len(step) == PROMPTS
        torch.testing.assert_close(step.conditioning["encoder_hidden_states"], kw["prompt_embeds"], rtol=0, atol=0)


@pytest.mark.parametrize("keep", [1, 3, 2 * PROMPTS, 100])
def test_samples_per_step_keeps_evenly_spaced_rows_of_the_whole_guided_batch(sd, sd_data, keep):
    pipe, kw = sd
    data = capture_calibration_data(pipe, STEPS, samples_per_step=keep, **kw,
                                    generator=torch.Generator().manual_seed(0))
    rows = evenly_spaced_rows(2 * PROMPTS, keep)
    assert rows.tolist() == {1: [0], 3: [0, 2, 3], 2 * PROMPTS: [0, 1, 2, 3], 100: [0, 1, 2, 3]}[keep]
    assert data.timesteps == sd_data.timesteps
    for kept, full in zip(data.steps, sd_data.steps):
        assert len(kept) == min(keep, 2 * PROMPTS)
        torch.testing.assert_close(kept.sample, full.sample[rows], rtol=0, atol=0)  # same noise, same call
        torch.testing.assert_close(kept.conditioning["encoder_hidden_states"],
                                   full.conditioning["encoder_hidden_states"][rows], rtol=0, atol=0)


def test_calls_are_concatenated_per_timestep_in_call_order(sd, sd_data):
    pipe, kw = sd
    g = torch.Generator().manual_seed(7)
    embeds = [torch.randn(n, SEQ, 32, generator=g) for n in (1, 2)]
    negatives = [torch.randn(n, SEQ, 32, generator=g) for n in (1, 2)]
    calls = [dict(kw, prompt_embeds=e, negative_prompt_embeds=n, generator=torch.Generator().manual_seed(10 + i))
             for i, (e, n) in enumerate(zip(embeds, negatives))]
    data = capture_calibration_data(pipe, STEPS, calls=calls)
    assert data.timesteps == sd_data.timesteps
    expected_emb = torch.cat([negatives[0], embeds[0], negatives[1], embeds[1]])  # each call: [uncond, cond]
    for step in data.steps:
        assert len(step) == 2 * 1 + 2 * 2
        torch.testing.assert_close(step.conditioning["encoder_hidden_states"], expected_emb, rtol=0, atol=0)
        torch.testing.assert_close(step.sample[0], step.sample[1], rtol=0, atol=0)      # call 0's halves
        torch.testing.assert_close(step.sample[2:4], step.sample[4:6], rtol=0, atol=0)  # call 1's halves
    first = data.steps[0].sample  # each call's own noise, in call order
    torch.testing.assert_close(first[:1], torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(10)),
                               rtol=0, atol=0)
    torch.testing.assert_close(first[2:4], torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(11)),
                               rtol=0, atol=0)


def test_the_pipeline_gets_the_steps_and_a_latent_output_unless_the_call_names_one():
    unet = tiny_unet()
    x = torch.randn(2, 1, 8, 8)
    pipe = _Pipe(unet, [(x, 10)])
    capture_calibration_data(pipe, 4, prompt="a cat")
    capture_calibration_data(pipe, 2, output_type="np")
    assert pipe.received == [dict(num_inference_steps=4, output_type="latent", prompt="a cat"),
                             dict(num_inference_steps=2, output_type="np")]


def test_a_timestep_called_twice_in_one_run_is_one_step_with_both_batches():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 1, 8, 8, generator=g) for _ in range(3))
    # e.g. Heun's second order step calls the denoiser twice at a timestep; a 0-d tensor and an int are both keys
    data = capture_calibration_data(_Pipe(unet, [(a, torch.tensor(10.0)), (b, 10), (c, torch.tensor([5.5, 5.5]))]), 3)
    assert data.timesteps == [10.0, 5.5]
    torch.testing.assert_close(data.steps[0].sample, torch.cat([a, b]), rtol=0, atol=0)
    torch.testing.assert_close(data.steps[1].sample, c, rtol=0, atol=0)
    assert not _patched(unet)


def test_a_pipeline_that_never_calls_its_denoiser_is_an_error():
    unet = tiny_unet()
    pipe = _Pipe(unet, [])
    with pytest.raises(ValueError, match=r"_Pipe never called its unet during capture"):
        capture_calibration_data(pipe, 3)
    assert len(pipe.received) == 1 and not _patched(unet)  # it ran, and the UNet is itself again


def test_a_batch_mixing_timesteps_or_inputs_changing_between_calls_is_refused():
    unet = tiny_unet()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(TypeError, match=r"UNet2DModel call mixes timesteps \[5.0, 10.0\]: calibration keys every "
                                        r"batch by one timestep value"):
        capture_calibration_data(_Pipe(unet, [(x, torch.tensor([10.0, 5.0]))]), 1)
    assert not _patched(unet)
    with pytest.raises(TypeError, match=r"inputs changed between calls of one pipeline run \(\['sample'\]\)"):
        capture_calibration_data(_Pipe(unet, [(x, 10), (torch.randn(2, 1, 16, 16), 5)]), 2)
    assert not _patched(unet)


def test_arguments_are_checked_before_the_pipeline_runs():
    unet = tiny_unet()
    pipe = _Pipe(unet, [(torch.randn(2, 1, 8, 8), 10)])
    with pytest.raises(ValueError, match=r"got calls=\[...\] and keyword arguments \['guidance_scale', 'prompt'\]: put "
                                         r"every argument of a pipeline call into its dict"):
        capture_calibration_data(pipe, 3, calls=[dict(prompt="a")], prompt="b", guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"num_inference_steps must be >= 1, got 0"):
        capture_calibration_data(pipe, 0)
    with pytest.raises(ValueError, match=r"samples_per_step must be >= 1, got 0"):
        capture_calibration_data(pipe, 3, samples_per_step=0)
    with pytest.raises(ValueError, match=r"calls must be a non-empty list of dicts"):
        capture_calibration_data(pipe, 3, calls=["a cat"])
    with pytest.raises(ValueError, match=r"memory_budget_mib=1.0 needs store=<directory>"):
        capture_calibration_data(pipe, 3, memory_budget_mib=1.0)
    assert pipe.received == [] and not _patched(unet)


def test_an_already_quantized_pipeline_is_refused_before_it_runs():
    unet = tiny_unet()
    wrapped = as_diffusers_denoiser(export_unet(unet, sample_shape=(1, 1, 8, 8)), like=unet)
    pipe = _Pipe(wrapped, [(torch.randn(2, 1, 8, 8), 10)])
    with pytest.raises(ValueError, match=r"pipe.unet is already quantized: capture calibration data from the "
                                         r"floating-point pipeline"):
        capture_calibration_data(pipe, 3)
    assert pipe.received == [] and not _patched(wrapped)
