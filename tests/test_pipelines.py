"""`capture_calibration_data` + `quantize_pipeline` on every diffusers pipeline family, through the pipeline's own
`__call__` (guidance on where the pipeline has it), with tiny models built from configs (tests/pipelines.py)."""
import pytest
import torch

from diffusion_ao import (QuantizedDenoiser, capture_calibration_data, count_int8_kernels, quantize_denoiser,
                          quantize_pipeline)
from diffusion_ao.denoisers import denoiser_role
from tests.conftest import snr_db
from tests.pipelines import PIPELINE_KINDS, denoiser_of, tiny_pipeline

TORCH_THREADS = 2
GUIDED = {"sd", "sdxl", "dit", "pixart", "sd3"}  # classifier-free guidance doubles the denoiser's batch
# Image SNR of W8A8 vs FP from the same seed, measured 37-72 dB over the seven tiny pipelines (see the README);
# a broken path (a wrong input, a lost guidance half, FP weights in the graph) gives < 15 dB or an exception.
MIN_W8A8_IMAGE_SNR_DB = 25.0


def _images(pipe, call_kwargs, seed=0) -> torch.Tensor:
    return torch.as_tensor(pipe(**call_kwargs, generator=torch.Generator().manual_seed(seed)).images)


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
def test_w8a8_pipeline_runs_quantized_through_its_own_call(kind):
    pipe, kw = tiny_pipeline(kind)
    reference = _images(pipe, kw)
    model = denoiser_of(pipe)
    data = capture_calibration_data(pipe, **kw, generator=torch.Generator().manual_seed(1))
    scheduler_steps = len(data)
    assert scheduler_steps == kw["num_inference_steps"]
    assert len(data.steps[0]) == (4 if kind in GUIDED else 2)
    report = quantize_pipeline(pipe, "w8a8", data, compile=False, progress=False)
    wrapped = getattr(pipe, denoiser_role(pipe))
    assert isinstance(wrapped, QuantizedDenoiser) and wrapped.config is model.config
    assert wrapped.dtype == torch.float32 and wrapped.device.type == "cpu"
    quantized_layers = [d for d in report.quantizer.decisions if d.layer is not None]
    assert len(quantized_layers) >= 10
    images = _images(pipe, kw)
    assert images.shape == reference.shape and torch.isfinite(images).all()
    assert snr_db(reference, images) > MIN_W8A8_IMAGE_SNR_DB
    assert not torch.equal(images, reference)  # the quantized graph ran, not the FP model


def test_capture_records_both_guidance_halves_at_the_real_timesteps():
    pipe, kw = tiny_pipeline("sd")
    seen = []
    unet = pipe.unet
    forward = unet.forward

    def spy(sample, timestep, *args, **kwargs):
        seen.append((float(timestep), sample.clone()))
        return forward(sample, timestep, *args, **kwargs)

    unet.forward = spy
    pipe(**kw, generator=torch.Generator().manual_seed(3))
    del unet.forward
    data = capture_calibration_data(pipe, **kw, generator=torch.Generator().manual_seed(3))
    assert data.timesteps == [t for t, _ in seen]
    for step, (_, sample) in zip(data.steps, seen):
        torch.testing.assert_close(step.sample, sample, rtol=0, atol=0)  # same call, same kernels
        uncond, cond = step.conditioning["encoder_hidden_states"].chunk(2)
        assert not torch.allclose(uncond, cond)  # the negative and positive embeddings are both there
        assert step.sample.device.type == "cpu"
    halves = capture_calibration_data(pipe, samples_per_step=2, **kw)
    for step in halves.steps:  # rows 0 and 3: one unconditional, one conditional
        assert len(step) == 2
        emb = step.conditioning["encoder_hidden_states"]
        torch.testing.assert_close(emb[0], kw["negative_prompt_embeds"][0])
        torch.testing.assert_close(emb[1], kw["prompt_embeds"][1])


def test_flux_capture_keeps_shared_ids_and_the_pipelines_timestep_scale():
    pipe, kw = tiny_pipeline("flux")
    data = capture_calibration_data(pipe, **kw)
    step = data.steps[0]
    assert set(step.shared) == {"img_ids", "txt_ids"} and step.shared["img_ids"].dim() == 2
    assert set(step.conditioning) == {"encoder_hidden_states", "pooled_projections", "guidance"}
    assert max(data.timesteps) <= 1.0  # Flux's pipeline passes t / 1000; the key is what the denoiser receives


