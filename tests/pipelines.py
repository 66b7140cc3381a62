"""Tiny diffusers pipelines for tests, built entirely from configs (random weights, no downloads).

`tiny_pipeline(kind)` returns `(pipe, call_kwargs)`; `pipe(**call_kwargs, generator=torch.Generator().manual_seed(0))`
generates a small `np` image batch in about 0.1 s on CPU. Weights and the text embeddings in
`call_kwargs` are seeded inside the builders, so two builds of one kind are identical and every call is
deterministic given the caller's generator.

Text encoders and tokenizers are left out (None): every pipeline gets precomputed, seeded `prompt_embeds` (and
pooled / negative ones) instead, so no tokenizer files are needed. Text-conditioned kinds use two prompts with
classifier-free guidance on, so the denoiser sees a doubled batch of 4 (Flux uses distilled guidance: batch 2).
"""
from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, DDIMPipeline, DDIMScheduler, DiffusionPipeline, DiTPipeline,
                       DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       PixArtAlphaPipeline, PixArtTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)

PIPELINE_KINDS = ("ddpm", "sd", "sdxl", "dit", "pixart", "sd3", "flux")

PROMPTS = 2      # prompts per call (the latent batch); guidance doubles it for all kinds but "ddpm" and "flux"
SIZE = 32        # image height/width in pixels; every tiny VAE downsamples by 2, so latents are 16x16
STEPS = 3
SEQ = 8          # text tokens per prompt


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _vae(latent_channels: int = 4, **config) -> AutoencoderKL:
    """A two-level AutoencoderKL (downsampling factor 2); SD3/Flux style ones pass shift_factor & co in `config`."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=SIZE, **config)


def _sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _ddpm():
    from diffusion_ao.models import load_default_model
    unet, scheduler = load_default_model()
    return DDIMPipeline(unet=unet, scheduler=scheduler), dict(batch_size=PROMPTS)


def _sd():
    unet = UNet2DConditionModel(sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=_sd_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe, dict(prompt_embeds=_embeds(1, PROMPTS, SEQ, 32), negative_prompt_embeds=_embeds(2, PROMPTS, SEQ, 32),
                      height=SIZE, width=SIZE, guidance_scale=5.0)


def _sdxl():
    pooled, time_dim = 32, 8   # add_embedding input: pooled text embeds + 6 time ids x addition_time_embed_dim
    unet = UNet2DConditionModel(sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=pooled + 6 * time_dim)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=_sd_scheduler(), add_watermarker=False)
    return pipe, dict(prompt_embeds=_embeds(1, PROMPTS, SEQ, 64), negative_prompt_embeds=_embeds(2, PROMPTS, SEQ, 64),
                      pooled_prompt_embeds=_embeds(3, PROMPTS, pooled),
                      negative_pooled_prompt_embeds=_embeds(4, PROMPTS, pooled),
                      height=SIZE, width=SIZE, guidance_scale=5.0)


def _dit():
    # DiTPipeline hard-codes the null class 1000: the label table has num_embeds_ada_norm + 1 rows.
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=SIZE // 2, patch_size=2, num_embeds_ada_norm=1000)
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler())
    return pipe, dict(class_labels=[1, 2], guidance_scale=4.0)   # image size comes from transformer.config.sample_size


def _pixart():
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=16, caption_channels=32,
                                           sample_size=SIZE // 2, patch_size=2, use_additional_conditions=False)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=transformer,
                               scheduler=DDIMScheduler())
    mask = torch.ones(PROMPTS, SEQ, dtype=torch.long)
    mask[1, SEQ // 2:] = 0   # a padded second prompt, as a T5 tokenizer would give
    return pipe, dict(prompt_embeds=_embeds(1, PROMPTS, SEQ, 32), prompt_attention_mask=mask,
                      negative_prompt=None,   # defaults to "", which check_inputs refuses next to negative_prompt_embeds
                      negative_prompt_embeds=_embeds(2, PROMPTS, SEQ, 32), negative_prompt_attention_mask=mask.clone(),
                      height=SIZE, width=SIZE, guidance_scale=4.5,
                      use_resolution_binning=False)   # binning only knows sample sizes 32/64/128/256


def _sd3():
    transformer = SD3Transformer2DModel(sample_size=SIZE // 2, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32)
    vae = _vae(16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    return pipe, dict(prompt_embeds=_embeds(1, PROMPTS, SEQ, 32), negative_prompt_embeds=_embeds(2, PROMPTS, SEQ, 32),
                      pooled_prompt_embeds=_embeds(3, PROMPTS, 32), negative_pooled_prompt_embeds=_embeds(4, PROMPTS, 32),
                      height=SIZE, width=SIZE, guidance_scale=5.0)


def _flux():
    # in_channels = 4 x the VAE's latent channels: Flux packs 2x2 latent patches into tokens.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    vae = _vae(16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    return pipe, dict(prompt_embeds=_embeds(1, PROMPTS, SEQ, 32), pooled_prompt_embeds=_embeds(3, PROMPTS, 32),
                      height=SIZE, width=SIZE, guidance_scale=3.5)


_BUILDERS = dict(ddpm=_ddpm, sd=_sd, sdxl=_sdxl, dit=_dit, pixart=_pixart, sd3=_sd3, flux=_flux)


def tiny_pipeline(kind: str, seed: int = 0) -> tuple[DiffusionPipeline, dict]:
    """(pipe, call_kwargs) for one of PIPELINE_KINDS; `pipe(**call_kwargs)` returns a tiny `np` image batch.

    The caller adds `generator=...`. Weights are seeded with `seed` ("ddpm" loads the shipped model instead);
    all modules are in eval mode on CPU in float32.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {PIPELINE_KINDS}")
    torch.manual_seed(seed)
    pipe, call_kwargs = _BUILDERS[kind]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(call_kwargs, num_inference_steps=STEPS, output_type="np")


def denoiser_of(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The pipeline's denoising network: `pipe.unet` or `pipe.transformer`."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return getattr(pipe, name)
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