def test_sdxl_added_conditions_are_graph_inputs():
    pipe, kw = tiny_pipeline("sdxl")
    data = capture_calibration_data(pipe, **kw)
    assert {"added_cond_kwargs__text_embeds", "added_cond_kwargs__time_ids"} <= set(data.steps[0].conditioning)
    quantize_pipeline(pipe, "w8a8", data, compile=False, progress=False)
    assert pipe.unet.add_embedding.linear_1.in_features == 80  # read by the SDXL pipeline's _get_add_time_ids
    with pytest.raises(TypeError, match=r"lacks \['added_cond_kwargs__text_embeds', 'added_cond_kwargs__time_ids'\]"):
        pipe.unet(data.steps[0].sample, 10, encoder_hidden_states=data.steps[0].conditioning["encoder_hidden_states"])


@pytest.mark.parametrize("kind", ["sd", "dit"])  # dit: a module called twice (block 0's time embedding)
def test_compiled_pipeline_runs_on_int8_kernels(kind):
    pipe, kw = tiny_pipeline(kind)
    reference = _images(pipe, kw)
    data = capture_calibration_data(pipe, **kw)
    report = quantize_pipeline(pipe, "w8a8", data, progress=False)
    planned = report.quantizer.decisions
    linears = sum(d.layer is not None and "linear" in d.op for d in planned)
    convs = sum(d.layer is not None and "conv" in d.op for d in planned)
    counts = count_int8_kernels(_images, pipe, kw)
    assert counts["qlinear"] + counts["merged_linears"] == linears and counts["qconv"] == convs
    assert snr_db(reference, _images(pipe, kw)) > MIN_W8A8_IMAGE_SNR_DB


def test_quantized_wrapper_rejects_a_call_unlike_the_captured_one():
    pipe, kw = tiny_pipeline("pixart")
    data = capture_calibration_data(pipe, **kw)
    quantize_pipeline(pipe, "w8a8", data, compile=False, progress=False)
    step = data.steps[0]
    args = dict(encoder_hidden_states=step.conditioning["encoder_hidden_states"],
                encoder_attention_mask=step.conditioning["encoder_attention_mask"], timestep=step.timestep)
    pipe.transformer(step.sample, **args)  # as captured: fine
    with pytest.raises(TypeError, match=r"'encoder_hidden_states' has shape \(4, 4, 32\).*exported for \(batch, 8, 32\)"):
        pipe.transformer(step.sample, **{**args, "encoder_hidden_states": args["encoder_hidden_states"][:, :4],
                                         "encoder_attention_mask": args["encoder_attention_mask"][:, :4]})
    with pytest.raises(TypeError, match=r"lacks \['encoder_attention_mask'\]"):
        pipe.transformer(step.sample, **{**args, "encoder_attention_mask": None})
    with pytest.raises(TypeError, match=r"cross_attention_kwargs=\{'scale': 0.5\}.*only tensors"):
        pipe.transformer(step.sample, **args, cross_attention_kwargs={"scale": 0.5})


def _dit_calls(labels, kw):
    """One DiT pipeline call per label batch, each with its own generator."""
    return [dict(kw, class_labels=batch, generator=torch.Generator().manual_seed(10 + i))
            for i, batch in enumerate(labels)]


def test_several_calls_are_recorded_in_call_order():
    pipe, kw = tiny_pipeline("dit")
    steps = kw.pop("num_inference_steps")
    calls = _dit_calls([[1], [2, 3]], kw)
    data = capture_calibration_data(pipe, steps, calls=calls)
    parts = [capture_calibration_data(pipe, steps, **_dit_calls([[1], [2, 3]], kw)[i]) for i in range(2)]
    assert data.timesteps == parts[0].timesteps == parts[1].timesteps
    for step, first, second in zip(data.steps, parts[0].steps, parts[1].steps):
        assert len(step) == len(first) + len(second) == 6  # guidance doubles each call's batch
        torch.testing.assert_close(step.sample, torch.cat([first.sample, second.sample]), rtol=0, atol=0)
        assert step.conditioning["class_labels"].tolist() == [1, 1000, 2, 3, 1000, 1000]  # DiT: labels, then nulls
    with pytest.raises(ValueError, match=r"calls=\[...\] and keyword arguments \['guidance_scale'\]"):
        capture_calibration_data(pipe, calls=calls, guidance_scale=2.0)
    with pytest.raises(ValueError, match="calls must be a non-empty list of dicts"):
        capture_calibration_data(pipe, calls=[])
    with pytest.raises(ValueError, match="holds num_inference_steps: pass it to capture_calibration_data"):
        capture_calibration_data(pipe, calls=[dict(calls[0], num_inference_steps=steps)])


def test_calls_shared_by_ranks_need_their_own_generators():
    from diffusion_ao.calibration.capture import _check_calls_for_ranks

    own = [dict(generator=torch.Generator()), dict(generator=[torch.Generator()]), dict(latents=torch.zeros(1))]
    _check_calls_for_ranks(own, world_size=2)
    with pytest.raises(ValueError, match="1 pipeline call.*cannot be shared by 2 ranks"):
        _check_calls_for_ranks(own[:1], world_size=2)
    with pytest.raises(ValueError, match="call 1 has no generator"):
        _check_calls_for_ranks([own[0], dict(prompt="a cat")], world_size=2)
    shared = torch.Generator()
    with pytest.raises(ValueError, match="calls 0 and 2 share one generator"):
        _check_calls_for_ranks([dict(generator=shared), own[2], dict(generator=[torch.Generator(), shared])], 2)


def test_pipeline_errors_name_the_problem():
    class NoDenoiser:
        components = {"vae": None}

    with pytest.raises(ValueError, match=r"NoDenoiser has no denoiser.*`unet` or\s+`transformer`"):
        capture_calibration_data(NoDenoiser())
    pipe, kw = tiny_pipeline("dit")
    data = capture_calibration_data(pipe, **kw)
    quantize_pipeline(pipe, "w8a8", data, compile=False, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        capture_calibration_data(pipe, **kw)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_pipeline(pipe, "w8a8", data, compile=False, progress=False)
    with pytest.raises(TypeError, match="no denoiser adapter for Linear.*register_adapter"):
        quantize_denoiser(torch.nn.Linear(2, 2), data, "w8a8")


def test_saved_transformer_with_shared_inputs_loads_back_into_its_pipeline(tmp_path):
    from diffusion_ao import as_diffusers_denoiser, load_quantized, save_quantized
    from diffusion_ao.graph import call_graph, graph_input_names

    pipe, kw = tiny_pipeline("flux")
    data = capture_calibration_data(pipe, **kw)
    model = pipe.transformer
    converted, _ = quantize_denoiser(model, data, "w8a8", progress=False)
    pipe.transformer = as_diffusers_denoiser(converted, like=model)
    expected = _images(pipe, kw)
    save_quantized(converted, tmp_path / "flux-w8a8")
    loaded = load_quantized(tmp_path / "flux-w8a8")
    assert graph_input_names(loaded) == graph_input_names(converted)
    inputs = data.steps[1].graph_inputs()
    assert torch.equal(call_graph(loaded, inputs, graph_input_names(loaded)),
                       call_graph(converted, inputs, graph_input_names(converted)))
    pipe.transformer = as_diffusers_denoiser(loaded, like=model)
    assert torch.equal(_images(pipe, kw), expected)  # same graph, same batch, same kernels


def test_each_transformers_temporal_information_block_is_found_in_its_graph():
    """What depends on the timestep alone: PixArt's whole adaLN-single modulation (cacheable exactly per timestep);
    in DiT (per block), SD3 and Flux only the timestep MLP, since their modulation also reads the class label,
    the pooled text or the guidance."""
    from diffusion_ao import export_denoiser
    from diffusion_ao.passes.temporal import find_temporal_blocks

    found = {}
    for kind in ("dit", "pixart", "sd3", "flux"):
        pipe, kw = tiny_pipeline(kind)
        data = capture_calibration_data(pipe, **kw)
        found[kind] = set(find_temporal_blocks(export_denoiser(pipe.transformer, data.steps[0])).module_paths)
    mlp = {"timestep_embedder.linear_1", "timestep_embedder.linear_2"}
    assert found["pixart"] == {f"adaln_single.emb.{m}" for m in mlp} | {"adaln_single.linear"}
    assert found["dit"] == {f"transformer_blocks.{i}.norm1.emb.{m}" for i in (0, 1) for m in mlp}
    assert found["sd3"] == found["flux"] == {f"time_text_embed.{m}" for m in mlp}


def test_dit_modulation_is_cached_per_timestep_and_label():
    import dataclasses

    from diffusion_ao import QuantConfig
    from diffusion_ao.config import TFMQConfig

    pipe, kw = tiny_pipeline("dit")
    reference = _images(pipe, kw)
    data = capture_calibration_data(pipe, **kw)
    config = dataclasses.replace(QuantConfig.preset("tfmq-w4a8"),
                                 tfmq=TFMQConfig(cache="all", cache_class_labels=True, cache_budget_bytes=1 << 20))
    report = quantize_pipeline(pipe, config, data, compile=False, progress=False)
    cache = report.tfmq.cache
    assert cache.labels == [1, 2, 1000]  # the two prompts' labels and DiTPipeline's null label
    assert {"transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear", "proj_out_1"} <= set(
        cache.removed_layers)  # the whole adaLN-Zero modulation left the graph
    # measured 23.1 dB (W4A8 elsewhere; the per-timestep cache of tfmq-w4a8 gives 20.3); wrong rows give noise
    assert snr_db(reference, _images(pipe, kw)) > 15
    with pytest.raises(ValueError, match=r"Class label\(s\) \[5\] are not in the set"):
        pipe(**{**kw, "class_labels": [5, 2]})


def _small_budget(preset: str):
    """The preset with its learned methods on a test-sized budget (same code paths)."""
    import dataclasses

    from diffusion_ao import QuantConfig
    from diffusion_ao.config import ReconstructionConfig

    config = QuantConfig.preset(preset)
    if config.dmq is not None:
        config = dataclasses.replace(config, dmq=dataclasses.replace(config.dmq, les_iterations=20,
                                                                     weighting_iterations=1))
    if config.qdiff is not None:
        config = dataclasses.replace(config, qdiff=dataclasses.replace(
            config.qdiff, reconstruction=ReconstructionConfig(iterations=20, max_samples=16)))
    return config


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_every_method_runs_on_diffusion_transformers(kind):
    """LES/PTS + timestep weights, the TFMQ cache/FSC/selection, and shortcut splitting + block reconstruction per
    transformer block, through the pipeline; each at least as close to FP as noise would be far from it."""
    pipe, kw = tiny_pipeline(kind)
    reference = _images(pipe, kw)
    data = capture_calibration_data(pipe, **kw)
    model = denoiser_of(pipe)
    reports = {}
    for preset in ("dmq-w4a8", "tfmq-w4a8", "qdiff-w4a8"):
        report = quantize_pipeline(pipe, _small_budget(preset), data, compile=False, progress=False)
        reports[preset] = report
        # measured 19-29 dB at full budget (README); an unquantized or broken graph gives inf or < 10
        assert 12 < snr_db(reference, _images(pipe, kw)) < 80
        pipe.transformer = model
    assert reports["dmq-w4a8"].les and reports["dmq-w4a8"].timestep_weights
    assert reports["tfmq-w4a8"].tfmq.fsc_pairs["int8"] > 0 and reports["tfmq-w4a8"].tfmq.selection
    blocks = [b.name for b in reports["qdiff-w4a8"].reconstruction.blocks]
    assert {"transformer_blocks.0", "transformer_blocks.1"} <= set(blocks)


def test_pixart_timestep_cache_is_the_fp_modulation_bit_for_bit():
    from diffusion_ao import export_denoiser
    from diffusion_ao.graph import call_graph, graph_input_names
    from diffusion_ao.passes.temporal_cache import cache_temporal_features

    pipe, kw = tiny_pipeline("pixart")
    data = capture_calibration_data(pipe, **kw)
    reference, cached = (export_denoiser(pipe.transformer, data.steps[0]) for _ in range(2))
    info = cache_temporal_features(cached, data.timesteps)
    assert set(info.removed_layers) == {"adaln_single.emb.timestep_embedder.linear_1",
                                        "adaln_single.emb.timestep_embedder.linear_2", "adaln_single.linear"}
    names = graph_input_names(reference)
    for step in data.steps:  # batch 2, one timestep: the batch the cache was computed with
        inputs = step.graph_inputs(0, 2)
        assert torch.equal(call_graph(cached, inputs, names), call_graph(reference, inputs, names))


@pytest.mark.parametrize("kind", ["pixart", "sd3", "flux"])
def test_the_recommended_recipes_are_no_worse_than_plain_quantization_on_text_conditioned_transformers(kind):
    """best-w4a8 / best-w4a6 through `quantize_pipeline` and the pipeline's own call, against w4a8 / w4a6 on the
    same calibration: the image SNR vs FP is no lower (0.5 dB of slack for kernels that round differently)."""
    pipe, kw = tiny_pipeline(kind)
    reference = _images(pipe, kw)
    data = capture_calibration_data(pipe, **kw, generator=torch.Generator().manual_seed(1))
    model = denoiser_of(pipe)
    snr, reports = {}, {}
    for preset in ("w4a8", "best-w4a8", "w4a6", "best-w4a6"):
        reports[preset] = quantize_pipeline(pipe, _small_budget(preset), data, compile=False, progress=False)
        snr[preset] = snr_db(reference, _images(pipe, kw))
        setattr(pipe, denoiser_role(pipe), model)
    assert all(10 < s < 80 for s in snr.values()), snr  # quantized (not inf), not broken (< 10 dB)
    for bits in ("w4a8", "w4a6"):
        assert snr[f"best-{bits}"] >= snr[bits] - 0.5, snr
        choices = reports[f"best-{bits}"].choices()
        assert "timestep cache" in choices["modulation cache"]  # text-conditioned: no label table to cache
